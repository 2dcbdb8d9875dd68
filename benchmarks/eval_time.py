"""Wall-clock time of `saekit eval` and `saekit eval-ioi` on one SAE (target for eval-ioi:
at most 5 minutes for 2,000 prompts on 2 CPU cores).

    python benchmarks/eval_time.py --sae pretrained/saes/topk-L3-corpus [--n 2000]

The SAE folder is copied to a temporary one first, so the shipped results are not rewritten.
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sae", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--tokens", type=int, default=65536)
    a = p.parse_args()
    from saekit.evals.options import EvalOptions, IOIEvalOptions
    from saekit.evals.run import run_eval, run_eval_ioi

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sae = Path(tmp) / Path(a.sae).name
        shutil.copytree(a.sae, sae, ignore=shutil.ignore_patterns("checkpoints"))
        t = time.perf_counter()
        r = run_eval(sae, opts=EvalOptions(tokens=a.tokens))
        rows.append(("saekit eval", f"{r['tokens']} tokens", time.perf_counter() - t))
        t = time.perf_counter()
        r = run_eval_ioi(sae, opts=IOIEvalOptions(n=a.n))
        rows.append(("saekit eval-ioi", f"{r['n_eval']} prompts, {len(r['nodes'])} nodes", time.perf_counter() - t))
    print(f"torch threads: {torch.get_num_threads()}")
    print("| command | size | seconds |\n|---|---|---|")
    for name, size, sec in rows:
        print(f"| {name} | {size} | {sec:.1f} |")


if __name__ == "__main__":
    main()
