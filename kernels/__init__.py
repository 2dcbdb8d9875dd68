"""saekit.kernels: the SAE's encoder selections, sparse backward and sparse decoder, in
PyTorch and in Triton. Imports only torch (triton lazily, where it runs).

Public API (each op takes impl="auto" | "torch" | "triton" | "screen"; see resolve_impl):

    PreActivations(x, W_enc, b_enc, b_dec, impl, k) -> a batch's pre-activations, made as far
        as a selection asks: .topk(k), .global_topk(n), .column_topk(m), .columns(cols), .dense()
    encode_selected(x, W_enc, b_enc, b_dec, values, indices) -> values with the encoder's sparse
        backward, for selections made on PreActivations
    encode_topk(x, W_enc, b_enc, b_dec, k) -> TopKResult(values [B, k], indices [B, k]), differentiable
    encode_topk_aux(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux) -> (TopKResult, TopKResult for AuxK)
    decode_sparse(values, indices, W_dec, b_dec) -> x_hat [B, d_in]
    topk_lower_index(scores, k) -> exact per-row top-k of any scores, ties to the lower index
    resolve_impl(impl, device, dtype, k) -> "torch" | "triton" | "screen"
    topk_impl(impl, x, W_enc, k) -> the impl encode_topk runs for these arguments ("auto" resolved)
    check_impl(impl, device, topk_k) -> None, or the ValueError a first call would raise

reference.py is the specification of each in plain PyTorch (one screen of code); the fast
paths sit behind these names and nothing outside this package names them: encoder.py /
encoder_triton.py and sparse_rows.py / sparse_rows_triton.py (each Triton kernel beside its
PyTorch form), select.py (exact top-k's faster than torch.topk on CPU), screen.py and
screen_batch.py (the CPU selections that rank through a bf16 matmul and rescore in fp32 what
their error bound cannot rule out, so they select what the fp32 path selects; "auto" takes
them on CPUs with AMX at sizes where they pay). Layout (SAELens): W_enc [d_in, d_sae],
b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]. Importing this package imports neither
triton nor anything that probes a device.
"""

if __name__ == "kernels":
    # This folder installs as saekit.kernels. It is importable as a bare `kernels` only when the
    # clone's root is on sys.path (`python -m saekit`, pytest, a notebook started there), and
    # there it would shadow Hugging Face's `kernels` package, which transformers >= 5.25 imports
    # whenever it is installed. Such an import gets the installed package; where none is
    # installed it gets this folder, as before (older transformers import it to look for a
    # version, find none, and leave it alone).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
else:
    _spec = None

if _spec is not None:
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
else:
    from .decoder import decode_sparse
    from .dispatch import resolve_impl
    from .encoder import (PreActivations, TopKResult, check_impl, encode_selected, encode_topk, encode_topk_aux,
                          topk_impl)
    from .select import topk_lower_index

    __all__ = ["PreActivations", "TopKResult", "check_impl", "decode_sparse", "encode_selected", "encode_topk",
               "encode_topk_aux", "resolve_impl", "topk_impl", "topk_lower_index"]
