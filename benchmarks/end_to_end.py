"""The whole job against a peer: saekit and EleutherAI sparsify train the same SAE, end to end.

    python benchmarks/end_to_end.py [--tokens 4000000] [--rounds 2] [--out runs/end_to_end] [--venv DIR]

The job is saekit's default run: a TopK SAE with d_sae 2048 and k 32 on ``blocks.5.attn.hook_z``
of the embedded model, 4M tokens of saekit's corpus in batches of 4,096. Each tool runs it in
a child process of its own, timed from its start to its exit (imports, model load, harvest,
training, saving), in rounds alternating saekit and sparsify (the order flips each round, so
the machine's drift hits both alike); the parent records each child's wall-clock, CPU time
(user + system, all threads) and peak RSS (``os.wait4``). On a shared machine the CPU time is
the steadier measure: it does not count the time a child waits for a core.

- saekit: ``saekit train --hook blocks.5.attn.hook_z --d-sae 2048 --k 32 --total-tokens N
  --eval-tokens 0`` (the summary's evaluation is left out; both SAEs are scored afterwards by
  the same code). saekit harvests whole fills of 1,032 sequences and trains on 31 batches of
  each, so ``--tokens`` in multiples of 126,976 (31 × 4,096) leave no fill partly unused.
- sparsify (PyPI ``eai-sparsify`` 1.3.3, in a virtual environment of its own that this script
  creates with ``--system-site-packages``; where that environment has no torch, a ``.pth``
  file points it at the packages of the interpreter running this script, so only sparsify
  and its small missing dependencies are downloaded): its ``Trainer`` on the same model
  loaded by ``transformers`` (``AutoModel``, fp32, as its CLI loads it for the FVU loss) and
  the same token sequences, exported to a tokenized ``datasets`` folder (an ``input_ids``
  column, which sparsify takes as already tokenized) and shuffled with seed 42 as its CLI
  does. Its defaults otherwise: signum with schedule-free averaging, its learning-rate rule,
  no AuxK; 32 sequences a step (4,096 positions, saekit's batch); its PyTorch decoder
  (``SPARSIFY_DISABLE_TRITON=1``: its Triton one needs a GPU).
  The hook point: TransformerBridge's ``hook_z`` *is* the input of the attention's output
  projection (the bridge aliases it to ``o.hook_in``; ``transformer.h.5.attn.c_proj`` in the
  Hugging Face model, heads flattened). sparsify autoencodes a module's *output* (it reads
  inputs only when transcoding), so the child puts an identity module in front of ``c_proj``
  (``h.5.attn.c_proj`` becomes ``Sequential(z=Identity, proj=c_proj)``, the same arithmetic)
  and trains on ``h.5.attn.c_proj.z``. saekit drops each sequence's BOS position; sparsify
  trains on every position (its default: no excluded tokens), so it also sees one constant
  BOS vector a sequence. Tokens are counted alike for both: the non-BOS positions trained on.

Explained variance: both SAEs are loaded with ``saekit.load_sae`` (which converts sparsify's
folder) and scored by ``saekit.metrics.reconstruction_stats`` on the same activations, the
bridge's ``hook_z`` on held-out tokens (drawn as saekit's summary draws them). sparsify's own
forward on those activations checks the conversion.

The tables split each child's time into harvest (model forwards), SAE steps (encode, decode,
loss, backward, optimizer), checkpoints, saekit's buffer (shuffled batches gathered from each
fill) and the rest (interpreter start, imports, model load, data set-up, saving). ``--resume``
keeps the runs ``--out`` already holds for the same job and runs only the missing ones;
with ``--max-runs`` a long comparison can be run in parts. The last line reads
``saekit_tokens_per_s=N sparsify_tokens_per_s=M saekit_ev=A sparsify_ev=B`` (wall-clock,
medians over rounds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SPARSIFY = "eai-sparsify==1.3.3"
HOOK = "blocks.5.attn.hook_z"
SEQ_LEN, SEQS_PER_STEP = 128, 32  # sparsify's step: 32 × 128 = 4,096 positions
BATCH = 4096  # saekit's step (--batch-size), activation vectors
SPARSIFY_HOOKPOINT = "h.5.attn.c_proj.z"  # the identity in front of c_proj (see the docstring)


# ---- the parent: set-up, rounds, evaluation, table ------------------------------------------

def ensure_sparsify_venv(venv: Path) -> Path:
    """A virtual environment holding sparsify; created on first use."""
    py = venv / "bin" / "python"
    probe = "import importlib.metadata as m; print(m.version('eai-sparsify'))"
    if py.exists() and subprocess.run([py, "-c", probe], capture_output=True, text=True).stdout.strip() == \
            SPARSIFY.split("==")[1]:
        return py
    print(f"creating {venv} with {SPARSIFY} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    if subprocess.run([py, "-c", "import torch"], capture_output=True).returncode != 0:
        import torch  # reuse this interpreter's torch (and its neighbours) rather than download it

        site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        Path(site, "_reuse_torch.pth").write_text(str(Path(torch.__file__).parent.parent) + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", SPARSIFY], check=True)
    return py


def export_tokens(model, folder: Path, n_seq: int, seed: int = 0) -> int:
    """The first ``n_seq`` sequences of the stream ``saekit train`` reads (same source, seed and
    held-out split), written as a ``datasets`` folder with an ``input_ids`` column."""
    import datasets
    import torch

    from saekit import data

    stream = data.token_batches(model.tokenizer, None, SEQ_LEN, batch_size=SEQS_PER_STEP, seed=seed,
                                heldout_frac=data.HELDOUT_FRAC)
    seqs = torch.cat([next(stream) for _ in range(n_seq // SEQS_PER_STEP)])  # [n_seq, 128]
    datasets.Dataset.from_dict({"input_ids": seqs.numpy()}).save_to_disk(str(folder))
    return len(seqs)


def heldout_activations(model, n_tokens: int, seed: int = 0):
    """``[n, d_in]`` activations at the hook on held-out tokens, drawn as saekit's summary draws
    them, and the tokens."""
    from saekit import data
    from saekit.activations import harvest_batches, resolve_hook

    tokens = data.heldout_sequences(model.tokenizer, None, max(1, n_tokens // (SEQ_LEN - 1)), SEQ_LEN, seed + 1)
    return harvest_batches(model, tokens, resolve_hook(model, HOOK)), tokens


def same_point_check(model_dir: str, tokens, acts) -> float:
    """Largest |hook_z − c_proj input| over the held-out tokens (the raw HF model, its default
    attention), relative to the largest |hook_z|: the two hook points are one vector."""
    import torch
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    box = []
    h = hf.h[5].attn.c_proj.register_forward_pre_hook(lambda m, a: box.append(a[0][:, 1:].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for j in range(0, len(tokens), 32):
            hf(tokens[j: j + 32])
    h.remove()
    return ((torch.cat(box) - acts).abs().max() / acts.abs().max()).item()


def run_child(cmd: list, log: Path, env: dict) -> tuple[float, float, float, int]:
    """Run ``cmd`` to its end: (wall seconds, CPU seconds (user + system, all threads), peak
    RSS MiB, exit code)."""
    t = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, p.returncode


def score(folder: Path, acts) -> dict:
    from saekit import load_sae
    from saekit.metrics import reconstruction_stats

    stats = reconstruction_stats(load_sae(folder), acts)
    return {k: stats[k] for k in ("explained_variance", "l0", "dense_frac")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4_000_000, help="activation vectors to train on")
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each tool, alternating")
    ap.add_argument("--out", default="runs/end_to_end")
    ap.add_argument("--venv", default=None, help="sparsify's virtual environment (default: OUT/sparsify-venv)")
    ap.add_argument("--eval-tokens", type=int, default=32_768)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs OUT already holds for this job and run only the missing ones")
    ap.add_argument("--max-runs", type=int, default=0,
                    help="run at most this many children now (with --resume: a long comparison in parts)")
    ap.add_argument("--child", choices=["saekit", "sparsify", "sparsify-eval"], help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return {"saekit": child_saekit, "sparsify": child_sparsify, "sparsify-eval": child_sparsify_eval}[
            args.child](args)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sparsify_py = ensure_sparsify_venv(Path(args.venv).resolve() if args.venv else out / "sparsify-venv")
    acts, rel = prepare(out, args)
    # SPARSIFY_DISABLE_TRITON: sparsify's switch to its PyTorch decoder (its Triton one needs a GPU)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "SPARSIFY_DISABLE_TRITON": "1"}
    job = {"tokens": args.tokens, "d_sae": args.d_sae, "k": args.k, "threads": args.threads,
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    me = str(Path(__file__).resolve())
    rows, ran = [], 0
    for r in range(args.rounds):
        for tool in (["saekit", "sparsify"] if r % 2 == 0 else ["sparsify", "saekit"]):
            run_dir = out / f"{tool}-{r + 1}"
            done = run_dir / "result.json"
            if args.resume and done.exists() and json.loads(done.read_text())["job"] == job:
                rows.append(json.loads(done.read_text()))
                continue
            if args.max_runs and ran == args.max_runs:
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable if tool == "saekit" else str(sparsify_py), me, "--child", tool,
                   "--run-dir", str(run_dir), "--data", str(out / "tokens"), "--model-dir", model_folder(),
                   *(f"--{k.replace('_', '-')}={v}" for k, v in job.items() if k != "OMP_WAIT_POLICY")]
            print(f"round {r + 1}/{args.rounds}: {tool} ...", flush=True)
            wall, cpu, rss, rc = run_child(cmd, run_dir / "log.txt", env)
            ran += 1
            if rc != 0:
                sys.exit(f"{tool} failed (exit {rc}); see {run_dir / 'log.txt'}")
            row = {"job": job, "tool": tool, "round": r + 1, "wall": wall, "cpu": cpu, "rss": rss,
                   **json.loads((run_dir / "phases.json").read_text())}
            done.write_text(json.dumps(row))
            rows.append(row)
    for row in rows:
        row.update(score(out / f"{row['tool']}-{row['round']}" / row["sae_folder"], acts))
    last = max((x["round"] for x in rows if x["tool"] == "sparsify"), default=None)
    check = ["no sparsify run yet"]
    if last is not None:
        c = subprocess.run([str(sparsify_py), me, "--child", "sparsify-eval", "--run-dir",
                            str(out / f"sparsify-{last}"), "--data", str(out / "heldout_acts.safetensors")],
                           capture_output=True, text=True, env=env)
        check = c.stdout.strip().splitlines()[-1:] if c.returncode == 0 else [c.stderr[-500:]]
    report(rows, args, rel, check)


def model_folder() -> str:
    from saekit.models import embedded_model_path

    return str(embedded_model_path())


def prepare(out: Path, args):
    """The exported token sequences (``OUT/tokens``) and the held-out activations, made once
    and reused while the job's size and the evaluation tokens stay the same: ``(acts, rel)``,
    ``rel`` from ``same_point_check``."""
    from safetensors.torch import load_file, save_file

    steps = args.tokens // BATCH
    n_seq = math.ceil(steps * BATCH / (SEQ_LEN - 1) / SEQS_PER_STEP) * SEQS_PER_STEP
    key = {"n_seq": n_seq, "eval_tokens": args.eval_tokens}
    meta = out / "prepared.json"
    if meta.exists() and json.loads(meta.read_text())["key"] == key:
        return load_file(str(out / "heldout_acts.safetensors"))["acts"], json.loads(meta.read_text())["rel"]
    from saekit.models import load_model

    model = load_model()
    export_tokens(model, out / "tokens", n_seq)
    acts, eval_tok = heldout_activations(model, args.eval_tokens)
    save_file({"acts": acts.contiguous()}, str(out / "heldout_acts.safetensors"))
    rel = same_point_check(model_folder(), eval_tok, acts)
    meta.write_text(json.dumps({"key": key, "rel": rel}))
    return acts, rel


def report(rows: list[dict], args, rel: float, check: list[str]) -> None:
    import torch

    threads = args.threads or torch.get_num_threads()
    print(f"\nend to end: {HOOK}, d_sae {args.d_sae}, k {args.k}, {args.tokens:,} tokens asked, {threads} threads "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), {args.rounds} rounds alternating\n")
    for unit, pre, total in (("wall-clock", "", "wall"), ("CPU time, all threads", "cpu_", "cpu")):
        print(f"{unit}:\n\n| tool | round | {unit} s | tokens | tokens/s | peak RSS MiB | harvest s | SAE steps s | "
              "checkpoints s | buffer s | other s | explained var. | L0 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for x in rows:
            ph = [x[pre + k] for k in ("harvest_s", "sae_s", "checkpoint_s", "buffer_s")]
            print(f"| {x['tool']} | {x['round']} | {x[total]:.1f} | {x['tokens']:,} | {x['tokens'] / x[total]:,.0f} | "
                  f"{x['rss']:,.0f} | " + " | ".join(f"{v:.1f}" for v in ph) + f" | {x[total] - sum(ph):.1f} | "
                  f"{x['explained_variance']:.4f} | {x['l0']:.1f} |")
        print()

    if {x["tool"] for x in rows} != {"saekit", "sparsify"}:
        print("not every tool has a finished run yet; run again with --resume")
        return

    def med(tool, f):
        return statistics.median(f(x) for x in rows if x["tool"] == tool)

    s, p = ({"tps": med(t, lambda x: x["tokens"] / x["wall"]), "cpu_tps": med(t, lambda x: x["tokens"] / x["cpu"]),
             "explained_variance": med(t, lambda x: x["explained_variance"])} for t in ("saekit", "sparsify"))
    print(f"saekit / sparsify tokens/s: {s['tps'] / p['tps']:.2f}x wall-clock (target >= 1.5), "
          f"{s['cpu_tps'] / p['cpu_tps']:.2f}x per CPU-second; explained variance {s['explained_variance']:.4f} "
          f"against {p['explained_variance']:.4f} (target: equal or better)")
    print(f"hook_z against c_proj's input (raw HF forward) on the held-out tokens: largest difference "
          f"{rel:.1e} of the largest |activation|")
    print(f"sparsify's own forward on the same activations: {' '.join(check)}")
    print(f"saekit_tokens_per_s={s['tps']:.0f} sparsify_tokens_per_s={p['tps']:.0f} "
          f"saekit_ev={s['explained_variance']:.4f} sparsify_ev={p['explained_variance']:.4f}")


# ---- the children -----------------------------------------------------------------------------

class Clock:
    """Seconds spent inside wrapped functions, by phase: wall-clock (``s``) and the process's
    CPU time, all threads (``cpu``)."""

    def __init__(self):
        self.s: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def add(self, phase: str, wall: float, cpu: float) -> None:
        self.s[phase] = self.s.get(phase, 0.0) + wall
        self.cpu[phase] = self.cpu.get(phase, 0.0) + cpu

    def wrap(self, phase: str, fn):
        self.add(phase, 0.0, 0.0)

        def timed(*a, **kw):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                self.add(phase, time.perf_counter() - t, time.process_time() - c)
        return timed

    def phases(self, harvest, sae, buffer=lambda t: 0.0) -> dict:
        """The table's phases, wall and CPU, each a function of a ``{phase: seconds}`` dict."""
        return {pre + name: f(src) for pre, src in (("", self.s), ("cpu_", self.cpu))
                for name, f in (("harvest_s", harvest), ("sae_s", sae), ("buffer_s", buffer),
                                ("checkpoint_s", lambda t: t["checkpoint"]))}


