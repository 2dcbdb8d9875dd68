"""Run a model with an SAE's reconstruction in place of the activation at its hook.

The BOS position is left as it is, matching harvesting (``saekit.activations``), where the
SAE never sees it. The ablation baselines come in two kinds, named apart: ``keep_bos``
ablates positions 1: as the splice replaces them; ``all`` zero-ablates every position, BOS
included, as Kissane et al. (2024) do for their "CE loss recovered".
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.activations import activation_and_grad, hook_names, resolve_hook
from saekit.errors import MismatchError
from saekit.metrics import CELosses, next_token_loss, reconstruction_stats
from saekit.types import SAEConfig



def check_sae_fits(model, sae) -> SAEConfig:
    """Raise ``MismatchError`` unless ``sae`` reads a hook of ``model`` with its ``d_in``.

    Returns the SAE's config as it applies to this model, changing nothing: ``sae.cfg``
    itself, or, when the config records no ``hook_shape`` for a hook with several axes (a
    SAELens hook_z SAE), a copy with the model's shape filled in, so the SAE knows how to
    unflatten; a caller that splices keeps it (``sae.cfg = check_sae_fits(model, sae)``)."""
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
        # the layer may run on another GPU than the SAE (--device-map): there and back
        dev = sae.W_dec.device
        x = sae.flatten_hook(act[:, 1:]).to(dev)  # [b, T-1, d_in]
        g = None if grads is None else sae.flatten_hook(grads[:, 1:]).float().to(dev)
        x_hat = sae(x.float(), g).x_hat.to(act.device, act.dtype)
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


@torch.no_grad()
def with_model_gradients(model, sae, tokens: Tensor, batch_size: int = 32) -> dict:
    """A g-SAE scored while it selects with gradients, without an oracle.

    Selecting with ∂L/∂x of the very next-token loss that is then reported would let the
    selection see the labels it is scored on. Here the gradients are of the loss against the
    model's own greedy predictions (``activation_and_grad(targets="model")``), over the first
    ``T − 1`` tokens of each sequence, and CE is scored at the last of those positions only,
    against token ``T``, which no gradient has read (at earlier positions the later *input*
    tokens, which are the earlier positions' labels, flow into the gradient). The same
    positions are scored clean and with the g-SAE selecting as TopK (β = 0), so the three
    losses compare directly. Explained variance and L0 are over every position (they read
    no label)."""
    hook = resolve_hook(model, sae.cfg.hook_name)
    inp, target = tokens[:, :-1], tokens[:, -1]
    xs, gs, sums = [], [], torch.zeros(3)
    for i in range(0, len(tokens), batch_size):
        t, y = inp[i: i + batch_size].to(model.cfg.device), target[i: i + batch_size].to(model.cfg.device)
        act, grad = activation_and_grad(model, t, hook, targets="model")  # [b, T-1, *shape]
        xs.append(sae.flatten_hook(act[:, 1:]).reshape(-1, sae.cfg.d_in).float())
        gs.append(sae.flatten_hook(grad[:, 1:]).reshape(-1, sae.cfg.d_in).float())
        last = [model(t)[:, -1],
                model.run_with_hooks(t, fwd_hooks=[(hook.name, reconstruct_hook(sae))])[:, -1],
                model.run_with_hooks(t, fwd_hooks=[(hook.name, reconstruct_hook(sae, grad))])[:, -1]]
        sums += torch.tensor([F.cross_entropy(lg.float(), y, reduction="sum").item() for lg in last])
    clean, topk, with_g = (sums / len(tokens)).tolist()
    stats = reconstruction_stats(sae, torch.cat(xs), torch.cat(gs))
    return {"gradients": "next-token loss against the model's own greedy predictions (no text labels)",
            "scored": "CE at the last position of each sequence, whose label no gradient read",
            "positions": len(tokens), "ce_loss_clean_last": clean, "ce_loss_sae_topk_last": topk,
            "ce_loss_sae_with_grads_last": with_g, "explained_variance": stats["explained_variance"],
            "l0": stats["l0"]}
