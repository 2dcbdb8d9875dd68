"""Randomly initialised models with the shapes of real ones, saved as Hugging Face folders.

    python -m saekit.training.shaped_models gpt2-small OUT     # 12 layers, d_model 768, 12 heads
    python -m saekit.training.shaped_models llama-gqa OUT      # 32 query heads over 8 key/value heads

They exist to run saekit at real widths without a network: ``saekit train --model OUT``
loads them through ``TransformerBridge.boot_transformers`` as it would a hub model, so hook
shapes, ``d_in``, head attribution and DFA are exercised at the sizes researchers use
(tests/test_real_shapes.py on CPU, benchmarks/gpu_check.sh on a GPU). Their weights are
random: nothing they compute means anything.

What is kept and what is shrunk, and why:

- ``gpt2-small``: GPT-2 small's 12 layers, d_model 768, 12 heads of 64 and d_mlp 3072, as
  in ``gpt2``'s config.json. The vocabulary is the embedded model's (1435 tokens, not 50257)
  and the context ``n_ctx`` (default 128, not 1024), so the folder stays ~350 MB.
- ``gpt2-narrow``: GPT-2 small's 12 layers at d_model 64 (4 heads of 16): the CPU stand-in
  of ``gpt2-small`` in ``benchmarks/gpu_check.sh --dry-run``.
- ``llama-gqa``: the attention of Llama 3.2 1B (d_model 2048, 32 query heads of 64 dims
  over 8 key/value heads: grouped-query attention, 4 query heads a key/value head, RoPE,
  RMSNorm, SwiGLU), in 2 layers with d_mlp 2048 instead of 16 layers of 8192: the layers and
  the MLP are not what the shape checks look at, and a CPU runs this in seconds.

The tokenizer is the embedded model's (``pretrained/saekit-ioi-6l``), copied beside the
weights, so saekit's corpus tokenizes as it does for the embedded model. Biases and norm
weights are drawn at random too (Hugging Face initialises them to 0 and 1), so no identity
a test checks can hold merely because a term is zero (GPT-2's value bias b_V, which DFA's
by-source sum must include, is one).
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from saekit.models import embedded_model_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Shape:
    """The architecture and widths of one shaped model."""

    arch: str  # "gpt2" or "llama"
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


SHAPES = {
    "gpt2-small": Shape("gpt2", n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, d_mlp=3072),
    "llama-gqa": Shape("llama", n_layers=2, d_model=2048, n_heads=32, n_kv_heads=8, d_mlp=2048),
    # GPT-2 small's 12 layers at a width a CPU runs in moments: gpu_check.sh --dry-run's stand-in
    "gpt2-narrow": Shape("gpt2", n_layers=12, d_model=64, n_heads=4, n_kv_heads=4, d_mlp=256),
}


def _vocab_size() -> int:
    """The embedded tokenizer's vocabulary (the embedded model's ``vocab_size``)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(embedded_model_path()).vocab_size


def hf_model(shape: Shape, n_ctx: int = 128, seed: int = 0):
    """An untrained Hugging Face causal LM of ``shape``, every weight drawn at random."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    vocab = _vocab_size()
    torch.manual_seed(seed)
    if shape.arch == "gpt2":
        if shape.n_kv_heads != shape.n_heads:
            raise ValueError("GPT-2 has one key/value head per query head")
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=n_ctx, n_embd=shape.d_model,
                                           n_layer=shape.n_layers, n_head=shape.n_heads, n_inner=shape.d_mlp,
                                           bos_token_id=0, eos_token_id=0))
    elif shape.arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=shape.d_model,
                                             intermediate_size=shape.d_mlp, num_hidden_layers=shape.n_layers,
                                             num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads,
                                             max_position_embeddings=n_ctx, bos_token_id=0, eos_token_id=0))
    else:
        raise ValueError(f"unknown architecture {shape.arch!r}")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # 0 at init: give it a size (GPT-2's b_V among them)
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # norm weights, 1 at init
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))
    return model.eval()


def build(name: str, out, n_ctx: int = 128, seed: int = 0) -> Path:
    """Write the shaped model ``name`` (a key of ``SHAPES``) to folder ``out``: config.json,
    model.safetensors and the embedded tokenizer. Deterministic from ``seed``."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose from {sorted(SHAPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_model(SHAPES[name], n_ctx, seed).save_pretrained(out)
    for f in TOKENIZER_FILES:
        shutil.copyfile(embedded_model_path() / f, out / f)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", help="folder to write the model into")
    ap.add_argument("--n-ctx", type=int, default=128, help="context length (positions)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    s = SHAPES[a.shape]
    print(f"{a.shape}: {s.n_layers} layers, d_model {s.d_model}, {s.n_heads} heads of {s.d_head} "
          f"({s.n_kv_heads} key/value heads), d_mlp {s.d_mlp} -> {build(a.shape, a.out, a.n_ctx, a.seed)}")


if __name__ == "__main__":
    main()
