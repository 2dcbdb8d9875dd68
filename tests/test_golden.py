"""Golden tests: today's results on CPU, pinned bitwise, so that a refactor which changes
any of them fails here.

What is pinned (each case is one file ``tests/golden/<case>.safetensors``):

* ``train_<sparsity>``: 20 steps of ``train_sae`` on seeded synthetic activations (the
  final weights, the sparsifier's buffers, every step's logged metrics), for the default
  TopK with AuxK active (a small ``dead_tokens`` makes latents die within a few steps) and
  for g-TopK, Mutual Choice and Feature Choice (Zipf capacities, re-ranked every 5 steps);
* ``cli_train``: 20 steps of ``saekit train`` on the embedded model with tiny budgets: the
  saved ``sae.safetensors``, the last checkpoint's trainer state (dead-latent counters, Adam's
  moments: as SHA-256), the metrics, ``cfg.json`` and ``train_config.json``.
  ``test_resume_after_sigkill_ends_with_the_golden_run`` kills the same run after its step-12
  checkpoint, resumes it with ``--resume``, and compares the result with this golden;
* ``sparsifier_<case>_<data>``: each sparsifier's codes, auxiliary (AuxK) selections,
  gradients and buffers over three ``encode(..., update=True)`` calls in train mode, then its
  eval-mode codes (``sae(x)``, ``sae.encode(x)``), on float data and on small-integer data
  whose many exact ties exercise the tie rules;
* ``screen_<case>``: the bf16-screened selections (``impl="screen"``, kernels/screen.py and
  screen_batch.py) and the plain ``impl="torch"`` ones at a shape where the screen takes its
  grouped paths (d_sae 4100 leaves latents in no group of 8, B 260 leaves tokens in none).

How they are stored, compared (bitwise on the platform that made them, within a tolerance
elsewhere) and regenerated: tests/golden_files.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saekit.cli import main
from saekit.kernels import encode_topk, encode_topk_aux
from saekit.sae import SAE
from saekit.training import TrainConfig, train_sae
from saekit.training.config import DataOptions, OptimOptions, RunOptions
from saekit.training.losses import encode_with_aux
from saekit.types import SAEConfig, VariantOptions
from tests.golden_files import GOLDEN, GOLDEN_THREADS, check_golden, codes_tensors, metrics_tensors, tensor_diff


@pytest.fixture(autouse=True)
def _golden_threads():
    """Run every test here on GOLDEN_THREADS threads: the goldens' last bits depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(GOLDEN_THREADS)
    yield
    torch.set_num_threads(before)


# ---- training runs ---------------------------------------------------------------------------


