"""Run a model with an SAE's reconstruction in place of the activation at its hook.

The BOS position is left as it is, matching harvesting (``saekit.activations``), where the
SAE never sees it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.errors import MismatchError


def check_sae_fits(model, sae) -> None:
    """Raise ``MismatchError`` unless ``sae`` reads a hook of ``model`` with its ``d_in``."""
    from saekit.activations import hook_names

    names = hook_names(model)
    hook = sae.cfg.hook_name
    if hook not in names:
        raise MismatchError(f"the SAE reads hook {hook!r}, which this model does not have; "
                            "load the model it was trained on (cfg.json: model_name)")
    d = 1
    for n in names[hook]:
        d *= n
    if d != sae.cfg.d_in:
        raise MismatchError(f"the SAE expects d_in={sae.cfg.d_in} at {hook} but this model gives {d}; "
                            f"it was trained on {sae.cfg.model_name or 'another model'}")
    if not sae.cfg.hook_shape and len(names[hook]) > 1:  # e.g. a SAELens hook_z SAE: learn
        sae.cfg = dataclasses.replace(sae.cfg, hook_shape=tuple(names[hook]))  # how to unflatten


def reconstruct_hook(sae, grads: Tensor | None = None):
    """A TransformerLens hook function that swaps positions 1: for the SAE's reconstruction.
    ``grads`` (``[b, T, *hook_shape]``, ∂L/∂x of the clean run) let a gtopk SAE select with
    gradients; without them it selects as TopK."""

    def hook_fn(act: Tensor, hook=None) -> Tensor:
        x = sae.flatten_hook(act[:, 1:])  # [b, T-1, d_in]
        g = None if grads is None else sae.flatten_hook(grads[:, 1:]).float()
        x_hat = sae(x.float(), g).x_hat.to(act.dtype)
        out = act.clone()
        out[:, 1:] = sae.unflatten_hook(x_hat)
        return out

    return hook_fn


def zero_hook(act: Tensor, hook=None) -> Tensor:
    out = act.clone()
    out[:, 1:] = 0
    return out


def mean_hook(mean: Tensor):
    """Replace positions 1: by ``mean`` (``[*hook_shape]``): mean ablation."""

    def hook_fn(act: Tensor, hook=None) -> Tensor:
        out = act.clone()
        out[:, 1:] = mean.to(act.device, act.dtype)
        return out

    return hook_fn


def loss_recovered(clean: float, spliced: float, ablated: float) -> float:
    """(L_ablated − L_spliced) / (L_ablated − L_clean): 1 = the splice loses nothing, 0 = as
    bad as the ablation (Kissane et al. 2024)."""
    return (ablated - spliced) / (ablated - clean)


def next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``logits [b, T, V]`` on ``tokens [b, T]``."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


class CELosses(NamedTuple):
    clean: float
    sae: float
    zero: float
    kl: float  # mean KL(clean ‖ spliced) of the next-token distributions, nats per position
    mean: float = float("nan")  # loss with the hook mean-ablated, when a mean was given

    @property
    def recovered(self) -> float:
        """Loss recovered against zero ablation."""
        return loss_recovered(self.clean, self.sae, self.zero)

    @property
    def recovered_mean(self) -> float:
        """Loss recovered against mean ablation."""
        return loss_recovered(self.clean, self.sae, self.mean)


@torch.no_grad()
def ce_losses(model, sae, tokens: Tensor, batch_size: int = 32, grads: Tensor | None = None,
              mean: Tensor | None = None) -> CELosses:
    """Next-token loss clean, with the SAE spliced in, and with the hook zero-ablated, and
    the KL of the spliced model's next-token distribution from the clean one; with ``mean``
    (``[*hook_shape]``) also the loss with the hook mean-ablated. ``grads``
    (``[n, T, *hook_shape]``) are passed to gradient-aware sparsifiers."""
    check_sae_fits(model, sae)
    sums = torch.zeros(5)
    hook = sae.cfg.hook_name
    for i in range(0, len(tokens), batch_size):
        t = tokens[i: i + batch_size].to(model.cfg.device)
        g = None if grads is None else grads[i: i + batch_size].to(model.cfg.device)
        clean = model(t)
        spliced = model.run_with_hooks(t, fwd_hooks=[(hook, reconstruct_hook(sae, g))])
        zero = model.run_with_hooks(t, fwd_hooks=[(hook, zero_hook)])
        kl = F.kl_div(spliced.float().log_softmax(-1), clean.float().log_softmax(-1),
                      log_target=True, reduction="none").sum(-1).mean()
        losses = [next_token_loss(clean, t), next_token_loss(spliced, t), next_token_loss(zero, t), kl]
        if mean is not None:
            losses.append(next_token_loss(model.run_with_hooks(t, fwd_hooks=[(hook, mean_hook(mean))]), t))
        sums[: len(losses)] += torch.tensor([v.item() for v in losses]) * len(t)
    out = (sums / len(tokens)).tolist()
    return CELosses(*out[:4], mean=out[4] if mean is not None else float("nan"))
