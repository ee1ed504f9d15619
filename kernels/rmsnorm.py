"""
Fused RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467) in Triton, with the numerics of
Hugging Face's LlamaRMSNorm.

For one row x of length N (statistics in fp32, cast back before the weight):

    xf   = float32(x)
    rstd = 1 / sqrt(mean(xf^2) + eps)
    y    = xf * rstd
    out  = weight * y.to(x.dtype)

Backward, with g = dout * weight (the gradient that reaches y):

    dweight = sum over rows of dout * y
    dx      = rstd * (g - y * mean(g * y))

Each program of the forward normalises one row held whole in registers (N up to 8192,
padded to a power of two and masked) and saves rstd. Each program of the backward walks
a strided set of rows, writes their dx, and keeps its partial sum of dout * y in
registers; the partials land in an (n_programs, N) fp32 buffer that one `sum(0)` reduces.
"""
import torch

from .flash import HAS_TRITON, INTERPRET, tl, triton  # triton, or a stand-in when it fails to import

MAX_N = 8192  # a whole row lives in registers


@triton.jit
def _rms_norm_fwd_kernel(X,     # pointer to the input, (M, N), rows stride_x apart
                         OUT,   # pointer to the output, (M, N), contiguous
                         W,     # pointer to the weight, (N,)
                         RSTD,  # pointer to 1 / rms of each row, (M,) fp32, saved for the backward
                         stride_x, N, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, 0) / N + eps)
    y = (x * rstd).to(X.dtype.element_ty)  # cast back to the input dtype BEFORE the weight
    w = tl.load(W + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)  # one rounding below, as in eager half precision
    tl.store(OUT + row * N + cols, out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(X,      # pointer to the input, (M, N), rows stride_x apart
                         DOUT,   # pointer to the output gradient, (M, N), rows stride_dout apart
                         W,      # pointer to the weight, (N,)
                         RSTD,   # pointer to the saved 1 / rms, (M,) fp32
                         DX,     # pointer to the input gradient, (M, N), contiguous
                         DW,     # pointer to the partial weight gradients, (n_programs, N) fp32
                         stride_x, stride_dout, M, N, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    for row in range(pid.to(tl.int64), M, n_programs):  # rows pid, pid + n_programs, ...
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + row * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        y = x * rstd
        dw += dout * y.to(X.dtype.element_ty).to(tl.float32)  # out = weight * (y cast to x's dtype)
        g = dout * w
        dx = rstd * (g - y * (tl.sum(g * y, 0) / N))
        tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + pid * N + cols, dw, mask=mask)


def _rows(t, N):
    """(..., N) -> (M, N) with a contiguous last dim, as a view when possible."""
    t = t.reshape(-1, N)
    return t if t.stride(-1) == 1 else t.contiguous()


def _num_warps(BLOCK_N):
    """One warp per 256 columns up to 8; 16 for rows padded to 8192 (hidden 5120: with 8 warps the
    backward needs ~175 registers a thread, one program per SM; Liger-Kernel uses 16 there too)."""
    return 16 if BLOCK_N >= 8192 else min(max(BLOCK_N // 256, 1), 8)


class _RMSNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, eps):
        N = x.shape[-1]
        x2 = _rows(x, N)
        M = x2.shape[0]
        out = torch.empty((M, N), device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
        rstd = torch.empty(M, device=x.device, dtype=torch.float32)
        BLOCK_N = triton.next_power_of_2(N)
        _rms_norm_fwd_kernel[(M,)](x2, out, weight, rstd, x2.stride(0), N, eps,
                                   BLOCK_N=BLOCK_N, num_warps=_num_warps(BLOCK_N))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dout):
        x2, weight, rstd = ctx.saved_tensors
        M, N = x2.shape
        dout2 = _rows(dout, N)
        dx = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
        # A few programs per SM on a GPU; on the CPU interpreter fewer, longer programs are faster.
        n_programs = 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 8
        n_programs = min(M, n_programs)
        dw_partial = torch.empty((n_programs, N), device=x2.device, dtype=torch.float32)
        BLOCK_N = triton.next_power_of_2(N)
        _rms_norm_bwd_kernel[(n_programs,)](x2, dout2, weight, rstd, dx, dw_partial, x2.stride(0), dout2.stride(0),
                                            M, N, BLOCK_N=BLOCK_N, num_warps=_num_warps(BLOCK_N))
        dweight = dw_partial.sum(0).to(weight.dtype)
        return dx.view(ctx.x_shape), dweight, None


def rms_norm(x, weight, eps):
    """LlamaRMSNorm over the last dim of x (any leading dims) with Triton; differentiable."""
    if not HAS_TRITON:
        raise RuntimeError("rms_norm needs triton, which failed to import")
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"rms_norm wants a weight of shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if x.shape[-1] > MAX_N:
        raise ValueError(f"rms_norm supports hidden sizes up to {MAX_N}, got {x.shape[-1]}")
    if not x.is_cuda and not INTERPRET:
        raise RuntimeError("rms_norm on CPU tensors needs TRITON_INTERPRET=1 set before kernels is imported")
    if INTERPRET and torch.bfloat16 in (x.dtype, weight.dtype):
        # The interpreter gets bf16 arithmetic wrong: run in fp32 and round like the bf16 math would.
        y = _RMSNorm.apply(x.float(), torch.ones_like(weight, dtype=torch.float32), eps).to(x.dtype)
        return weight * y
    return _RMSNorm.apply(x, weight, eps)


def rms_norm_ref(x, weight, eps):
    """transformers' LlamaRMSNorm: fp32 statistics, cast back to x's dtype, then times weight."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)
