"""Time one full SAE training step on CPU against the floor every exact TopK SAE pays.

    python benchmarks/train_step.py --d-in 768 --d-sae 12288 --k 32 --batch 4096

The step is the trainer's own (``saekit.training.trainer.Trainer.train_step``): encode,
decode, loss, backward, parallel-gradient removal, Adam, decoder renormalization. The
floor is the single dense encoder product ``(x − b_dec) @ W_enc + b_enc`` that any exact
TopK SAE must compute, written into a reused buffer (a fresh 200 MB output would add page
faults to the floor and flatter the ratio), with W_enc stored either way round; the faster
counts. The floors and the step are timed in turns, round after round (medians), so that the
machine's drift hits them alike; with ``--sparsity`` other than topk, a TopK step of the same
shape joins the rounds and the table gives the step's time over TopK's (standard, gated and
jumprelu run their dense step: no sparse kernels). Prints a table; the last line is
``tokens_per_s=<n> floor_tokens_per_s=<n>``.

On a CPU with AMX the default step (``impl="auto"``) takes the screened encoder
(kernels/screen.py; TopK, Mutual and Feature Choice): it ranks latents through a bf16 product and
recomputes in fp32 the candidates its error bound keeps (~2k a row), so it no longer
computes the fp32 product the floor times. Its selection is still the exact top k of fp32
pre-activations. The same rounds then also time the step with ``impl="torch"`` (the fp32
product) and, for TopK, the bf16 product alone, so all are in the table.
"""

from __future__ import annotations

import argparse
import resource
import statistics

import torch
from bench_timing import interleaved_times

from saekit.kernels import screen
from saekit.kernels.encoder import encoder_impl
from saekit.sae import SAE, SAEConfig
from saekit.training.config import DataOptions, OptimOptions, RunOptions, TrainConfig
from saekit.training.trainer import Trainer
from saekit.types import ELEMENTWISE


def peak_rss_mib() -> float:
    """The process's peak resident set size so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_args(argv=None) -> argparse.Namespace:
    """The command line's options: the SAE's and the batch's shape, the sparsifier, the rounds,
    the share of dead latents and the step's kernels."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--d-sae", type=int, default=12288)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--sparsity", default="topk")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dead-frac", type=float, default=0.0,
                    help="mark this share of latents dead so the AuxK path runs too")
    ap.add_argument("--impl", default="auto", choices=["auto", "torch", "screen"],
                    help="the step's kernels (auto: the screened encoder on CPUs with AMX)")
    ap.add_argument("--sae-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the step's compute dtype (the floor stays the float32 product; "
                         "benchmarks/precision.py compares the two side by side)")
    return ap.parse_args(argv)


def make_trainer(args: argparse.Namespace, sparsity: str, impl: str | None = None
                 ) -> tuple[SAE, TrainConfig, Trainer]:
    """A seeded SAE of ``args``' shape with ``sparsity`` and ``impl`` (default ``args.impl``),
    its training config (one batch a fill, no warm-up) and its Trainer."""
    impl = args.impl if impl is None else impl
    sae = SAE(SAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k, sparsity=sparsity, impl=impl), seed=0)
    cfg = TrainConfig(sae=SAEConfig(d_sae=args.d_sae, k=args.k, sparsity=sparsity, impl=impl),
                      data=DataOptions(batch_size=args.batch, total_tokens=args.batch * 10**6,
                                       fill_tokens=args.batch),
                      optim=OptimOptions(lr=1e-4, warmup_steps=0, sae_dtype=args.sae_dtype),
                      run=RunOptions(progress=False))
    return sae, cfg, Trainer(sae, cfg, total_steps=10**6)