def child_saekit(args) -> None:
    """``saekit train`` for the job, its phases timed by wrapping the functions that do them."""
    import saekit.activations as acts
    import saekit.training.trainer as tr
    from saekit.cli import main as saekit_main

    clock = Clock()
    acts.harvest_many = clock.wrap("harvest", acts.harvest_many)  # ModelActivations' forwards
    tr.FillReader.batch_at = clock.wrap("batch_at", tr.FillReader.batch_at)  # harvest + shuffled gather
    tr.Trainer.train_step = clock.wrap("sae", tr.Trainer.train_step)
    tr._checkpoint = clock.wrap("checkpoint", tr._checkpoint)
    rc = saekit_main(["train", "--hook", HOOK, "--d-sae", str(args.d_sae), "--k", str(args.k),
                      "--total-tokens", str(args.tokens), "--out", args.run_dir, "--eval-tokens", "0",
                      "--progress", "false"])
    if rc:
        sys.exit(rc)
    steps = args.tokens // BATCH
    Path(args.run_dir, "phases.json").write_text(json.dumps({
        "tokens": steps * BATCH, "steps": steps, "sae_folder": ".",
        **clock.phases(harvest=lambda t: t["harvest"], sae=lambda t: t["sae"],
                       buffer=lambda t: t["batch_at"] - t["harvest"])}))


