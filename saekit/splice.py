"""Run a model with an SAE's reconstruction in place of the activation at its hook.

The BOS position is left as it is, matching harvesting (``saekit.activations``), where the
SAE never sees it. The ablation baselines come in two kinds, named apart: ``keep_bos``
ablates positions 1: as the splice replaces them; ``all`` zero-ablates every position, BOS
included, as Kissane et al. (2024) do for their "CE loss recovered".
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.errors import MismatchError
from saekit.types import SAEConfig


def check_sae_fits(model, sae) -> SAEConfig:
    """Raise ``MismatchError`` unless ``sae`` reads a hook of ``model`` with its ``d_in``.

    Returns the SAE's config as it applies to this model, changing nothing: ``sae.cfg``
    itself, or, when the config records no ``hook_shape`` for a hook with several axes (a
    SAELens hook_z SAE), a copy with the model's shape filled in, so the SAE knows how to
    unflatten; a caller that splices keeps it (``sae.cfg = check_sae_fits(model, sae)``)."""
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
    if not sae.cfg.hook_shape and len(names[hook]) > 1:
        return dataclasses.replace(sae.cfg, hook_shape=tuple(names[hook]))
    return sae.cfg


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
    """Zero ablation of positions 1: (BOS kept, as the splice keeps it)."""
    out = act.clone()
    out[:, 1:] = 0
    return out


def zero_all_hook(act: Tensor, hook=None) -> Tensor:
    """Zero ablation of every position, BOS included (Kissane et al. 2024's baseline)."""
    return torch.zeros_like(act)


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
    zero_keep_bos: float  # positions 1: zeroed, BOS kept (the positions the splice replaces)
    zero_all: float  # every position zeroed, BOS included (Kissane et al. 2024)
    kl: float  # mean KL(clean ‖ spliced) of the next-token distributions, nats per position
    mean: float = float("nan")  # loss with positions 1: mean-ablated, when a mean was given

    @property
    def recovered_zero_keep_bos(self) -> float:
        """Loss recovered against zero ablation of the positions the splice replaces."""
        return loss_recovered(self.clean, self.sae, self.zero_keep_bos)

    @property
    def recovered_zero_all(self) -> float:
        """Loss recovered against zero ablation of every position (Kissane et al.'s figure)."""
        return loss_recovered(self.clean, self.sae, self.zero_all)

    @property
    def recovered_mean(self) -> float:
        """Loss recovered against mean ablation (positions 1:)."""
        return loss_recovered(self.clean, self.sae, self.mean)

    def as_dict(self) -> dict[str, float]:
        """The keys summary.json and eval.json use."""
        d = {"ce_loss_clean": self.clean, "ce_loss_sae": self.sae,
             "ce_loss_zero_ablation_keep_bos": self.zero_keep_bos, "ce_loss_zero_ablation_all": self.zero_all,
             "ce_loss_recovered_zero_keep_bos": self.recovered_zero_keep_bos,
             "ce_loss_recovered_zero_all": self.recovered_zero_all, "kl": self.kl}
        if self.mean == self.mean:  # a mean was given
            d |= {"ce_loss_mean_ablation": self.mean, "ce_loss_recovered_mean": self.recovered_mean}
        return d


@torch.no_grad()
def ce_losses(model, sae, tokens: Tensor, batch_size: int = 32, grads: Tensor | None = None,
              mean: Tensor | None = None) -> CELosses:
    """Next-token loss clean, with the SAE spliced in, and with the hook zero-ablated (both
    kinds, see the module docstring), and the KL of the spliced model's next-token
    distribution from the clean one; with ``mean`` (``[*hook_shape]``) also the loss with the
    hook mean-ablated. ``grads`` (``[n, T, *hook_shape]``) are passed to gradient-aware
    sparsifiers."""
    sae.cfg = check_sae_fits(model, sae)
    sums = torch.zeros(6)
    hook = sae.cfg.hook_name
    for i in range(0, len(tokens), batch_size):
        t = tokens[i: i + batch_size].to(model.cfg.device)
        g = None if grads is None else grads[i: i + batch_size].to(model.cfg.device)
        clean = model(t)
        spliced = model.run_with_hooks(t, fwd_hooks=[(hook, reconstruct_hook(sae, g))])
        zero = model.run_with_hooks(t, fwd_hooks=[(hook, zero_hook)])
        zero_all = model.run_with_hooks(t, fwd_hooks=[(hook, zero_all_hook)])
        kl = F.kl_div(spliced.float().log_softmax(-1), clean.float().log_softmax(-1),
                      log_target=True, reduction="none").sum(-1).mean()
        losses = [next_token_loss(clean, t), next_token_loss(spliced, t), next_token_loss(zero, t),
                  next_token_loss(zero_all, t), kl]
        if mean is not None:
            losses.append(next_token_loss(model.run_with_hooks(t, fwd_hooks=[(hook, mean_hook(mean))]), t))
        sums[: len(losses)] += torch.tensor([v.item() for v in losses]) * len(t)
    out = (sums / len(tokens)).tolist()
    return CELosses(*out[:5], mean=out[5] if mean is not None else float("nan"))
