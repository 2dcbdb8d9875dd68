"""Harvesting throughput at a hook against a raw Hugging Face forward and the bridge's own.

    python benchmarks/harvest.py [--hook blocks.5.attn.hook_z] [--model M] [--dtype bfloat16] [--profile]

Rows, timed in turns round after round (medians), so the machine's drift hits them alike:

- raw HF forward of the full model: ``transformers`` loads the same folder the bridge wraps
  (``AutoModelForCausalLM``, its default attention, the bridge's dtype), logits included;
- raw HF forward to the hook: the same model stopped where saekit stops, by a forward hook
  that raises on the Hugging Face module behind the hook point (``blocks.5.attn.hook_z`` is
  the input of ``transformer.h.5.attn.c_proj``); this is the reference of the target;
- the same with ``attn_implementation="eager"``, the attention arithmetic TransformerBridge
  runs (it loads the model eager and recomputes attention itself to fire its hooks);
- the bridge: its forward through blocks 0..L (``stop_at_layer=L+1``, no hooks), its full
  forward, and the bridge stopped at the hook by a bare ``torch`` pre-hook on the module
  (no ``run_with_hooks``, nothing of saekit's);
- saekit's harvest (``saekit.activations.harvest``: hook, stop as soon as it fires, drop BOS,
  flatten), and the harvest of (x, ∂L/∂x) pairs for g-SAEs (full forward, summed next-token
  loss, backward to the hook only).

Targets: harvest ≤ 1.1× the raw HF forward to the hook; with gradients ≤ 3.5× the harvest
without. ``--profile`` adds a torch.profiler table of operator self-time for the raw HF
forward to the hook against the harvest (what the bridge runs that HF does not).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import defaultdict

import torch
from bench_timing import interleaved_times


class _Stop(Exception):
    pass


def _raise(*_):
    raise _Stop


def hf_path(bridge, component: str) -> str:
    """The Hugging Face module a bridge component wraps (``blocks.5.attn.o`` ->
    ``transformer.h.5.attn.c_proj``): top-level components and blocks carry their full HF
    path as their name, the components inside a block their name relative to their parent."""
    parts = component.split(".")
    top = 2 if parts[0] == "blocks" else 1
    cur = bridge.get_submodule(".".join(parts[:top]))
    path = cur.name
    for p in parts[top:]:
        cur = getattr(cur, p)
        path += "." + cur.name
    return path


def hf_module_of_hook(bridge, hook_name: str) -> tuple[str, str]:
    """``(path, kind)``: the Hugging Face module behind ``hook_name`` and whether the hook reads
    its input (``"hook_in"``) or its output (``"hook_out"``). A hook inside a component (an
    attention pattern, a norm's scale) maps to the output of its block."""
    point = bridge.hook_dict[hook_name].name  # aliases resolved: blocks.5.attn.o.hook_in
    comp, _, kind = point.rpartition(".")
    if kind not in ("hook_in", "hook_out"):
        return hf_path(bridge, ".".join(comp.split(".")[:2])), "hook_out"
    return hf_path(bridge, comp), kind


def stopped_at(model, path: str, kind: str, tokens):
    """A function running ``model(tokens)`` until module ``path`` is reached (``hook_in``) or
    has run (``hook_out``)."""
    module = model.get_submodule(path)

    def run():
        h = (module.register_forward_pre_hook(_raise) if kind == "hook_in"
             else module.register_forward_hook(_raise))
        try:
            with torch.no_grad():
                model(tokens)
        except _Stop:
            pass
        finally:
            h.remove()
    return run


def no_grad(fn):
    def run():
        with torch.no_grad():
            fn()
    return run


def op_profile(fns: dict, reps: int = 3) -> dict[str, dict[str, float]]:
    """Self CPU milliseconds per call of each operator, for each function of ``fns``; the
    functions take turns, one profiled call each, round after round."""
    from torch.profiler import ProfilerActivity, profile

    out = {name: defaultdict(float) for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            with profile(activities=[ProfilerActivity.CPU]) as p:
                fn()
            for e in p.key_averages():
                out[name][e.key] += e.self_cpu_time_total / 1000 / reps
    return out


# Bridge components by kind; {i} runs over the blocks up to the hook's.
COMPONENTS = {"embeddings": ("embed", "pos_embed"), "layer norms": ("blocks.{i}.ln1", "blocks.{i}.ln2"),
              "attention": ("blocks.{i}.attn",), "MLP": ("blocks.{i}.mlp",)}


def component_times(pairs: dict, reps: int = 3, clock=time.perf_counter) -> dict[str, dict[str, float]]:
    """Milliseconds (of ``clock``) a forward spent in each kind of component (``COMPONENTS``),
    for each ``name: (model, {kind: [module paths]}, fn)`` of ``pairs``, the functions taking
    turns round after round. A component cut short by the hook's stop (block L's attention)
    is not counted."""
    acc, handles = {name: defaultdict(float) for name in pairs}, []
    for name, (model, paths, fn) in pairs.items():
        fn()
        for kind, ps in paths.items():
            for p in ps:
                m, start, a = model.get_submodule(p), {}, acc[name]
                handles.append(m.register_forward_pre_hook(lambda *_, s=start: s.update(t=clock())))
                handles.append(m.register_forward_hook(
                    lambda *_, s=start, k=kind, a=a: a.__setitem__(k, a[k] + clock() - s["t"])))
    for _ in range(reps):
        for name, (_, _, fn) in pairs.items():
            t = clock()
            fn()
            acc[name]["whole forward"] += clock() - t
    for h in handles:
        h.remove()
    return {name: {k: v * 1000 / reps for k, v in a.items()} for name, a in acc.items()}


def print_profile(prof: dict[str, dict[str, float]], rows: int = 14,
                  unit: str = "operator, self CPU ms a call") -> None:
    """A table with a column per function of ``prof`` and the difference last − first."""
    cols = list(prof.values())
    first, last = cols[0], cols[-1]
    keys = sorted(set().union(*cols), key=lambda k: -abs(last.get(k, 0) - first.get(k, 0)))
    print(f"\n| {unit} | " + " | ".join(prof) + f" | {list(prof)[-1]} − {list(prof)[0]} |")
    print("|---" * (len(cols) + 2) + "|")
    for k in keys[:rows]:
        print(f"| {k} | " + " | ".join(f"{c.get(k, 0):.1f}" for c in cols)
              + f" | {last.get(k, 0) - first.get(k, 0):+.1f} |")
    if "whole forward" not in first:
        print("| all operators | " + " | ".join(f"{sum(c.values()):.1f}" for c in cols)
              + f" | {sum(last.values()) - sum(first.values()):+.1f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hook", default="blocks.5.attn.hook_z")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the model's dtype (benchmarks/precision.py compares them side by side)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true", help="also print an operator profile")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time CPU seconds (all threads) instead of wall-clock: steadier on a busy machine")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from saekit import data
    from saekit.activations import harvest, harvest_with_grads, resolve_hook
    from saekit.models import load_model, resolve_model_name

    model = load_model(args.model, "cpu", args.dtype)
    hook = resolve_hook(model, args.hook)
    layer = int(re.match(r"blocks\.(\d+)\.", args.hook).group(1))
    tokens = next(data.token_batches(model.tokenizer, None, args.seq_len, args.batch))
    n = tokens.numel()
    dtype = model.cfg.dtype
    folder = resolve_model_name(args.model)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    hf_eager = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()
    path, kind = hf_module_of_hook(model, args.hook)
    bridge_comp, _, bridge_kind = model.hook_dict[args.hook].name.rpartition(".")

    fns = {
        "raw HF forward, full model": no_grad(lambda: hf(tokens)),
        f"raw HF forward to the hook ({kind} of {path})": stopped_at(hf, path, kind, tokens),
        "raw HF forward to the hook, eager attention": stopped_at(hf_eager, path, kind, tokens),
        f"bridge forward to layer {layer} (stop_at_layer={layer + 1})":
            no_grad(lambda: model(tokens, stop_at_layer=layer + 1)),
        "bridge full forward": no_grad(lambda: model(tokens)),
        # the bridge alone, stopped at the hook's module: no saekit code
        "bridge stopped at the hook by a bare torch hook": stopped_at(model, bridge_comp, bridge_kind, tokens),
        "saekit harvest": lambda: harvest(model, tokens, hook),
        "saekit harvest with gradients (g-SAE)": lambda: harvest_with_grads(model, tokens, hook),
    }
    clock = time.process_time if args.cpu_time else time.perf_counter
    times = {k: statistics.median(v) for k, v in interleaved_times(fns, args.reps, clock=clock).items()}
    ref = times[f"raw HF forward to the hook ({kind} of {path})"]
    unit = "CPU seconds (all threads)" if args.cpu_time else "seconds"
    print(f"| {args.hook}, batch {args.batch}×{args.seq_len}, {dtype}, {torch.get_num_threads()} threads "
          f"| {unit} | tokens/s | × raw HF to the hook |\n|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t:.4f} | {n / t:,.0f} | {t / ref:.2f} |")
    t_h, t_bare = times["saekit harvest"], times["bridge stopped at the hook by a bare torch hook"]
    print(f"harvest / raw HF forward to the hook: {t_h / ref:.2f}x (target <= 1.1); "
          f"harvest / bridge stopped by a bare hook: {t_h / t_bare:.2f}x; "
          f"with gradients / without: {times['saekit harvest with gradients (g-SAE)'] / t_h:.2f}x")
    if args.profile:
        hf_fn, h_fn = fns[f"raw HF forward to the hook ({kind} of {path})"], fns["saekit harvest"]
        eager_fn = fns["raw HF forward to the hook, eager attention"]
        print_profile(op_profile({"raw HF to the hook": hf_fn, "raw HF, eager": eager_fn, "saekit harvest": h_fn}))
        comps = {k: list(dict.fromkeys(c.format(i=i) for i in range(layer + 1) for c in cs))
                 for k, cs in COMPONENTS.items()}
        hf_comps = {k: [hf_path(model, c) for c in cs] for k, cs in comps.items()}
        ct = component_times({"raw HF to the hook": (hf, hf_comps, hf_fn),
                              "raw HF, eager": (hf_eager, hf_comps, eager_fn),
                              "saekit harvest": (model, comps, h_fn)}, clock=clock)
        print_profile(ct, unit=f"{'CPU' if args.cpu_time else 'wall'} ms a forward, by component")


if __name__ == "__main__":
    main()
