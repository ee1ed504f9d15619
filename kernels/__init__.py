"""
nanollava's kernels: fused attention and RMSNorm in Triton, each beside its plain PyTorch
reference. Tensors in, tensors out: nothing here knows about LLaVA.

The models call only `attention(...)` and `norm(...)`, which pick the Triton kernel or
PyTorch by the rule below. Scripts choose with `kernels.use("triton" | "torch" | "auto")`:
"auto" runs Triton on CUDA tensors and PyTorch on the CPU; "triton" runs Triton
everywhere (on the CPU only under TRITON_INTERPRET=1, as the tests do); "torch" never.
If triton fails to import, "auto" uses PyTorch (with one warning where a CUDA GPU is
present, since the kernels were expected there) and `use("triton")` raises.

The FlashAttention-2 kernels live in `kernels/flash.py` (their launch configs and tuning in
`kernels/tune.py`), RMSNorm's in `kernels/rmsnorm.py`.
"""
import warnings

import torch
import torch.nn.functional as F

from .flash import HAS_TRITON, TRITON_ERROR, attention_ref, flash_attention, supports
from .rmsnorm import MAX_N, rms_norm, rms_norm_ref

if not HAS_TRITON and torch.cuda.is_available():
    warnings.warn(f"kernels: triton failed to import ({TRITON_ERROR}); attention() and norm() use PyTorch "
                  "on this CUDA machine", stacklevel=2)

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


def _flash_serves(q, k, v):
    """The fallback rules: inputs the Triton attention kernel leaves to SDPA. fp32 on CUDA
    (the kernel's exact-fp32 path has no tensor-core instructions and spills), and what
    flash_attention does not support (head dims other than 16, 32, 64, 128; B * H > 65535)."""
    if q.is_cuda and q.dtype == torch.float32:
        return False
    return supports(q, k, v) is None


def attention(q, k, v, mask=None):
    """Scaled dot-product attention, (B, H, Tq, D), (B, H, Tk, D) -> (B, H, Tq, D), scale 1/sqrt(D).

    `mask` says what each query sees, in one of three forms (the caller decides; nanollava's Llama does it
    in llama.attention_plan):
    - "causal": query i sees keys 0..i (Tq == Tk: a sequence from its start);
    - None: every query sees every key (the vision tower, or one new token after a KV cache);
    - a bool tensor broadcastable to (B, 1, Tq, Tk), True = attend, holding the causal part too
      (left-padded batches, several new tokens after a cache).
    Triton's flash_attention serves the first two when the backend allows it and Tq == Tk; everything
    else is PyTorch's F.scaled_dot_product_attention. SDPA's is_causal aligns its mask top-left (query i
    sees keys 0..i), which is wrong when Tq != Tk, so "causal" insists on Tq == Tk.
    """
    causal = isinstance(mask, str)
    if causal and (mask != "causal" or q.shape[-2] != k.shape[-2]):
        raise ValueError(f"attention mask {mask!r} with {q.shape[-2]} queries and {k.shape[-2]} keys: "
                         "the only string is 'causal', for as many queries as keys")
    if _triton(q) and not torch.is_tensor(mask) and q.shape[-2] == k.shape[-2] and _flash_serves(q, k, v):
        return flash_attention(q, k, v, causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal)


def norm(x, weight, eps):
    """LlamaRMSNorm over the last dim: Triton's rms_norm when the backend allows it, else PyTorch: in fp32
    its fused F.rms_norm (the same math in one op, which matters when decoding one token), else rms_norm_ref,
    whose casts round as transformers' do."""
    if _triton(x) and x.shape[-1] <= MAX_N:  # wider rows do not fit the kernel's registers
        return rms_norm(x, weight, eps)
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return rms_norm_ref(x, weight, eps)
