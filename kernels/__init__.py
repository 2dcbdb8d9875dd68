"""saekit.kernels: the SAE's TopK encoder and sparse decoder, in PyTorch and in Triton.

Public API (each op takes impl="auto" | "torch" | "triton" | "screen"; see resolve_impl):

    encode_topk(x, W_enc, b_enc, b_dec, k) -> TopK(values [B, k], indices [B, k])
    encode_topk_aux(x, W_enc, b_enc, b_dec, k, dead_mask, k_aux) -> (TopK, TopK for AuxK)
    encode_selected(x, W_enc, b_enc, b_dec, values, indices) -> values with the sparse backward,
        for selections made elsewhere (Mutual/Feature Choice, g-TopK)
    decode_sparse(values, indices, W_dec, b_dec) -> x_hat [B, d_in]
    resolve_impl(impl, device) -> "torch" | "triton" | "screen"
    check_impl(impl, device, topk_k) -> None, or the ValueError a first call would raise

Layout (SAELens): W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
Every Triton kernel sits beside its PyTorch reference: encoder.py / encoder_triton.py,
sparse_rows.py / sparse_rows_triton.py. screen.py is the CPU encoder's fast path: it ranks
through a bf16 matmul and rescores in fp32 the latents its error bound cannot rule out, so
it selects what encoder.py's reference selects (impl="screen"; "auto" takes it on CPUs with
AMX at sizes where it pays); screen_batch.py does the same for Mutual and Feature Choice's
selections (select.global_topk, select.column_topk). Importing this package imports neither triton nor
anything that probes a device.
"""

from .decoder import decode_sparse
from .dispatch import resolve_impl
from .encoder import TopK, check_impl, encode_selected, encode_topk, encode_topk_aux

__all__ = ["TopK", "check_impl", "decode_sparse", "encode_selected", "encode_topk", "encode_topk_aux",
           "resolve_impl"]
