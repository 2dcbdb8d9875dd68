"""Option groups several commands share."""

from __future__ import annotations

from dataclasses import dataclass

from saekit.errors import SaekitError
from saekit.placement import check_placement, parse_device_map
from saekit.training.config import check_choice
from saekit.types import ModelDtypeName


@dataclass
class ModelOptions:
    """Which model to run, where, and in what dtype."""

    model: str | None = None
    """A hub name (gpt2) or a local Hugging Face folder; omitted: the SAE's own model (cfg.json model_name) where the command reads an SAE, else the embedded model."""  # noqa: E501
    device: str = "cpu"
    """Torch device for the model (and the SAE)."""
    dtype: ModelDtypeName = "auto"
    """The model's dtype (the SAE reads its activations upcast to float32); auto = float32 on CPU, the model config's dtype on CUDA."""  # noqa: E501
    device_map: str = ""
    """Spread a model too large for one device over several: auto, balanced, sequential, a JSON object {"module": device} or a .json file holding one; --device is then the SAE's."""  # noqa: E501
    n_devices: int = 1
    """Split the model over this many CUDA GPUs, layers balanced."""

    def __post_init__(self):
        check_choice("--dtype", self.dtype, ModelDtypeName)
        check_placement(parse_device_map(self.device_map), self.n_devices)

    @property
    def placement(self) -> dict:
        """``load_model``'s keyword arguments for --device-map and --n-devices."""
        return {"device_map": self.device_map, "n_devices": self.n_devices}


@dataclass
class SAEOption:
    """Which SAE."""

    sae: str = ""
    """SAE folder (saekit, SAELens or sparsify layout), Gemma Scope params.npz, Kissane et al. NAME.pt, or hf://ORG/REPO/PATH; results go beside it (hf://: in runs/hf/ORG/REPO/PATH)."""  # noqa: E501

    def __post_init__(self):
        if not self.sae:
            raise SaekitError("--sae PATH is required (an SAE folder, e.g. runs/demo)")


@dataclass
class DatasetOption:
    """Held-out text to run on."""

    dataset: str | None = None
    """A Hugging Face dataset name, a .txt/.jsonl file or folder, ioi, or omitted for saekit's held-out corpus."""
