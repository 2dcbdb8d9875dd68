"""benchmarks/gpu_check.sh --dry-run: the GPU readiness script's code path on CPU (Triton's
interpreter, gloo instead of NCCL, tiny shapes), and the one markdown file it writes, with
every table filled."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADINGS = ["## Sections", "## Kernel tests on the device",
            "### Fused encoder against F.linear + torch.topk and the bare GEMM", '### impl="auto" on this device',
            "### AuxK active (saekit Trainer step)", "## saekit train: every hook_z of the GPT-2-small-shaped model",
            "## torchrun, one process"]


def tables(text: str) -> dict[str, list[dict]]:
    """Each heading's tables' rows as {column: cell}, in order (several tables: concatenated)."""
    out: dict[str, list[dict]] = {}
    heading, columns = None, None
    for line in text.splitlines():
        if line.startswith("#"):
            heading, columns = line, None
        elif line.startswith("|") and heading:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if columns is None:
                columns = cells
            elif not set(line) <= set("|-"):
                out.setdefault(heading, []).append(dict(zip(columns, cells)))
        else:
            columns = None
    return out


def test_dry_run_writes_every_table(tmp_path):
    md = tmp_path / "gpu_check.md"
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--work", str(tmp_path / "w"),
                        "--out", str(md)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr[-3000:]
    text = md.read_text()
    assert text.startswith("# saekit GPU check (dry-run)")
    assert "\n## Kernel benchmark\n" in text
    rows = tables(text)
    for h in HEADINGS:
        assert rows.get(h), f"no table rows under {h!r}"
    assert {s["section"]: s["status"] for s in rows["## Sections"]} == dict.fromkeys(
        ["tests", "kernels", "train", "torchrun"], "ok")
    # the two kernel tests the dry run selects, both run (compiled on a GPU, interpreted here)
    assert sum(int(t["PASSED"]) for t in rows["## Kernel tests on the device"]) == 2
    assert all(t["FAILED"] == t["ERROR"] == "0" for t in rows["## Kernel tests on the device"])
    enc = rows["### Fused encoder against F.linear + torch.topk and the bare GEMM"]
    assert {e["dtype"] for e in enc} == {"float32", "bfloat16"} and all(e["error"] == "" for e in enc)
    assert all(e["index agree"] == "1" for e in enc if e["dtype"] == "float32")
    assert all(re.fullmatch(r"[\d.,e+-]+", e[c]) for e in enc for c in ("gemm ms", "triton ms", "step triton ms"))
    auto = rows['### impl="auto" on this device']
    assert all(a["auto runs"] == "torch" and a["auto = faster step"] in ("yes", "**NO**") for a in auto)  # CPU
    aux = rows["### AuxK active (saekit Trainer step)"]
    assert {(a["impl"], a["dead"]) for a in aux} == {(i, d) for i in ("auto", "torch") for d in ("0%", "10%")}
    assert all((float(a["aux loss"]) > 0) == (a["dead"] == "10%") for a in aux)  # AuxK runs on the dead latents
    train = rows["## saekit train: every hook_z of the GPT-2-small-shaped model"]
    assert train[0]["hooks"] == "12" and train[0]["finished"] == "yes" and train[0]["tokens trained"] == "512"
    assert [t["hook"] for t in train[1:]] == [f"blocks.{i}.attn.hook_z" for i in range(12)]
    run = rows["## torchrun, one process"][0]
    assert run["backend"] == "gloo" and run["processes"] == "1"
    assert run["torchrun exit"] == run["one process exit"] == "0"
    assert float(run["max abs weight diff"]) <= 1e-6  # one rank of data parallelism is the plain run
