"""Training configuration: small nested dataclasses, validated on creation, never mutated
after the run starts. The ``saekit train`` options are generated from these classes."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

from saekit.errors import ConfigError
from saekit.placement import check_placement, parse_device_map
from saekit.types import ELEMENTWISE, ModelDtypeName, SAEConfig, SAEDtypeName


class _Joined(str):
    """A value the command line has already set (see ``JoinRepeated``)."""


class JoinRepeated(argparse.Action):
    """``--hook A --hook B`` gives ``"A,B"`` (plain argparse would keep only the last)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, _Joined(f"{current},{values}" if isinstance(current, _Joined) else values))


@dataclass
class DataOptions:
    """Where activations come from."""

    hook: str = field(default="blocks.5.attn.hook_z", metadata={"custom_args": {"action": JoinRepeated}})
    """Hook to train on: a full TransformerLens name, a pattern (blocks.*.attn.hook_z) or several, comma-separated; repeat --hook for more. One SAE per hook, fed by one forward."""
    model: str | None = None
    """A hub name (gpt2), a local Hugging Face folder, or omitted for the embedded model."""
    dataset: str | None = None
    """A Hugging Face dataset name, a .txt/.jsonl file or folder, ioi (IOI prompts only), or
    omitted for saekit's corpus."""
    from_cache: str | None = None
    """Train from a `saekit cache` folder instead of running the model."""
    seq_len: int = 128
    """Tokens per sequence (BOS included)."""
    total_tokens: int = 4_000_000
    """Activation vectors to train on."""
    batch_size: int = 4096
    """Activation vectors per step."""
    fill_tokens: int = 131_072
    """Activations per shuffled buffer fill (and per cache shard)."""
    device: str = "cpu"
    """Device for the model and the SAE."""
    dtype: ModelDtypeName = "auto"
    """The model's dtype, which activations are buffered and cached in (bfloat16: half the memory); auto = float32 on CPU (measured fastest), the model config's dtype on CUDA; --from-cache: the cache's."""
    heldout_frac: float = 0.01
    """Local files and hub datasets without a validation/test split: share of documents (by a stable hash) held out of training for the summary and saekit eval."""
    device_map: str = ""
    """Spread a model too large for one device over several: auto, balanced, sequential, a JSON object {"module": device} or a .json file holding one (docs/training-at-scale.md); --device is then where the SAE trains."""
    n_devices: int = 1
    """Split the model over this many CUDA GPUs, layers balanced (--device-map balanced over N GPUs)."""

    def __post_init__(self):
        self.hook = str(self.hook)
        for name in ("seq_len", "total_tokens", "batch_size", "fill_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, not {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError("--seq-len must be at least 2 (BOS plus one token)")
        if self.fill_tokens < self.batch_size:
            raise ConfigError(f"--fill-tokens ({self.fill_tokens}) must be at least --batch-size ({self.batch_size})")
        if not 0 < self.heldout_frac < 1:
            raise ConfigError(f"--heldout-frac must be between 0 and 1 (exclusive), not {self.heldout_frac}")
        if self.total_tokens < self.batch_size:
            raise ConfigError(f"--total-tokens ({self.total_tokens}) is less than one batch ({self.batch_size})")
        check_placement(parse_device_map(self.device_map), self.n_devices)
        check_choice("--dtype", self.dtype, ModelDtypeName)

    @property
    def placement(self) -> dict:
        """``load_model``'s keyword arguments for --device-map and --n-devices."""
        return {"device_map": self.device_map, "n_devices": self.n_devices}


def check_choice(option: str, value, choices) -> None:
    """Refuse a value outside the ``Literal`` ``choices`` (the command line's parser refuses
    them too; this catches configs built in Python or read from files)."""
    if value not in typing.get_args(choices):
        raise ConfigError(f"{option} must be one of {', '.join(typing.get_args(choices))}, not {value!r}")


@dataclass
class OptimOptions:
    """Adam, with a linear warm-up and a linear decay to zero at the end."""

    lr: float = 0.0
    """Learning rate; 0 means sparsify's rule 2e-4 / sqrt(d_sae / 2^14)."""
    warmup_steps: int = 100
    """Steps of linear warm-up."""
    decay_frac: float = 0.2
    """Fraction of the run, at the end, over which the rate decays linearly to 0."""
    adam_eps: float = 6.25e-10
    """Adam epsilon (OpenAI's TopK value)."""
    aux: Literal["auto", "auxk", "zipf", "none"] = "auto"
    """Auxiliary loss of the TopK family: auxk (dead latents), zipf (dead and underused latents), none; auto = auxk, and none for standard, jumprelu and gated (their recipes have none)."""
    aux_coef: float = 1 / 32
    """Weight α of the auxiliary loss."""
    aux_norm: Literal["residual", "input"] = "residual"
    """AuxK normalisation: residual = ‖e − ê‖² / variance of the residual e, unscaled (Gao et al.'s code); input = divided by the variance of x and scaled by min(n_dead / k_aux, 1) (saekit before, several times weaker)."""
    k_aux: int = 0
    """Dead latents the auxiliary loss reconstructs with; 0 means d_in / 2."""
    dead_tokens: int = 1_000_000
    """A latent is dead after this many tokens without firing (an activation above 1e-3)."""
    b_dec_init: Literal["mean", "geometric_median"] = "mean"
    """Start of b_dec: the mean of the first batch, or the geometric median of at least 32768 activations (Gao et al.)."""
    zipf_tail_frac: float = 0.2
    """aux zipf: share of lowest-ranked latents left out of the Zipf fit."""
    zipf_gamma: float = 0.5
    """aux zipf: a latent is underused below gamma times its fitted frequency."""
    l1_coef: float = 0.0
    """standard and gated: weight λ of the L1 penalty (docs/methods.md); 0 means the architecture's default."""
    l0_coef: float = 0.0
    """jumprelu: weight λ of the L0 penalty (docs/methods.md); 0 means the default."""
    sparsity_warmup_frac: float = 0.05
    """standard, gated, jumprelu: share of the run, at the start, over which the sparsity penalty's weight rises linearly from 0."""
    matryoshka_sizes: str = ""
    """matryoshka: nested prefix sizes, comma-separated and increasing (128,512,2048); d_sae is added last if missing; empty means d_sae/16, d_sae/4, d_sae."""
    sae_dtype: SAEDtypeName = "float32"
    """The SAE step's compute dtype; bfloat16 keeps float32 master weights (parameters, Adam, checkpoints and files stay float32) and is slower on CPUs without bf16 matmul units."""

    def __post_init__(self):
        if self.lr < 0:
            raise ConfigError(f"--lr must be at least 0 (0 picks it from d_sae), not {self.lr}")
        if not 0 <= self.decay_frac <= 1:
            raise ConfigError(f"--decay-frac must be between 0 and 1, not {self.decay_frac}")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be at least 0, not {self.warmup_steps}")
        if self.dead_tokens < 1:
            raise ConfigError(f"--dead-tokens must be positive, not {self.dead_tokens}")
        if self.l1_coef < 0 or self.l0_coef < 0:
            raise ConfigError("--l1-coef and --l0-coef must be at least 0 (0 picks the default)")
        if not 0 <= self.sparsity_warmup_frac <= 1:
            raise ConfigError(f"--sparsity-warmup-frac must be between 0 and 1, not {self.sparsity_warmup_frac}")
        if self.matryoshka_sizes:
            self.prefix_sizes(None)  # refuse a malformed list now
        check_choice("--sae-dtype", self.sae_dtype, SAEDtypeName)

    def prefix_sizes(self, d_sae: int | None) -> list[int]:
        """matryoshka's nested prefix sizes for ``d_sae`` latents, the last being ``d_sae``
        (``d_sae`` None: only check the list's form)."""
        try:
            sizes = [int(t) for t in self.matryoshka_sizes.split(",")] if self.matryoshka_sizes else []
        except ValueError:
            raise ConfigError(f"--matryoshka-sizes must be comma-separated integers, e.g. 128,512,2048, not "
                              f"{self.matryoshka_sizes!r}") from None
        if any(b <= a for a, b in zip(sizes, sizes[1:])) or any(n < 1 for n in sizes):
            raise ConfigError(f"--matryoshka-sizes must be positive and increasing, not {self.matryoshka_sizes!r}")
        if d_sae is None:
            return sizes
        if not sizes:
            sizes = sorted({max(1, d_sae // 16), max(1, d_sae // 4)} - {d_sae})
        if sizes and sizes[-1] > d_sae:
            raise ConfigError(f"--matryoshka-sizes {self.matryoshka_sizes} goes past d_sae={d_sae}; "
                              "keep every size at most d_sae")
        return sizes + [d_sae] if not sizes or sizes[-1] != d_sae else sizes


@dataclass
class RunOptions:
    """Files, logging, checkpoints."""

    out: str = "runs/sae"
    """Run folder: the SAE, its config, metrics.jsonl, checkpoints and the summary."""
    seed: int = 0
    """Seed of the SAE init and the data order."""
    resume: bool = False
    """Continue from the last checkpoint in --out."""
    log_every: int = 50
    """Steps between metric lines."""
    checkpoint_every: int = 200
    """Steps between checkpoints."""
    eval_tokens: int = 32_768
    """Held-out tokens for the end-of-run summary (0 skips it)."""
    wandb: bool = False
    """Also log to Weights & Biases (offline unless WANDB_MODE says otherwise)."""
    progress: bool = True
    """Show a progress bar."""
    distribute_hooks: bool = False
    """Under torchrun, spread the hooks' SAEs over the ranks (each trains its own on all the data) instead of data parallelism."""

    def __post_init__(self):
        for name in ("log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, not {getattr(self, name)}")


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``train_config.json`` in the run folder.
    The SAE's width at the hook, d_in, is read from the model."""

    sae: SAEConfig = field(default_factory=SAEConfig)
    expansion: int = 16
    """Latents per input dimension, used when --d-sae is 0."""
    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    run: RunOptions = field(default_factory=RunOptions)

    def __post_init__(self):
        if self.expansion < 1:
            raise ConfigError(f"--expansion must be at least 1, not {self.expansion}")
        if self.sae.sparsity in ELEMENTWISE and self.optim.aux in ("auxk", "zipf"):
            raise ConfigError(f"--aux {self.optim.aux} trains the dead latents of TopK-family SAEs; a "
                              f"{self.sae.sparsity} SAE trains without it: use --aux auto or none")
        if self.sae.sparsity == "matryoshka" and self.sae.d_sae:  # else checked once d_in is known
            self.optim.prefix_sizes(self.sae.d_sae)

    @property
    def aux(self) -> str:
        """The auxiliary loss this run trains with: ``optim.aux`` with ``auto`` resolved."""
        if self.optim.aux != "auto":
            return self.optim.aux
        return "none" if self.sae.sparsity in ELEMENTWISE else "auxk"

    def sae_for(self, d_in: int, hook_name: str, hook_shape: tuple[int, ...], model_name: str) -> SAEConfig:
        """The config of the SAE this run trains at one hook: ``sae`` with its open shape
        (``d_in`` 0; ``d_sae`` 0 for ``expansion × d_in``) and its hook filled in."""
        return dataclasses.replace(self.sae, d_in=d_in, d_sae=self.sae.d_sae or self.expansion * d_in,
                                   hook_name=hook_name, model_name=model_name, hook_shape=tuple(hook_shape))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = upgrade_layout(d)
        parts = {"sae": SAEConfig.from_dict, "data": lambda v: DataOptions(**v),
                 "optim": lambda v: OptimOptions(**v), "run": lambda v: RunOptions(**v)}
        try:
            return cls(**{k: parts[k](v) if k in parts else v for k, v in d.items()})
        except (KeyError, TypeError) as e:
            raise ConfigError(f"not a saekit training config ({e})") from None

    def identity(self) -> dict:
        """The settings that must match for --resume (everything but bookkeeping)."""
        d = self.to_dict()
        # out: a run folder may be moved or copied (to another disk) and resumed there
        for k in ("out", "resume", "progress", "wandb", "log_every", "checkpoint_every", "distribute_hooks"):
            d["run"].pop(k)
        for k in ("device", "device_map", "n_devices"):  # where the model runs, not what it computes
            d["data"].pop(k)
        d["optim"]["aux"] = self.aux  # auto and what it stands for are the same run
        return d


def upgrade_layout(d: dict) -> dict:
    """A ``train_config.json`` (or checkpoint identity) of saekit before SAEConfig was nested
    here, in today's layout: ``sae`` held d_sae, expansion, k, sparsity and impl, and
    ``variant`` sat beside it."""
    if "variant" not in d:
        return d
    d = dict(d)
    variant = d.pop("variant")
    sae = dict(d.get("sae", {}))
    if "expansion" in sae:
        d["expansion"] = sae.pop("expansion")
    d["sae"] = {**sae, "variant": variant}
    return d
