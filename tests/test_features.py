"""saekit.evals.features and `saekit analyze`: the statistics agree with a direct recount,
survive a save/load round trip, and bad or stale files give one fixable message."""

import json

import pytest
import torch

from saekit.activations import harvest, resolve_hook
from saekit.cli import main
from saekit.errors import ConfigError, SAEFileError
from saekit.evals.features import (BEFORE, N_BINS, N_TOP, analyze, fingerprint, load_stats, prompt_lens,
                                   save_stats, stats_path)
from tests.app_helpers import PROMPT, make_sae
from tests.arch_helpers import ARCHITECTURES

N_TOKENS = 2 * 32 * 127  # two batches of 32 sequences


@pytest.fixture(scope="module")
def stats(model):
    return analyze(model, make_sae(), N_TOKENS, progress=False)


def test_statistics_match_a_direct_recount(model, stats):
    assert stats.meta["n_tokens"] == N_TOKENS
    check_recount(model, make_sae(), stats)
    assert stats.freq.sum().item() == pytest.approx(16, rel=1e-3)  # TopK: k latents per token


def check_recount(model, sae, stats, latents=(0, 17, 255)):
    """The statistics of ``sae`` agree with its own encoder run again on their sequences."""
    seqs = stats.sequences
    # recount over the sequences the top contexts use: every peak value is the latent's
    # activation at that position, and no other position of that sequence beats it
    hook = resolve_hook(model, sae.cfg.hook_name)
    f = sae.encode_dense(harvest(model, seqs.long(), hook)).view(len(seqs), seqs.shape[1] - 1, -1)  # [n, T-1, d_sae]
    for latent in latents:
        for j, c in enumerate(stats.contexts(latent)):
            s, p = int(stats.top_seq[latent, j]), int(stats.top_pos[latent, j])
            assert c.value == pytest.approx(f[s, p - 1, latent].item(), rel=1e-5)
            assert c.value == pytest.approx(f[s, :, latent].max().item(), rel=1e-5)
            assert c.acts[c.peak].item() == pytest.approx(c.value, rel=1e-3)  # float16 window
            assert c.tokens[c.peak] == int(seqs[s, p]) and len(c.prefix) == p + 1
        values = stats.top_values[latent]
        assert (values[:-1] >= values[1:]).all()  # strongest first
    counts = stats.freq * stats.meta["n_tokens"]
    torch.testing.assert_close(stats.hist.sum(1).float(), counts, rtol=0, atol=0.5)
    assert stats.hist.shape == (256, N_BINS)
    n_contexts = (stats.top_seq >= 0).sum(1)
    assert torch.equal(n_contexts > 0, counts > 0) and (n_contexts <= torch.clamp(counts, max=N_TOP)).all()
    assert sum(len(stats.contexts(i)) for i in latents) > 0  # the checks above saw some contexts


def test_head_attribution_and_logit_effects_are_stored(stats):
    assert stats.extra["head_attr"].shape == (256, 4)
    assert stats.extra["boosted_ids"].shape == (256, 10)
    assert (stats.extra["boosted_values"][:, 0] >= stats.extra["boosted_values"][:, -1]).all()


def test_save_load_round_trip_and_stale_detection(stats, tmp_path):
    save_stats(stats, tmp_path)
    back = load_stats(tmp_path, make_sae())
    for name in ("freq", "hist", "top_values", "top_acts", "sequences"):
        assert torch.equal(getattr(back, name), getattr(stats, name))
    assert back.contexts(3)[0].tokens == stats.contexts(3)[0].tokens
    summary = json.loads((stats_path(tmp_path).parent / "features.json").read_text())
    assert summary["sae_fingerprint"] == fingerprint(make_sae()) and summary["d_sae"] == 256
    with pytest.raises(SAEFileError, match="other SAE weights.*saekit analyze"):
        load_stats(tmp_path, make_sae(seed=1))
    stats_path(tmp_path).write_bytes(b"not safetensors")
    with pytest.raises(SAEFileError, match="unreadable.*saekit analyze"):
        load_stats(tmp_path)
    with pytest.raises(SAEFileError, match="no feature statistics.*saekit analyze --sae"):
        load_stats(tmp_path / "elsewhere")


@pytest.mark.parametrize("sparsity", [a for a in ARCHITECTURES if a != "topk"])
def test_every_variant_and_a_residual_sae(model, sparsity):
    sae = make_sae(sparsity=sparsity)  # batch-level ones with inference thresholds, as if trained
    s = analyze(model, sae, 1016, batch_seqs=8, progress=False)
    assert s.freq.max() > 0 and not sae.training
    check_recount(model, sae, s, latents=range(0, 256, 16))
    resid = make_sae(hook_name="blocks.2.hook_resid_post", hook_shape=(128,))
    r = analyze(model, resid, 1016, batch_seqs=8, progress=False)
    assert "boosted_ids" in r.extra and "head_attr" not in r.extra


def test_prompt_lens(model):
    lens = prompt_lens(model, make_sae(), PROMPT)
    assert lens.tokens[0] == "<|endoftext|>" and lens.tokens[-1] == " to"
    assert lens.acts.shape == (len(lens.tokens), 256) and (lens.acts[0] == 0).all()
    assert ((lens.acts[1:] > 0).sum(1) <= 16).all()
    with pytest.raises(ConfigError, match="empty"):
        prompt_lens(model, make_sae(), " ")


def test_window_starts_before_the_peak(stats):
    c = next(c for latent in range(256) for c in stats.contexts(latent) if len(c.prefix) > BEFORE + 1)
    assert c.peak == BEFORE


@pytest.fixture
def saekit_logger_restored():
    """``main`` sets up the "saekit" logger (a stderr handler, INFO, no propagation) for the
    process; undo that so later tests see logging as they would without this one."""
    import logging

    log = logging.getLogger("saekit")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]


def test_analyze_command(tmp_path, capsys, saekit_logger_restored):
    make_sae().save(tmp_path / "sae")
    assert main(["analyze", "--sae", str(tmp_path / "sae"), "--tokens", "2000", "--noprogress"]) == 0
    assert "latents fire" in capsys.readouterr().out
    assert load_stats(tmp_path / "sae", make_sae()).meta["n_tokens"] >= 2000
    assert main(["analyze", "--sae", str(tmp_path / "missing")]) == 2
    assert "no SAE folder" in capsys.readouterr().err
    assert main(["analyze", "--sae", str(tmp_path / "sae"), "--tokens", "0"]) == 2
    assert "--tokens must be positive" in capsys.readouterr().err
