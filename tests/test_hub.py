"""SAEs on the Hugging Face Hub (hf://), offline: the tests lay out a cache exactly as
huggingface_hub does (models--ORG--REPO/refs/REF naming a commit, blobs/ named by hash,
snapshots/COMMIT/PATH linking into blobs) and run saekit in a fresh process with
HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointed at it: the code a user runs online, minus the network."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saekit import SAE, SAEConfig, hub
from saekit.errors import SAEFileError
from saekit.formats import results_folder

D_IN, D_SAE = 8, 32


def hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str, ref: str = "main") -> None:
    """Lay ``files`` out as huggingface_hub's cache holds a download of them: blobs named by their
    hash, snapshots/COMMIT/PATH as relative links into blobs, refs/REF naming the commit."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    (root / "blobs").mkdir(exist_ok=True)
    for rel, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = root / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def cache_folder(cache, repo_id, folder: Path, inside: str, commit: str, ref: str = "main") -> None:
    """The files of ``folder`` (not its subfolders) as ``inside/NAME``."""
    files = {f"{inside}/{p.name}": p.read_bytes() for p in folder.iterdir() if p.is_file()}
    hub_cache(cache, repo_id, files, commit, ref)


def run_offline(tmp_path, cache, args, code=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "saekit", *args]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_hub_paths_parse_and_results_go_under_runs():
    assert hub.parse("hf://org/repo/a/b") == ("org/repo", None, "a/b")
    assert hub.parse("hf://org/repo@v1.0/a/b/") == ("org/repo", "v1.0", "a/b")
    assert hub.parse("hf://org/repo") == ("org/repo", None, "")
    assert results_folder("hf://org/repo@v1/a/b") == Path("runs/hf/org/repo@v1/a/b")
    assert results_folder("hf://org/repo/x/name.pt") == Path("runs/hf/org/repo/x/name")
    with pytest.raises(SAEFileError, match="^[^\n]*not a Hub path"):
        hub.parse("hf://just-a-name")


def test_hf_sae_loads_from_the_hub_cache_offline_at_a_revision(tmp_path):
    cache, commits = tmp_path / "cache", ("a" * 40, "b" * 40)
    for seed, (commit, ref) in enumerate(zip(commits, ("main", "v1"))):
        SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, hook_name="blocks.0.hook_resid_pre"), seed=seed).save(
            tmp_path / f"local{seed}", format="saelens")
        cache_folder(cache, "saekit-tests/demo", tmp_path / f"local{seed}", "saes/L0", commit, ref)
    code = ("import json, torch, saekit\n"
            "x = torch.randn(5, 8)\n"
            "out = {}\n"
            "for spec, local in (('hf://saekit-tests/demo/saes/L0', 'local0'), "
            "('hf://saekit-tests/demo@v1/saes/L0', 'local1')):\n"
            "    a, b = saekit.load_sae(spec), saekit.load_sae(local)\n"
            "    out[spec] = bool(torch.equal(a(x).x_hat, b(x).x_hat))\n"
            "print(json.dumps(out))\n")
    r = run_offline(tmp_path, cache, [], code)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"hf://saekit-tests/demo/saes/L0": True, "hf://saekit-tests/demo@v1/saes/L0": True}


def test_hf_sae_not_in_the_cache_is_one_line_and_exit_2(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    r = run_offline(tmp_path, cache, ["analyze", "--sae", "hf://saekit-tests/absent/sae"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "saekit analyze: error: hf://saekit-tests/absent/sae is not in the Hugging Face cache (HF_HUB_CACHE) and "
        "the Hub cannot be reached (HF_HUB_OFFLINE is set); fetch it once with network")


def test_analyze_of_an_hf_sae_writes_under_runs_hf(tmp_path, model):
    cache = tmp_path / "cache"
    shape = (model.cfg.n_heads, model.cfg.d_head)
    SAE(SAEConfig(d_in=shape[0] * shape[1], d_sae=64, k=4, hook_name="blocks.3.attn.hook_z",
                  model_name="saekit-ioi-6l", hook_shape=shape), seed=0).save(tmp_path / "local")
    cache_folder(cache, "saekit-tests/demo", tmp_path / "local", "L3", "c" * 40)
    r = run_offline(tmp_path, cache, ["analyze", "--sae", "hf://saekit-tests/demo/L3", "--tokens", "512",
                                      "--progress", "false"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs" / "hf" / "saekit-tests" / "demo" / "L3" / "stats" / "features.safetensors").is_file()
    assert not list((cache / "models--saekit-tests--demo" / "snapshots").rglob("stats"))  # the cache untouched
