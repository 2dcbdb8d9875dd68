"""saekit at real widths: randomly initialised models of GPT-2 small's shape (12 layers,
d_model 768, 12 heads) and of Llama 3.2 1B's grouped-query attention (d_model 2048, 32 query
heads over 8 key/value heads), written as Hugging Face folders (saekit.training.shaped_models)
and loaded by `saekit train --model PATH`, which trains an SAE at every hook_z and one
residual hook in one run. Then hook shapes, d_in, head attribution and the DFA identities.

A small token budget (2 steps of 128 activations from one fill of 10 sequences of 32 tokens)."""

import json

import pytest
import torch

from saekit import load_sae
from saekit.activations import hook_names
from saekit.attention import head_attribution
from saekit.cli import main
from saekit.models import load_model
from saekit.training.shaped_models import SHAPES, build
from tests.test_attention import _check_dfa_identity

ARGS = ["--expansion", "2", "-k", "16", "--batch-size", "128", "--total-tokens", "256", "--fill-tokens", "310",
        "--seq-len", "32", "--eval-tokens", "0", "--progress", "false"]


@pytest.fixture(scope="module", params=["gpt2-small", "llama-gqa"])
def trained(request, tmp_path_factory):
    """(shape, model, run folder, residual hook) after one `saekit train --model PATH` run."""
    shape = SHAPES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    path = build(request.param, root / "model")
    resid = f"blocks.{shape.n_layers - 1}.hook_resid_post"
    assert main(["train", "--model", str(path), "--hook", "blocks.*.attn.hook_z", "--hook", resid,
                 "--out", str(root / "run"), *ARGS]) == 0
    return shape, load_model(str(path)), root / "run", resid


def test_hook_shapes_and_d_in(trained):
    shape, model, run, resid = trained
    c = model.cfg
    assert (c.n_layers, c.d_model, c.n_heads, c.d_head) == (shape.n_layers, shape.d_model, shape.n_heads,
                                                           shape.d_head)
    names = hook_names(model)
    for layer in range(shape.n_layers):
        assert names[f"blocks.{layer}.attn.hook_z"] == (shape.n_heads, shape.d_head)
        assert names[f"blocks.{layer}.attn.hook_q"] == (shape.n_heads, shape.d_head)
        for kv in ("k", "v"):  # grouped-query attention: fewer key/value heads
            assert names[f"blocks.{layer}.attn.hook_{kv}"] == (shape.n_kv_heads, shape.d_head)
    assert names[resid] == (shape.d_model,)
    folders = sorted(p.name for p in run.iterdir() if p.is_dir())
    assert folders == sorted([f"blocks.{i}.attn.hook_z" for i in range(shape.n_layers)] + [resid])
    for name in folders:
        sae = load_sae(run / name)
        z = name.endswith("hook_z")
        assert sae.cfg.hook_name == name and sae.cfg.model_name.endswith("model")
        assert sae.cfg.d_in == (shape.n_heads * shape.d_head if z else shape.d_model) == shape.d_model
        assert tuple(sae.cfg.hook_shape) == ((shape.n_heads, shape.d_head) if z else (shape.d_model,))
        assert sae.cfg.d_sae == 2 * sae.cfg.d_in and sae.W_dec.shape == (sae.cfg.d_sae, sae.cfg.d_in)
        assert [json.loads(l)["step"] for l in (run / name / "metrics.jsonl").read_text().splitlines()][-1] == 2


def test_head_attribution_at_real_width(trained):
    shape, model, run, _ = trained
    sae = load_sae(run / f"blocks.{shape.n_layers - 1}.attn.hook_z")
    share = head_attribution(sae, model)  # [d_sae, n_heads]
    assert share.shape == (sae.cfg.d_sae, shape.n_heads)
    torch.testing.assert_close(share.sum(1), torch.ones(sae.cfg.d_sae))
    for i in (0, sae.cfg.d_sae - 1):
        blocks = sae.W_dec[i].detach().reshape(shape.n_heads, shape.d_head)  # head-major, as hook_z flattens
        torch.testing.assert_close(share[i], blocks.norm(dim=1) / blocks.norm(dim=1).sum())


@pytest.mark.filterwarnings("error:hook_z differs")  # z == pattern @ v at every head, kv heads shared or not
def test_dfa_identities_at_real_width(trained):
    """By head and by source (query heads that share a key/value head read the same v, each
    weighted by its own pattern), both sum to the encoder projection, and with the bias to
    the pre-activation harvested independently; at the first and the last layer."""
    shape, model, run, _ = trained
    tokens = model.to_tokens("When Mary and John went to the store, John gave a drink to")[0]
    for layer in sorted({0, shape.n_layers - 1}):
        sae = load_sae(run / f"blocks.{layer}.attn.hook_z")
        _check_dfa_identity(model, sae, tokens, latents=[0, sae.cfg.d_sae // 2], dests=[len(tokens) - 1])
