"""Data-parallel and hook-parallel training under torchrun (2 CPU ranks on gloo).

The torchrun runs are subprocesses (``python -m torch.distributed.run``, which is what the
``torchrun`` script runs); each takes ~25 s on 2 cores, mostly start-up, so they share one
uninterrupted 2-rank run and one single-process reference."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from saekit import load_sae
from saekit.cli import main

# 20 steps of 512 activations (2.5 fills of 32 sequences), checkpoints every 4 steps
ARGS = ["--d-sae", "256", "-k", "8", "--batch-size", "512", "--fill-tokens", "4064", "--seq-len", "128",
        "--total-tokens", "10240", "--warmup-steps", "5", "--eval-tokens", "0", "--progress", "false",
        "--log-every", "1", "--checkpoint-every", "4",
        # gated's weight pinned at the value this tolerance was set with: at its default (0.6,
        # chosen for 4M-token runs) the two runs' rounding differences grew to 1.7e-4 in 20 steps
        "--l1-coef", "0.1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# the data-parallel architectures whose equality with one process is run (each a 2-rank run,
# ~25 s of start-up): TopK, and Gated, the elementwise rule with the most of its own (b_gate,
# r_mag, b_mag, the frozen-decoder auxiliary loss)
DATA_PARALLEL = ["topk", "gated"]


def torchrun(*args, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "saekit", "train", *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def descendants(pid: int) -> list[int]:
    """Processes below ``pid`` (torchrun starts its workers in sessions of their own, so
    killing its process group would not reach them)."""
    parent = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(stat)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def finish(p, timeout=300):
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    return out


def max_diff(a, b):
    """The largest difference over every tensor of the two SAEs' state dicts (gated's b_gate,
    r_mag, b_mag and JumpReLU's threshold included)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[n].float() - sb[n].float()).abs().max().item() for n in sa)


@pytest.fixture(scope="module")
def sparsity(request):
    return getattr(request, "param", "topk")


@pytest.fixture(scope="module")
def single(tmp_path_factory, sparsity):
    out = tmp_path_factory.mktemp(f"single-{sparsity}") / "run"
    assert main(["train", "--out", str(out), "--sparsity", sparsity, *ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, sparsity):
    out = tmp_path_factory.mktemp(f"ddp-{sparsity}") / "run"
    log = finish(torchrun("--out", str(out), "--sparsity", sparsity, *ARGS))
    return out, log


@pytest.mark.parametrize("sparsity", DATA_PARALLEL, indirect=True, scope="module")
def test_two_ranks_match_one_process(single, two_ranks, sparsity):
    out, log = two_ranks
    assert max_diff(load_sae(single), load_sae(out)) < 1e-4
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))  # rank 0 alone writes, once per step
    assert log.count("saved to") == 1  # and alone reports
    ref = [json.loads(l) for l in (single / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[-1]["fvu"] - ref[-1]["fvu"]) < 1e-4  # logged stats are of the global batch


def test_sigkill_at_a_random_step_then_resume_under_torchrun(two_ranks, tmp_path):
    kill_at = random.Random().randint(6, 14)
    print(f"killing at step {kill_at}")
    out = tmp_path / "run"
    p = torchrun("--out", str(out), *ARGS)
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_at:
            break
        time.sleep(0.01)
    for pid in [*descendants(p.pid), p.pid]:  # both workers, mid-step, then torchrun
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.communicate()
    assert not (out / "sae.safetensors").exists(), "the run finished before it could be killed"
    finish(torchrun("--out", str(out), "--resume", "true", *ARGS))
    a, b = load_sae(two_ranks[0]).state_dict(), load_sae(out).state_dict()
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert steps == list(range(1, 21))


def test_distribute_hooks_gives_each_rank_its_own_saes(tmp_path):
    hooks = ["--hook", "blocks.3.attn.hook_z", "--hook", "blocks.4.attn.hook_z"]
    finish(torchrun("--out", str(tmp_path / "spread"), *hooks, "--distribute-hooks", "true", *ARGS))
    assert main(["train", "--out", str(tmp_path / "one"), *hooks, *ARGS]) == 0
    for h in ("blocks.3.attn.hook_z", "blocks.4.attn.hook_z"):
        assert max_diff(load_sae(tmp_path / "one" / h), load_sae(tmp_path / "spread" / h)) < 1e-4
    assert set(json.loads((tmp_path / "spread" / "summary.json").read_text())) == {
        "blocks.3.attn.hook_z", "blocks.4.attn.hook_z"}


def test_batch_level_sparsifiers_are_refused_under_data_parallelism():
    from saekit.errors import ConfigError
    from saekit.training.distributed import check_supported

    for batch_level in ("mutual_choice", "batchtopk", "matryoshka", "feature_choice"):
        with pytest.raises(ConfigError, match=f"--sparsity {batch_level} selects across the whole batch"):
            check_supported(batch_level, 512, 2)
    with pytest.raises(ConfigError, match="divisible by the 2 torchrun processes"):
        check_supported("topk", 511, 2)
    for per_token in ("topk", "gtopk", "standard", "jumprelu", "gated"):
        check_supported(per_token, 512, 2)
