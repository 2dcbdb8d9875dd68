"""Fused TopK encoder against F.linear + torch.topk and the bare cuBLAS GEMM, training steps,
impl="auto"'s choice and AuxK, on one GPU.

    python benchmarks/gpu_kernels.py [--out table.md]     # one H100/H200, a few minutes
    python benchmarks/gpu_kernels.py --small              # tiny shapes on CPU, TRITON_INTERPRET=1
    python benchmarks/gpu_kernels.py --compile-only       # compile every kernel for sm_90, no GPU

benchmarks/gpu_check.sh runs it as one section of the GPU readiness check. Three tables:

1. The encoder, at d_in 768, d_sae 32768 and 131072, k 32 and 128, batch 4096 and 16384,
   fp32 and bf16 (--d-in, --d-sae, --k, --batch change the grid). Each row:
   check    fused top-k vs F.linear + torch.topk: share of selected latents that agree, max
            |value| difference (ties in torch.topk may pick other indices with equal values)
   gemm     the bare product (x - b_dec) @ W_enc + b_enc (cuBLAS addmm): the floor any exact
            TopK encoder pays; time, peak memory above the inputs, roofline fraction
   linear   F.linear + torch.topk (the plain PyTorch encoder)
   torch    saekit's encode_topk(impl="torch")
   triton   saekit's encode_topk(impl="triton"), the fused kernel (never builds [B, d_sae])
   step     a training step (forward, backward, Adam on W_enc, b_enc, W_dec, b_dec):
            "unfused" = autograd through F.linear + topk + embedding_bag decode;
            "torch"/"triton" = encode_topk + decode_sparse with that impl (sparse backward)
   roofline fraction = 2*B*d_in*d_sae flops / time / measured matmul ceiling of that dtype
   (fp32 without TF32, as torch does with allow_tf32=False, and the kernels' "ieee" dot).
2. impl="auto": what encode_topk(impl="auto") runs at each shape on this device
   (kernels.topk_impl) beside the faster of torch and triton, for the encoder and for the
   step. The default on CUDA must follow this table: where torch wins, auto must pick torch.
3. AuxK active: saekit's Trainer step at d_in 2304 (d_sae 36864, k 32, k_aux = d_in/2),
   with 0% and 10% of latents dead, impl="auto" and "torch".

Times: CUDA events, warm-up, median of --reps. A failing row prints its error and the table
goes on; the markdown (--out) is rewritten after every row, so a run stopped by a time limit
leaves the rows it finished. `--small` runs the same code on CPU (wall-clock timer, no memory
numbers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",")]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--compile-only", action="store_true", help="compile the kernels for sm_90 and report registers")
    ap.add_argument("--out", help="also write the tables as markdown to this file")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5, --small 1)")
    ap.add_argument("--d-in", type=ints, default=None, help="comma-separated (default 768; --small 24)")
    ap.add_argument("--d-sae", type=ints, default=None, help="comma-separated (default 32768,131072; --small 200)")
    ap.add_argument("--k", type=ints, default=None, help="comma-separated (default 32,128; --small 4)")
    ap.add_argument("--batch", type=ints, default=None, help="comma-separated (default 4096,16384; --small 37)")
    ap.add_argument("--no-auxk", action="store_true", help="leave out the AuxK table")
    return ap.parse_args()


ARGS = parse_args()
if ARGS.small:  # before anything imports triton or decorates a kernel
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from saekit.kernels import decode_sparse, encode_topk, topk_impl  # noqa: E402


# ---- measurement ------------------------------------------------------------------------


class Timer:
    """Median milliseconds of fn() after warm-up; CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        ts = []
        for _ in range(self.reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                ts.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)