def synthetic(n=4096, d=16, n_feat=128, k=4, seed=0):
    """Sparse sums of unit features, as tests/test_training.py's."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    idx = torch.randint(0, n_feat, (n, k), generator=g)
    coef = torch.rand(n, k, generator=g) * 2 + 0.5
    return (coef[..., None] * feats[idx]).sum(1)


def golden_cfg(sparsity: str, **variant) -> TrainConfig:
    """20 steps of 256 over fills of 2048 (2.5 fills, so the reader wraps into new fills);
    the default learning rate, Adam, AuxK (k_aux = d_in / 2 = 8) and schedule, with a warm-up
    and a decay that both fit in 20 steps; a latent is dead after one batch without firing,
    so AuxK trains, on more dead latents than k_aux at some steps (its selection matters)."""
    return TrainConfig(sae=SAEConfig(d_sae=256, k=4, sparsity=sparsity, variant=VariantOptions(**variant)),
                       optim=OptimOptions(warmup_steps=5, dead_tokens=256),
                       data=DataOptions(batch_size=256, fill_tokens=2048, total_tokens=256 * 20),
                       run=RunOptions(progress=False, log_every=1, checkpoint_every=1000))


TRAIN_CASES = {
    "topk": {},
    "gtopk": {"beta": 2.0},
    "mutual_choice": {},
    "feature_choice": {"capacity": "zipf", "rerank_every": 5},
}


@pytest.mark.parametrize("sparsity", list(TRAIN_CASES))
def test_train_sae_20_steps_matches_the_golden(sparsity, tmp_path):
    x = synthetic()
    grads = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) if sparsity == "gtopk" else None
    sae = train_sae(x, golden_cfg(sparsity, **TRAIN_CASES[sparsity]), grads=grads, out=str(tmp_path))
    metrics = metrics_tensors(tmp_path)
    assert len(metrics["metrics.step"]) == 20
    if sparsity != "feature_choice":  # (where no latent can die) the auxiliary loss must train
        n_dead = metrics["metrics.dead_frac"] * sae.cfg.d_sae
        assert bool((metrics["metrics.aux"] > 0).any()) and bool((n_dead > sae.cfg.d_in // 2).any())
    check_golden(f"train_{sparsity}", {**sae.state_dict(), **metrics})


# The `saekit train` run: 20 steps of 256 at blocks.5.attn.hook_z of the embedded model (half of
# tests/test_training.py's TINY budgets: the model's forward passes are most of the time), fills
# of 16 sequences of 127 (steps 0-6, 7-13, 14-19 read three fills), a checkpoint every 4 steps,
# latents dead after a batch without firing and AuxK on 16 of them, no summary (it evaluates the
# model, not the SAE).
CLI_ARGS = ["--hook", "blocks.5.attn.hook_z", "--d-sae", "256", "-k", "8", "--batch-size", "256",
            "--fill-tokens", "2032", "--seq-len", "128", "--total-tokens", "5120", "--warmup-steps", "5",
            "--eval-tokens", "0", "--dead-tokens", "256", "--k-aux", "16", "--checkpoint-every", "4",
            "--progress", "false", "--log-every", "1"]


def cli_run_golden(out: Path, write: bool) -> None:
    """Compare run folder ``out`` of CLI_ARGS with golden ``cli_train``."""
    tensors = {f"sae.{k}": v for k, v in load_file(str(out / "sae.safetensors")).items()}
    state = torch.load(out / "checkpoints" / "step_0000020.pt", weights_only=False)["state"]
    assert state["step"] == 20
    tensors["trainer.tokens_since_fired"] = state["tokens_since_fired"]
    tensors["trainer.freq"] = state["freq"]
    hashed = []
    params = [n for n, _ in SAE(SAEConfig(d_in=128, d_sae=256, k=8)).named_parameters()]  # Adam's order
    for i, moments in sorted(state["opt"]["state"].items()):
        for name, t in moments.items():
            key = f"adam.{params[i]}.{name}"
            tensors[key] = t
            if t.numel() > 1024:
                hashed.append(key)
    tensors |= metrics_tensors(out)
    train_config = json.loads((out / "train_config.json").read_text())
    train_config["run"].pop("out")  # the folder's path
    docs = {"cfg": json.loads((out / "cfg.json").read_text()), "train_config": train_config}
    check_golden("cli_train", tensors, docs, hashed=tuple(hashed), write=write)


def test_cli_train_20_steps_matches_the_golden(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *CLI_ARGS]) == 0
    capsys.readouterr()
    rows = metrics_tensors(out)
    assert bool((rows["metrics.aux"] > 0).any()) and bool((rows["metrics.dead_frac"] * 256 > 16).any())  # AuxK ran
    cli_run_golden(out, write=True)


# ---- a run killed and resumed ends as the golden run -----------------------------------------

# The subprocess runs on GOLDEN_THREADS threads too, so its arithmetic matches bit for bit.
SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(GOLDEN_THREADS)}


def test_resume_after_sigkill_ends_with_the_golden_run(tmp_path, capsys):
    """SIGKILL right after the step-12 checkpoint (mid-fill: the resumed run must re-read fill 1
    from its 6th batch), then ``--resume``: the same files as the uninterrupted golden run."""
    out = tmp_path / "run"
    log = tmp_path / "killed.log"
    with open(log, "w") as fh:
        p = subprocess.Popen([sys.executable, "-m", "saekit", "train", "--out", str(out), *CLI_ARGS],
                             stdout=fh, stderr=subprocess.STDOUT, env=SUBPROCESS_ENV)
    checksum = out / "checkpoints" / "step_0000012.sha256"  # written after the checkpoint itself
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not checksum.exists():
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert checksum.exists(), f"no step-12 checkpoint; the run's output:\n{log.read_text()[-3000:]}"
    assert not (out / "sae.safetensors").exists(), "the run finished before it could be killed"
    assert main(["train", "--out", str(out), "--resume", "true", *CLI_ARGS]) == 0
    capsys.readouterr()
    steps = metrics_tensors(out)["metrics.step"].tolist()
    assert steps == list(range(1, 21))  # the rows after step 12 were dropped and logged again once
    cli_run_golden(out, write=False)


# ---- each sparsifier on fixed inputs ---------------------------------------------------------


def data_for(kind: str, shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded float data, or small integers ("ties": exact sums with many equal values)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        return torch.randint(-2, 3, shape, generator=g).float()
    return torch.randn(shape, generator=g) * scale


def small_sae(sparsity: str, kind: str, d_in=16, d_sae=64, k=4, **variant) -> SAE:
    """An SAE with encoder, decoder and biases all distinct and seeded."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, sparsity=sparsity, variant=VariantOptions(**variant)), seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(data_for(kind, (d_in, d_sae), 1, d_in ** -0.5))
        sae.b_enc.copy_(data_for(kind, (d_sae,), 2, 0.2))
        sae.b_dec.copy_(data_for(kind, (d_in,), 3, 0.2))
    return sae


