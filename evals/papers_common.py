"""What the experiment modules of `saekit bench papers` share: the hooks, the penalty grid,
the seed rule of a comparison, and the verdict of a claim from the signs of its told comparisons.

Its own module so that every experiment module (evals/papers.py, evals/papers_ioi.py,
evals/papers_attn.py) reads the same rule without importing the suite, which imports them.
"""

from __future__ import annotations

ATTN_HOOK = "blocks.3.attn.hook_z"  # the IOI node where mean-ablating the hook costs something
RESID_HOOK = "blocks.3.hook_resid_post"
# The elementwise rules' penalty weights, a grid of four spanning L0 ~8-64 on the default job
# (the shipped SAEs' weights, 4M tokens: standard 0.8 -> L0 31, gated 0.6 -> 16, jumprelu
# 0.01 -> 25); the achieved L0 is measured, not assumed.
PENALTY_GRID = {"standard": ("l1_coef", (0.2, 0.4, 0.8, 1.6)),
                "gated": ("l1_coef", (0.15, 0.3, 0.6, 1.2)),
                "jumprelu": ("l0_coef", (0.0025, 0.005, 0.01, 0.02))}


def verdict(signs: list[int]) -> str:
    """From the told comparisons' signs (+1 the claim's way, −1 against, 0 not told)."""
    if any(s < 0 for s in signs):
        return "does not hold"
    if any(s > 0 for s in signs):
        return "holds"
    return "cannot be told at this scale"


def separated(a: list[float], b: list[float], min_seeds: int) -> int:
    """+1 when every value of ``a`` exceeds every value of ``b``, −1 the reverse, 0 when the
    seeds overlap or either side has fewer than ``min_seeds``."""
    if min(len(a), len(b)) < min_seeds:
        return 0
    return 1 if min(a) > max(b) else -1 if max(a) < min(b) else 0