def peak_mib(device: torch.device, fn) -> float | None:
    """Peak memory allocated while fn() runs, above what was allocated before (MiB)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def matmul_ceiling(device: torch.device, dtype: torch.dtype, timer: Timer) -> float:
    """Measured TFLOP/s of a large square matmul: the roofline each row is compared with."""
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = timer(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ---- the things being measured ---------------------------------------------------------------


def make_sae(B, d_in, d_sae, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, d_in, generator=g).to(device, dtype)
    W_dec = F.normalize(torch.randn(d_sae, d_in, generator=g), dim=1)
    p = dict(
        W_enc=W_dec.t().contiguous(), b_enc=torch.zeros(d_sae), W_dec=W_dec,
        b_dec=x.float().mean(0).cpu() * 0.5,
    )
    return x, {n: torch.nn.Parameter(t.to(device, dtype)) for n, t in p.items()}


def gemm(x, p, k):
    return torch.addmm(p["b_enc"], x - p["b_dec"], p["W_enc"])  # [B, d_sae]


def unfused_topk(x, p, k):
    pre = F.linear(x - p["b_dec"], p["W_enc"].t(), p["b_enc"])  # [B, d_sae]
    v, i = pre.topk(k, dim=1)
    return v.relu(), i


def saekit_topk(impl):
    return lambda x, p, k: encode_topk(x, p["W_enc"], p["b_enc"], p["b_dec"], k, impl=impl)


def train_step(kind, x, p, opt, k):
    if kind == "unfused":
        v, i = unfused_topk(x, p, k)
        # fp32, as saekit's decode: CUDA has no bf16 backward for embedding_bag's per-sample weights
        x_hat = F.embedding_bag(i, p["W_dec"].float(), per_sample_weights=v.float(), mode="sum") + p["b_dec"]
    else:  # "torch" or "triton": saekit's kernels with their sparse backward
        top = encode_topk(x, p["W_enc"], p["b_enc"], p["b_dec"], k, impl=kind)
        x_hat = decode_sparse(top.values, top.indices, p["W_dec"], p["b_dec"], impl=kind)
    loss = (x_hat.float() - x.float()).pow(2).sum() / x.shape[0]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def agreement(x, p, k) -> tuple[float, float]:
    """(share of selected latents in common, max |value| difference of the sorted values)."""
    with torch.no_grad():
        rv, ri = unfused_topk(x, p, k)
        top = saekit_topk("triton")(x, p, k)
    same = (top.indices[:, :, None] == ri[:, None, :]).any(-1).float().mean().item()
    err = (top.values.float() - rv.float()).abs().max().item()
    return same, err


# ---- the tables ----------------------------------------------------------------------------------

ENCODER = ["d_in", "d_sae", "k", "B", "dtype", "index agree", "max val err",
           "gemm ms", "gemm MiB", "gemm roof", "linear+topk ms", "linear+topk MiB",
           "torch ms", "torch MiB", "triton ms", "triton MiB", "triton roof", "triton / gemm",
           "step unfused ms", "step unfused MiB", "step torch ms", "step torch MiB",
           "step triton ms", "step triton MiB", "error"]
DISPATCH = ["d_in", "d_sae", "k", "B", "dtype", "auto runs", "faster encoder", "faster step", "auto = faster step"]
AUXK = ["d_in", "d_sae", "k", "k_aux", "B", "impl", "runs", "dead", "step ms", "tokens/s", "step MiB", "aux loss",
        "error"]


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def table(columns, rows) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(fmt(r[c]) if c in r else "" for c in columns) + " |" for r in rows]


def error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__


def measure_row(B, d_in, d_sae, k, dtype, device, timer, ceilings) -> dict:
    row = {"d_in": d_in, "d_sae": d_sae, "k": k, "B": B, "dtype": str(dtype).removeprefix("torch.")}
    try:
        x, p = make_sae(B, d_in, d_sae, dtype, device)
        row["index agree"], row["max val err"] = agreement(x, p, k)
        row["auto"] = topk_impl("auto", x, p["W_enc"], k)
        flops = 2 * B * d_in * d_sae
        for tag, fn in (("gemm", gemm), ("linear+topk", unfused_topk), ("torch", saekit_topk("torch")),
                        ("triton", saekit_topk("triton"))):
            with torch.no_grad():
                ms = timer(lambda: fn(x, p, k))
                row[f"{tag} ms"] = ms
                row[f"{tag} MiB"] = peak_mib(device, lambda: fn(x, p, k))
            row[f"{tag} roof"] = f"{flops / (ms * 1e-3) / 1e12 / ceilings[dtype]:.0%}"
        row["triton / gemm"] = row["triton ms"] / row["gemm ms"]
        errors = []
        for kind in ("unfused", "torch", "triton"):  # one failing kind leaves the others measured
            opt = torch.optim.Adam(p.values(), lr=1e-5)
            try:
                # the lambdas run before `del opt` (which frees Adam's moments before the next kind)
                row[f"step {kind} ms"] = timer(lambda: train_step(kind, x, p, opt, k))  # noqa: F821
                row[f"step {kind} MiB"] = peak_mib(device, lambda: train_step(kind, x, p, opt, k))  # noqa: F821
            except Exception as e:
                errors.append(f"step {kind}: {error_text(e)}")
                traceback.print_exc(file=sys.stderr)
            del opt
        if errors:
            row["error"] = "; ".join(errors)
    except Exception as e:  # one bad row must not take the table down
        row["error"] = error_text(e)
        traceback.print_exc(file=sys.stderr)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def dispatch_row(r: dict) -> dict:
    """impl="auto"'s choice at row r beside the faster of torch and triton."""
    out = {c: r[c] for c in ("d_in", "d_sae", "k", "B", "dtype")}
    faster = lambda a, b: ("triton" if r[a] < r[b] else "torch") if a in r and b in r else None  # noqa: E731
    out["auto runs"] = r.get("auto")
    out["faster encoder"] = faster("triton ms", "torch ms")
    out["faster step"] = faster("step triton ms", "step torch ms")
    if out["auto runs"] and out["faster step"]:
        out["auto = faster step"] = "yes" if out["auto runs"] == out["faster step"] else "**NO**"
    return out


