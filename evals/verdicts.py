"""The verdict of a claim of `saekit bench papers`, from the signs of its told comparisons.

Its own module so that every experiment module (evals/papers.py, evals/papers_attn.py) reads the
same rule without importing the suite, which imports them.
"""

from __future__ import annotations


def verdict(signs: list[int]) -> str:
    """From the told comparisons' signs (+1 the claim's way, −1 against, 0 not told)."""
    if any(s < 0 for s in signs):
        return "does not hold"
    if any(s > 0 for s in signs):
        return "holds"
    return "cannot be told at this scale"
