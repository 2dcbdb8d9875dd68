"""``saekit eval-ioi``: score SAEs against supervised IOI dictionaries at IOI nodes, on the
three axes of Makelov, Lange & Nanda (2024) (methods.md §7).

Which prompts serve what: the *fit* prompts fit the supervised dictionaries and *choose*
latents (each attribute value's best-F1 latent, the aware edit's latents, over-splitting's
candidates); every reported number is measured on the *evaluation* prompts and their
counterfactuals. A g-SAE (``gtopk``) is scored twice: without gradients (its selection is
then TopK's) and with ∂L/∂x of the loss against the model's own greedy predictions
(``layer_grads``), which no label of the prompt enters (methods.md §5)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saekit.activations import activation_and_grad, resolve_hook
from saekit.errors import ConfigError, MismatchError
from saekit.evals import axes
from saekit.evals import ioi_data as D
from saekit.evals.nodes import (GPT2_SMALL_NODES, Node, ablation_table, ioi_nodes, layer_acts, logits_batch_size,
                                main_layer, model_dims, readout, resid_pre)
from saekit.evals.options import IOIEvalOptions
from saekit.evals.supervised import SupervisedDictionary
from saekit.hooks import hook_z_layer, hook_z_name
from saekit.metrics import centred_sq, fvu_of_sums, l0_per_token, residual_sq
from saekit.models import model_name
from saekit.splice import check_sae_fits

log = logging.getLogger("saekit")

GRAD_SUFFIX = " (with model-target gradients)"  # the label of a g-SAE's with-gradient block


def sae_layer(sae) -> int:
    layer = hook_z_layer(sae.cfg.hook_name)
    if layer is None:
        raise MismatchError(f"eval-ioi scores SAEs on an attention layer's hook_z (blocks.N.attn.hook_z); "
                            f"this SAE reads {sae.cfg.hook_name!r}")
    return layer


def is_gpt2_small(model) -> bool:
    return model_name(model, "") in ("gpt2", "gpt2-small", "openai-community/gpt2")


def node_table(model, setup: D.IOISetup, opts: IOIEvalOptions) -> tuple[list[dict], list[Node]]:
    """The mean-ablation table and the IOI nodes (the paper's preset for GPT-2 small)."""
    n_layers = model_dims(model)[0]
    if is_gpt2_small(model):
        return [{"node": n.name, "preset": True} for n in GPT2_SMALL_NODES], \
            list(GPT2_SMALL_NODES) + [Node(l, "end") for l in range(n_layers)]
    data = D.encode(model.tokenizer, D.eval_prompts(setup, opts.n_table, opts.seed + 1), setup)
    table = ablation_table(model, data)
    return table, ioi_nodes(table, n_layers)


def choose_nodes(model, layer: int, opts: IOIEvalOptions, found: list[Node]) -> list[Node]:
    n_layers, n_heads, _ = model_dims(model)
    if opts.node:
        nodes = [Node.parse(t, n_layers, n_heads) for t in opts.node]
        for n in nodes:
            if n.layer != layer:
                raise ConfigError(f"node {n.name} is on layer {n.layer} but the SAE reads layer {layer}; "
                                  f"pick a node L{layer}...")
        return nodes
    return [Node(layer, "end")] + [n for n in found if n.layer == layer and n.head is not None]


@dataclass
class Prepared:
    """Prompts and counterfactuals, encoded once for every node, and the activations nodes
    of one layer share (computed once per layer and position)."""

    setup: D.IOISetup
    fit: D.IOIData
    eval: D.IOIData
    cf: dict[str, D.IOIData]
    cache: dict = field(default_factory=dict)

    def acts(self, model, which: str, layer: int, pos: str):
        """``layer_acts`` of the fit, eval or a counterfactual (``which`` = io/s/pos) set."""
        key = (which, layer, pos)
        if key not in self.cache:
            data = {"fit": self.fit, "eval": self.eval}.get(which) or self.cf[which]
            self.cache[key] = layer_acts(model, data, layer, pos)
        return self.cache[key]

    def grads(self, model, which: str, layer: int, pos: str):
        """``layer_grads`` of the fit, eval or a counterfactual set (only g-SAEs need them)."""
        key = ("grad", which, layer, pos)
        if key not in self.cache:
            data = {"fit": self.fit, "eval": self.eval}.get(which) or self.cf[which]
            self.cache[key] = layer_grads(model, data, layer, pos)
        return self.cache[key]

    def resid(self, model, layer: int):
        if ("resid", layer) not in self.cache:
            self.cache[("resid", layer)] = resid_pre(model, self.eval, layer)
        return self.cache[("resid", layer)]


def layer_grads(model, data: D.IOIData, layer: int, pos: str) -> torch.Tensor:
    """∂L/∂``hook_z`` of ``layer`` at each prompt's ``pos``, flattened like ``layer_acts``:
    ``[n, n_heads·d_head]``, for a g-SAE's selection (Olmo et al. 2024; methods.md §5).

    L is ``activation_and_grad``'s ``targets="model"`` loss: the next-token cross-entropy
    summed over positions, each scored against the model's own greedy prediction there, so
    no token of the prompt, and not the IO answer the evaluation scores, is a target. Each
    prompt runs cut one position after END (prompts of one length batched together), so the
    positions 0..END are all scored, END included (its target is the model's own guess of
    the IO), and neither padding nor the appended token (BOS, whose logits are not scored)
    enters L."""
    hook = resolve_hook(model, hook_z_name(layer))
    where = data.position(pos)
    tokens = torch.cat([data.tokens, data.tokens[:, :1]], 1)  # one more column: BOS, a pad
    out = torch.zeros(len(data), hook.d_in)
    bs = logits_batch_size(model, data)
    for end in data.end.unique().tolist():
        rows = (data.end == end).nonzero()[:, 0]
        for i in range(0, len(rows), bs):
            r = rows[i: i + bs]
            _, g = activation_and_grad(model, tokens[r, : end + 2], hook, targets="model")  # [b, T, h, d]
            out[r] = g[torch.arange(len(r)), where[r].to(g.device)].flatten(1).float().cpu()
    return out


def prepare(model, opts: IOIEvalOptions) -> Prepared:
    setup = D.setup_for(model)
    prompts = D.eval_prompts(setup, opts.n, opts.seed)
    enc = lambda ps: D.encode(model.tokenizer, ps, setup)  # noqa: E731
    return Prepared(setup, enc(D.fit_prompts(setup, opts.n_fit, opts.seed)), enc(prompts),
                    {a: enc(D.counterfactuals(prompts, a, setup, opts.seed)) for a in D.ATTRIBUTES})


def _accuracy(pred, truth) -> float:
    return (pred == truth).float().mean().item()


def eval_node(model, node: Node, p: Prepared, saes: dict) -> dict:
    d_head = model.cfg.d_head
    sl = node.slice(d_head)
    x = {w: p.acts(model, w, node.layer, node.pos) for w in ("fit", "eval")}
    x_cf = {a: p.acts(model, a, node.layer, node.pos) for a in D.ATTRIBUTES}
    a, values, labels = x["eval"][:, sl], p.setup.values, p.eval.labels
    resid = p.resid(model, node.layer)
    run = lambda v: readout(model, p.eval, node, v, resid)  # noqa: E731
    clean = run(a)
    clean_pred = clean.pred
    base = (clean.ld.mean().item(), run(a.mean(0).expand_as(a)).ld.mean().item())
    truth = {attr: run(x_cf[attr][:, sl]).pred for attr in D.ATTRIBUTES}  # counterfactual patching
    res: dict = {"node": node.name, "hook": node.hook, "d_node": a.shape[1],
                 "unedited_accuracy": {t: _accuracy(clean_pred, truth[t]) for t in D.ATTRIBUTES},
                 "supervised": {}, "saes": {}}
    changes, norms = {}, {}
    for method in ("mean", "lstsq"):
        sup = SupervisedDictionary.fit(x["fit"][:, sl], p.fit.labels, values, method, node.name)
        feats = sup.features(labels)
        control = {}
        for attr in D.ATTRIBUTES:
            pred = run(sup.edit(a, attr, labels[attr], p.cf[attr].labels[attr])).pred
            w = axes.weight_removed(sup.U[attr][labels[attr]], feats + sup.u0, sup.u0).mean().item()
            control[attr] = {"accuracy": _accuracy(pred, truth[attr]), "weight_removed": w,
                             "changes_output": 1 - _accuracy(pred, clean_pred)}
        res["supervised"][method] = {"approximation": axes.approximation(run, a, sup.reconstruct(labels), feats, base),
                                     "control": control, "dictionary": sup}
        if method == "mean":
            changes = {t: control[t]["changes_output"] for t in D.ATTRIBUTES}
            seen = {t: torch.bincount(p.fit.labels[t], minlength=len(values[t])) > 0 for t in D.ATTRIBUTES}
            norms = {t: sup.norms(t)[seen[t]].mean().item() for t in D.ATTRIBUTES}
    for label, sae in saes.items():
        ns = axes.NodeSAE(sae, sl)
        block = eval_sae_at_node(ns, run, a, x, x_cf, p, truth, changes, norms, base)
        if type(sae.sparsifier).uses_grad:
            res["saes"][label] = {"selection": "TopK (g-SAE without gradients)", **block}
            g = {w: p.grads(model, w, node.layer, node.pos) for w in ("fit", "eval", *D.ATTRIBUTES)}
            res["saes"][label + GRAD_SUFFIX] = {
                "selection": "g-TopK with gradients of the loss against the model's own predictions",
                **eval_sae_at_node(ns, run, a, x, x_cf, p, truth, changes, norms, base, grads=g)}
        else:
            res["saes"][label] = block
    return res


def eval_sae_at_node(ns: axes.NodeSAE, run, a, x, x_cf, p: Prepared, truth, changes, norms, base,
                     grads: dict | None = None) -> dict:
    """One SAE's three axes at a node. ``x``/``x_cf``: layer activations of the fit and eval
    sets and of each attribute's counterfactuals; ``grads``, keyed the same way (fit, eval,
    io, s, pos), reach the encoder (a g-SAE's selection). Latents are chosen on the fit
    prompts, every score is measured on the evaluation prompts."""
    values, labels = p.setup.values, p.eval.labels
    g = grads or {}
    f, f_fit = ns.codes(x["eval"], g.get("eval")), ns.codes(x["fit"], g.get("fit"))
    x_hat = ns.reconstruct(f)
    D_ = ns.directions
    interp = axes.interpretability(f_fit > 0, p.fit.labels, f > 0, labels, values)
    control = {}
    for attr in D.ATTRIBUTES:
        old, new = labels[attr], p.cf[attr].labels[attr]
        # the aware edit's latents are a choice, made on the fit prompts like the interpretations
        f1 = axes.f1_table(f_fit > 0, p.fit.labels[attr], len(values[attr]))[2]  # [d_sae, V]
        f_cf = ns.codes(x_cf[attr], g.get(attr))
        rows = {"aware": {}, "agnostic": {}}
        for b in axes.BUDGETS:
            edit = axes.aware_edit(f, f_cf, D_, f1[:, old].T, f1[:, new].T, b)
            rows["aware"][b] = _edit_score(run, a, edit, x_hat, ns.bias, truth[attr])
        target = x_cf[attr][:, ns.sl] - a
        for b, edit in axes.agnostic_edits(f, f_cf, D_, target).items():
            rows["agnostic"][b] = _edit_score(run, a, edit, x_hat, ns.bias, truth[attr])
        control[attr] = rows
    return {"approximation": axes.approximation(run, a, x_hat, x_hat - ns.bias, base),
            "fvu": fvu_of_sums(residual_sq(a, x_hat).item(), centred_sq(a).item()),
            "l0": l0_per_token(f).float().mean().item(),
            "control": control, "interpretability": interp,
            "occlusion": axes.occlusion(interp, changes, norms),
            "oversplitting": {t: axes.oversplitting(f_fit > 0, p.fit.labels[t], f > 0, labels[t], len(values[t]))
                              for t in D.ATTRIBUTES},
            "f1_heatmaps": _heatmaps(f_fit > 0, p.fit.labels, f > 0, labels, values)}


def _edit_score(run, a, edit: axes.Edit, x_hat, bias, truth) -> dict:
    pred = run(a + edit.delta).pred
    return {"accuracy": _accuracy(pred, truth),
            "weight_removed": axes.weight_removed(edit.removed, x_hat, bias).mean().item(),
            "latents_changed": edit.changed.float().mean().item()}


def _heatmaps(fit_active, fit_labels, eval_active, eval_labels, values, n_latents: int = 24,
              n_values: int = 24) -> dict:
    """For the report, per attribute: for the values most frequent on the evaluation prompts,
    the latents with the best fit-prompt F1 for one of them (chosen on the fit prompts, like
    ``interpretability``'s), and their F1 on the evaluation prompts."""
    out = {}
    for attr, lab in eval_labels.items():
        n_v = len(values[attr])
        fit_f1 = axes.f1_table(fit_active, fit_labels[attr], n_v)[2]
        f1 = axes.f1_table(eval_active, lab, n_v)[2]
        counts = torch.bincount(lab, minlength=n_v)
        vals = counts.argsort(descending=True)[: min(n_values, int((counts > 0).sum()))]
        lat = fit_f1[:, vals].max(1).values.argsort(descending=True)[:n_latents]
        out[attr] = {"latents": lat.tolist(), "values": [values[attr][v] for v in vals.tolist()],
                     "f1": f1[lat][:, vals].round(decimals=3).tolist()}
    return out


def evaluate_ioi(model, saes: dict, opts: IOIEvalOptions, dictionaries_dir: Path | None = None) -> dict:
    """Score ``saes`` (label → SAE on the same ``blocks.L.attn.hook_z``) and the supervised
    dictionaries at the chosen nodes. Returns a JSON-able dict."""
    layers = set()
    for sae in saes.values():
        sae.cfg = check_sae_fits(model, sae)
        layers.add(sae_layer(sae))
    if len(layers) != 1:
        raise MismatchError(f"the SAEs read different layers {sorted(layers)}; compare SAEs of one layer")
    layer = layers.pop()
    explicit = choose_nodes(model, layer, opts, []) if opts.node else None  # bad names fail fast
    p = prepare(model, opts)
    log.info("eval-ioi: finding IOI nodes by mean ablation on %d prompts", opts.n_table)
    table, found = node_table(model, p.setup, opts)
    nodes = explicit or choose_nodes(model, layer, opts, found)
    results = {}
    for i, node in enumerate(nodes):
        log.info("eval-ioi: node %s (%d of %d)", node.name, i + 1, len(nodes))
        r = eval_node(model, node, p, saes)
        for method, s in r["supervised"].items():
            sup = s.pop("dictionary")
            if dictionaries_dir is not None:
                sup.save(dictionaries_dir / f"{node.name}.{method}.safetensors")
        results[node.name] = r
    return {"model": model_name(model, ""), "layer": layer, "main_layer": _main(table),
            "n_eval": len(p.eval), "n_fit": len(p.fit), "templates": list(p.setup.templates),
            "node_table": table, "ioi_nodes": [n.name for n in found], "nodes": results}


def _main(table):
    return main_layer(table) if table and "effect" in table[0] else None