# (sparsity, variant, aux weights: "dead" (a 0/1 mask: AuxK), "graded" (aux_zipf-like) or None)
SPARSIFIER_CASES = {
    "topk_auxk": ("topk", {}, "dead"),
    "topk_graded_aux": ("topk", {}, "graded"),
    "gtopk": ("gtopk", {"beta": 2.0}, "dead"),
    "gtopk_no_norm": ("gtopk", {"beta": 2.0, "grad_norm": "none"}, None),
    "mutual_choice": ("mutual_choice", {}, "dead"),
    "mutual_choice_batch": ("mutual_choice", {"mc_mode": "batch"}, None),
    "feature_choice": ("feature_choice", {}, "dead"),
    "feature_choice_zipf": ("feature_choice", {"capacity": "zipf", "rerank_every": 2}, "dead"),
}


def aux_weights_for(kind: str | None, d_sae: int) -> torch.Tensor | None:
    if kind is None:
        return None
    w = torch.zeros(d_sae)
    if kind == "dead":
        w[torch.arange(3, d_sae, 4)] = 1.0  # every 4th latent is dead
    else:
        w[torch.arange(1, d_sae, 3)] = torch.linspace(0.1, 1.0, len(range(1, d_sae, 3)))
    return w


@pytest.mark.parametrize("data", ["float", "ties"])
@pytest.mark.parametrize("case", list(SPARSIFIER_CASES))
def test_sparsifier_codes_match_the_golden(case, data):
    sparsity, variant, aux_kind = SPARSIFIER_CASES[case]
    sae = small_sae(sparsity, data, **variant)
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    weights, k_aux = aux_weights_for(aux_kind, d_sae), 6
    got = {}
    sae.train()
    for step in range(3):  # three updates: the thresholds' EMA past its first value; zipf re-ranks
        x = data_for(data, (48, d_in), 10 + step)
        grad = data_for("float", (48, d_in), 20 + step)
        enc = encode_with_aux(sae, x, grad, weights, k_aux if weights is not None else 0, update=True)
        got |= codes_tensors(f"train{step}.codes", enc.codes)
        if enc.aux is not None:
            got |= codes_tensors(f"train{step}.aux", enc.aux)
        assert (enc.aux is None) == (weights is None)
        # the sparse backward of both selections (a reconstruction loss and an AuxK-like term)
        loss = ((sae.decode(enc.codes) - x) ** 2).sum()
        if enc.aux is not None:
            loss = loss + (enc.aux.values * torch.arange(1, k_aux + 1)).sum()
        loss.backward()  # accumulates: the gradients below hold all three backward passes
        got |= {f"train{step}.buffer.{n}": b.clone() for n, b in sae.sparsifier.named_buffers()}
    got |= {"grad.W_enc": sae.W_enc_T.grad.t(), "grad.b_enc": sae.b_enc.grad, "grad.W_dec": sae.W_dec.grad,
            "grad.b_dec": sae.b_dec.grad}
    sae.eval()
    x = data_for(data, (16, d_in), 30)
    grad = data_for("float", (16, d_in), 31)
    with torch.no_grad():
        out = sae(x)
        got |= {"eval.x_hat": out.x_hat, **codes_tensors("eval.codes", out.codes), "eval.dense": sae.encode_dense(x)}
        if sparsity == "gtopk":
            got["eval.dense_with_grad"] = sae.encode_dense(x, grad)
    check_golden(f"sparsifier_{case}_{data}", got)


# ---- the screened and the plain selections ---------------------------------------------------


def screen_inputs():
    """B=260, d_in=256, d_sae=4100: TopK k=32 takes the screen's grouped path (d_sae // 8 >= 8k)
    and the torch path's hierarchical one; 260·4100 entries reach global_topk's and
    column_topk's grouped paths (>= 2^20); 4 tokens and 4 latents are in no group of 8."""
    g = torch.Generator().manual_seed(5)
    B, d_in, d_sae = 260, 256, 4100
    x = torch.randn(B, d_in, generator=g) * 2
    x[7] *= 30  # one token of outsized norm: the batch screens compute its row exactly
    W_T = torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5
    b_enc = torch.randn(d_sae, generator=g) * 0.2
    b_dec = torch.randn(d_in, generator=g) * 0.1
    return x, W_T.t(), b_enc, b_dec  # W_enc [d_in, d_sae], stored as rows as saekit.SAE does


