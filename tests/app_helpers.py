"""A small SAE on the embedded model, saved with feature statistics, for the app tests."""

import torch

from saekit.evals.features import analyze, save_stats
from saekit.sae import SAE, SAEConfig
from tests.arch_helpers import as_if_trained_

PROMPT = "When Mary and John went to the store, John gave a drink to"


def make_sae(seed: int = 0, **cfg) -> SAE:
    """A seeded hook_z SAE at layer 5 of the embedded model (4 heads of 32)."""
    base = dict(d_in=128, d_sae=256, k=16, hook_name="blocks.5.attn.hook_z", model_name="saekit-ioi-6l",
                hook_shape=(4, 32))
    sae = SAE(SAEConfig(**{**base, **cfg}), seed=seed)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return as_if_trained_(sae).eval()


def analyzed_sae(model, folder, n_tokens: int = 4096, sparsity: str = "topk") -> str:
    """Save an SAE of architecture ``sparsity`` in ``folder`` with statistics over ``n_tokens``
    tokens; return the path."""
    sae = make_sae(sparsity=sparsity)
    sae.save(folder)
    save_stats(analyze(model, sae, n_tokens, progress=False), folder)
    return str(folder)
