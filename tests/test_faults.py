"""Faults: corrupt checkpoints, full disks, unwritable run folders."""

import errno
import shutil

import pytest
import torch

from saekit import load_sae
from saekit.cli import main
from saekit.training import preflight

ARGS = ["--d-sae", "128", "-k", "4", "--batch-size", "512", "--fill-tokens", "4064", "--seq-len", "128",
        "--total-tokens", "6144", "--warmup-steps", "3", "--eval-tokens", "0", "--progress", "false",
        "--checkpoint-every", "4"]


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "drop the checksum"])
def test_resume_skips_a_damaged_checkpoint_and_ends_the_same(tmp_path, damage):
    ref = tmp_path / "ref"
    assert main(["train", "--out", str(ref), *ARGS]) == 0
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    (run / "sae.safetensors").unlink()
    newest = run / "checkpoints" / "step_0000012.pt"
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip a byte":
        newest.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        newest.with_suffix(".sha256").unlink()
    with pytest.warns(UserWarning, match="skipping checkpoint step_0000012.pt"):
        assert main(["train", "--out", str(run), "--resume", "true", *ARGS]) == 0  # from step 8
    a, b = load_sae(ref), load_sae(run)
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, n), getattr(b, n)), n


def test_full_disk_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "free_bytes", lambda path: 10 * 2**20)
    assert main(["train", "--out", str(tmp_path / "o"), *ARGS, "--d-sae", "100000"]) == 2
    err = capsys.readouterr().err
    assert "not enough disk space in --out" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.parametrize("out", ["{tmp}/a-file/run", "/proc/saekit-run"])
def test_unwritable_out_fails_before_training_even_as_root(tmp_path, capsys, out):
    (tmp_path / "a-file").write_text("a regular file cannot hold a folder")
    assert main(["train", "--out", out.format(tmp=tmp_path), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "cannot write to --out" in err and err.count("\n") == 1, err


def test_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_previous(tmp_path, capsys, monkeypatch):
    from saekit.training import checkpoint as ckpt

    real = ckpt.atomic_write_bytes
    calls = {"n": 0}

    def fill_up(path, write):
        calls["n"] += 1
        if calls["n"] > 1:  # the first checkpoint fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, write)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", fill_up)
    assert main(["train", "--out", str(tmp_path / "o"), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "No space left on device" in err and err.count("\n") == 1
    assert [p.name for p in (tmp_path / "o" / "checkpoints").glob("*.pt")] == ["step_0000004.pt"]