def auxk_row(B, d_in, d_sae, k, impl, dead_frac, device, timer) -> dict:
    """One saekit Trainer step with the first ``dead_frac`` of latents marked dead before it,
    so AuxK runs on them (k_aux = d_in/2, its default)."""
    from saekit.sae import SAE, SAEConfig
    from saekit.training.config import DataOptions, OptimOptions, RunOptions, TrainConfig
    from saekit.training.trainer import Trainer

    row = {"d_in": d_in, "d_sae": d_sae, "k": k, "B": B, "impl": impl, "dead": f"{dead_frac:.0%}"}
    try:
        sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, impl=impl), seed=0).to(device)
        cfg = TrainConfig(sae=SAEConfig(d_sae=d_sae, k=k, impl=impl),
                          data=DataOptions(batch_size=B, total_tokens=B * 10**6, fill_tokens=B),
                          optim=OptimOptions(lr=1e-5, warmup_steps=0), run=RunOptions(progress=False))
        trainer = Trainer(sae, cfg, total_steps=10**6)
        x = torch.randn(B, d_in, generator=torch.Generator().manual_seed(0)).to(device)
        dead = int(dead_frac * d_sae)
        row["k_aux"] = trainer.k_aux
        row["runs"] = topk_impl(impl, x, sae.W_enc, k)

        def step():
            if dead:  # the same latents dead at every step
                trainer.tokens_since_fired[:dead] = cfg.optim.dead_tokens
            return trainer.train_step(x)

        row["aux loss"] = step().aux
        row["step ms"] = timer(step)
        row["tokens/s"] = B / (row["step ms"] * 1e-3)
        row["step MiB"] = peak_mib(device, step)
    except Exception as e:
        row["error"] = error_text(e)
        traceback.print_exc(file=sys.stderr)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def markdown(header, rows, auxk_rows) -> str:
    lines = list(header)
    lines += ["## Fused encoder against F.linear + torch.topk and the bare GEMM", ""]
    lines += table(ENCODER, rows)
    disp = [dispatch_row(r) for r in rows]
    lines += ["", '## impl="auto" on this device', "",
              "`auto runs` is what `encode_topk(impl=\"auto\")` runs at that shape (`saekit.kernels.topk_impl`); "
              "the faster of torch and triton is by median time. The default on CUDA must follow this table: "
              "where torch's step is faster, `auto` must run torch (`kernels/dispatch.py`).", ""]
    lines += table(DISPATCH, disp)
    agree = [d for d in disp if d.get("auto = faster step")]
    wrong = [d for d in agree if d["auto = faster step"] != "yes"]
    lines += ["", f"auto runs the faster step at {len(agree) - len(wrong)} of {len(agree)} measured shapes"
              + (f"; **change the default at {len(wrong)}**." if wrong else ".")]
    if auxk_rows is not None:
        lines += ["", "## AuxK active (saekit Trainer step)", "",
                  "The first `dead` share of latents is marked dead before every step, so AuxK reconstructs "
                  "the residual with k_aux of them (`aux loss` > 0 when it ran).", ""]
        lines += table(AUXK, auxk_rows)
    return "\n".join(lines) + "\n"


