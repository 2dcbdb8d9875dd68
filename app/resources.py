"""What every page needs: the model, the SAE and its statistics, loaded once per process
(``st.cache_resource``) and checked; a bad choice becomes one message in the page."""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import NamedTuple

import streamlit as st

from saekit import formats, hub
from saekit.errors import SAEFileError, SaekitError
from saekit.evals.features import fingerprint, load_stats, stats_path
from saekit.formats import load_sae, results_folder
from saekit.models import load_model
from saekit.splice import check_sae_fits

# SAE -> its fingerprint (saekit.evals.features.fingerprint), kept here, not on the SAE object
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Loaded(NamedTuple):
    model: object
    sae: object
    sae_path: str
    stats: object | None  # saekit.evals.features.FeatureStats, or None when missing/stale
    stats_error: str | None  # why stats is None, with the command that fixes it


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


@st.cache_resource(show_spinner="Loading the model ...")
def _model(name: str | None):
    return load_model(name)


@st.cache_resource(show_spinner="Loading the SAE ...")
def _sae(path: str, _mtime_key: float):
    return load_sae(path)


@st.cache_resource(show_spinner="Loading feature statistics ...")
def _stats(path: str, _mtime_key: float, _sae_obj, fingerprint: str, sae_path: str):
    return load_stats(path, _sae_obj, sae_path)


@st.cache_resource
def model_lock() -> threading.Lock:
    """One lock around runs with hooks: sessions share the cached model, and steering hooks
    added by one session must not leak into another's forward pass."""
    return threading.Lock()


def load(sae_path: str, model_name: str | None) -> Loaded:
    """Load and check everything; raises ``SaekitError`` with a one-line, fixable message."""
    source = sae_path if hub.is_hub(sae_path) else str(Path(sae_path).expanduser())
    if not hub.is_hub(source) and not Path(source).exists():
        raise SAEFileError(f"no SAE folder at {source}; pass the folder `saekit train --out` wrote "
                           "(it holds cfg.json and sae.safetensors), another SAE file or an hf:// path")
    folder = results_folder(source)  # where analyze wrote the statistics (the folder itself, mostly)
    sae = _sae(source, _mtime(Path(source) / "cfg.json" if Path(source).is_dir() else Path(source)))
    name = model_name or sae.cfg.model_name or None
    try:
        model = _model(name)
    except SaekitError as e:
        raise type(e)(f"{e} (this SAE was trained on {sae.cfg.model_name or 'an unnamed model'}, "
                      "cfg.json model_name)") from None
    sae.cfg = check_sae_fits(model, sae)
    try:
        if sae not in _FINGERPRINTS:  # the cached SAE never changes: hash its decoder once
            _FINGERPRINTS[sae] = fingerprint(sae)
        fp = _FINGERPRINTS[sae]
        stats, err = _stats(str(folder), _mtime(stats_path(folder)), sae, fp, source), None
    except SAEFileError as e:
        stats, err = None, str(e)
    return Loaded(model, sae, str(folder), stats, err)


FIRST_SHIPPED = "topk-L3-corpus"  # the picker opens on it where it is shipped


def sae_choices() -> tuple[dict[str, str], str]:
    """The SAE picker: ``({name: folder} of the shipped SAEs, the name to start on)``. The start
    is ``OTHER`` (a typed path) when ``saekit app --sae`` passed one or nothing is shipped."""
    shipped = {p.name: str(p) for p in formats.shipped_saes()}
    if os.environ.get("SAEKIT_APP_SAE") or not shipped:
        return shipped, OTHER
    return shipped, FIRST_SHIPPED if FIRST_SHIPPED in shipped else next(iter(shipped))


OTHER = "another folder or hf:// path"
