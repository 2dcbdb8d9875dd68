"""The model's forward and the SAE's training step in float32 against bfloat16 (and float16).

    python benchmarks/precision.py [--hook blocks.5.attn.hook_z] [--model M] [--reps 5]

Two tables. The first times saekit's harvest at ``--hook`` (``saekit.activations.harvest``:
the forward stopped at the hook) with the model loaded in each ``--dtypes`` entry, in
interleaved rounds (medians), and compares each harvest with float32's: the relative error
‖a − a_fp32‖ / ‖a_fp32‖ over the batch and the largest entrywise gap. The second times the
trainer's own step (``Trainer.train_step``) with ``--sae-dtype`` float32 and bfloat16 on the
same activations (the float32 harvest of the first table's model, ``--steps`` batches), both
SAEs from one seed, stepping through the same batches round after round; it reports each
one's FVU on a held-out batch afterwards. Run on a CPU without bf16 matmul units (AVX2 only,
``torch.backends.cpu.get_cpu_capability()``), half precision is expected to be slower: torch
then converts every operand to float32 and back.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_timing import interleaved_times

from saekit import data
from saekit.activations import harvest, resolve_hook
from saekit.models import load_model
from saekit.sae import SAE
from saekit.training.config import DataOptions, OptimOptions, RunOptions, TrainConfig
from saekit.training.trainer import Trainer, init_b_dec_
from saekit.types import Batch, SAEConfig


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hook", default="blocks.5.attn.hook_z")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16,float16", help="the model's dtypes, float32 first")
    ap.add_argument("--batch", type=int, default=32, help="sequences a harvest")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--sae-batch", type=int, default=4096, help="activations a training step")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds (after one untimed)")
    return ap.parse_args(argv)


def model_rows(args, models: dict, tokens: torch.Tensor) -> tuple[list, torch.Tensor]:
    """The harvest table's rows and the float32 harvest."""
    hook = resolve_hook(models["float32"], args.hook)
    acts = {name: harvest(m, tokens, hook) for name, m in models.items()}  # float32 copies of each
    times = interleaved_times({name: (lambda m=m: harvest(m, tokens, hook)) for name, m in models.items()},
                              args.reps)
    t32 = statistics.median(times["float32"])
    ref = acts["float32"]
    rows = []
    for name, ts in times.items():
        t = statistics.median(ts)
        gap = acts[name] - ref
        rows.append((name, f"{t:.3f}", f"{tokens.numel() / t:,.0f}", f"{t / t32:.2f}",
                     f"{(gap.norm() / ref.norm()).item():.2e}", f"{gap.abs().max().item():.2e}"))
    return rows, ref


def trainer_for(x: torch.Tensor, args, sae_dtype: str) -> Trainer:
    cfg = TrainConfig(sae=SAEConfig(d_sae=args.d_sae, k=args.k),
                      data=DataOptions(batch_size=args.sae_batch, total_tokens=args.sae_batch * 10**6,
                                       fill_tokens=args.sae_batch),
                      optim=OptimOptions(lr=1e-3, warmup_steps=0, sae_dtype=sae_dtype), run=RunOptions(progress=False))
    sae = SAE(cfg.sae_for(x.shape[1], args.hook, (), "bench"), seed=0)
    init_b_dec_(sae, lambda step: Batch(x[: args.sae_batch]), "mean", 1)
    return Trainer(sae, cfg, total_steps=10**6)


def fvu(sae: SAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (((sae(x).x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()).item()


def sae_rows(args, acts: torch.Tensor) -> list:
    """The SAE step table's rows, on ``acts`` (the last ``sae_batch`` rows held out)."""
    held_out, train = acts[-args.sae_batch:], acts[: -args.sae_batch]
    n_batches = len(train) // args.sae_batch
    trainers = {name: trainer_for(train, args, name) for name in ("float32", "bfloat16")}

    def stepper(t: Trainer):
        def step():
            i = t.step % n_batches
            t.train_step(train[i * args.sae_batch: (i + 1) * args.sae_batch])
        return step

    times = interleaved_times({name: stepper(t) for name, t in trainers.items()}, args.reps)
    t32 = statistics.median(times["float32"])
    rows = []
    for name, ts in times.items():
        t = statistics.median(ts)
        tr = trainers[name]
        rows.append((name, f"{t:.3f}", f"{args.sae_batch / t:,.0f}", f"{t / t32:.2f}", tr.step,
                     f"{fvu(tr.sae, held_out):.4f}"))
    return rows


def print_table(header: tuple, rows: list) -> None:
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def main(argv=None):
    args = parse_args(argv)
    names = [d.strip() for d in args.dtypes.split(",")]
    if names[0] != "float32":
        raise SystemExit("--dtypes must start with float32 (the reference)")
    models = {name: load_model(args.model, "cpu", name) for name in names}
    stream = data.token_batches(models["float32"].tokenizer, None, args.seq_len, args.batch)
    tokens = next(stream)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}\n")
    rows, _ = model_rows(args, models, tokens)
    print(f"harvest at {args.hook}, {args.batch}×{args.seq_len} tokens, median of {args.reps} interleaved rounds:\n")
    print_table(("model dtype", "seconds", "tokens/s", "× float32", "relative error vs float32", "max |gap|"), rows)
    # activations to train on: float32 harvests of fresh sequences, enough for 4 batches and a held-out one
    hook = resolve_hook(models["float32"], args.hook)
    need = 5 * args.sae_batch
    acts = []
    while sum(len(a) for a in acts) < need:
        acts.append(harvest(models["float32"], next(stream), hook))
    acts = torch.cat(acts)[:need]
    print(f"\nSAE step: d_in {acts.shape[1]}, d_sae {args.d_sae}, k {args.k}, batch {args.sae_batch}, TopK, "
          f"median of {args.reps} interleaved rounds; FVU on a held-out batch after the steps:\n")
    print_table(("--sae-dtype", "seconds a step", "tokens/s", "× float32", "steps", "held-out FVU"),
                sae_rows(args, acts))


if __name__ == "__main__":
    main()