def run_tables() -> None:
    small = ARGS.small
    device = torch.device("cpu" if small else "cuda")
    if not small and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --small (CPU, Triton interpreter) or --compile-only")
    reps = ARGS.reps or (1 if small else 5)
    timer = Timer(device, reps=reps, warmup=0 if small else 3)
    d_ins = ARGS.d_in or ([24] if small else [768])
    d_saes = ARGS.d_sae or ([200] if small else [32768, 131072])
    ks = ARGS.k or ([4] if small else [32, 128])
    batches = ARGS.batch or ([37] if small else [4096, 16384])
    dtypes = (torch.float32, torch.bfloat16)
    ceilings = {dt: matmul_ceiling(device, dt, timer) for dt in dtypes}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    header = [
        f"# saekit.kernels on {name}: median of {reps} ({'CUDA events' if not small else 'wall clock'})",
        "",
        "matmul ceiling: " + ", ".join(f"{str(dt).removeprefix('torch.')} {c:.3g} TFLOP/s"
                                       for dt, c in ceilings.items())
        + f"; torch {torch.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}",
        "",
    ]
    rows, auxk_rows = [], None

    def write():
        text = markdown(header, rows, auxk_rows)
        if ARGS.out:
            with open(ARGS.out, "w") as f:
                f.write(text)
        return text

    if not ARGS.no_auxk:  # first: its four steps are quick, and a time limit cuts the grid's end
        auxk_rows = []
        d_in, k = (40, 4) if small else (2304, 32)
        d_sae, B = (200, 37) if small else (16 * d_in, 4096)
        for impl in ("auto", "torch"):
            for dead in (0.0, 0.1):
                auxk_rows.append(auxk_row(B, d_in, d_sae, k, impl, dead, device, timer))
                print("auxk row done:", {c: fmt(auxk_rows[-1].get(c)) for c in ("impl", "dead", "step ms", "error")
                                         if c in auxk_rows[-1]}, file=sys.stderr, flush=True)
                write()
    for B in batches:
        for d_in in d_ins:
            for d_sae in d_saes:
                for k in ks:
                    for dtype in dtypes:
                        rows.append(measure_row(B, d_in, d_sae, k, dtype, device, timer, ceilings))
                        done = {c: fmt(rows[-1].get(c)) for c in ("B", "d_sae", "k", "dtype", "triton ms", "error")
                                if c in rows[-1]}
                        print("row done:", done, file=sys.stderr, flush=True)
                        write()
    print(write())


# ---- offline compilation check ------------------------------------------------------------------