def test_screened_topk_matches_the_golden():
    x, W_enc, b_enc, b_dec = screen_inputs()
    x = x[:128]  # the TopK screen works row by row: fewer rows keep the golden small
    dead = torch.zeros(W_enc.shape[1], dtype=torch.bool)
    dead[::5] = True
    got = {}
    for impl in ("screen", "torch"):
        top = encode_topk(x, W_enc, b_enc, b_dec, 32, impl=impl)
        got |= {f"{impl}.topk.values": top.values, f"{impl}.topk.indices": top.indices}
        with_aux, aux = encode_topk_aux(x, W_enc, b_enc, b_dec, 32, dead, 16, impl=impl)
        assert torch.equal(with_aux.values, top.values) and torch.equal(with_aux.indices, top.indices)
        got |= {f"{impl}.aux.values": aux.values, f"{impl}.aux.indices": aux.indices}
    # the two paths select the same latents here (no near-ties at the cut on this data)
    assert torch.equal(got["screen.topk.indices"], got["torch.topk.indices"])
    check_golden("screen_topk", got)


def screen_sae(sparsity: str, impl: str, k: int, **variant) -> SAE:
    x, W_enc, b_enc, b_dec = screen_inputs()
    sae = SAE(SAEConfig(d_in=W_enc.shape[0], d_sae=W_enc.shape[1], k=k, sparsity=sparsity, impl=impl,
                        variant=VariantOptions(**variant)), seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.b_dec.copy_(b_dec)
    return sae


# case: (sparsity, variant, update)
SCREEN_BATCH_CASES = {
    "mutual_choice": ("mutual_choice", {}, True),
    "feature_choice": ("feature_choice", {}, True),
    # zipf capacities screen only without an update; from the initial ranks some latents keep
    # more than a quarter of the token groups (the screen ranks their fp32 columns)
    "feature_choice_zipf": ("feature_choice", {"capacity": "zipf"}, False),
}


@pytest.mark.parametrize("case", list(SCREEN_BATCH_CASES))
def test_screened_batch_selections_match_the_golden(case):
    sparsity, variant, update = SCREEN_BATCH_CASES[case]
    x = screen_inputs()[0]
    got = {}
    for impl in ("screen", "torch"):
        sae = screen_sae(sparsity, impl, 8, **variant).train()
        with torch.no_grad():
            enc = encode_with_aux(sae, x, None, None, 0, update=update)
        got |= codes_tensors(f"{impl}.codes", enc.codes)
        if update:  # the thresholds (Feature Choice's freq and rank move with zipf capacities only)
            got |= {f"{impl}.buffer.{n}": b for n, b in sae.sparsifier.named_buffers()
                    if n not in ("freq", "rank")}
    check_golden(f"screen_{case}", got)


def test_every_golden_file_is_a_test_case_and_the_set_stays_small():
    """No golden outlives its test (a renamed case would leave a file nothing checks), and
    the folder stays well under 2 MB."""
    cases = {"cli_train", "screen_topk", *(f"train_{c}" for c in TRAIN_CASES),
             *(f"sparsifier_{c}_{d}" for c in SPARSIFIER_CASES for d in ("float", "ties")),
             *(f"screen_{c}" for c in SCREEN_BATCH_CASES)}
    files = {p.name for p in GOLDEN.iterdir()}
    assert files == {f"{c}.safetensors" for c in cases}
    assert sum(p.stat().st_size for p in GOLDEN.iterdir()) < 1_500_000


def test_off_platform_comparison_tolerates_last_bits_but_not_a_changed_result():
    want = torch.tensor([0.25, -1.5, 3.0e-3, 0.0])
    last_bits = want * (1 + 3e-7)
    assert tensor_diff("w", last_bits, want, "torch.float32", exact=True) is not None
    assert tensor_diff("w", last_bits, want, "torch.float32", exact=False) is None
    assert tensor_diff("w", want * (1 + 1e-3), want, "torch.float32", exact=False) is not None
    assert tensor_diff("i", torch.tensor([1, 2]), torch.tensor([1, 3]), "torch.int64", exact=False) is not None
