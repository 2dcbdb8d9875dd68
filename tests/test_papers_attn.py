"""Experiment ``attn`` of `saekit bench papers` (evals/papers_attn.py): its rules on hand-made
numbers, its induction test on a construction whose answer is known, and the experiment end to
end at toy sizes."""

import re
from dataclasses import replace

import pytest
import torch

from saekit.attention import dfa
from saekit.evals.papers import PapersOptions, quick_budget_for_tests, run_papers, verdict
from saekit.evals.papers_attn import (INDUCTION_MIN_FIRES, RELATIONS, SPAN, TOKEN_CLASSES, ce_signs, families,
                                      induction_scores, induction_signs, judge_head, points_to_source,
                                      polysemantic_signs, profile, relations, repeated_spans, source_attribution)
from saekit.sae import SAE, SAEConfig


def test_ce_rule_reads_the_threshold_and_the_noise():
    assert ce_signs([0.9, 0.8, 0.7], noise=0.0) == [1, 1, -1]  # no noise: below at all is against
    assert ce_signs([0.79, 0.77, 0.70], noise=0.02) == [0, -1, -1]  # 0.01 below is within the noise
    assert ce_signs([0.85], noise=0.5) == [1]
    assert verdict(ce_signs([0.9, 0.79], noise=0.02)) == "holds"
    assert verdict(ce_signs([0.9, 0.7], noise=0.02)) == "does not hold"


def _profile(cls: str, src_cls: str, rel: str, n: int = 10, stray: int = 0) -> torch.Tensor:
    """A latent whose top activations are all (cls, src_cls, rel), ``stray`` of them other."""
    c = torch.tensor([TOKEN_CLASSES.index(cls)] * (n - stray) + [TOKEN_CLASSES.index("other")] * stray)
    s = torch.tensor([TOKEN_CLASSES.index(src_cls)] * (n - stray) + [TOKEN_CLASSES.index("other")] * stray)
    r = torch.tensor([RELATIONS.index(rel)] * (n - stray) + [RELATIONS.index("far")] * stray)
    return profile(torch.ones(n), c, s, r)


def test_profiles_are_three_histograms():
    p = _profile("name", "bos", "bos", n=4, stray=1)
    assert p.shape == (2 * len(TOKEN_CLASSES) + len(RELATIONS),)
    assert p[TOKEN_CLASSES.index("name")] == pytest.approx(0.75)
    assert p.sum() == pytest.approx(3.0)


def test_a_head_with_two_unrelated_families_is_polysemantic():
    induction = [_profile("name", "name", "induction", stray=i) for i in range(3)]
    previous = [_profile("punctuation", "object", "previous", stray=i) for i in range(3)]
    fams, poly = judge_head(induction + previous)
    assert poly is True and fams == [[0, 1, 2], [3, 4, 5]]
    fams, poly = judge_head(induction + [_profile("name", "name", "induction", stray=1)] * 2)
    assert poly is False and fams == [[0, 1, 2, 3, 4]]
    # a lone odd latent is not a family
    fams, poly = judge_head(induction + [_profile("action", "place", "far")])
    assert poly is False and fams == [[0, 1, 2]]
    assert judge_head(induction) == ([], None)  # too few to judge
    assert families([]) == []


def test_polysemantic_and_induction_claims():
    assert polysemantic_signs([True, True, False]) == [1]
    assert polysemantic_signs([True, False]) == [-1]  # half is not most
    assert polysemantic_signs([]) == [0]
    assert verdict(polysemantic_signs([])) == "cannot be told at this scale"
    assert induction_signs(True) == [1] and induction_signs(False) == [-1]


def test_relations_take_the_first_rule_that_applies():
    a, b, c = 5, 6, 7
    toks = torch.tensor([[0, a, b, c, a, b] + [9] * 10 + [a]])
    cases = [(4, 0, "bos"), (4, 4, "self"), (4, 3, "previous"), (4, 1, "duplicate"), (4, 2, "induction"),
             (5, 1, "near"), (16, 3, "far"), (16, 2, "induction")]
    got = relations(toks.expand(len(cases), -1), torch.tensor([d for d, _, _ in cases]),
                    torch.tensor([s for _, s, _ in cases]))
    assert [RELATIONS[i] for i in got] == [r for _, _, r in cases]


