"""Fused TopK encoder kernel against F.linear + torch.topk, and full training steps, on one GPU.

    python benchmarks/gpu_kernels.py [--out table.md]     # one H100/H200, a few minutes
    python benchmarks/gpu_kernels.py --small              # tiny shapes on CPU, TRITON_INTERPRET=1
    python benchmarks/gpu_kernels.py --compile-only       # compile every kernel for sm_90, no GPU

For batch 4096, k=32, d_in in {768, 2304}, d_sae in {32768, 131072}, bf16 and fp32, each row:
  check   fused top-k vs F.linear + torch.topk: share of selected latents that agree, max
          |value| difference (ties in torch.topk may pick other indices with equal values)
  (a)     F.linear + torch.topk                 time, peak memory above the inputs
  (b)     fused kernel (encode_topk impl=triton) time, peak memory
  (c)     training step (forward, backward, Adam on W_enc, b_enc, W_dec, b_dec):
          "unfused" = autograd through F.linear + topk + embedding_bag decode,
          "fused"   = encode_topk + decode_sparse with impl="triton"
  roofline fraction = 2*B*d_in*d_sae flops / time / measured matmul ceiling of that dtype
          (fp32 ceiling and kernels use full fp32, as torch does with allow_tf32=False).
Times: CUDA events, warm-up, median of --reps. A failing row prints its error and the table
goes on. `--small` runs the same code on CPU (wall-clock timer, no memory numbers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--compile-only", action="store_true", help="compile the kernels for sm_90 and report registers")
    ap.add_argument("--out", help="also write the table as markdown to this file")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10, --small 1)")
    ap.add_argument("--k", type=int, default=32)
    return ap.parse_args()


ARGS = parse_args()
if ARGS.small:  # before anything imports triton or decorates a kernel
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from saekit.kernels import decode_sparse, encode_topk  # noqa: E402


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


def unfused_topk(x, p, k):
    pre = F.linear(x - p["b_dec"], p["W_enc"].t(), p["b_enc"])  # [B, d_sae]
    v, i = pre.topk(k, dim=1)
    return v.relu(), i


def fused_topk(x, p, k):
    return encode_topk(x, p["W_enc"], p["b_enc"], p["b_dec"], k, impl="triton")


def train_step(kind, x, p, opt, k):
    if kind == "unfused":
        v, i = unfused_topk(x, p, k)
        x_hat = F.embedding_bag(i, p["W_dec"], per_sample_weights=v, mode="sum") + p["b_dec"]
    else:
        top = encode_topk(x, p["W_enc"], p["b_enc"], p["b_dec"], k, impl="triton")
        x_hat = decode_sparse(top.values, top.indices, p["W_dec"], p["b_dec"], impl="triton")
    loss = (x_hat.float() - x.float()).pow(2).sum() / x.shape[0]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def agreement(x, p, k) -> tuple[float, float]:
    """(share of selected latents in common, max |value| difference of the sorted values)."""
    with torch.no_grad():
        rv, ri = unfused_topk(x, p, k)
        top = fused_topk(x, p, k)
    same = (top.indices[:, :, None] == ri[:, None, :]).any(-1).float().mean().item()
    err = (top.values.float() - rv.float()).abs().max().item()
    return same, err


# ---- the table ------------------------------------------------------------------------------------

COLUMNS = ["d_in", "d_sae", "dtype", "index agree", "max val err",
           "(a) ms", "(a) MiB", "(a) roof", "(b) ms", "(b) MiB", "(b) roof",
           "(c) unfused ms", "(c) unfused MiB", "(c) fused ms", "(c) fused MiB", "error"]


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def measure_row(B, d_in, d_sae, dtype, k, device, timer, ceilings) -> dict:
    row = {"d_in": d_in, "d_sae": d_sae, "dtype": str(dtype).removeprefix("torch.")}
    try:
        x, p = make_sae(B, d_in, d_sae, dtype, device)
        row["index agree"], row["max val err"] = agreement(x, p, k)
        flops = 2 * B * d_in * d_sae
        for tag, fn in (("(a)", unfused_topk), ("(b)", fused_topk)):
            with torch.no_grad():
                ms = timer(lambda: fn(x, p, k))
                row[f"{tag} ms"] = ms
                row[f"{tag} MiB"] = peak_mib(device, lambda: fn(x, p, k))
            row[f"{tag} roof"] = f"{flops / (ms * 1e-3) / 1e12 / ceilings[dtype]:.0%}"
        for kind in ("unfused", "fused"):
            opt = torch.optim.Adam(p.values(), lr=1e-5)
            # the lambdas run before `del opt` (which frees Adam's moments before the next kind)
            row[f"(c) {kind} ms"] = timer(lambda: train_step(kind, x, p, opt, k))  # noqa: F821
            row[f"(c) {kind} MiB"] = peak_mib(device, lambda: train_step(kind, x, p, opt, k))  # noqa: F821
            del opt
    except Exception as e:  # one bad row must not take the table down
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
        traceback.print_exc(file=sys.stderr)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def markdown(rows, header_lines) -> str:
    lines = list(header_lines)
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) if c in r else "" for c in COLUMNS) + " |")
    return "\n".join(lines)


def run_table() -> None:
    small = ARGS.small
    device = torch.device("cpu" if small else "cuda")
    if not small and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --small (CPU, Triton interpreter) or --compile-only")
    reps = ARGS.reps or (1 if small else 10)
    timer = Timer(device, reps=reps, warmup=1 if small else 3)
    B = 37 if small else 4096
    k = min(ARGS.k, 7) if small else ARGS.k
    d_ins = (24, 40) if small else (768, 2304)
    d_saes = (200, 333) if small else (32768, 131072)
    dtypes = (torch.bfloat16, torch.float32)
    ceilings = {dt: matmul_ceiling(device, dt, timer) for dt in dtypes}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    header = [
        f"# saekit.kernels on {name}: B={B}, k={k}, median of {reps} (CUDA events)" if not small
        else f"# saekit.kernels --small on {name}: B={B}, k={k}, wall clock, {reps} rep(s)",
        "matmul ceiling: " + ", ".join(f"{str(dt).removeprefix('torch.')} {c:.3g} TFLOP/s"
                                       for dt, c in ceilings.items()),
        "",
    ]
    rows = []
    for d_in in d_ins:
        for d_sae in d_saes:
            for dtype in dtypes:
                rows.append(measure_row(B, d_in, d_sae, dtype, k, device, timer, ceilings))
                done = {c: fmt(rows[-1].get(c)) for c in ("d_in", "d_sae", "dtype", "(b) ms", "error")
                        if c in rows[-1]}
                print("row done:", done, file=sys.stderr, flush=True)
    table = markdown(rows, header)
    if ARGS.out:
        with open(ARGS.out, "w") as f:
            f.write(table + "\n")
    print(table)


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
        run_table()
