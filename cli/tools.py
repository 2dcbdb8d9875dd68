"""`saekit bench` and `saekit app`."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import simple_parsing as sp

from saekit.errors import SaekitError
from saekit.types import SparsityName


@dataclass
class BenchOptions:
    """Which benchmark, and its training budget."""

    suite: Literal["synthetic", "papers"] = sp.field(default="synthetic", positional=True)
    """The benchmark: synthetic (SAE variants on data with known features) or papers (the seed papers' claims on the embedded model: --quick, --out, --experiments)."""  # noqa: E501
    variants: str = "topk,mutual_choice,feature_choice,matryoshka,standard,gated,jumprelu"
    """synthetic: comma-separated architectures to train (any --sparsity name)."""
    d_sae: int = 1024
    """synthetic: latents per SAE."""
    k: int = 8
    """synthetic: mean L0 every variant trains at."""
    steps: int = 2000
    """synthetic: training steps per variant."""


def cmd_bench(args) -> None:
    """Benchmarks of training itself: `saekit bench synthetic` scores each variant on ground truth;
    `saekit bench papers` tests the seed papers' claims on the embedded model."""
    if args.bench.suite == "papers":
        from saekit.evals.papers import run_papers

        run_papers(args.papers)
        print(f"wrote {args.papers.out}/results.md and {args.papers.out}/results.html")
        return
    from saekit.training.synthetic import bench, format_table

    o, b = args.synthetic, args.bench
    variants = [v.strip() for v in b.variants.split(",") if v.strip()]
    names = typing.get_args(SparsityName)
    unknown = [v for v in variants if v not in names]
    if unknown:
        raise SaekitError(f"unknown variants {unknown}; choose from {sorted(names)}")
    print(format_table(bench(o, variants, d_sae=b.d_sae, k=b.k, steps=b.steps), o))


@dataclass
class AppOptions:
    """Where the explorer listens and what it opens first."""

    sae: str | None = None
    """The SAE folder to open; omitted: the first SAE shipped in pretrained/saes/."""
    model: str | None = None
    """The model to run; omitted: the SAE's own (cfg.json model_name)."""
    port: int = 8501
    """Local port of the web page."""
    address: str = "127.0.0.1"
    """Interface to listen on; 127.0.0.1 keeps the app on this machine."""


def cmd_app(args) -> None:
    """The Streamlit explorer: browse features, read prompts through the SAE, steer the model."""
    from saekit.app.launch import launch

    o = args.app
    launch(o.sae, o.model, o.port, o.address)  # replaces this process with the server


def _bench_groups():
    from saekit.evals.papers import PapersOptions
    from saekit.training.synthetic import SyntheticOptions

    return [(BenchOptions, "bench"), (SyntheticOptions, "synthetic"), (PapersOptions, "papers")]


COMMANDS = {"bench": (cmd_bench, _bench_groups), "app": (cmd_app, lambda: [(AppOptions, "app")])}
