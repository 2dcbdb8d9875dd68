"""`saekit eval`, `saekit eval-ioi` and `saekit analyze`: scoring and studying an SAE."""

from __future__ import annotations

from dataclasses import dataclass

import simple_parsing as sp

from saekit.cli.options import DatasetOption, ModelOptions, SAEOption
from saekit.formats import results_folder


@dataclass
class CompareOption:
    """Other SAEs to score side by side."""

    compare: list[str] = sp.field(default_factory=list)
    """More SAEs at the same layer (paths as for --sae), shown beside --sae in the report."""


def cmd_eval(args) -> None:
    """Standard metrics of an SAE (L0, explained variance, CE loss recovered, KL, never-fired
    and dense fractions, frequency histogram): eval.json and eval.html beside the SAE."""
    from saekit.evals.run import run_eval

    a, m = args.target, args.model
    r = run_eval(a.sae, m.model, args.data.dataset, args.eval, m.device, m.dtype, **m.placement)
    print(f"{a.sae}: {r['tokens']} tokens  L0 {r['l0']:.1f} (sd {r['l0_std']:.1f})  explained variance "
          f"{r['explained_variance']:.3f}  CE recovered {r['ce_loss_recovered_mean']:.3f} (mean abl.) "
          f"{r['ce_loss_recovered_zero_all']:.3f} (zero abl., all positions) "
          f"{r['ce_loss_recovered_zero_keep_bos']:.3f} (zero abl., BOS kept)  KL {r['kl']:.4f}  "
          f"never fired {r['never_fired_frac']:.3f}  "
          f"dense {r['dense_frac']:.3f}\nwrote eval.json and eval.html in {results_folder(a.sae)}")


def cmd_eval_ioi(args) -> None:
    """Score an SAE against supervised IOI dictionaries on approximation, control and
    interpretability (Makelov et al. 2024): ioi_eval.json and ioi_eval.html beside the SAE."""
    from saekit.evals.run import run_eval_ioi

    a, m = args.target, args.model
    r = run_eval_ioi(a.sae, args.compare.compare, m.model, args.ioi_eval, m.device, m.dtype, **m.placement)
    print(format_ioi(r) + f"\nwrote ioi_eval.json and ioi_eval.html in {results_folder(a.sae)}")


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
class AnalyzeOptions:
    """How many tokens to analyze."""

    tokens: int = 200_000
    """Tokens of the corpus to run over; the statistics go to the SAE's stats/ subfolder."""
    progress: bool = True
    """Show a progress bar on stderr."""


def cmd_analyze(args) -> None:
    """Feature statistics of an SAE (frequencies, histograms, top contexts, logit effects),
    saved beside it for `saekit app`."""
    from saekit.evals.features import analyze, save_stats
    from saekit.formats import load_sae
    from saekit.models import load_model
    from saekit.precision import check_device

    o, m, folder = args.analyze, args.model, args.target.sae
    check_device(m.device)  # before the SAE moves there
    sae = load_sae(folder, m.device)
    model = load_model(m.model or sae.cfg.model_name or None, m.device, m.dtype, **m.placement)
    stats = analyze(model, sae, o.tokens, dataset=args.data.dataset, progress=o.progress)
    path = save_stats(stats, results_folder(folder))
    alive = int((stats.freq > 0).sum())
    print(f"{stats.meta['n_tokens']} tokens in {stats.meta['seconds']:.0f} s: {alive}/{stats.d_sae} latents "
          f"fire, mean frequency {stats.freq.mean().item():.4f}; saved to {path}")


def _eval_groups():
    from saekit.evals.options import EvalOptions

    return [(SAEOption, "target"), (ModelOptions, "model"), (DatasetOption, "data"), (EvalOptions, "eval")]


def _eval_ioi_groups():
    from saekit.evals.options import IOIEvalOptions

    return [(SAEOption, "target"), (ModelOptions, "model"), (CompareOption, "compare"), (IOIEvalOptions, "ioi_eval")]


COMMANDS = {
    "eval": (cmd_eval, _eval_groups),
    "eval-ioi": (cmd_eval_ioi, _eval_ioi_groups),
    "analyze": (cmd_analyze, lambda: [(SAEOption, "target"), (ModelOptions, "model"), (DatasetOption, "data"),
                                       (AnalyzeOptions, "analyze")]),
}
