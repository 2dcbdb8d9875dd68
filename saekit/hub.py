"""SAEs on the Hugging Face Hub: ``hf://ORG/REPO[@REVISION]/PATH/INSIDE/REPO``.

``PATH`` is a folder (saekit, SAELens or sparsify layout, or a Gemma Scope folder holding
``params.npz``) or a file (Kissane et al.'s ``NAME.pt``, a ``params.npz``); it may be empty for
an SAE at the repository's root. ``@REVISION`` (a branch, tag or commit) is optional, as in
``huggingface_hub``'s own ``hf://`` paths. Only the files an SAE of those layouts consists of
are fetched (``snapshot_download`` with exact ``allow_patterns``, never the whole repository),
into huggingface_hub's normal cache (``HF_HUB_CACHE``, by default under ``HF_HOME``), so a path
fetched once loads offline (``HF_HUB_OFFLINE=1``) after. A path that is neither cached nor
reachable is a one-line ``SAEFileError``.

Results that commands write "beside the SAE" (``saekit eval``, ``eval-ioi``, ``analyze``) do
not go into the cache: ``results_folder`` puts them in ``runs/hf/ORG/REPO[@REVISION]/PATH``
under the working directory (a file's path without its suffix).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from saekit.errors import SAEFileError

PREFIX = "hf://"
# Every file an SAE folder of the layouts saekit reads may consist of (formats.load_sae).
FOLDER_FILES = ("cfg.json", "sae.safetensors", "sae_weights.safetensors", "activation_scaler.json", "params.npz")
_SPEC = re.compile(r"hf://([\w.-]+)/([\w.-]+)(?:@([^/]+))?(?:/(.*))?")


class HubPath(NamedTuple):
    repo_id: str
    revision: str | None
    path: str  # inside the repository, no leading or trailing slash; "" for the root


def is_hub(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse(spec: str) -> HubPath:
    m = _SPEC.fullmatch(spec)
    if m is None or ".." in (m[4] or "").split("/"):
        raise SAEFileError(f"{spec!r} is not a Hub path; write hf://ORG/REPO/PATH/INSIDE/REPO (optionally "
                           "hf://ORG/REPO@REVISION/PATH)")
    return HubPath(f"{m[1]}/{m[2]}", m[3], (m[4] or "").strip("/"))


def _patterns(path: str) -> list[str]:
    """The repository files that make up the SAE at ``path``."""
    prefix = f"{path}/" if path else ""
    if path.endswith(".pt"):
        return [path, path[:-3] + "_cfg.json"]
    if path.endswith(".npz"):
        return [path]
    return [prefix + name for name in FOLDER_FILES]


def download(spec: str) -> Path:
    """The local path (in the Hub cache) of the SAE at ``spec``, fetched first where needed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    hp = parse(spec)
    where = f"{hp.repo_id}@{hp.revision or 'main'}"
    not_cached = (f"{spec} is not in the Hugging Face cache (HF_HUB_CACHE) and the Hub cannot be reached"
                  f"{' (HF_HUB_OFFLINE is set)' if _offline() else ''}; fetch it once with network")
    try:
        root = snapshot_download(hp.repo_id, revision=hp.revision, allow_patterns=_patterns(hp.path))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise SAEFileError(not_cached) from None
    except HfHubHTTPError as e:  # no such repository or revision, gated, private
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SAEFileError(f"{spec}: the Hub refused {where} ({why}); check the repository name and revision") \
            from None
    local = Path(root) / hp.path
    if not local.exists():
        if _offline():
            raise SAEFileError(not_cached)
        raise SAEFileError(f"{spec}: {where} has no SAE at {hp.path or 'its root'}; "
                           "check the path inside the repository")
    return local


def results_folder(spec: str) -> Path:
    """Where commands write results for the Hub SAE ``spec``: ``runs/hf/ORG/REPO[@REV]/PATH``."""
    hp = parse(spec)
    org, repo = hp.repo_id.split("/")
    path = re.sub(r"\.(pt|npz)$", "", hp.path)
    return Path("runs", "hf", org, repo + (f"@{hp.revision}" if hp.revision else ""), *path.split("/") if path else ())


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)

