"""The golden files' machinery of tests/test_golden.py: storing a case's results under
tests/golden/ and comparing a run with them.

Tensors are compared bit for bit (floats through their integer bits, so -0.0 differs from
+0.0); a failure names every tensor that differs, how many entries, the largest absolute
difference and where the first difference lies (for ``metrics.*``: index i is step i + 1).
Adam's moments of the two matrices are stored as the SHA-256 of their raw bytes (``hashed``);
integer tensors in the narrowest integer type that holds them, with their real dtype in the
file's metadata; padded codes without their padding (``codes_tensors``).

The goldens hold bitwise for the platform they were made on: torch's version, its CPU
kernels (``torch.backends.cpu.get_cpu_capability()``, e.g. AVX512 or AVX2) and the CPU's
vendor (MKL takes other code paths on AMD than on Intel at the same ISA: the same code gave
last-bit differences in every trained weight, up to 1.2e-7 after 20 steps) can change the
last bits of a matmul's sums, and so can the thread count, which these tests therefore fix
at ``GOLDEN_THREADS`` (2) on any machine. Each file records its platform. On another
platform the floats are compared to within ``OFF_PLATFORM_RTOL``/``OFF_PLATFORM_ATOL``
instead (integers, booleans and the JSON documents still exactly, tensors stored only as a
hash not at all), and a failure prints both platforms.

Regenerating. ``SAEKIT_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py``
rewrites every golden its tests compute and then fails each such test with a message saying
it rewrote the file, so that nothing is regenerated silently; rerun without the variable to
check. Regenerate only on purpose: a commit that rewrites files under tests/golden/ must say
exactly why the results changed (which change, and why the new results are the right ones).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("SAEKIT_REGEN_GOLDEN") == "1"
REGEN_HINT = "SAEKIT_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py"

# The matmuls' and reductions' sums split over this many threads, whatever the machine's cores
# (tests/conftest.py allows at most 2): with another count their last bits change.
GOLDEN_THREADS = 2


# ---- storing and comparing goldens -----------------------------------------------------------

_INTS = (torch.int8, torch.int16, torch.int32, torch.int64)
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


# Off the golden's platform, a float may differ from it by this much (20 training steps moved
# the weights by up to ~2e-6 relative between two platforms; a wrong result moves them far more).
OFF_PLATFORM_RTOL, OFF_PLATFORM_ATOL = 1e-4, 1e-6


def cpu_vendor() -> str:
    """The CPU's vendor (``GenuineIntel``, ``AuthenticAMD``, ...), or what Python reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def platform_info() -> dict[str, str]:
    """What a golden's last bits depend on besides saekit's code."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": str(torch.get_num_threads()), "machine": platform.machine(), "cpu_vendor": cpu_vendor()}


def _narrow(t: torch.Tensor) -> torch.Tensor:
    """An integer tensor in the narrowest integer type holding its values (storage only)."""
    if t.dtype not in _INTS or t.numel() == 0:
        return t
    lo, hi = int(t.min()), int(t.max())
    return t.to(next(d for d in _INTS if torch.iinfo(d).min <= lo and hi <= torch.iinfo(d).max))


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.dtype]) if t.dtype in _BITS else t


def tensor_diff(key: str, got: torch.Tensor, want: torch.Tensor, dtype: str, exact: bool = True) -> str | None:
    """None when ``got`` equals the golden ``want`` (stored as ``_narrow`` made it) bit for
    bit (floats within the off-platform tolerance unless ``exact``), else one line saying
    how they differ."""
    if str(got.dtype) != dtype:
        return f"{key}: dtype {got.dtype}, golden {dtype}"
    if got.shape != want.shape:
        return f"{key}: shape {tuple(got.shape)}, golden {tuple(want.shape)}"
    if got.dtype in _INTS:
        want = want.to(got.dtype)
    if exact or not got.is_floating_point():
        differ = _bits(got) != _bits(want)
    else:
        g, w = got.double(), want.double()
        differ = ~((g - w).abs() <= OFF_PLATFORM_ATOL + OFF_PLATFORM_RTOL * w.abs()) & ~(g.isnan() & w.isnan())
    if not bool(differ.any()):
        return None
    first = tuple(int(i) for i in differ.nonzero()[0])
    if got.dtype == torch.bool:
        big = "booleans"
    else:
        gap = (got.double() - want.double()).abs()
        big = f"max abs difference {float(gap[differ].max()):.6g}"  # 0: only -0.0/+0.0 or NaN bits
    return (f"{key}: {int(differ.sum())} of {got.numel()} entries differ, {big}; first at index "
            f"{first}: {got[first].item()!r}, golden {want[first].item()!r}")


def _json_diff(key: str, got, want) -> list[str]:
    if isinstance(got, dict) and isinstance(want, dict):
        return [line for k in sorted(set(got) | set(want), key=str)
                for line in (_json_diff(f"{key}.{k}", got.get(k, "<missing>"), want.get(k, "<missing>")))]
    if got == want and type(got) is type(want):
        return []
    gap = ""
    if isinstance(got, (int, float)) and isinstance(want, (int, float)) and not isinstance(got, bool):
        gap = f" (abs difference {abs(got - want):.6g})"
    return [f"{key}: {got!r}, golden {want!r}{gap}"]


def check_golden(case: str, tensors: dict[str, torch.Tensor], docs: dict[str, object] | None = None,
                 hashed: tuple[str, ...] = (), write: bool = True) -> None:
    """Compare ``tensors`` (and the JSON-able ``docs``) with golden ``case``; the tensors
    named in ``hashed`` are kept as a SHA-256 only. Under SAEKIT_REGEN_GOLDEN=1 a test that
    computes the golden (``write``) rewrites it and fails saying so."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    docs = json.loads(json.dumps(docs or {}))  # what a JSON round trip keeps
    path = GOLDEN / f"{case}.safetensors"
    if REGEN and write:
        GOLDEN.mkdir(exist_ok=True)
        meta = {"platform": json.dumps(platform_info()), "docs": json.dumps(docs, sort_keys=True),
                "dtypes": json.dumps({k: str(v.dtype) for k, v in tensors.items()}),
                "sha256": json.dumps({k: [_sha256(tensors[k]), list(tensors[k].shape)] for k in hashed})}
        save_file({k: _narrow(v) for k, v in tensors.items() if k not in hashed}, str(path), metadata=meta)
        pytest.fail(f"SAEKIT_REGEN_GOLDEN=1: rewrote {path.relative_to(GOLDEN.parent.parent)} "
                    f"({path.stat().st_size} bytes); rerun without it to check, and say in the commit "
                    "exactly why the golden results changed")
    if not path.exists():
        pytest.fail(f"no golden file {path.name}; make it deliberately with {REGEN_HINT}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    stored = load_file(str(path))
    dtypes, sha = json.loads(meta["dtypes"]), json.loads(meta["sha256"])
    made, now = json.loads(meta["platform"]), platform_info()
    exact = made == now
    problems = [f"{k}: missing (the golden has it)" for k in sorted(set(dtypes) - set(tensors))]
    problems += [f"{k}: not in the golden" for k in sorted(set(tensors) - set(dtypes))]
    for k in sorted(set(tensors) & set(dtypes)):
        got = tensors[k]
        if k in sha:
            if not exact:  # a hash holds only for the bits of the golden's platform
                continue
            digest, shape = sha[k]
            if str(got.dtype) != dtypes[k] or list(got.shape) != shape or _sha256(got) != digest:
                problems.append(f"{k}: differs from the golden's SHA-256 (dtype {got.dtype}, shape "
                                f"{tuple(got.shape)}; golden {dtypes[k]}, {tuple(shape)}; only a hash is stored)")
        else:
            line = tensor_diff(k, got, stored[k], dtypes[k], exact)
            if line:
                problems.append(line)
    problems += _json_diff("docs", docs, json.loads(meta["docs"]))
    if problems:
        where = ("" if exact else
                 f"\n(the golden was made on {made}, this run is on {now}: floats were compared to within "
                 f"rtol={OFF_PLATFORM_RTOL}, atol={OFF_PLATFORM_ATOL})")
        pytest.fail(f"golden {path.name} differs in {len(problems)} item(s):\n  " + "\n  ".join(problems) + where
                    + f"\nIf the change is intended, regenerate with {REGEN_HINT} and say why in the commit.")


def codes_tensors(prefix: str, codes) -> dict[str, torch.Tensor]:
    """A ``Codes``' fields, exactly. Codes with ``lengths`` (rows padded to the widest) as
    their entries row by row (``packed_*``), the lengths, the padded shape and the number of
    padding values and indices that are not bitwise 0: together the whole padded tensors, in
    a fraction of the bytes where one row is much wider than the rest."""
    values, indices, lengths = codes
    if lengths is None:
        return {f"{prefix}.values": values, f"{prefix}.indices": indices}
    inside = torch.arange(values.shape[1]) < lengths[:, None]
    padding_nonzero = torch.stack([(_bits(values)[~inside] != 0).sum(), (indices[~inside] != 0).sum()])
    return {f"{prefix}.packed_values": values[inside], f"{prefix}.packed_indices": indices[inside],
            f"{prefix}.lengths": lengths, f"{prefix}.shape": torch.tensor(values.shape + indices.shape),
            f"{prefix}.padding_nonzero": padding_nonzero}


def metrics_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Every logged metric of ``run/metrics.jsonl`` but the wall time, one float64 tensor a
    metric (so a failure's first index is the first row that differs)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    names = [k for k in rows[0] if k != "elapsed_s"]
    return {f"metrics.{k}": torch.tensor([float(r[k]) for r in rows], dtype=torch.float64) for k in names}
