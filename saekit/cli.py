"""The ``saekit`` command line. Every option comes from a config dataclass (simple_parsing),
so the CLI, the Python API and the saved configs share one definition.

Bad input ends with one line on stderr, ``saekit CMD: error: ...``, and exit code 2.
Heavy imports (torch, transformer-lens) happen inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

import simple_parsing as sp

from saekit.errors import SaekitError


@dataclass
class ModelOptions:
    """Which model to run."""

    model: str | None = None
    """A hub name (gpt2), a local Hugging Face folder, or omitted for the embedded model."""
    device: str = "cpu"
    """Torch device to run the model on."""


@dataclass
class IOIOptions:
    """How to score IOI."""

    n: int = 1000
    """Number of prompts."""
    split: str = "heldout"
    """heldout: held-out templates and name pairs; train: the training templates."""
    seed: int = 0
    """Seed of the prompt draw."""

    def __post_init__(self):
        if self.split not in ("heldout", "train"):
            raise SaekitError(f"--split must be 'heldout' or 'train', not {self.split!r}")
        if self.n < 1:
            raise SaekitError(f"--n must be at least 1, not {self.n}")


class UsageError(SaekitError):
    """Bad command-line syntax, raised by the parser instead of argparse's usage dump."""

    def __init__(self, prog: str, message: str):
        super().__init__(f"{message} (see `{prog} --help`)")
        self.prog = prog


class Parser(sp.ArgumentParser):
    """argparse whose errors become one-line ``UsageError``s."""

    def error(self, message):  # noqa: D102 - argparse API
        raise UsageError(self.prog, message)


# ---- commands -----------------------------------------------------------------------------

