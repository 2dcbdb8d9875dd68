"""Every row of docs/errors.md is a test: the command (or Python call) in the row, run here,
ends with exactly the row's one-line error (exit code 2 from the CLI).

CLI rows run in-process through ``saekit.cli.main``; the embedded model is loaded once
(``load_model`` is patched to return the session's copy when no --model is given), and the
working directory is a scratch folder, so default output folders land there.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

ERRORS_MD = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def table_rows() -> list[tuple[str, str, str]]:
    """(bad input, how it is tried, expected line) for each row of the tables."""
    rows = []
    for line in ERRORS_MD.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 4 and cells[0].isdigit():
            # a code span: `x`, or `` x `` when x holds a backtick
            how, expected = (re.fullmatch(r"(`+) ?(.*?) ?\1", c).group(2).replace("\\|", "|") for c in cells[2:])
            rows.append((cells[1], how, expected))
    return rows


def prepare(d: Path) -> None:
    """The files the rows' $DIR paths name (docs/errors.md lists them)."""
    from saekit.sae import SAE, SAEConfig
    from saekit.training import checkpoint as ckpt
    from saekit.training.config import TrainConfig

    (d / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    (d / "notes.csv").write_text("a,b\n")
    (d / "empty").mkdir()
    (d / "tiny.txt").write_text("Mary and John went to the store.\n")
    (d / "a-file").write_text("a regular file")
    meta = {"hook_name": "blocks.5.attn.hook_z", "hook_shape": [8, 64], "d_in": 512, "model_name": "saekit-ioi-6l",
            "with_grads": False, "n_shards": 1, "shard_tokens": 4096}
    (d / "cache").mkdir()
    (d / "cache" / "meta.json").write_text(json.dumps(meta))
    (d / "corrupt-sae").mkdir()
    (d / "corrupt-sae" / "cfg.json").write_text("{not json")
    SAE(SAEConfig(d_in=8, d_sae=16, k=2), seed=0).save(d / "torn-sae")
    w = d / "torn-sae" / "sae.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    for name, hook, shape in (("l3-sae", "blocks.3.attn.hook_z", (4, 32)), ("l5-sae", "blocks.5.attn.hook_z", (4, 32)),
                              ("resid-sae", "blocks.3.hook_resid_post", ())):
        SAE(SAEConfig(d_in=128, d_sae=64, k=4, hook_name=hook, model_name="saekit-ioi-6l", hook_shape=shape),
            seed=0).save(d / name)
    five = [*(f"transformer.h.{i}" for i in range(5)), "transformer.wte", "transformer.wpe", "transformer.ln_f",
            "lm_head"]  # layer 5 left out
    (d / "five-layers.json").write_text(json.dumps(dict.fromkeys(five, "cpu")))
    ckpt.save(d / "run", {"step": 4}, TrainConfig())
    (d / "corrupt-run" / "checkpoints").mkdir(parents=True)
    (d / "corrupt-run" / "checkpoints" / "step_0000004.pt").write_bytes(b"x")
    prepare_saelens(d)
    prepare_formats(d)


