"""Many hooks, one forward: the SAEs equal those of separate single-hook runs."""

import pytest
import torch

from saekit import load_sae
from saekit.cli import build_parser, main

ARGS = ["--d-sae", "128", "-k", "4", "--batch-size", "512", "--fill-tokens", "4064", "--seq-len", "128",
        "--total-tokens", "6144", "--warmup-steps", "3", "--eval-tokens", "0", "--progress", "false"]


@pytest.mark.parametrize("sparsity", ["topk", "jumprelu", "gated", "matryoshka"])
def test_many_hooks_equal_separate_single_hook_runs(tmp_path, sparsity):
    args = [*ARGS, "--sparsity", sparsity]
    assert main(["train", "--out", str(tmp_path / "many"), "--hook", "blocks.[24].attn.hook_z",
                 "--hook", "blocks.0.hook_resid_post", *args]) == 0
    hooks = sorted(p.name for p in (tmp_path / "many").iterdir() if p.is_dir())
    assert hooks == ["blocks.0.hook_resid_post", "blocks.2.attn.hook_z", "blocks.4.attn.hook_z"]
    for h in ("blocks.0.hook_resid_post", "blocks.4.attn.hook_z"):
        assert main(["train", "--out", str(tmp_path / h), "--hook", h, *args]) == 0
        a, b = load_sae(tmp_path / h), load_sae(tmp_path / "many" / h)
        assert a.cfg.hook_name == b.cfg.hook_name == h and a.cfg.sparsity == b.cfg.sparsity == sparsity
        a, b = a.state_dict(), b.state_dict()  # every tensor, the architecture's own parameters included
        assert a.keys() == b.keys()
        for n in a:
            assert torch.equal(a[n], b[n]), (h, n)


def test_patterns_expand_in_forward_order(model):
    from saekit.activations import resolve_hooks

    names = [h.name for h in resolve_hooks(model, "blocks.*.attn.hook_z")]
    assert names == [f"blocks.{i}.attn.hook_z" for i in range(model.cfg.n_layers)]
    assert [h.name for h in resolve_hooks(model, "blocks.1.hook_mlp_out, blocks.1.hook_mlp_out")] == [
        "blocks.1.hook_mlp_out"]


def test_harvest_many_equals_one_hook_at_a_time(model):
    from saekit.activations import harvest, harvest_many, resolve_hooks

    tokens = torch.randint(0, 100, (2, 16))
    hooks = resolve_hooks(model, "blocks.1.attn.hook_z,blocks.3.hook_resid_post")
    many = harvest_many(model, tokens, hooks)
    for h in hooks:
        assert torch.equal(many[h.name], harvest(model, tokens, h))


def test_repeated_hook_options_are_joined():
    def hook(*argv):
        return build_parser().parse_args(["train", *argv]).train.data.hook

    assert hook("--hook", "a", "-k", "4", "--hook=b") == "a,b"
    assert hook("--hook", "blocks.5.attn.hook_z", "--hook", "c") == "blocks.5.attn.hook_z,c"  # the default, given
    assert hook("--hook", "a") == "a" and type(hook("--hook", "a")) is str
    assert hook() == "blocks.5.attn.hook_z"
