"""The SAEs shipped in ``pretrained/saes/``, side by side, from the files beside each of them.

    python benchmarks/shipped_saes.py

One row per SAE folder (``saekit.evals.report.summary_row``): architecture and sparsity
setting, ``saekit eval``'s metrics, and ``saekit eval-ioi``'s at L3.END. Nothing is
recomputed: rerun those commands to refresh the files. The explorer's Evaluations page shows
the same rows.
"""

from __future__ import annotations

import argparse

from saekit.evals.report import summary_row
from saekit.formats import shipped_saes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.parse_args(argv)
    rows = [summary_row(f) for f in shipped_saes()]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