def cmd_hooks(args) -> None:
    """List every hook point with its activation shape for a one-token prompt."""
    import torch

    from saekit.models import load_model, model_name

    model = load_model(args.model.model, args.model.device)
    tokens = torch.tensor([[model.tokenizer.bos_token_id or 0]], device=model.cfg.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    print(f"# {len(cache)} hook points of {model_name(model)}; shape without the batch axis")
    width = max(map(len, cache.keys()))
    for name, act in cache.items():
        print(f"{name:<{width}}  {list(act.shape[1:])}")


def cmd_ioi(args) -> None:
    """Print IOI accuracy and mean logit difference."""
    from saekit.ioi import score_ioi
    from saekit.models import load_model

    model = load_model(args.model.model, args.model.device)
    o = args.ioi
    s = score_ioi(model, o.n, o.split, o.seed)
    print(f"IOI ({o.split}, {s.n} prompts): accuracy {s.accuracy:.3f}  mean logit diff {s.logit_diff:.2f}")


def cmd_demo(args) -> None:
    """The main job on the embedded defaults: load the model, show its hook points, score IOI,
    train a TopK SAE on blocks.5.attn.hook_z and print its summary."""
    import shutil
    from pathlib import Path

    from saekit.activations import hook_names
    from saekit.ioi import score_ioi
    from saekit.models import load_model, model_name
    from saekit.training.config import DataOptions, RunOptions, TrainConfig
    from saekit.training.run import run_training

    model = load_model(args.model.model, args.model.device)
    c = model.cfg
    print(f"model {model_name(model)}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads "
          f"of d_head {c.d_head}, vocab {c.d_vocab}")
    hooks = hook_names(model)
    print(f"{len(hooks)} hook points, e.g. blocks.5.attn.hook_z {list(hooks['blocks.5.attn.hook_z'])}"
          " (n_heads, d_head) per token; `saekit hooks` lists them all")
    s = score_ioi(model, 1000, "heldout")
    print(f"IOI on {s.n} held-out prompts: accuracy {s.accuracy:.3f}, mean logit diff {s.logit_diff:.2f}")
    out = Path("runs/demo")
    if (out / "train_config.json").exists():  # the previous demo's run folder
        shutil.rmtree(out)
    cfg = TrainConfig(data=DataOptions(model=args.model.model, device=args.model.device),
                      run=RunOptions(out=str(out)))
    print(f"training a TopK SAE at {cfg.data.hook} (`saekit train --hook {cfg.data.hook}`) ...")
    print(format_summary(run_training(cfg), str(out)))


@dataclass
class CacheOptions:
    """Where to write the activation cache."""

    out: str = "runs/cache"
    """Folder for the safetensors shards and meta.json."""
    seed: int = 0
    """Seed of the token stream."""
    with_grads: bool = False
    """Also store the loss gradient at the hook (for --sparsity gtopk)."""


def _train_config(args):
    from saekit.training.config import TrainConfig

    return TrainConfig(sae=args.sae, variant=args.variant, data=args.data, optim=args.optim, run=args.run)


def cmd_train(args) -> None:
    """Train an SAE at a hook point (default: the embedded model and corpus)."""
    from saekit.training.run import run_training

    cfg = _train_config(args)
    summary = run_training(cfg)
    if summary and "hook" not in summary:  # several hooks: {hook: summary}
        for name, s in summary.items():
            print(format_summary(s, f"{cfg.run.out}/{name}"))
    elif summary or os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(format_summary(summary, cfg.run.out))


def format_summary(summary: dict, out: str) -> str:
    if not summary:
        return f"saved to {out}"
    return (f"SAE at {summary['hook']} (d_sae {summary['d_sae']}, k {summary['k']}), "
            f"{summary['eval_tokens']} held-out tokens:\n"
            f"  L0 {summary['l0']:.1f}  explained variance {summary['explained_variance']:.3f}  "
            f"dead fraction (training) {summary['dead_frac']:.3f}\n"
            f"  CE loss clean {summary['ce_loss_clean']:.3f}  with SAE {summary['ce_loss_sae']:.3f}  "
            f"recovered {summary['ce_loss_recovered_mean']:.3f} (mean abl.) "
            f"{summary['ce_loss_recovered_zero_all']:.3f} (zero abl., all positions) "
            f"{summary['ce_loss_recovered_zero_keep_bos']:.3f} (zero abl., BOS kept)\n"
            f"saved to {out}")


def cmd_cache(args) -> None:
    """Harvest activations at a hook into safetensors shards for `saekit train --from-cache`."""
    from saekit.training.run import cache_activations

    path = cache_activations(args.data, args.cache.out, args.cache.seed, with_grads=args.cache.with_grads)
    print(f"cached activations in {path}")


@dataclass
class SAEPathOptions:
    """Which SAE to evaluate."""

    sae: str = ""
    """SAE folder (saekit, SAELens or sparsify layout); the results are written beside it."""
    model: str | None = None
    """The model to run; default: the one the SAE was trained on (cfg.json model_name)."""
    device: str = "cpu"
    """Torch device."""

    def __post_init__(self):
        if not self.sae:
            raise SaekitError("--sae PATH is required (an SAE folder, e.g. runs/demo)")


@dataclass
class DatasetOption:
    """Held-out text to evaluate on."""

    dataset: str | None = None
    """A Hugging Face dataset name, a .txt/.jsonl file or folder, ioi, or omitted for saekit's corpus."""


@dataclass
class CompareOption:
    """Other SAEs to score side by side."""

    compare: list[str] = sp.field(default_factory=list)
    """Folders of more SAEs at the same layer, shown beside --sae in the report."""


def cmd_eval(args) -> None:
    """Standard metrics of an SAE (L0, explained variance, CE loss recovered, KL, never-fired
    and dense fractions, frequency histogram): eval.json and eval.html beside the SAE."""
    from saekit.evals.run import run_eval

    a = args.target
    r = run_eval(a.sae, a.model, args.data.dataset, args.eval, a.device)
    print(f"{a.sae}: {r['tokens']} tokens  L0 {r['l0']:.1f} (sd {r['l0_std']:.1f})  explained variance "
          f"{r['explained_variance']:.3f}  CE recovered {r['ce_loss_recovered_mean']:.3f} (mean abl.) "
          f"{r['ce_loss_recovered_zero_all']:.3f} (zero abl., all positions) "
          f"{r['ce_loss_recovered_zero_keep_bos']:.3f} (zero abl., BOS kept)  KL {r['kl']:.4f}  "
          f"never fired {r['never_fired_frac']:.3f}  "
          f"dense {r['dense_frac']:.3f}\nwrote eval.json and eval.html in {a.sae}")


def cmd_eval_ioi(args) -> None:
    """Score an SAE against supervised IOI dictionaries on approximation, control and
    interpretability (Makelov et al. 2024): ioi_eval.json and ioi_eval.html beside the SAE."""
    from saekit.evals.run import run_eval_ioi

    a = args.target
    r = run_eval_ioi(a.sae, args.compare.compare, a.model, args.ioi_eval, a.device)
    print(format_ioi(r) + f"\nwrote ioi_eval.json and ioi_eval.html in {a.sae}")


def format_ioi(r: dict) -> str:
    lines = [f"IOI evaluation on layer {r['layer']} ({r['n_eval']} prompts); IOI nodes: {', '.join(r['ioi_nodes'])}"]
    for name, n in r["nodes"].items():
        for label, s in [(f"supervised ({m})", s) for m, s in n["supervised"].items()] + list(n["saes"].items()):
            ap = s["approximation"]
            ctl = s["control"]["io"]
            io = ctl["accuracy"] if "accuracy" in ctl else max(v["accuracy"] for v in ctl["aware"].values())
            lines.append(f"  {name:<9} {label:<24} sufficiency {ap['sufficiency']:.3f}  necessity "
                         f"{ap['necessity']:.3f}  io edit accuracy {io:.3f}")
    return "\n".join(lines)


@dataclass
class BenchOptions:
    """Which benchmark, and its training budget."""

    suite: str = sp.field(default="synthetic", positional=True)
    """The benchmark: synthetic (SAE variants on data with known features)."""
    variants: str = "topk,mutual_choice,feature_choice"
    """Comma-separated sparsifiers to train."""
    d_sae: int = 1024
    """Latents per SAE."""
    k: int = 8
    """Mean L0 every variant trains at."""
    steps: int = 2000
    """Training steps per variant."""

    def __post_init__(self):
        if self.suite != "synthetic":
            raise SaekitError(f"unknown benchmark {self.suite!r}; the one available is 'synthetic'")


def cmd_bench(args) -> None:
    """Benchmarks of training itself: `saekit bench synthetic` scores each variant on ground truth."""
    from saekit.training.synthetic import bench, format_table

    o, b = args.synthetic, args.bench
    variants = [v.strip() for v in b.variants.split(",") if v.strip()]
    from saekit.sparsity import SPARSIFIERS

    unknown = [v for v in variants if v not in SPARSIFIERS]
    if unknown:
        raise SaekitError(f"unknown variants {unknown}; choose from {sorted(SPARSIFIERS)}")
    print(format_table(bench(o, variants, d_sae=b.d_sae, k=b.k, steps=b.steps), o))


@dataclass
class AnalyzeOptions:
    """Which SAE to analyze, on how many tokens."""

    sae: str = ""
    """The SAE folder (cfg.json and weights); statistics go to its stats/ subfolder."""
    tokens: int = 200_000
    """Tokens of the corpus to run over."""
    model: str | None = None
    """The model to run; omitted: the SAE's own (cfg.json model_name), else the embedded one."""
    dataset: str | None = None
    """A Hugging Face dataset, a .txt/.jsonl file or folder; omitted: saekit's held-out corpus."""
    device: str = "cpu"
    """Torch device."""
    progress: bool = True
    """Show a progress bar on stderr."""


def cmd_analyze(args) -> None:
    """Feature statistics of an SAE (frequencies, histograms, top contexts, logit effects),
    saved beside it for `saekit app`."""
    from saekit.evals.features import analyze, save_stats
    from saekit.formats import load_sae
    from saekit.models import load_model

    o = args.analyze
    if not o.sae:
        raise SaekitError("--sae is required: the folder of an SAE (cfg.json and its weights)")
    sae = load_sae(o.sae, o.device)
    model = load_model(o.model or sae.cfg.model_name or None, o.device)
    stats = analyze(model, sae, o.tokens, dataset=o.dataset, progress=o.progress)
    path = save_stats(stats, o.sae)
    alive = int((stats.freq > 0).sum())
    print(f"{stats.meta['n_tokens']} tokens in {stats.meta['seconds']:.0f} s: {alive}/{stats.d_sae} latents "
          f"fire, mean frequency {stats.freq.mean().item():.4f}; saved to {path}")


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


COMMANDS: dict[str, tuple[Callable, list[tuple[type, str]]]] = {
    "demo": (cmd_demo, [(ModelOptions, "model")]),
    "hooks": (cmd_hooks, [(ModelOptions, "model")]),
    "ioi": (cmd_ioi, [(ModelOptions, "model"), (IOIOptions, "ioi")]),
    "train": (cmd_train, "train"),
    "cache": (cmd_cache, "cache"),
    "bench": (cmd_bench, "bench"),
    "eval": (cmd_eval, "eval"),
    "eval-ioi": (cmd_eval_ioi, "eval-ioi"),
    "analyze": (cmd_analyze, [(AnalyzeOptions, "analyze")]),
    "app": (cmd_app, [(AppOptions, "app")]),
}


def _groups(spec):
    """Option groups of a command; training's come from saekit.training.config, imported
    only when a parser is built (it imports no torch)."""
    if spec == "train":
        from saekit.training.config import DataOptions, OptimOptions, RunOptions, SAEOptions

        from saekit.types import VariantOptions

        return [(SAEOptions, "sae"), (VariantOptions, "variant"), (DataOptions, "data"),
                (OptimOptions, "optim"), (RunOptions, "run")]
    if spec == "bench":
        from saekit.training.synthetic import SyntheticOptions

        return [(BenchOptions, "bench"), (SyntheticOptions, "synthetic")]
    if spec == "eval":
        from saekit.evals.options import EvalOptions

        return [(SAEPathOptions, "target"), (DatasetOption, "data"), (EvalOptions, "eval")]
    if spec == "eval-ioi":
        from saekit.evals.options import IOIEvalOptions

        return [(SAEPathOptions, "target"), (CompareOption, "compare"), (IOIEvalOptions, "ioi_eval")]
    if spec == "cache":
        from saekit.training.config import DataOptions

        return [(DataOptions, "data"), (CacheOptions, "cache")]
    return spec


def build_parser() -> Parser:
    p = Parser(prog="saekit", description="Train and study sparse autoencoders on transformer "
               "activations.", add_option_string_dash_variants=sp.DashVariant.DASH,
               add_config_path_arg=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, groups) in COMMANDS.items():
        sp_ = sub.add_parser(name, help=fn.__doc__.splitlines()[0], description=fn.__doc__,
                             add_option_string_dash_variants=sp.DashVariant.DASH,
                             add_config_path_arg=False)
        for cls, dest in _groups(groups):
            sp_.add_arguments(cls, dest=dest, default=None)
    return p


def _setup_logging() -> None:
    """saekit's INFO lines (e.g. which kernel implementation runs) go to stderr once each."""
    import logging

    class StderrHandler(logging.StreamHandler):
        """Writes to the current ``sys.stderr`` (which tests and callers may swap), not the
        one that existed when the handler was made."""

        stream = property(lambda self: sys.stderr, lambda self, value: None)

    log = logging.getLogger("saekit")
    if not log.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def join_repeated(argv: list[str], option: str = "--hook") -> list[str]:
    """``--hook A --hook B`` → ``--hook A,B`` (argparse would keep only the last)."""
    values, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == option and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
            continue
        if a.startswith(option + "="):
            values.append(a.split("=", 1)[1])
        else:
            rest.append(a)
        i += 1
    return rest + [option, ",".join(values)] if len(values) > 1 else argv


def main(argv: list[str] | None = None) -> int:
    argv = join_repeated(sys.argv[1:] if argv is None else list(argv))
    _setup_logging()
    command = next((a for a in argv if not a.startswith("-")), None)
    prog = f"saekit {command}" if command in COMMANDS else "saekit"
    try:
        args = build_parser().parse_args(argv)
        COMMANDS[args.command][0](args)
    except SaekitError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has the error: say it once
            sys.stderr.write(f"{getattr(e, 'prog', prog)}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