def prepare_saelens(d: Path) -> None:
    """Tiny SAELens TopK folders $DIR/lens-*, each with one setting saekit refuses."""
    from safetensors.torch import save_file

    changes = {"arch": {"architecture": "abstopk"}, "no-k": {"k": None},
               "two-k": {"activation_fn_kwargs": {"k": 3}}, "kwargs": {"activation_fn_kwargs": {"k": 2, "temp": 1}},
               "head": {"hook_head_index": 1}, "layer-norm": {"normalize_activations": "layer_norm"},
               "norm-typo": {"normalize_activations": "l2"},
               "no-factor": {"normalize_activations": "expected_average_only_in"},
               "bad-factor": {"normalize_activations": "expected_average_only_in"},
               "half-b-dec": {"apply_b_dec_to_input": 0.5}, "zero-row": {"rescale_acts_by_decoder_norm": True},
               "ft-scale": {}}
    for name, change in changes.items():
        w = {"W_enc": torch.ones(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.ones(8, 4), "b_dec": torch.zeros(4)}
        w["W_dec"][5] = 0
        if name == "ft-scale":
            w["scaling_factor"] = torch.full((8,), 2.0)
        (d / f"lens-{name}").mkdir()
        save_file(w, d / f"lens-{name}" / "sae_weights.safetensors")
        cfg = {"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 2, "dtype": "float32", **change}
        (d / f"lens-{name}" / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    (d / "lens-bad-factor" / "activation_scaler.json").write_text('{"scaling_factor": -1}')


def prepare_formats(d: Path) -> None:
    """$DIR/fmt-*: the files of the rows on other SAE formats, each with one fault."""
    import numpy as np
    from safetensors.torch import save_file

    (d / "fmt-no-weights").mkdir()
    (d / "fmt-no-weights" / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 2}))
    base = {"W_enc": torch.ones(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.ones(8, 4), "b_dec": torch.zeros(4)}
    gated = {"W_enc": torch.ones(4, 8), "b_gate": torch.zeros(8), "b_mag": torch.zeros(8), "W_dec": torch.ones(8, 4),
             "b_dec": torch.zeros(4)}
    for name, arch, w, extra in (("gated-no-r-mag", "gated", gated, {}),
                                 ("bad-shape", "standard", {**base, "W_enc": torch.ones(4, 6)}, {}),
                                 ("tanh-relu", "standard", base, {"activation_fn_str": "tanh-relu"})):
        (d / f"fmt-{name}").mkdir()
        save_file(w, d / f"fmt-{name}" / "sae_weights.safetensors")
        (d / f"fmt-{name}" / "cfg.json").write_text(json.dumps({"architecture": arch, "d_in": 4, "d_sae": 8, **extra}))
    arrays = {"W_enc": np.ones((4, 8)), "W_dec": np.ones((8, 4)), "b_enc": np.zeros(8), "b_dec": np.zeros(4)}
    (d / "fmt-gemma-scope-2b-pt-res" / "layer_0").mkdir(parents=True)
    np.savez(d / "fmt-gemma-scope-2b-pt-res" / "layer_0" / "params.npz", **arrays)
    (d / "fmt-npz").mkdir()
    np.savez(d / "fmt-npz" / "params.npz", **arrays, threshold=np.zeros(8))
    (d / "fmt-kissane").mkdir()
    torch.save(base, d / "fmt-kissane" / "no-cfg.pt")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    prepare(d)
    return d


def python_namespace(model):
    import saekit
    from saekit import SAE, SAEConfig
    from saekit.splice import check_sae_fits
    from saekit.training import train_sae
    from saekit.training.distributed import check_supported

    return {"saekit": saekit, "torch": torch, "SAE": SAE, "SAEConfig": SAEConfig, "model": model,
            "check_sae_fits": check_sae_fits, "train_sae": train_sae, "check_supported": check_supported}


ROWS = table_rows()


def test_the_table_has_at_least_30_rows():
    assert len(ROWS) >= 30


@pytest.mark.filterwarnings("ignore:skipping checkpoint")  # row "every checkpoint corrupt" warns first
@pytest.mark.parametrize("what, how, expected", ROWS, ids=[f"{i + 1}" for i in range(len(ROWS))])
def test_row(what, how, expected, scratch, model, monkeypatch, capsys, tmp_path):
    import saekit.models
    from saekit.cli import main
    from saekit.errors import SaekitError

    real = saekit.models.load_model

    # the session's model where it is the one asked for
    def load_model(name=None, device="cpu", dtype="auto", device_map=None, n_devices=1):
        placement = {"device_map": device_map, "n_devices": n_devices}
        if name is None and device == "cpu" and dtype in ("auto", "float32") and not device_map and n_devices == 1:
            return model
        return real(name, device, dtype, **placement)

    monkeypatch.setattr(saekit.models, "load_model", load_model)
    monkeypatch.chdir(tmp_path)
    how, expected = (s.replace("$DIR", str(scratch)) for s in (how, expected))
    if re.search(r"device[ =]\"?cuda", how) and torch.cuda.is_available():
        pytest.skip("a row about a machine without a CUDA GPU")
    if how.startswith("saekit "):
        assert main(shlex.split(how)[1:]) == 2, what
        # saekit's own INFO lines ("saekit.kernels: impl=..."), logged once per process, may come
        # first, depending on which tests ran before; the error itself is one line
        got = "".join(line for line in capsys.readouterr().err.splitlines(keepends=True)
                      if not re.match(r"saekit(\.\w+)+: ", line))
        assert got.count("\n") == 1, got  # one line
        assert got.strip() == expected, what
    else:
        with pytest.raises(SaekitError) as e:
            eval(how, python_namespace(model))
        assert f"{type(e.value).__name__}: {e.value}" == expected, what
