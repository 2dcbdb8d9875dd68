"""--device-map and --n-devices (saekit.placement). A CPU-only machine has one real device,
but accelerate also places weights on "disk" (loaded layer by layer at each forward), and
transformer-lens counts cpu + disk as two devices: the same dispatch hooks run as on two
GPUs. What CPUs cannot show: activations crossing GPUs (docs/training-at-scale.md)."""

import json

import pytest
import torch

from saekit import load_sae
from saekit.cli import main
from saekit.errors import ConfigError, DeviceMapError, ModelLoadError
from saekit.models import load_model
from saekit.placement import check_covers, parse_device_map
from saekit.training.config import DataOptions, TrainConfig

OUTER = ["transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"]
# layers 0-2 in memory, 3-5 read from disk at each forward
SPLIT = {**dict.fromkeys(OUTER, "cpu"), **{f"transformer.h.{i}": "cpu" if i < 3 else "disk" for i in range(6)}}
ARGS = ["--d-sae", "256", "-k", "8", "--batch-size", "128", "--fill-tokens", "508", "--seq-len", "128",
        "--total-tokens", "256", "--warmup-steps", "1", "--eval-tokens", "127", "--progress", "false"]


def test_cpu_and_disk_are_two_devices_with_the_same_activations(model):
    split = load_model("saekit-ioi-6l", device_map=SPLIT)
    assert split.cfg.n_devices == 2
    tokens = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    with torch.no_grad():
        _, a = split.run_with_cache(tokens, names_filter=["blocks.1.attn.hook_z", "blocks.4.attn.hook_z"])
        _, b = model.run_with_cache(tokens, names_filter=["blocks.1.attn.hook_z", "blocks.4.attn.hook_z"])
    for name in ("blocks.1.attn.hook_z", "blocks.4.attn.hook_z"):  # one hook on each device
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_train_over_a_device_map_equals_one_device(tmp_path):
    """`saekit train --device-map FILE` at a hook on the second "device": the same SAE, and the
    same end-of-run summary (the SAE spliced into the split model), as on one device."""
    (tmp_path / "map.json").write_text(json.dumps(SPLIT))
    for name, extra in (("one", []), ("split", ["--device-map", str(tmp_path / "map.json")])):
        assert main(["train", "--model", "saekit-ioi-6l", "--hook", "blocks.4.attn.hook_z", "--out",
                     str(tmp_path / name), *ARGS, *extra]) == 0
    a, b = (load_sae(tmp_path / name).state_dict() for name in ("one", "split"))
    for n in a:
        assert torch.equal(a[n], b[n]), n
    one, split = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("one", "split"))
    assert one == split
    saved = json.loads((tmp_path / "split" / "train_config.json").read_text())
    assert saved["data"]["device_map"] == str(tmp_path / "map.json")
    # where the model runs is not what it computes: --resume may change it
    other = json.loads((tmp_path / "one" / "train_config.json").read_text())
    assert TrainConfig.from_dict(saved).identity() == TrainConfig.from_dict(other).identity()


def test_parse_device_map(tmp_path):
    assert parse_device_map("") is None and parse_device_map(None) is None
    assert parse_device_map("balanced") == "balanced"
    assert parse_device_map('{"transformer": 0, "lm_head": "cuda:1"}') == {"transformer": 0, "lm_head": "cuda:1"}
    (tmp_path / "m.json").write_text(json.dumps(SPLIT))
    assert parse_device_map(str(tmp_path / "m.json")) == SPLIT
    for bad, match in (("{}", "non-empty"), ("[1, 2]", "must be one of"), ('{"a": true}', "GPU index"),
                       (str(tmp_path / "none.json"), "does not exist")):
        with pytest.raises(ConfigError, match=match):
            parse_device_map(bad)
    with pytest.raises(ConfigError, match="not both"):
        DataOptions(device_map="auto", n_devices=2)


def test_coverage_names_the_layers_left_out():
    names = [f"model.layers.{i}.mlp.w" for i in range(32)] + ["model.embed.weight", "model.norm.weight"]
    check_covers({"model": 0}, names, 32)
    check_covers({"": "cpu"}, names, 32)
    gaps = {"model.embed": 0, "model.norm": 1,
            **{f"model.layers.{i}": i // 16 for i in range(32) if i not in (3, 30, 31)}}
    with pytest.raises(DeviceMapError) as e:
        check_covers(gaps, names, 32)
    assert str(e.value).startswith("the device map places no device on layers 3, 30-31 of the model's 32 "
                                   "(model.layers.3 ... model.layers.31);")
    with pytest.raises(DeviceMapError, match=r"on layer 1 of the model's 32 \(model.layers.1\) and on model.norm;"):
        check_covers({"model.embed": 0, **{f"model.layers.{i}": 0 for i in range(32) if i != 1}}, names, 32)
    # "model.layers.1" must not cover model.layers.10-19
    with pytest.raises(DeviceMapError, match="layers 10-19"):
        check_covers({"model.embed": 0, "model.norm": 0, **{f"model.layers.{i}": 0 for i in range(10)},
                      **{f"model.layers.{i}": 0 for i in range(20, 32)}}, names, 32)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has two GPUs to split over")
def test_n_devices_without_the_gpus_is_a_one_line_error():
    with pytest.raises(ModelLoadError, match=r"could not spread model 'saekit-ioi-6l' over devices: n_devices=2"):
        load_model("saekit-ioi-6l", n_devices=2)
