"""Feature-card render time in the explorer, once statistics exist.

    python benchmarks/app_card.py --sae PATH [--reps 20]

Drives the app script with Streamlit's AppTest (the same script run a browser triggers,
without the network and the browser's own drawing). Rows: the first run of a session
(model, SAE and statistics loaded and cached), then a card for a new latent each rerun, with
and without its DFA chart (latents with and without contexts), and the Prompt lens page.
Target: a card in under 1 s once statistics exist. Needs `saekit analyze --sae PATH` first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from bench_timing import run_times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", required=True, help="an SAE folder with stats/ (saekit analyze)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)

    import torch
    from streamlit.testing.v1 import AppTest

    from saekit.app.launch import ENV_SAE, script_path
    from saekit.evals.features import load_stats, stats_path

    if not stats_path(args.sae).is_file():
        sys.exit(f"no statistics for {args.sae}; run `saekit analyze --sae {args.sae}` first")
    os.environ[ENV_SAE] = os.path.abspath(args.sae)
    at = AppTest.from_file(str(script_path()), default_timeout=600)
    t = time.perf_counter()
    at.run()
    first = time.perf_counter() - t
    if at.exception or at.error:
        sys.exit(f"the app failed: {at.exception or at.error[0].value}")

    freq = load_stats(args.sae).freq.tolist()
    firing = iter(torch.randperm(len(freq), generator=torch.Generator().manual_seed(0)).tolist())

    def card():  # a latent not shown before, one that fires (so its card has contexts and DFA)
        at.number_input(key="latent").set_value(next(i for i in firing if freq[i] > 0)).run()
        assert not at.exception and len(at.get("plotly_chart")) >= 2

    card_times = run_times(card, args.reps)
    at.sidebar.radio(key="page").set_value("Prompt lens").run()
    count = iter(range(10**6))

    def lens():  # a new prompt each time, so nothing is cached
        at.text_area(key="lens_prompt").input(f"When Mary and John went to the store {next(count)}, "
                                              "John gave a drink to").run()
        assert not at.exception and at.dataframe

    lens_times = run_times(lens, args.reps)

    print(f"| {os.path.basename(os.path.abspath(args.sae))}, {torch.get_num_threads()} threads | "
          "median (s) | min (s) | max (s) | runs |")
    print("|---|---|---|---|---|")
    print(f"| first run (loads model, SAE, statistics) | {first:.2f} | {first:.2f} | {first:.2f} | 1 |")
    for name, ts in (("feature card, new latent (with DFA)", card_times), ("prompt lens, new prompt", lens_times)):
        print(f"| {name} | {statistics.median(ts):.3f} | {min(ts):.3f} | {max(ts):.3f} | {len(ts)} |")

if __name__ == "__main__":
    main()
