"""--dtype (the model's, the activation buffer's and a cache's) and --sae-dtype (the SAE
step's): runs in bfloat16 train end to end, harvest what float32 harvests up to bf16
rounding, keep float32 master weights, and a cache keeps and reports its dtype.

Budgets are small: on a CPU without bf16 matmul units a bf16 forward is many times slower
than float32's (benchmarks/RESULTS.md, "Precision").
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from saekit import data, load_sae, precision
from saekit.activations import CachedActivations, harvest_many, resolve_hooks
from saekit.cli import main
from saekit.errors import ConfigError, DeviceError
from saekit.models import embedded_model_path, load_model, model_dtype
from saekit.sae import SAE
from saekit.training import TrainConfig, train_sae
from saekit.training.checkpoint import check_same_config
from saekit.training.config import DataOptions, OptimOptions, RunOptions
from saekit.training.trainer import Trainer
from saekit.types import SAEConfig
from tests.test_training import small_cfg, synthetic

U = 2.0**-8  # bf16's unit roundoff: 8 significant bits, round to nearest

# 8 steps of 254 over two fills of 8 sequences (127 activations each), a summary on 2 sequences
BF16_RUN = ["--hook", "blocks.5.attn.hook_z", "--d-sae", "256", "-k", "8", "--batch-size", "254",
            "--fill-tokens", "1016", "--seq-len", "128", "--total-tokens", "2032", "--warmup-steps", "2",
            "--eval-tokens", "254", "--progress", "false", "--log-every", "2", "--checkpoint-every", "4"]


@pytest.fixture(scope="module")
def bf16_model():
    return load_model(dtype="bfloat16")


def test_a_bf16_run_trains_end_to_end_from_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--dtype", "bfloat16", "--sae-dtype", "bfloat16", *BF16_RUN]) == 0
    assert "explained variance" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dtype"] == "bfloat16" and summary["sae_dtype"] == "bfloat16"
    assert 0 < summary["explained_variance"] <= 1 and summary["l0"] <= 8
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert rows[-1]["fvu"] < rows[0]["fvu"]  # it learns
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["data"]["dtype"] == "bfloat16" and cfg["optim"]["sae_dtype"] == "bfloat16"
    # master weights: the SAE's file, its parameters and Adam's moments stay float32
    assert {t.dtype for t in load_file(str(out / "sae.safetensors")).values()} == {torch.float32}
    assert {p.dtype for p in load_sae(out).parameters()} == {torch.float32}
    state = torch.load(out / "checkpoints" / "step_0000008.pt", weights_only=False)["state"]
    assert {t.dtype for m in state["opt"]["state"].values() for t in m.values() if t.numel() > 1} == {torch.float32}


def test_a_bf16_harvest_matches_the_fp32_harvest_within_bf16_rounding(model, bf16_model):
    """A bf16 forward rounds every weight and every op's output to 8 significant bits
    (relative error at most U = 2^-8 each). The embedding sum at blocks.0.hook_resid_pre takes
    three such roundings (the two weights and their sum, each at most U of its own value): the
    bound is 2U of the activations' norm (measured 0.6U). blocks.5.attn.hook_z is ~40
    roundings deep (five blocks of layer norms, products, softmax and sums); independent errors
    grow as their square root, sqrt(40)·U ≈ 6U, and the bound is 8U = 2^-5 (measured 2.6U
    on this data). Both are far below what a misaligned token (a relative error near 1) or
    another hook would give; the gap must not be 0 either (the forward ran in bf16)."""
    tokens = next(data.token_batches(model.tokenizer, None, 128, 4))
    hooks = resolve_hooks(model, "blocks.0.hook_resid_pre,blocks.5.attn.hook_z")
    ref = harvest_many(model, tokens, hooks)
    got = harvest_many(bf16_model, tokens, hooks, dtype=None)
    for hook, bound in (("blocks.0.hook_resid_pre", 2 * U), ("blocks.5.attn.hook_z", 8 * U)):
        a, b = ref[hook], got[hook]
        assert b.dtype == torch.bfloat16 and b.shape == a.shape == (4 * 127, a.shape[1])
        rel = ((b.float() - a).norm() / a.norm()).item()
        assert 0 < rel <= bound, (hook, rel / U)
        per_token = ((b.float() - a).norm(dim=1) / a.norm(dim=1)).max().item()
        assert per_token < 0.25, (hook, per_token)  # no token is off, not only the batch on average


def test_a_bf16_cache_round_trips_its_dtype(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["cache", "--out", str(cache), "--dtype", "bfloat16", "--fill-tokens", "1016", "--batch-size", "254",
                 "--total-tokens", "1016"]) == 0
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["n_shards"] == 1
    shard = load_file(str(cache / "shard_00000.safetensors"))["acts"]
    assert shard.dtype == torch.bfloat16 and shard.shape == (1016, 128)  # 2 bytes an entry: half of float32's
    source = CachedActivations(cache)
    assert source.dtype == torch.bfloat16 and torch.equal(source.fill(0).x, shard)
    # training reads it in its dtype (upcast at the step) and ends where training from the bf16 model does
    args = [*BF16_RUN, "--total-tokens", "1016", "--eval-tokens", "0"]  # one fill; the later options win
    assert main(["train", "--out", str(tmp_path / "a"), "--from-cache", str(cache), *args]) == 0
    assert main(["train", "--out", str(tmp_path / "b"), "--dtype", "bfloat16", *args]) == 0
    a, b = load_sae(tmp_path / "a"), load_sae(tmp_path / "b")
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.W_dec, b.W_dec)
    # a cache written before the dtype was recorded holds float32
    del meta["dtype"]
    (cache / "meta.json").write_text(json.dumps(meta))
    assert CachedActivations(cache).dtype == torch.float32


def test_computing_in_bf16_reads_bf16_copies_and_leaves_the_parameters():
    sae = SAE(SAEConfig(d_in=32, d_sae=128, k=4), seed=0)
    before = dict(sae.named_parameters())
    x = synthetic(n=64)
    with sae.computing_in(torch.bfloat16):
        assert sae.W_dec.dtype == sae.W_enc.dtype == sae.b_enc.dtype == torch.bfloat16
        x_hat = sae(x.bfloat16()).x_hat
    assert x_hat.dtype == torch.bfloat16
    (x_hat.float() - x).pow(2).sum().backward()
    assert dict(sae.named_parameters()) == before  # the same Parameter objects
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in sae.parameters())


def _one_step(sae_dtype: str, x: torch.Tensor) -> Trainer:
    cfg = TrainConfig(sae=SAEConfig(d_sae=256, sparsity="standard"),
                      optim=OptimOptions(lr=1e-3, warmup_steps=0, sae_dtype=sae_dtype),
                      data=DataOptions(batch_size=len(x), fill_tokens=len(x), total_tokens=len(x) * 10),
                      run=RunOptions(progress=False))
    t = Trainer(SAE(cfg.sae_for(x.shape[1], "", (), ""), seed=0), cfg, total_steps=10)
    t.train_step(x)
    return t


def test_the_bf16_step_computes_in_bf16_with_float32_master_weights():
    """One step of the same SAE on the same batch. The bf16 step rounds the products' inputs
    to 8 bits (relative error U each), so its gradients differ from float32's by a few U, and
    not by 0 (it did compute in bf16); measured 0.6-0.8U. The standard (ReLU) architecture
    keeps the comparison to rounding alone: a selection (TopK) may pick another latent where
    two pre-activations are within rounding of each other, which the next test covers by the
    result. Parameters, their gradients and Adam's moments are float32."""
    x = synthetic(n=1024)
    t32, t16 = _one_step("float32", x), _one_step("bfloat16", x)
    for (name, p32), p16 in zip(t32.sae.named_parameters(), t16.sae.parameters()):
        assert p16.dtype == p16.grad.dtype == torch.float32
        rel = ((p16.grad - p32.grad).norm() / p32.grad.norm()).item()
        assert 0 < rel < 4 * U, (name, rel / U)
    assert {t.dtype for m in t16.opt.state.values() for t in m.values() if t.numel() > 1} == {torch.float32}


