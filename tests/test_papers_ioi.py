"""`saekit bench papers --experiments ioi` (evals/papers_ioi.py): its rules on hand-made
numbers, and the experiment end to end at toy sizes."""

from dataclasses import replace

from saekit.evals.papers import PapersOptions, quick_budget_for_tests, run_papers, verdict
from saekit.evals.papers_ioi import judge


def _row(name, arch, data, role, s_small, s_large, f1, occluded="—", split=0, d_sae=64):
    return {"dictionary": name, "arch": arch, "trained on": data, "role": role, "d_sae": d_sae,
            "s edit @2": s_small, "s edit @16": s_large, "s best F1": f1, "occluded": occluded,
            "over-split values": split}


def _res(sup_acc):
    control = {a: {"accuracy": sup_acc, "changes_output": 0.9 if a == "s" else 0.1} for a in ("io", "s", "pos")}
    return {"supervised": {"mean": {"control": control}}}


def test_the_ioi_claims_follow_the_numbers_and_the_seeds():
    rows = [_row("topk-c", "topk", "corpus", "architecture", 0.40, 0.50, 0.60),
            _row("topk-c-seed1", "topk", "corpus", "seed", 0.42, 0.52, 0.62),  # noise 0.02 on every measure
            _row("topk-i", "topk", "IOI", "architecture", 0.30, 0.70, 0.61),
            _row("topk-i-seed1", "topk", "IOI", "seed", 0.31, 0.72, 0.59),
            _row("std-c", "standard", "corpus", "architecture", 0.10, 0.20, 0.30, occluded="io", d_sae=256),
            _row("std-c-seed1", "standard", "corpus", "seed", 0.10, 0.21, 0.31, d_sae=256),
            _row("std-i", "standard", "IOI", "architecture", 0.10, 0.10, 0.40, split=2),
            _row("std-i-seed1", "standard", "IOI", "seed", 0.10, 0.12, 0.41),
            _row("gated-c", "gated", "corpus", "architecture", 0.10, 0.10, 0.10),  # one seed a side: never told
            _row("gated-i", "gated", "IOI", "architecture", 0.10, 0.90, 0.90)]
    claims = judge(rows, _res(0.9), used=["s"], min_seeds=2)
    assert [c["signs"] for c in claims] == [
        [1] * 6,  # supervised 0.9 beats every SAE's (seed 0's) two-latent edit by more than the noise 0.02
        [1, -1, 0],  # 16-latent edits: topk 0.70-0.72 above 0.50-0.52; std 0.10-0.12 below 0.20-0.21; gated: one seed
        [0, 1, 0],  # F1: topk's seeds overlap (0.59-0.61 against 0.60-0.62); standard 0.40-0.41 above 0.30-0.31
        [1], [1]]  # occlusion and over-splitting are each seen in one SAE
    assert [c["verdict"] for c in claims] == ["holds", "does not hold", "holds", "holds", "holds"]
    assert "topk 0.710 (0.700–0.720)/0.510 (0.500–0.520)" in claims[1]["numbers"]
    # nothing used at the node: the control claims are not told; no phenomenon: they do not hold
    quiet = [_row("a", "topk", "corpus", "architecture", 0.4, 0.5, 0.6), _row("b", "topk", "IOI", "architecture",
                                                                             0.4, 0.5, 0.6)]
    claims = judge(quiet, _res(0.9), used=[], min_seeds=2)
    assert [c["verdict"] for c in claims] == ["cannot be told at this scale"] * 3 + ["does not hold"] * 2


def test_the_ioi_experiment_end_to_end_at_toy_sizes(tmp_path):
    out = tmp_path / "papers"
    budget = replace(quick_budget_for_tests(), seeds=2)
    results = run_papers(PapersOptions(quick=True, out=str(out), experiments="ioi"), budget, log=lambda *_: None)
    rows = results["ioi"]["rows"]
    names = [r["dictionary"] for r in rows]
    assert names[:2] == ["supervised (mean)", "supervised (lstsq)"]
    # TopK and the standard SAE on both data over two seeds, TopK at a second size on both
    assert {(r["arch"], r["trained on"], r["d_sae"]) for r in rows[2:]} == {
        ("topk", "corpus", 256), ("topk", "IOI", 256), ("standard", "corpus", 256), ("standard", "IOI", 256),
        ("topk", "corpus", 64), ("topk", "IOI", 64)}
    assert sum(r.get("role") == "seed" for r in rows) == 4
    assert all(0 <= r["s edit @16"] <= 1 and r["L0"] > 0 for r in rows[2:])
    claims = results["ioi"]["claims"]
    assert len(claims) == 5 and all(c["verdict"] == verdict(c["signs"]) for c in claims)
    md = (out / "results.md").read_text()
    assert "## Supervised IOI dictionaries and SAEs at L3.END" in md and md.count("| ioi |") == 5
    assert (out / "caches" / "blocks.3.attn.hook_z-ioi" / "meta.json").exists()
