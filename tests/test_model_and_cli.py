import subprocess
import sys

import pytest

from saekit.cli import main
from saekit.errors import ModelLoadError
from saekit.ioi import score_ioi
from saekit.models import load_model


def test_embedded_model_loads_offline_and_solves_heldout_ioi(model):
    assert type(model).__name__ == "TransformerBridge"
    assert model.cfg.n_layers >= 6
    s = score_ioi(model, n=200, split="heldout")
    assert s.n == 200
    assert s.accuracy >= 0.95, s
    assert s.logit_diff > 0


def test_hooks_lists_hook_z_with_heads_and_d_head(model, capsys):
    assert main(["hooks"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("blocks.5.attn.hook_z "))
    shape = eval(line.split(None, 1)[1])  # [pos, n_heads, d_head] for the one-token prompt
    assert shape == [1, model.cfg.n_heads, model.cfg.d_head]
    assert "blocks.0.hook_resid_pre" in out


def test_ioi_command_prints_accuracy(capsys):
    assert main(["ioi", "--n", "50"]) == 0
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["hooks", "--model", "./no/such/folder"], "no such model folder"),
    (["hooks", "--model", "surely-not-a-model-xyz"], "could not load model"),
    (["ioi", "--split", "dev"], "argument --split: invalid choice"),
    (["ioi", "--n", "0"], "--n must be at least 1"),
    (["hooks", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_cli_errors_are_one_line_with_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_console_script_exit_code():
    r = subprocess.run([sys.executable, "-m", "saekit", "hooks", "--model", "./nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("saekit hooks: error: no such model folder")


def test_load_model_raises_specific_error_offline():
    with pytest.raises(ModelLoadError, match="embedded default"):
        load_model("gpt2")