def test_a_bf16_topk_run_ends_where_the_float32_run_does():
    """60 steps of TopK with AuxK on the same data from the same seed: the FVU they reach
    agrees to within 0.01 (measured: 0.18439 and 0.18438)."""
    x = synthetic()
    fvu = {}
    for sae_dtype in ("float32", "bfloat16"):
        cfg = small_cfg()
        cfg.optim = replace(cfg.optim, sae_dtype=sae_dtype)
        cfg.data = replace(cfg.data, total_tokens=256 * 60)
        sae = train_sae(x, cfg)
        with torch.no_grad():
            fvu[sae_dtype] = (((x - sae(x).x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()).item()
    assert fvu["float32"] < 0.5 and abs(fvu["bfloat16"] - fvu["float32"]) < 0.01, fvu


def test_auto_is_float32_on_cpu_and_the_configs_dtype_on_cuda(tmp_path):
    """Resolving ``--dtype auto`` reads the config only; no GPU is needed to check it."""
    embedded = str(embedded_model_path())
    assert model_dtype("auto", "cpu", embedded) == torch.float32
    assert model_dtype("auto", "cuda", embedded) == torch.float32  # its config says float32
    assert model_dtype("bfloat16", "cpu", embedded) == torch.bfloat16
    config = json.loads((embedded_model_path() / "config.json").read_text())
    for key, value, want in (("dtype", "bfloat16", torch.bfloat16), ("torch_dtype", "float16", torch.float16),
                             ("dtype", "float64", torch.float32), (None, None, torch.float32)):
        folder = tmp_path / f"{key}-{value}"
        folder.mkdir()
        c = {k: v for k, v in config.items() if k != "dtype"}
        if key:
            c[key] = value
        (folder / "config.json").write_text(json.dumps(c))
        assert model_dtype("auto", "cuda", str(folder)) == want, (key, value)
        assert model_dtype("auto", "cpu", str(folder)) == torch.float32


def test_a_dtype_the_device_cannot_run_is_one_line(monkeypatch, capsys, tmp_path):
    """A torch build without half-precision CPU kernels, simulated: its matmul raises as such
    a build's does. --dtype is refused before the model loads, --sae-dtype before step 1;
    from Python, load_model raises DeviceError."""
    def no_half(dtype, device):
        if dtype != torch.float32:
            raise NotImplementedError(f"\"addmm_impl_cpu_\" not implemented for '{dtype}'")
        return True

    monkeypatch.setattr(precision, "_matmul_probe", no_half)
    monkeypatch.setattr(precision, "_PROBED", {})
    assert main(["train", "--dtype", "float16", "--out", str(tmp_path / "a"), *BF16_RUN]) == 2
    assert capsys.readouterr().err == ("saekit train: error: --dtype float16: a float16 matmul does not run on cpu "
                                       "with this torch build (NotImplementedError); use --dtype float32\n")
    assert main(["train", "--sae-dtype", "bfloat16", "--out", str(tmp_path / "b"), *BF16_RUN]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == ("saekit train: error: --sae-dtype bfloat16: a bfloat16 matmul does not run on cpu with this "
                   "torch build (NotImplementedError); use --sae-dtype float32")
    assert not (tmp_path / "b" / "checkpoints").exists()
    with pytest.raises(DeviceError, match="--dtype bfloat16: a bfloat16 matmul does not run on cpu"):
        load_model(dtype=torch.bfloat16)


def test_a_checkpoint_from_before_the_dtype_options_resumes_with_the_defaults():
    cfg = TrainConfig()
    old = cfg.identity()
    del old["data"]["dtype"], old["optim"]["sae_dtype"]
    check_same_config(old, cfg)  # no error: the defaults are what ran
    with pytest.raises(ConfigError, match="optim.sae_dtype"):
        check_same_config(old, TrainConfig(optim=OptimOptions(sae_dtype="bfloat16")))


def test_ioi_readout_from_a_float32_residual_runs_in_a_bf16_model(model, bf16_model):
    """eval-ioi's patched runs start from the float32 residual stream at a layer
    (``resid_pre``) and continue in the model's dtype."""
    from saekit.evals import ioi_data as D
    from saekit.evals.nodes import Node, layer_acts, readout, resid_pre

    setup = D.setup_for(model)
    prompts = D.encode(model.tokenizer, D.eval_prompts(setup, 16, 1), setup)
    lds = []
    for m in (model, bf16_model):
        acts = layer_acts(m, prompts, 3, "end")
        lds.append(readout(m, prompts, Node(3, "end"), acts.mean(0).expand_as(acts), resid_pre(m, prompts, 3)).ld)
    assert lds[1].dtype == torch.float32 and (lds[1] - lds[0]).abs().max() < 0.1 * lds[0].abs().max()