def child_sparsify(args) -> None:
    """sparsify's Trainer on the exported tokens, at the input of layer 5's c_proj."""
    from collections import OrderedDict

    import torch
    from datasets import Dataset
    from sparsify import SaeConfig, SparseCoder, TrainConfig, Trainer
    from torch import nn
    from transformers import AutoModel

    clock = Clock()
    model = AutoModel.from_pretrained(args.model_dir, dtype=torch.float32)  # GPT2Model, as sparsify's CLI for fvu
    attn = model.h[5].attn
    tap_t = [0.0, 0.0]

    class Tap(nn.Identity):  # exposes c_proj's input as a module output; records when it runs
        def forward(self, x):
            tap_t[:] = time.perf_counter(), time.process_time()
            return x

    def after_sae(module, inputs):  # c_proj's pre-hook: sparsify's hook on the tap has just returned
        clock.add("sae", time.perf_counter() - tap_t[0], time.process_time() - tap_t[1])

    attn.c_proj = nn.Sequential(OrderedDict(z=Tap(), proj=attn.c_proj))
    attn.c_proj.proj.register_forward_pre_hook(after_sae)
    clock.add("sae", 0.0, 0.0)
    model.forward = clock.wrap("forward", model.forward)  # the whole forward, sparsify's hook included
    ds = Dataset.load_from_disk(args.data).shuffle(42).with_format("torch")  # as sparsify's CLI does
    cfg = TrainConfig(SaeConfig(num_latents=args.d_sae, k=args.k), batch_size=SEQS_PER_STEP,
                      hookpoints=[SPARSIFY_HOOKPOINT], log_to_wandb=False, save_dir=args.run_dir, run_name="sae")
    trainer = Trainer(cfg, ds, model)
    for opt in trainer.optimizers:
        opt.step = clock.wrap("opt", opt.step)
        opt.zero_grad = clock.wrap("opt", opt.zero_grad)
    SparseCoder.remove_gradient_parallel_to_decoder_directions = clock.wrap(
        "opt", SparseCoder.remove_gradient_parallel_to_decoder_directions)
    trainer.save = clock.wrap("checkpoint", trainer.save)
    trainer.fit()
    n = len(ds) // SEQS_PER_STEP * SEQS_PER_STEP
    Path(args.run_dir, "phases.json").write_text(json.dumps({
        "tokens": n * (SEQ_LEN - 1), "steps": n // SEQS_PER_STEP, "sae_folder": f"sae/{SPARSIFY_HOOKPOINT}",
        **clock.phases(harvest=lambda t: t["forward"] - t["sae"], sae=lambda t: t["sae"] + t["opt"])}))


def child_sparsify_eval(args) -> None:
    """Explained variance of the last sparsify SAE by sparsify's own forward, on the parent's
    held-out activations (a check of saekit's conversion of its folder)."""
    import torch
    from safetensors.torch import load_file
    from sparsify import SparseCoder

    x = load_file(args.data)["acts"]
    sae = SparseCoder.load_from_disk(Path(args.run_dir, "sae", SPARSIFY_HOOKPOINT))
    with torch.no_grad():
        fvu = sae(x).fvu.item()
    print(f"explained variance {1 - fvu:.4f}")


if __name__ == "__main__":
    main()
