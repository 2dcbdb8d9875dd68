"""`saekit demo`, `saekit hooks` and `saekit ioi`: the model on its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from saekit.cli.options import ModelOptions
from saekit.cli.train import format_summary
from saekit.errors import SaekitError



@dataclass
class IOIOptions:
    """How to score IOI."""

    n: int = 1000
    """Number of prompts."""
    split: Literal["heldout", "train"] = "heldout"
    """heldout: held-out templates and name pairs; train: the training templates."""
    seed: int = 0
    """Seed of the prompt draw."""

    def __post_init__(self):
        if self.n < 1:
            raise SaekitError(f"--n must be at least 1, not {self.n}")


def cmd_hooks(args) -> None:
    """List every hook point with its activation shape for a one-token prompt."""
    import torch

    from saekit.models import load_model, model_name

    model = load_model(args.model.model, args.model.device, args.model.dtype, **args.model.placement)
    tokens = torch.tensor([[model.tokenizer.bos_token_id or 0]], device=model.cfg.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    print(f"# {len(cache)} hook points of {model_name(model)}; shape without the batch axis")
    width = max(map(len, cache.keys()))
    for name, act in cache.items():
        print(f"{name:<{width}}  {list(act.shape[1:])}")


def cmd_ioi(args) -> None:
    """Print IOI accuracy and mean logit difference."""
    from saekit.ioi import score_ioi
    from saekit.models import load_model

    model = load_model(args.model.model, args.model.device, args.model.dtype, **args.model.placement)
    o = args.ioi
    s = score_ioi(model, o.n, o.split, o.seed)
    print(f"IOI ({o.split}, {s.n} prompts): accuracy {s.accuracy:.3f}  mean logit diff {s.logit_diff:.2f}")


def cmd_demo(args) -> None:
    """The main job on the embedded defaults: load the model, show its hook points, score IOI,
    train a TopK SAE on blocks.5.attn.hook_z and print its summary."""
    import shutil
    from pathlib import Path

    from saekit.activations import hook_names
    from saekit.ioi import score_ioi
    from saekit.models import load_model, model_name
    from saekit.training.config import DataOptions, RunOptions, TrainConfig
    from saekit.training.run import run_training

    model = load_model(args.model.model, args.model.device, args.model.dtype, **args.model.placement)
    c = model.cfg
    print(f"model {model_name(model)}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads "
          f"of d_head {c.d_head}, vocab {c.d_vocab}")
    hooks = hook_names(model)
    print(f"{len(hooks)} hook points, e.g. blocks.5.attn.hook_z {list(hooks['blocks.5.attn.hook_z'])}"
          " (n_heads, d_head) per token; `saekit hooks` lists them all")
    s = score_ioi(model, 1000, "heldout")
    print(f"IOI on {s.n} held-out prompts: accuracy {s.accuracy:.3f}, mean logit diff {s.logit_diff:.2f}")
    out = Path("runs/demo")
    if (out / "train_config.json").exists():  # the previous demo's run folder
        shutil.rmtree(out)
    cfg = TrainConfig(data=DataOptions(model=args.model.model, device=args.model.device, dtype=args.model.dtype,
                                       **args.model.placement),
                      run=RunOptions(out=str(out)))
    print(f"training a TopK SAE at {cfg.data.hook} (`saekit train --hook {cfg.data.hook}`) ...")
    print(format_summary(run_training(cfg), str(out)))


COMMANDS = {
    "demo": (cmd_demo, lambda: [(ModelOptions, "model")]),
    "hooks": (cmd_hooks, lambda: [(ModelOptions, "model")]),
    "ioi": (cmd_ioi, lambda: [(ModelOptions, "model"), (IOIOptions, "ioi")]),
}
