"""The architectures the downstream tests (eval, analyze, app, steering, attention, splice,
training) run over, and how to give a random SAE the inference state training would."""

import torch

# batchtopk is mutual_choice's class under a second name: matryoshka covers that class's new use
ARCHITECTURES = ["topk", "gtopk", "mutual_choice", "feature_choice", "standard", "jumprelu", "gated", "matryoshka"]
NEW = ["standard", "jumprelu", "gated", "matryoshka"]


def as_if_trained_(sae, theta: float = 0.05):
    """Set the inference thresholds a trained batch-level SAE (mutual/feature choice, batchtopk,
    matryoshka) holds, so its inference rule fires on some tokens; elementwise SAEs keep theirs."""
    with torch.no_grad():
        if hasattr(sae.sparsifier, "theta"):
            sae.sparsifier.theta.fill_(theta)
    return sae
