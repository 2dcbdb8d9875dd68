"""The Python half of benchmarks/gpu_check.sh: the sections that are Python runs, and the one
markdown file of tables they add up to.

    python benchmarks/gpu_check.py train    --shape S --model-dir M --run R --device D --dtype T -- ARGS
    python benchmarks/gpu_check.py torchrun --shape S --model-dir M --dir R --device D -- ARGS
    python benchmarks/gpu_check.py report   --work W --out FILE.md --mode gpu|dry-run

`train` and `torchrun` write ``info.json`` beside their runs when they start and when they
end; `report` builds every table from what the sections left on disk (logs, run folders,
info.json, the kernel benchmark's markdown), so a section stopped by its time limit still
shows how far it got. Nothing here asserts a time: the tables report them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

SECTIONS = [  # (name, heading): the order of the report
    ("tests", "Kernel tests on the device"),
    ("kernels", "Kernel benchmark"),
    ("train", "saekit train: every hook_z of the GPT-2-small-shaped model"),
    ("torchrun", "torchrun, one process"),
]


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---- the sections ------------------------------------------------------------------------


def ensure_model(shape: str, folder: Path) -> Path:
    from saekit.training.shaped_models import build

    if not (folder / "config.json").exists():
        build(shape, folder)
    return folder


def peak_gpu_mib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def cmd_train(a, args: list[str]) -> int:
    """`saekit train` (in this process, through saekit.cli.main) of the shaped model."""
    import torch

    from saekit.cli import main

    model = ensure_model(a.shape, Path(a.model_dir))
    argv = ["train", "--model", str(model), "--out", a.run, "--device", a.device, "--dtype", a.dtype, *args]
    info = {"shape": a.shape, "argv": argv, "dtype": a.dtype}
    write_json(Path(a.run) / "info.json", info)
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    rc = main(argv)
    info.update(rc=rc, wall_s=time.time() - t0, peak_gpu_mib=peak_gpu_mib(a.device))
    write_json(Path(a.run) / "info.json", info)
    return rc


def max_abs_diff(a: Path, b: Path) -> float | None:
    from saekit import load_sae

    try:
        x, y = load_sae(a).state_dict(), load_sae(b).state_dict()
    except Exception:  # a run that did not finish has no SAE to compare
        return None
    return max((x[n].float() - y[n].float()).abs().max().item() for n in x)


def cmd_torchrun(a, args: list[str]) -> int:
    """One process under torchrun (NCCL on CUDA, gloo on CPU), then the same run without
    torchrun in this process; both SAEs compared."""
    import subprocess

    from saekit.cli import main

    model, root = ensure_model(a.shape, Path(a.model_dir)), Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    common = ["--model", str(model), "--device", a.device, *args]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "saekit", "train", "--out", str(root / "torchrun"), *common]
    info = {"cmd": cmd}
    write_json(root / "info.json", info)
    t0 = time.time()
    with open(root / "torchrun.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    info.update(rc_torchrun=rc, wall_torchrun_s=time.time() - t0)
    write_json(root / "info.json", info)
    t0 = time.time()
    info["rc_plain"] = main(["train", "--out", str(root / "plain"), *common])
    info["wall_plain_s"] = time.time() - t0
    info["max_abs_diff"] = max_abs_diff(root / "torchrun", root / "plain")
    write_json(root / "info.json", info)
    return rc or info["rc_plain"]


# ---- the report ----------------------------------------------------------------------------------


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def table(columns: list[str], rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]


def log_tail(path: Path, n: int = 15) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return ["(no log)"]
    return ["```", *lines, "```"]


TEST_LINE = re.compile(r"^(tests/[^:\s]+)::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def tests_tables(work: Path) -> list[str]:
    """Per test file: passed / failed / skipped / errors, from pytest -v's log; then the
    failures by name."""
    counts: dict[str, dict] = {}
    failed = []
    for line in (work / "tests.log").read_text(errors="replace").splitlines() if (work / "tests.log").exists() else []:
        m = TEST_LINE.match(line)
        if m:
            c = counts.setdefault(m.group(1), {"file": m.group(1)})
            c[m.group(3)] = c.get(m.group(3), 0) + 1
            if m.group(3) in ("FAILED", "ERROR"):
                failed.append(f"{m.group(1)}::{m.group(2)}")
    info = read_json(work / "tests.json")
    lines = [f"{info.get('where', '')}", ""] if info else []
    rows = [{**c, **{k: c.get(k, 0) for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")}} for c in counts.values()]
    lines += table(["file", "PASSED", "FAILED", "SKIPPED", "ERROR"], rows)
    if failed:
        lines += ["", "Failed:", *(f"- `{t}`" for t in failed[:40])]
    return lines


def train_tables(work: Path) -> list[str]:
    """The run: tokens reached, speed, memory; then each hook's SAE and its summary."""
    run = work / "train"
    info = read_json(run / "info.json")
    cfg = read_json(run / "train_config.json")
    hooks = sorted((p for p in run.iterdir() if p.is_dir()), key=lambda p: [int(t) if t.isdigit() else t
                   for t in re.split(r"(\d+)", p.name)]) if run.is_dir() else []
    per_hook, tokens, elapsed = [], 0, None
    for h in hooks:
        metrics = [json.loads(l) for l in (h / "metrics.jsonl").read_text().splitlines() if l] \
            if (h / "metrics.jsonl").exists() else []
        last = metrics[-1] if metrics else {}
        tokens = max(tokens, last.get("tokens", 0))
        elapsed = last.get("elapsed_s", elapsed)
        s, c = read_json(h / "summary.json"), read_json(h / "cfg.json")
        per_hook.append({"hook": h.name, "d_in": c.get("d_in"), "d_sae": c.get("d_sae"), "k": c.get("k"),
                         "tokens": last.get("tokens"), "fvu (last step)": last.get("fvu"), "L0": s.get("l0"),
                         "explained variance": s.get("explained_variance"), "dead frac": s.get("dead_frac"),
                         "CE recovered (mean abl.)": s.get("ce_loss_recovered_mean")})
    target = cfg.get("data", {}).get("total_tokens")
    run_row = {"model": info.get("shape"), "hooks": len(hooks), "dtype": info.get("dtype"),
               "target tokens": target, "tokens trained": tokens,
               "training s": elapsed, "tokens/s (training)": tokens / elapsed if elapsed else None,
               "wall s (load, train, summary)": info.get("wall_s"), "peak GPU MiB": info.get("peak_gpu_mib"),
               "finished": "yes" if info.get("rc") == 0 else "no"}
    lines = [f"`{' '.join(info.get('argv', []))}`", ""] if info else []
    lines += table(list(run_row), [run_row]) + [""]
    lines += table(["hook", "d_in", "d_sae", "k", "tokens", "fvu (last step)", "L0", "explained variance",
                    "dead frac", "CE recovered (mean abl.)"], per_hook)
    return lines


