"""The Python entry points behind ``saekit eval`` and ``saekit eval-ioi``: load the SAE and
its model, measure, and write the JSON and HTML report beside the SAE (atomically)."""

from __future__ import annotations

import json

from saekit import data
from saekit.errors import MismatchError
from saekit.evals.ioi_eval import evaluate_ioi
from saekit.evals.metrics import evaluate_sae
from saekit.evals.options import EvalOptions, IOIEvalOptions
from saekit.evals.report import eval_parts, ioi_parts, write_report
from saekit.files import atomic_write_text
from saekit.formats import load_sae, results_folder
from saekit.models import EMBEDDED_NAME, load_model, model_name
from saekit.precision import dtype_name
from saekit.splice import check_sae_fits


def model_for(sae, name: str | None = None, device: str = "cpu", dtype: str = "auto", **placement):
    """The model an SAE was trained on (``cfg.model_name``), or ``name`` if the user gave one
    — which must then be that model, when the SAE records it; in ``dtype`` (``load_model``).
    ``placement``: ``load_model``'s ``device_map`` and ``n_devices``."""
    recorded = sae.cfg.model_name
    if name and recorded and name != recorded and {name, recorded} != {"", EMBEDDED_NAME}:
        raise MismatchError(f"the SAE was trained on {recorded!r}, not {name!r}; omit --model to use its model")
    model = load_model(name or (None if recorded in ("", EMBEDDED_NAME) else recorded), device, dtype, **placement)
    sae.cfg = check_sae_fits(model, sae)
    return model


def _load(path):
    """(where results go, the SAE): the SAE's folder, or for hf:// and file SAEs formats.results_folder."""
    return results_folder(path), load_sae(path)


def run_eval(sae_path, model: str | None = None, dataset: str | None = None, opts: EvalOptions | None = None,
             device: str = "cpu", dtype: str = "auto", **placement) -> dict:
    """Standard metrics of the SAE at ``sae_path`` on held-out text, the model run in
    ``dtype``; writes ``eval.json`` and ``eval.html`` in its folder
    (``saekit.formats.results_folder``) and returns the metrics."""
    opts = opts or EvalOptions()
    folder, sae = _load(sae_path)
    m = model_for(sae, model, device, dtype, **placement)
    n_seq = max(1, opts.tokens // opts.seq_len)
    tokens = data.heldout_sequences(m.tokenizer, dataset, n_seq, opts.seq_len, opts.seed + 1, opts.heldout_frac)
    result = {**evaluate_sae(m, sae, tokens), "model": model_name(m), "dtype": dtype_name(m.cfg.dtype),
              "dataset": dataset or "saekit",
              "eval_split": data.describe_heldout(dataset, opts.heldout_frac)}
    atomic_write_text(folder / "eval.json", json.dumps(result, indent=1))
    write_report(folder / "eval.html", f"SAE evaluation: {folder.name}", eval_parts(result))
    return result


def run_eval_ioi(sae_path, compare: list[str] = (), model: str | None = None,
                 opts: IOIEvalOptions | None = None, device: str = "cpu", dtype: str = "auto", **placement) -> dict:
    """Score the SAE at ``sae_path`` (and any ``compare`` SAEs of the same layer) against
    supervised IOI dictionaries, the model run in ``dtype``; writes ``ioi_eval.json``,
    ``ioi_eval.html`` and (unless ``opts.save_dictionaries`` is off) ``ioi_dictionaries/``
    in its folder."""
    opts = opts or IOIEvalOptions()
    folder, sae = _load(sae_path)
    saes = {folder.name: sae}
    for path in compare:
        f, other = _load(path)
        saes[f.name if f.name not in saes else str(f)] = other
    m = model_for(sae, model, device, dtype, **placement)
    result = evaluate_ioi(m, saes, opts, folder / "ioi_dictionaries" if opts.save_dictionaries else None)
    atomic_write_text(folder / "ioi_eval.json", json.dumps(result, indent=1))
    write_report(folder / "ioi_eval.html", f"IOI evaluation: {folder.name}", ioi_parts(result))
    return result
