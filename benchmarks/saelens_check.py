"""Does real SAELens run saekit's SAELens folders as saekit runs them, and saekit SAELens's?

Two interpreters, two directions (SAELens lives in its own virtual environment; nothing here
imports the other side's package):

    # saekit -> SAELens: saekit writes one tiny folder per architecture (SAE.save(format="saelens"))
    # with inputs and saekit's outputs; SAELens loads each (SAE.load_from_disk) and compares
    .venv/bin/python benchmarks/saelens_check.py --write DIR
    SAELENS_PYTHON benchmarks/saelens_check.py --check DIR

    # SAELens -> saekit: SAELens writes folders of each architecture with settings saekit folds
    # (save_model), with its outputs; saekit loads each (load_sae) and compares
    SAELENS_PYTHON benchmarks/saelens_check.py --make DIR
    .venv/bin/python benchmarks/saelens_check.py --compare DIR

Each prints a table of max |Δ| of the feature activations f and the reconstruction x̂ (fp32;
pass: < 1e-5). Results and the versions they were run with: docs/formats.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

D_IN, D_SAE, K, N = 16, 64, 8, 256
HOOK, HOOK_Z = "blocks.0.hook_resid_pre", "blocks.0.attn.hook_z"
SPARSITIES = ["topk", "gtopk", "standard", "jumprelu", "gated", "mutual_choice", "batchtopk", "matryoshka",
              "feature_choice"]
TOL = 1e-5


def _randomize_(module, gen) -> None:
    """Weights far from an identity-like init: random biases, decoder rows of unequal norms,
    thresholds where pre-activations fall, so every rule's cut matters."""
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if name == "W_dec":
                t.copy_(torch.randn(t.shape, generator=gen) * (torch.rand(t.shape[0], 1, generator=gen) + 0.5))
            elif name == "W_enc":  # pre-activations of order 1, so fp32 rounding is ~1e-7 of them
                t.copy_(torch.randn(t.shape, generator=gen) / D_IN**0.5)
            elif name in ("b_enc", "b_dec", "b_gate", "b_mag", "r_mag"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
            elif name in ("threshold", "sparsifier.theta"):
                t.copy_(torch.rand(t.shape, generator=gen) * 2)


def _row(name: str, df: float, dx: float) -> str:
    return f"| {name} | {df:.2e} | {dx:.2e} | {'yes' if max(df, dx) < TOL else 'NO'} |"


def _table(rows: list[str], title: str) -> None:
    print(f"{title}\n\n| SAE | max abs diff f | max abs diff x_hat | < {TOL:g} |\n|---|---|---|---|")
    print("\n".join(rows))


# ---- saekit -> SAELens -------------------------------------------------------------------------

def write(out: Path) -> None:
    from saekit import SAE, SAEConfig

    gen = torch.Generator().manual_seed(0)
    cases = [(s, s, HOOK, ()) for s in SPARSITIES] + [("topk-hook_z", "topk", HOOK_Z, (4, 4))]
    for name, sparsity, hook, shape in cases:
        try:
            sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, sparsity=sparsity, hook_name=hook, model_name="gpt2",
                                hook_shape=shape)).eval()
        except (KeyError, ValueError) as e:  # an architecture this saekit does not have
            print(f"skipped {name}: {type(e).__name__}: {e}")
            continue
        _randomize_(sae, gen)
        sae.save(out / name, format="saelens")
        x = torch.randn(N, D_IN, generator=gen)
        with torch.no_grad():
            o = sae(x)
        save_file({"x": x, "f": o.codes.dense(D_SAE).contiguous(), "x_hat": o.x_hat}, out / f"{name}.io.safetensors")
    print(f"wrote the SAELens folders and their inputs/outputs in {out}")


def check(out: Path) -> None:
    import sae_lens
    from sae_lens import SAE

    rows = []
    for io in sorted(out.glob("*.io.safetensors")):
        name = io.name.removesuffix(".io.safetensors")
        t = load_file(io)
        sae = SAE.load_from_disk(out / name)
        x = t["x"].reshape(N, 4, 4) if sae.cfg.reshape_activations == "hook_z" else t["x"]
        with torch.no_grad():
            f = sae.encode(x)
            x_hat = sae.decode(f).reshape(N, D_IN)
        arch = json.loads((out / name / "cfg.json").read_text())["architecture"]
        rows.append(_row(f"saekit {name} (saved as {arch})", (f - t["f"]).abs().max().item(),
                         (x_hat - t["x_hat"]).abs().max().item()))
    _table(rows, f"SAELens {sae_lens.__version__} (torch {torch.__version__}) running saekit's folders")


# ---- SAELens -> saekit -------------------------------------------------------------------------

MADE = {  # name: (architecture, cfg settings saekit must fold)
    "standard": ("standard", {}), "standard-no-b_dec": ("standard", {"apply_b_dec_to_input": False}),
    "jumprelu": ("jumprelu", {}), "jumprelu-no-b_dec": ("jumprelu", {"apply_b_dec_to_input": False}),
    "gated": ("gated", {}), "gated-no-b_dec": ("gated", {"apply_b_dec_to_input": False}),
    "topk": ("topk", {"k": K}), "topk-rescaled-no-b_dec": ("topk", {"k": K, "rescale_acts_by_decoder_norm": True,
                                                                    "apply_b_dec_to_input": False}),
}


def make(out: Path) -> None:
    from sae_lens import SAE

    gen = torch.Generator().manual_seed(1)
    for name, (arch, settings) in MADE.items():
        cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
               "metadata": {"hook_name": HOOK, "model_name": "gpt2"}, **settings}
        sae = SAE.from_dict(cfg)
        _randomize_(sae, gen)
        sae.save_model(out / name)
        x = torch.randn(N, D_IN, generator=gen)
        with torch.no_grad():
            f = sae.encode(x)
            save_file({"x": x, "f": f.contiguous(), "x_hat": sae.decode(f)}, out / f"{name}.io.safetensors")
    print(f"wrote {len(MADE)} SAELens folders and their inputs/outputs in {out}")


def compare(out: Path) -> None:
    from saekit import load_sae

    rows = []
    for io in sorted(out.glob("*.io.safetensors")):
        name = io.name.removesuffix(".io.safetensors")
        t = load_file(io)
        try:
            sae = load_sae(out / name)
        except Exception as e:  # a table row, not a traceback: the other rows still run
            rows.append(f"| SAELens {name} | not loaded: {type(e).__name__}: {e} | | NO |")
            continue
        with torch.no_grad():
            o = sae(t["x"])
        rows.append(_row(f"SAELens {name} (loaded as {sae.cfg.sparsity})",
                         (o.codes.dense(D_SAE) - t["f"]).abs().max().item(), (o.x_hat - t["x_hat"]).abs().max().item()))
    _table(rows, f"saekit (torch {torch.__version__}) running SAELens's folders")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    for flag in ("write", "check", "make", "compare"):
        g.add_argument(f"--{flag}", type=Path, metavar="DIR")
    a = p.parse_args()
    for flag, fn in (("write", write), ("check", check), ("make", make), ("compare", compare)):
        if getattr(a, flag) is not None:
            fn(getattr(a, flag))


if __name__ == "__main__":
    main()