def step_trainers(args: argparse.Namespace, x: torch.Tensor) -> tuple[SAE, TrainConfig, dict, bool]:
    """The step's SAE and config, the trainers the rounds time and whether the step's
    selection screens. The trainers: "step" (``args.sparsity`` with ``args.impl``); "topk",
    a TopK step of the same shape, for another sparsifier; "plain", the same step on the fp32
    product (impl="torch"), where the step screens; "topk_plain", the TopK step on the fp32
    product, for another sparsifier where TopK screens. Those that do not apply are None."""
    sae, cfg, trainer = make_trainer(args, args.sparsity)
    # Another sparsifier's step is compared with a TopK step timed in the same rounds.
    topk = make_trainer(args, "topk")[2] if args.sparsity != "topk" else None
    topk_screens = encoder_impl(args.impl, x, sae.W_enc, args.k) == "screen"
    screened = topk_screens and args.sparsity not in ("gtopk", *ELEMENTWISE)  # the selections that screen
    plain = make_trainer(args, args.sparsity, "torch")[2] if screened else None  # the step on the fp32 product
    # ... and another sparsifier is compared with the TopK step on the fp32 product as well
    topk_plain = make_trainer(args, "topk", "torch")[2] if topk is not None and topk_screens else None
    return sae, cfg, {"step": trainer, "topk": topk, "plain": plain, "topk_plain": topk_plain}, screened


def floor_with(sae: SAE, x: torch.Tensor, W: torch.Tensor, pre: torch.Tensor):
    """The floor with encoder matrix ``W``: ``(x - b_dec) @ W + b_enc`` into the reused
    buffer ``pre`` (the fastest way to compute the product here)."""
    def floor():
        with torch.no_grad():
            torch.addmm(sae.b_enc, x - sae.b_dec, W, out=pre)
    return floor


def stepper(t: Trainer, x: torch.Tensor, grad: torch.Tensor | None, dead: int, dead_tokens: int):
    """One training step of ``t`` on ``x`` (and ``grad``), with the first ``dead`` latents
    marked dead (``dead_tokens`` tokens since they fired) before it, if any."""
    def step():
        if dead:  # the same latents dead at every step
            t.tokens_since_fired[:dead] = dead_tokens
        t.train_step(x, grad)
    return step


def timed_functions(args: argparse.Namespace, x: torch.Tensor, grad: torch.Tensor | None, sae: SAE,
                    cfg: TrainConfig, trainers: dict, screened: bool, layouts: dict, pre: torch.Tensor) -> dict:
    """What the rounds time, in the order they run: the floor with each of ``layouts``'
    matrices, "step", then where they apply "topk", "topk_plain", "plain" and, for a
    screened TopK step, "bf16" (the screen's bf16 product alone)."""
    dead = int(args.dead_frac * args.d_sae)
    fns = {**{name: floor_with(sae, x, W, pre) for name, W in layouts.items()},
           "step": stepper(trainers["step"], x, grad, dead, cfg.optim.dead_tokens)}
    topk, topk_plain = trainers["topk"], trainers["topk_plain"]
    if topk is not None:
        fns["topk"] = lambda: topk.train_step(x)
    if topk_plain is not None:
        fns["topk_plain"] = lambda: topk_plain.train_step(x)
    if screened:
        fns["plain"] = stepper(trainers["plain"], x, grad, dead, cfg.optim.dead_tokens)
        if args.sparsity == "topk":
            fns["bf16"] = bf16_product(screen, x - sae.b_dec, sae)
    return fns