def torchrun_tables(work: Path) -> list[str]:
    root = work / "torchrun"
    info = read_json(root / "info.json")
    log = (root / "torchrun.log").read_text(errors="replace") if (root / "torchrun.log").exists() else ""
    backend = re.search(r"process group (\w+), (\d+) process", log)
    row = {"backend": backend.group(1) if backend else "not logged", "processes": backend.group(2) if backend else "",
           "torchrun exit": info.get("rc_torchrun"), "torchrun wall s": info.get("wall_torchrun_s"),
           "one process exit": info.get("rc_plain"), "one process wall s": info.get("wall_plain_s"),
           "max abs weight diff": info.get("max_abs_diff")}
    lines = [f"`{' '.join(info.get('cmd', []))}`", "",
             "The same run without torchrun, in one process, is compared weight by weight.", ""] if info else []
    return lines + table(list(row), [row])


def cmd_report(a) -> int:
    work = Path(a.work)
    collect_env(work)
    status = {}
    if (work / "sections.tsv").exists():
        for line in (work / "sections.tsv").read_text().splitlines():
            name, rc, seconds, limit = line.split("\t")
            status[name] = {"section": name, "exit": int(rc), "seconds": int(seconds), "limit s": int(limit),
                            "status": "ok" if rc == "0" else "TIMED OUT" if rc in ("124", "137") else "FAILED"}
    env = read_json(work / "env.json")
    out = [f"# saekit GPU check ({a.mode}): {env.get('device', '')}", "",
           f"{env.get('date', '')}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
           f"commit {env.get('commit', '?')}, TRITON_INTERPRET={env.get('triton_interpret', '?')}", "",
           "## Sections", ""]
    out += table(["section", "status", "exit", "seconds", "limit s"],
                 [status.get(n, {"section": n, "status": "not run"}) for n, _ in SECTIONS])
    makers = {"tests": tests_tables, "train": train_tables, "torchrun": torchrun_tables}
    for n, heading in SECTIONS:
        out += ["", f"## {heading}", ""]
        try:
            if n == "kernels":  # gpu_kernels.py wrote its own tables: its title as text, its sections one level down
                text = (work / "kernels.md").read_text()
                out += [l[2:] if l.startswith("# ") else "#" + l if l.startswith("#") else l for l in text.splitlines()]
            else:
                out += makers[n](work)
        except (OSError, ValueError, KeyError) as e:
            out += [f"No table: {type(e).__name__}: {e}"]
        if status.get(n, {}).get("status") != "ok":
            out += ["", f"Section `{n}`: {status.get(n, {}).get('status', 'not run')}; the end of its log:", "",
                    *log_tail(work / f"{n}.log")]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(out) + "\n")
    print(f"wrote {a.out}")
    return 0


def collect_env(work: Path) -> None:
    """Facts for the report's first lines (device, versions, commit) into env.json and
    tests.json (where the kernel tests ran: this process has the section's environment)."""
    import datetime
    import os
    import shutil
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    def package(name: str) -> str:  # without importing it (torch alone takes seconds)
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    def output(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = output("git", "rev-parse", "--short", "HEAD")
    gpus = output("nvidia-smi", "--query-gpu=name", "--format=csv,noheader") if shutil.which("nvidia-smi") else ""
    device = ", ".join(gpus.splitlines()) or "no CUDA device (CPU)"
    write_json(work / "env.json", {
        "device": device, "torch": package("torch"), "triton": package("triton"), "commit": commit or "?",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")})
    write_json(work / "tests.json", {
        "where": f"`SAEKIT_TEST_DEVICE={os.environ.get('SAEKIT_TEST_DEVICE', 'cpu')}`, "
                 f"`TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}` on {device}"})


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--shape", default="gpt2-small")
    t.add_argument("--model-dir", required=True)
    t.add_argument("--run", required=True)
    t.add_argument("--device", default="cuda")
    t.add_argument("--dtype", default="auto", help="saekit train's --dtype (the model's)")
    r = sub.add_parser("torchrun")
    r.add_argument("--shape", default="gpt2-small")
    r.add_argument("--model-dir", required=True)
    r.add_argument("--dir", required=True)
    r.add_argument("--device", default="cuda")
    p = sub.add_parser("report")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="gpu")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        return cmd_train(a, rest)
    if a.cmd == "torchrun":
        return cmd_torchrun(a, rest)
    return cmd_report(a)


if __name__ == "__main__":
    sys.exit(main())