def compile_only() -> None:
    """Compile each Triton kernel for sm_90 with ptxas (no GPU needed); print registers/spills."""
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from saekit.kernels import encoder_triton as et
    from saekit.kernels import sparse_rows_triton as st

    target = GPUTarget("cuda", 90, 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def report(name, fn, sig, consts, warps):
        t0 = time.perf_counter()
        try:
            kern = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                                  options={"num_warps": warps})
        except Exception as e:
            print(f"| {name} | FAILED: {str(e).splitlines()[-1][:150]} |")
            return
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kern.asm["cubin"])
            f.flush()
            use = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        use = " ".join(w for line in use.splitlines() if "REG:" in line
                       for w in line.split() if w.split(":")[0] in ("REG", "STACK"))
        print(f"| {name} | {use} | {time.perf_counter() - t0:.0f} s |")

    print("| kernel (sm_90) | registers / stack bytes (spills) | compile |\n|---|---|---|")
    ptr = lambda dt: "*" + dt  # noqa: E731
    for dt in ("bf16", "fp32"):
        elt = 2 if dt == "bf16" else 4
        for k_pad in (32, 128, 512):
            plan = et._plan(4096, 32768, elt, k_pad)
            sig = {n: ptr(dt) for n in ("x_ptr", "w_ptr", "b_enc_ptr", "b_dec_ptr")}
            sig |= {"keys_ptr": "*i64"}
            sig |= {n: "i32" for n in ("B", "D_IN", "D_SAE", "TILES_PER_CHUNK", "s_xb", "s_xd", "s_wd", "s_wn")}
            consts = dict(LOG_K=k_pad.bit_length() - 1,
                          BLOCK_B=plan["BLOCK_B"], LOG_N=plan["BLOCK_N"].bit_length() - 1, BLOCK_K=plan["BLOCK_K"],
                          DOT_PRECISION="ieee", UPCAST_DOT=False, IS_BF16=dt == "bf16")
            sig |= {n: "constexpr" for n in consts}
            report(f"encoder {dt} k_pad={k_pad} BLOCK_B={plan['BLOCK_B']}",
                   et._encoder_topk_kernel, sig, consts, 8)
        common = {"B": "i32", "K": "i32", "D": "i32"}
        s6 = lambda *names: {n: "i32" for n in names}  # noqa: E731
        report(f"gather_rows {dt}", st._gather_rows_kernel,
               {"idx_ptr": "*i64", "w_ptr": ptr(dt), "m_ptr": ptr(dt), "out_ptr": "*fp32", **common,
                **s6("s_ib", "s_ik", "s_wb", "s_wk", "s_mn", "s_md"), "BLOCK_B": "constexpr", "BLOCK_D": "constexpr"},
               {"BLOCK_B": 16, "BLOCK_D": 128}, 4)
        report(f"row_dot {dt}", st._row_dot_kernel,
               {"idx_ptr": "*i64", "dense_ptr": "*fp32", "m_ptr": ptr(dt), "out_ptr": "*fp32", "P": "i32", "K": "i32",
                "D": "i32", **s6("s_db", "s_dd", "s_mn", "s_md"), "BLOCK_P": "constexpr", "BLOCK_D": "constexpr"},
               {"BLOCK_P": 64, "BLOCK_D": 64}, 4)
        report(f"scatter_rows {dt}", st._scatter_rows_kernel,
               {"idx_ptr": "*i64", "w_ptr": ptr(dt), "dense_ptr": "*fp32", "out_ptr": "*fp32", **common,
                **s6("s_ib", "s_ik", "s_wb", "s_wk", "s_db", "s_dd"), "BLOCK_B": "constexpr", "BLOCK_D": "constexpr"},
               {"BLOCK_B": 16, "BLOCK_D": 128}, 4)


if __name__ == "__main__":
    if ARGS.compile_only:
        compile_only()
    else:
        run_tables()