def test_induction_latents_are_found_on_a_known_construction():
    """Latent 0 fires exactly on second occurrences; 1 on first and second alike; 2 on the second
    list's positions whatever they hold (it fires in the control too: an induction latent, not a
    token-matched one); 3 on second occurrences but too rarely to judge; 4 never."""
    n, d_sae = 6, 5
    first, second, control = (torch.zeros(n, SPAN, d_sae) for _ in range(3))
    second[..., 0] = 2.0
    first[..., 1] = second[..., 1] = 1.0
    second[..., 2] = control[..., 2] = 1.5
    second[0, : INDUCTION_MIN_FIRES - 1, 3] = 1.0
    sc = induction_scores(first, second, control)
    assert sc["induction"].tolist() == [True, False, True, False, False]
    assert sc["token_matched"].tolist() == [True, False, False, False, False]
    assert sc["share_first"][:3].tolist() == pytest.approx([1.0, 0.5, 1.0])
    assert sc["share_control"][:3].tolist() == pytest.approx([1.0, 1.0, 0.5])
    assert sc["fires"][0] == n * SPAN and sc["fires"][4] == 0


def test_points_to_source_reads_attention_and_the_largest_dfa_source():
    A = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.4, 0.1]])
    contrib = torch.tensor([[0.0, 2.0, 1.0], [3.0, 1.0, 0.0]])
    attn, top = points_to_source(A, contrib, torch.tensor([1, 1]))
    assert attn == pytest.approx(0.55) and top == pytest.approx(0.5)


def test_probe_sequences_repeat_the_list(model):
    tok = model.tokenizer
    probe, first, second = repeated_spans(tok, 4, seed=3)
    control, f2, s2 = repeated_spans(tok, 4, seed=3, repeat=False)
    assert torch.equal(first, f2) and torch.equal(second, s2) and len(first) == SPAN
    assert torch.equal(probe[:, first], probe[:, second]) and torch.equal(probe[:, first], control[:, first])
    assert torch.equal(probe[:, first + 1], probe[:, second + 1])  # the induction source holds the next token
    for row in control:
        assert not set(row[first].tolist()) & set(row[second].tolist())
    text = tok.decode(probe[0, 1:])
    assert text.startswith("The list was:") and ". Again, the list was:" in text
    assert tok.encode(text, add_special_tokens=False) == probe[0, 1:].tolist()


def test_source_attribution_is_dfa_by_source(model):
    n_heads, d_head, layer = model.cfg.n_heads, model.cfg.d_head, 2
    hook = f"blocks.{layer}.attn.hook_z"
    sae = SAE(SAEConfig(d_in=n_heads * d_head, d_sae=32, k=4, hook_name=hook, hook_shape=(n_heads, d_head)), seed=0)
    tokens = model.to_tokens("When Mary and John went to the store, John gave a drink to")[0]
    _, cache = model.run_with_cache(tokens[None], names_filter=[f"blocks.{layer}.attn.hook_pattern",
                                                                f"blocks.{layer}.attn.hook_v"])
    A, v = cache[f"blocks.{layer}.attn.hook_pattern"][0], cache[f"blocks.{layer}.attn.hook_v"][0]
    for latent, dest, head in ((3, 5, 0), (17, len(tokens) - 1, 2)):
        w = sae.W_enc[:, latent].detach().reshape(n_heads, d_head)[head]
        got = source_attribution(A[head, dest][None], v[:, head][None], w)[0]
        torch.testing.assert_close(got, dfa(model, sae, tokens, latent, dest).by_source[head], atol=1e-5, rtol=1e-4)


