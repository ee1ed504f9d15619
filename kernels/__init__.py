"""
nanollava's kernels: fused attention and RMSNorm in Triton, each beside its plain PyTorch
reference. Tensors in, tensors out: nothing here knows about LLaVA.

The models call only `attention(...)` and `norm(...)`, which pick the Triton kernel or
PyTorch by the rule below. Scripts choose with `kernels.use("triton" | "torch" | "auto")`:
"auto" runs Triton on CUDA tensors and PyTorch on the CPU; "triton" runs Triton
everywhere (on the CPU only under TRITON_INTERPRET=1, as the tests do); "torch" never.
If triton fails to import, "auto" quietly uses PyTorch and `use("triton")` raises.

The FlashAttention-2 kernels live in `kernels/flash.py`, RMSNorm's in `kernels/rmsnorm.py`.
"""
import torch
import torch.nn.functional as F

from .flash import HAS_TRITON, attention_ref, flash_attention
from .rmsnorm import rms_norm, rms_norm_ref

BACKEND = "auto"  # "auto" | "triton" | "torch"
BACKENDS = ("auto", "triton", "torch")


def use(backend: str):
    """Set the backend for attention() and norm()."""
    global BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernels backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "triton" and not HAS_TRITON:
        raise ValueError("kernels backend 'triton' asked for, but triton failed to import")
    BACKEND = backend


def _triton(x):
    return HAS_TRITON and (BACKEND == "triton" or (BACKEND == "auto" and x.is_cuda))


def attention(q, k, v, causal: bool, mask=None):
    """Scaled dot-product attention, (B, H, Tq, D), (B, H, Tk, D) -> (B, H, Tq, D), scale 1/sqrt(D).

    Triton's flash_attention when the backend allows it, mask is None and Tq == Tk (causal:
    query i attends keys 0..i). Everything else is PyTorch's F.scaled_dot_product_attention:
    `mask` (bool, broadcastable to (B, 1, Tq, Tk), True = attend) serves left-padded batches
    and decoding with a KV cache (Tq != Tk); it must already hold the causal part, since
    `causal` is ignored when a mask is given. Without a mask and with Tq != Tk, SDPA's
    is_causal aligns the mask top-left (query i sees keys 0..i), which is wrong for decoding.
    """
    if _triton(q) and mask is None and q.shape[-2] == k.shape[-2]:
        return flash_attention(q, k, v, causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)


def norm(x, weight, eps):
    """LlamaRMSNorm over the last dim: Triton's rms_norm when the backend allows it, else PyTorch: in fp32
    its fused F.rms_norm (the same math in one op, which matters when decoding one token), else rms_norm_ref,
    whose casts round as transformers' do."""
    if _triton(x):
        return rms_norm(x, weight, eps)
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return rms_norm_ref(x, weight, eps)