def result_rows(args: argparse.Namespace, sae: SAE, encoder: str, screened: bool, times: dict,
                t_layouts: dict, rss0: float, rss1: float) -> list[tuple[str, object]]:
    """The table's (measure, value) rows from the median seconds ``times`` ("step" and where
    timed "topk", "topk_plain", "plain", "bf16"), the floor's per layout ``t_layouts`` and the
    peak RSS before (``rss0``) and after (``rss1``) the timing."""
    t_step, t_topk, t_topk_plain = times["step"], times.get("topk"), times.get("topk_plain")
    t_plain, t_bf16 = times.get("plain"), times.get("bf16")
    t_floor = min(t_layouts.values())
    params_mib = sum(p.numel() for p in sae.parameters()) * 4 / 2**20
    return [
        ("threads", torch.get_num_threads()),
        ("shape", f"d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch} {args.sparsity}"),
        ("step's compute dtype (--sae-dtype)", args.sae_dtype),
        *((f"dense encoder matmul, {name} (s)", f"{t:.4f}") for name, t in t_layouts.items()),
        ("floor: the faster of the two (s)", f"{t_floor:.4f}"),
        ("encoder (impl=" + args.impl + ")", encoder),
        ("full training step (s)", f"{t_step:.4f}"),
        ("step / floor tokens per s", f"{t_floor / t_step:.2f}"),
        *([("the screen's bf16 product [B, d_in+pad] @ [d_in+pad, d_sae] (s)", f"{t_bf16:.4f}")]
          if t_bf16 is not None else []),
        *([("step with impl=torch: the fp32 product (s)", f"{t_plain:.4f}"),
           ("impl=torch step / floor tokens per s", f"{t_floor / t_plain:.2f}")] if screened else []),
        *([("TopK step, same rounds (s)", f"{t_topk:.4f}"), ("step time / TopK step time", f"{t_step / t_topk:.2f}")]
          if t_topk is not None else []),
        *([("TopK step with impl=torch (the fp32 product), same rounds (s)", f"{t_topk_plain:.4f}"),
           ("step time / impl=torch TopK step time", f"{t_step / t_topk_plain:.2f}")]
          if t_topk_plain is not None else []),
        ("SAE parameters (MiB)", f"{params_mib:.0f}"),
        ("peak RSS growth during timing (MiB)", f"{rss1 - rss0:.0f}"),
        ("peak RSS of the process (MiB)", f"{rss1:.0f}"),
    ]


def print_table(rows: list[tuple[str, object]]) -> None:
    """Print ``rows`` as a two-column markdown table, the measures padded to one width."""
    w = max(len(r[0]) for r in rows)
    print("| measure | value |\n|---|---|")
    for name, v in rows:
        print(f"| {name:<{w}} | {v} |")


def main(argv=None):
    """Time the training step against the floor in interleaved rounds (module docstring);
    print the table, then the tokens-per-second line."""
    args = parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    grad = torch.randn(args.batch, args.d_in) if args.sparsity == "gtopk" else None  # g-SAE selects with it
    sae, cfg, trainers, screened = step_trainers(args, x)
    encoder = "screen" if screened else "fp32 pre-activations"
    pre = torch.empty(args.batch, args.d_sae)
    # The SAE stores W_enc transposed ([d_sae, d_in] rows); the floor is timed with both
    # storage orders and the faster one counts, so the layout cannot flatter the ratio.
    layouts = {"W_enc as [d_sae, d_in] rows": sae.W_enc.detach(),
               "W_enc as [d_in, d_sae] rows": sae.W_enc.detach().contiguous()}
    rss0 = peak_rss_mib()
    fns = timed_functions(args, x, grad, sae, cfg, trainers, screened, layouts, pre)
    times = {name: statistics.median(t) for name, t in interleaved_times(fns, args.reps, warmup=2).items()}
    t_layouts = {name: times.pop(name) for name in layouts}
    rss1 = peak_rss_mib()
    print_table(result_rows(args, sae, encoder, screened, times, t_layouts, rss0, rss1))
    t_step, t_topk, t_floor = times["step"], times.get("topk"), min(t_layouts.values())
    extra = f" topk_tokens_per_s={args.batch / t_topk:.0f}" if t_topk is not None else ""
    print(f"tokens_per_s={args.batch / t_step:.0f} floor_tokens_per_s={args.batch / t_floor:.0f}{extra}")


def bf16_product(screen, xc, sae):
    """The screen's matmul alone, on buffers laid out as screened_select lays them out."""
    K = screen._padded_k(xc.shape[1])
    Wa = torch.zeros(sae.cfg.d_sae, K, dtype=torch.bfloat16)
    xa = torch.zeros(len(xc), K, dtype=torch.bfloat16)
    with torch.no_grad():
        Wa[:, : xc.shape[1]].copy_(sae.W_enc_T)
        xa[:, : xc.shape[1]].copy_(xc)
    out = torch.empty(len(xc), sae.cfg.d_sae, dtype=torch.bfloat16)
    return lambda: torch.mm(xa, Wa.t(), out=out)


if __name__ == "__main__":
    main()