def test_exp_attn_end_to_end_at_toy_sizes(tmp_path):
    out = tmp_path / "papers"
    budget = replace(quick_budget_for_tests(), attn_layers=(0, 1))
    results = run_papers(PapersOptions(quick=True, out=str(out), experiments="attn"), budget, log=lambda *_: None)
    r = results["attn"]
    assert [row["layer"] for row in r["rows"]] == [0, 1]
    for row in r["rows"]:
        assert row["L0"] == pytest.approx(budget.attn_k) and 0 < row["CE recovered (mean abl.)"] <= 1.5
    assert len(r["claims"]) == 3 and {c["experiment"] for c in r["claims"]} == {"attn"}
    for c in r["claims"]:
        assert c["verdict"] == verdict(c["signs"]) and c["numbers"]
    assert len(r["claims"][0]["signs"]) == 2  # one per layer
    seeded = sorted(p.name for p in (out / "runs").iterdir())
    # seed 0 at each layer; the other seeds at the middle layer (1 of 0, 1) only when a layer is below 0.8
    below = any(row["CE recovered (mean abl.)"] < 0.8 for row in r["rows"])
    assert seeded == ["attn-L0-topk-k16-seed0", "attn-L1-topk-k16-seed0"] + ["attn-L1-topk-k16-seed1"] * below
    titles = [t[0] for t in r["tables"]]
    assert any("polysemantic heads" in t for t in titles) and any("induction latents" in t for t in titles)
    heads = next(rows for title, rows, _ in r["tables"] if "polysemantic heads" in title)
    assert [(h["layer"], h["head"]) for h in heads] == [(L, h) for L in (0, 1) for h in range(4)]
    assert len(r["figures"]) == 2
    # the activation caches hold no gradients (none are needed), one a layer
    assert sorted(p.name for p in (out / "caches").iterdir()) == ["blocks.0.attn.hook_z.acts",
                                                                  "blocks.1.attn.hook_z.acts"]
    md = (out / "results.md").read_text()
    table = md.split("## Verdicts")[1].split("##")[0]
    assert len(re.findall(r"^\| attn \|", table, flags=re.M)) == 3
    assert "## Attention-output SAEs: fidelity by layer" in md


def _head_pure_sae(model, layer: int, d_sae: int = 32) -> SAE:
    """A random hook_z SAE whose latent i writes from head i mod n_heads only."""
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    sae = SAE(SAEConfig(d_in=n_heads * d_head, d_sae=d_sae, k=4, hook_name=f"blocks.{layer}.attn.hook_z",
                        hook_shape=(n_heads, d_head)), seed=0)
    mask = torch.zeros(d_sae, n_heads, d_head)
    mask[torch.arange(d_sae), torch.arange(d_sae) % n_heads] = 1
    with torch.no_grad():
        sae.W_dec.mul_(mask.reshape(d_sae, -1))
    return sae


def test_head_rows_judge_the_well_attributed_latents(model):
    from saekit import data
    from saekit.attention import head_attribution
    from saekit.evals.papers_attn import TOP_PER_HEAD, _heads, token_classes

    sae = _head_pure_sae(model, layer=1)
    share = head_attribution(sae, model)
    text = data.heldout_sequences(model.tokenizer, None, 4, 128, 11)
    rows = _heads(model, sae, 1, text, share, token_classes(model.tokenizer))
    assert [r["head"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert r["latents attributed"] == 8 and r["judged"] <= min(8, TOP_PER_HEAD)
        assert r["polysemantic"] == ("too few to judge" if r["judged"] < 4 else "yes" if r["families"] >= 2 else "no")
    assert sum(r["judged"] for r in rows) >= 16  # random latents fire often at k = 4 of 32


def test_an_exact_second_occurrence_latent_reads_its_heads_attention(model, monkeypatch):
    """A latent made to fire on exactly the second occurrences (and never in the control) is an
    induction latent, and the attention reported for it is its head's mean attention from every
    second occurrence to the induction source."""
    import saekit.evals.papers_attn as pa

    layer = 1
    sae = _head_pure_sae(model, layer)
    probe, first, second = repeated_spans(model.tokenizer, 16, seed=0)
    control, _, _ = repeated_spans(model.tokenizer, 16, seed=0, repeat=False)
    calls = []

    def fake_codes(sae_, z):
        codes = torch.zeros(*z.shape[:2], sae_.cfg.d_sae)
        if not calls:  # the probe comes first, then the control
            codes[:, second, 2] = 1.0
        calls.append(1)
        return codes

    monkeypatch.setattr(pa, "_codes", fake_codes)
    share = pa._head_share(sae, model)
    latents, heads = pa._induction(model, sae, layer, share, probe, control, first, second)
    assert [r["latent"] for r in latents] == [2] and latents[0]["vs first"] == 1.0
    assert latents[0]["vs control"] == 1.0 and latents[0]["token-matched"] == "yes"
    assert latents[0]["decoder head"] == 2 and latents[0]["decoder share"] == pytest.approx(1.0)
    h = latents[0]["head"]  # the head of the largest DFA where it fires
    assert latents[0]["attention to induction source"] == pytest.approx(heads[h]["attention to induction source"])
    assert heads[h]["induction latents"] == 1 and sum(r["induction latents"] for r in heads) == 1
    assert 0 <= latents[0]["DFA top = induction source"] <= 1
