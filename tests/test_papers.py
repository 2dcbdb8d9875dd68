"""`saekit bench papers` (evals/papers.py): the deciding rules, and the suite end to end at toy sizes."""

import json
import math
import re
from dataclasses import replace

import pytest
import torch

from saekit.errors import ConfigError
from saekit.evals.papers import (PapersOptions, frontier_signs, interpolate, quick_budget_for_tests, run_papers,
                                 separated, verdict, zipf_fit)


def test_seeds_tell_a_difference_only_when_they_do_not_overlap():
    assert separated([0.9, 0.8, 0.85], [0.7, 0.75, 0.6], 3) == 1
    assert separated([0.7, 0.75, 0.6], [0.9, 0.8, 0.85], 3) == -1
    assert separated([0.9, 0.7, 0.85], [0.8, 0.75, 0.6], 3) == 0  # 0.7 < 0.8: overlap
    assert separated([0.9, 0.8], [0.1, 0.2], 3) == 0  # too few seeds to tell


def test_a_claim_holds_only_on_told_comparisons_and_fails_on_one_against():
    assert verdict([1, 0, 1]) == "holds"
    assert verdict([1, -1, 1]) == "does not hold"
    assert verdict([0, 0]) == "cannot be told at this scale"
    assert verdict([]) == "cannot be told at this scale"


def test_frontiers_are_compared_at_shared_l0_in_log_space():
    assert interpolate([(8, 0.5), (32, 0.7)], 16) == pytest.approx(0.6)  # halfway in log L0
    assert interpolate([(8, 0.5), (32, 0.7)], 64) is None
    better = [(8, 0.60), (16, 0.70), (32, 0.80)]
    worse = [(10, 0.55), (20, 0.66), (40, 0.70)]
    # shared range 10..32: at 10, 16, 20 and 32 the first curve is ahead by more than 0.01
    assert frontier_signs(better, worse, noise=0.01) == [1, 1, 1, 1]
    assert frontier_signs(worse, better, noise=0.01) == [-1, -1, -1, -1]
    assert frontier_signs(better, better, noise=0.01) == [0, 0, 0]


def test_zipf_fit_recovers_a_power_law():
    f = torch.arange(1, 200, dtype=torch.float64) ** -1.3
    fit = zipf_fit(f)
    assert fit["zipf_slope"] == pytest.approx(-1.3) and fit["zipf_r2"] == pytest.approx(1.0)
    assert math.isnan(zipf_fit(f[:2])["zipf_slope"])


def test_unknown_experiments_are_refused():
    subset = "frontier, dead, gsae, ioi, attn"
    with pytest.raises(ConfigError, match=f"--experiments takes a comma-separated subset of {subset}"):
        PapersOptions(experiments="frontier,iio")


def test_the_suite_end_to_end_at_toy_sizes(tmp_path):
    """`--quick`'s code path at toy sizes: every experiment trains, scores and judges, and
    results.md's verdicts are the rule applied to the recorded comparisons. (``attn`` trains
    an SAE a layer; tests/test_papers_attn.py runs it on two layers.)"""
    out = tmp_path / "papers"
    results = run_papers(PapersOptions(quick=True, out=str(out), experiments="frontier,dead,gsae"),
                         quick_budget_for_tests(), log=lambda *_: None)
    assert set(results) == {"frontier", "dead", "gsae"}
    # frontier: topk at 2 L0s, standard at 2 penalty weights (the extra TopK seed is not a row)
    assert [r["arch"] for r in results["frontier"]["rows"]] == ["topk"] * 2 + ["standard"] * 2
    assert [r["L0"] for r in results["frontier"]["rows"][:2]] == [4.0, 8.0]
    assert len(results["dead"]["rows"]) == 4 and len(results["gsae"]["rows"]) == 4
    claims = [c for r in results.values() for c in r["claims"]]
    assert {c["experiment"] for c in claims} == {"frontier", "dead", "gsae"}
    for c in claims:
        assert c["verdict"] == verdict(c["signs"])
    for r in results["gsae"]["rows"]:
        assert r["steering KL"] > 0 and r["L0"] == pytest.approx(4.0)
    md = (out / "results.md").read_text()
    table = md.split("## Verdicts")[1].split("##")[0]
    assert len(re.findall(r"^\| (frontier|dead|gsae) \|", table, flags=re.M)) == len(claims)
    assert "## g-SAE against TopK" in md and "## Dead and under-used latents" in md
    assert "<h2>Verdicts</h2>" in (out / "results.html").read_text()
    assert sorted(p.name for p in (out / "runs").iterdir())[0].endswith("-seed0")
    # every run warms up over the budget's share of its steps (toy: 10% of 8 steps -> 1), not saekit's 100
    budget = quick_budget_for_tests()
    assert budget.warmup_steps() == 1 and replace(budget, tokens=507_904, batch_size=4096).warmup_steps() == 12
    for run in (out / "runs").iterdir():
        assert json.loads((run / "train_config.json").read_text())["optim"]["warmup_steps"] == 1, run.name
    assert re.search(r"minutes \(frontier \d+\.\d, dead \d+\.\d, gsae \d+\.\d\)\.", md)
    # the runs are reused only under the budget that made them
    with pytest.raises(ConfigError, match="holds runs made with another budget; pass another --out"):
        run_papers(PapersOptions(out=str(out)), log=lambda *_: None)
