"""
Fused attention, FlashAttention-2 style (Dao 2023, arXiv 2307.08691), in Triton.

For one (batch, head), with q, k, v of shape (T, D) and scale = 1/sqrt(D):

    S = scale * q @ k^T              (T, T)   masked to -inf above the diagonal when causal
    P = softmax(S, dim=-1)                    query i attends keys 0..i when causal
    O = P @ v                        (T, D)

The forward never materialises S or P. Each program owns BLOCK_M query rows and walks
over the keys BLOCK_N at a time with an online softmax: a running row max m, a running
row sum l and an unnormalised accumulator acc, rescaled by exp(m_old - m_new) whenever
the max grows. It stores O and the row log-sum-exp L = m + log(l) (in base 2, below).

The backward recomputes P = exp(S - L) block by block from the stored L, with dO the
gradient of O:

    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = sum_d O_id dO_id
    dQ = scale * dS K
    dK = scale * dS^T Q

Two backward variants, both beginning with a delta kernel (preprocessing):

- deterministic (the default, what training uses): a dK/dV kernel (one program per key
  block, looping over queries) and a dQ kernel (one program per query block, looping over
  keys). Both recompute S and dP: 7 matmuls per tile where 5 would do, but every output
  element is summed by one program in a fixed order, so two runs give identical bits.
- atomic (`deterministic=False`, FlashAttention-2's): the dK/dV kernel alone, which also
  computes dQ's share of each tile (dS K) and adds it into an fp32 dQ buffer with atomics:
  5 matmuls per tile, one pass over the key blocks per program, one kernel fewer. The
  order in which programs add into a dQ element is up to the GPU, so dQ (and through it
  every gradient upstream) can differ in its last bits from run to run. Faster, not
  bit-reproducible.

Speed details: exponentials are exp2; the forward folds scale * log2(e) into the row
maximum and into one fused multiply-add per score (exp2(s * scale - m)); causal programs
stop at the diagonal; the causal (or sequence-tail) mask is applied to the scores only in
the blocks that need it (MASK=True); accumulators and softmax statistics are fp32 while
tl.dot takes fp16/bf16 operands. Any T works: loads and stores are bounds-checked, the
tail block is masked, nothing is padded. q, k, v may be strided views, e.g. the
`.view(B, T, H, D).transpose(1, 2)` of a projection; the last dimension must be contiguous.

Launch configs (block sizes, warps, pipeline stages) come from a short candidate list per
kernel and head dim, timed once per (head dim, causal, dtype, T bucket) on a GPU: they and
the choice live in `kernels/tune.py` (CANDIDATES, pin()). `python -m kernels.report`
compiles them for sm_80 and sm_90.
"""
import math
import os

import torch

from .tune import _arch, _choose, candidates  # the launch configs and their choice

try:
    import triton
    import triton.language as tl
    HAS_TRITON, TRITON_ERROR = True, None
except ImportError as e:  # kernels/ still imports; attention() then uses PyTorch
    class _NoTriton:  # just enough for the decorators and annotations below to evaluate
        jit = staticmethod(lambda fn: fn)
        constexpr = None
    triton = tl = _NoTriton()
    HAS_TRITON, TRITON_ERROR = False, f"{type(e).__name__}: {e}"

# Triton's CPU interpreter runs each program with numpy (REFERENCE.md, "Triton on a CPU").
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))


# ----------------------------------------------------------------------------- forward

@triton.jit
def _key_split(start_m, T, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keys a query block reads, as [0, mid) with no mask and [mid, end) with one. Causal: the blocks below the
    query block, then its diagonal block (BLOCK_M is a multiple of BLOCK_N). Non-causal: the full key blocks, then
    the partial tail block when T % BLOCK_N != 0."""
    if CAUSAL:
        return start_m, tl.minimum(start_m + BLOCK_M, T)
    else:
        return (T // BLOCK_N) * BLOCK_N, T


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q,
                    K, V,            # pointers to k and v of this (batch, head), each (T, D)
                    stride_kt, stride_vt, offs_m, start, end, T, qk_scale,
                    CAUSAL: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr):
    offs_d = tl.arange(0, HEAD_D)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None], mask=offs_n[None, :] < T, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
        qk = tl.dot(q, kT, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
        if MASK:  # the diagonal block (causal) or the sequence tail (non-causal)
            if CAUSAL:
                keep = offs_m[:, None] >= offs_n[None, :]
            else:
                keep = offs_n[None, :] < T
            qk = tl.where(keep, qk, float("-inf"))
        # The scale (> 0) commutes with the max: scale the BLOCK_M maxima, not the BLOCK_M x BLOCK_N
        # scores, and fold the scores' scaling into the subtraction, one fused multiply-add each.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # log2 units
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V,  # pointers to the inputs, each (B, H, T, D) with the strides below
                     O,        # pointer to the output, (B, H, T, D)
                     LSE,      # pointer to the row log2-sum-exp, (B * H, T) fp32, contiguous
                     stride_qb, stride_qh, stride_qt,
                     stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt,
                     stride_ob, stride_oh, stride_ot,
                     H, T, qk_scale,
                     CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    LSE += bh.to(tl.int64) * T

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m[:, None] < T
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)

    mid, end = _key_split(start_m, T, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, 0, mid, T, qk_scale,
                                    CAUSAL, False, PRECISION, BLOCK_N, HEAD_D)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, mid, end, T, qk_scale,
                                    CAUSAL, True, PRECISION, BLOCK_N, HEAD_D)
    # Every row sees at least key 0, so l_i > 0 (rows past T read zeros and are not stored).
    o = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :], o.to(O.dtype.element_ty), mask=row_ok)
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)


# ---------------------------------------------------------------------------- backward
# Query rows past T are loaded as zeros (L and delta too) and add nothing to dK and dV:
# their dO row is zero, so dP, delta and dS are zero. Key rows past T give garbage dK, dV
# rows that are never stored. Key rows past T are masked wherever dQ is summed (the dQ
# kernel, the atomic dQ of the dK/dV kernel) like in the forward: a zero k row gives S = 0,
# and exp2(0 - L) overflows when a row's L is very negative (inf * 0 = NaN in dS K).

@triton.jit
def _attn_bwd_delta_kernel(O, DO,  # pointers to the output and its gradient, (B, H, T, D)
                           DELTA,  # pointer to delta = rowsum(O * dO), (B * H, T) fp32
                           stride_ob, stride_oh, stride_ot,
                           stride_dob, stride_doh, stride_dot,
                           H, T, BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr):
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m[:, None] < T
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v,
                         Q, DO,          # pointers to q and dO of this (batch, head), each (T, D)
                         LSE, DELTA,     # pointers to this (batch, head)'s rows of L and delta, (T,)
                         DQ,             # pointer to this (batch, head)'s fp32 dQ buffer, (T, D) (ATOMIC_DQ)
                         stride_qt, stride_dot, stride_dqt, offs_n, start, end, T, qk_scale,
                         CAUSAL: tl.constexpr, MASK: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr):
    offs_d = tl.arange(0, HEAD_D)
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        qT = tl.load(Q + offs_m[None, :] * stride_qt + offs_d[:, None], mask=row_ok[None, :], other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        sT = tl.dot(k, qT, input_precision=PRECISION)  # (BLOCK_N, BLOCK_M), unscaled
        pT = tl.math.exp2(sT * qk_scale - lse[None, :])  # one fused multiply-add, log2 units
        if MASK:  # causal diagonal: key n is seen by query m only if m >= n
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        if ATOMIC_DQ:
            if not CAUSAL:  # key rows past T (causal: only queries past T, whose dO is zero, see them)
                pT = tl.where(offs_n[:, None] < T, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)  # (BLOCK_N, BLOCK_M)
        dk = tl.dot(dsT, tl.trans(qT), dk, input_precision=PRECISION)
        if ATOMIC_DQ:  # the fifth matmul: this key block's share of dQ, (D, BLOCK_M) = k^T dS^T
            # Computed transposed so that the MMA's rows are D (>= 16 x num_warps), not BLOCK_M.
            dqT = tl.dot(tl.trans(k), dsT, input_precision=PRECISION)
            tl.atomic_add(DQ + offs_m[None, :] * stride_dqt + offs_d[:, None], dqT, mask=row_ok[None, :],
                          sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO,  # pointers to the inputs and dO, (B, H, T, D), strides below
                          DK, DV,       # pointers to the key and value gradients, (B, H, T, D)
                          LSE, DELTA,   # pointers to L (log2 units) and delta, (B * H, T) fp32
                          DQ,           # pointer to the fp32 dQ buffer, (B, H, T, D), zeroed (ATOMIC_DQ only)
                          stride_qb, stride_qh, stride_qt,
                          stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt,
                          stride_dob, stride_doh, stride_dot,
                          stride_dkb, stride_dkh, stride_dkt,
                          stride_dvb, stride_dvh, stride_dvt,
                          stride_dqb, stride_dqh, stride_dqt,
                          H, T, qk_scale, sm_scale,
                          CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    DQ += b * stride_dqb + h * stride_dqh
    LSE += bh.to(tl.int64) * T
    DELTA += bh.to(tl.int64) * T

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    col_ok = offs_n[:, None] < T
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=col_ok, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], tl.float32)

    # Causal: queries before this key block never see it; the diagonal block
    # [start_n, start_n + BLOCK_N) is masked (BLOCK_N is a multiple of BLOCK_M); the rest not.
    # With ATOMIC_DQ a key row past T is zero in k, so it adds nothing to dQ.
    if CAUSAL:
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DQ, stride_qt, stride_dot, stride_dqt, offs_n,
                                      start_n, start_n + BLOCK_N, T, qk_scale, CAUSAL, True, ATOMIC_DQ, PRECISION,
                                      BLOCK_M, HEAD_D)
        start = start_n + BLOCK_N
    else:
        start = 0
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DQ, stride_qt, stride_dot, stride_dqt, offs_n,
                                  start, T, T, qk_scale, CAUSAL, False, ATOMIC_DQ, PRECISION, BLOCK_M,
                                  HEAD_D)
    tl.store(DK + offs_n[:, None] * stride_dkt + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok)
    tl.store(DV + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta,
                       K, V,           # pointers to k and v of this (batch, head), each (T, D)
                       stride_kt, stride_vt, offs_m, start, end, T, qk_scale,
                       CAUSAL: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr):
    offs_d = tl.arange(0, HEAD_D)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n[None, :] < T
        kT = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None], mask=col_ok, other=0.0)
        vT = tl.load(V + offs_n[None, :] * stride_vt + offs_d[:, None], mask=col_ok, other=0.0)
        s = tl.dot(q, kT, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
        p = tl.math.exp2(s * qk_scale - lse[:, None])  # one fused multiply-add, log2 units
        if MASK:  # the diagonal block (causal) or the sequence tail (non-causal)
            if CAUSAL:
                keep = offs_m[:, None] >= offs_n[None, :]
            else:
                keep = col_ok
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO,  # pointers to the inputs and dO, (B, H, T, D), strides below
                        DQ,           # pointer to the query gradient, (B, H, T, D)
                        LSE, DELTA,   # pointers to L (log2 units) and delta, (B * H, T) fp32
                        stride_qb, stride_qh, stride_qt,
                        stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt,
                        stride_dob, stride_doh, stride_dot,
                        stride_dqb, stride_dqh, stride_dqt,
                        H, T, qk_scale, sm_scale,
                        CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < T
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_D], tl.float32)

    mid, end = _key_split(start_m, T, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, 0, mid, T, qk_scale,
                            CAUSAL, False, PRECISION, BLOCK_N, HEAD_D)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, mid, end, T, qk_scale,
                            CAUSAL, True, PRECISION, BLOCK_N, HEAD_D)
    tl.store(DQ + offs_m[:, None] * stride_dqt + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


def _strides(x):
    """Strides of (B, H, T, D) over B, H and T; the kernels assume the last dim contiguous."""
    assert x.stride(-1) == 1, "the last dim must be contiguous"
    return x.stride(0), x.stride(1), x.stride(2)


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


HEAD_DIMS = (16, 32, 64, 128)
MAX_BH = 65535  # B * H is the grid's second axis, which CUDA caps at 65535


def supports(q, k, v):
    """None if flash_attention takes these inputs, else the reason it does not (one sentence)."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        return (f"flash_attention wants q, k, v of one shape (B, H, T, D), got {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"flash_attention wants q, k, v all fp32, fp16 or bf16, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"flash_attention supports head dims {', '.join(map(str, HEAD_DIMS))}, got {q.shape[-1]}"
    if q.shape[0] * q.shape[1] > MAX_BH:
        return f"flash_attention supports B * H up to {MAX_BH}, got {q.shape[0]} * {q.shape[1]}"
    return None


def _check(q, k, v):
    if not HAS_TRITON:
        raise RuntimeError("flash_attention needs triton, which failed to import")
    reason = supports(q, k, v)
    if reason:
        raise ValueError(reason)
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError("flash_attention on CPU tensors needs TRITON_INTERPRET=1 set before kernels is imported")


# ---------------------------------------------------------------------- autograd wrapper

def _launch_fwd(q, k, v, o, lse, causal, precision, cfg):
    B, H, T, D = q.shape
    grid = (triton.cdiv(T, cfg.block_m), B * H)
    _attn_fwd_kernel[grid](q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                           H, T, LOG2E / math.sqrt(D), CAUSAL=causal, PRECISION=precision,
                           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_D=D,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _launch_dkdv(q, k, v, do, dk, dv, lse, delta, dq_acc, causal, precision, cfg):
    """dq_acc: the zeroed fp32 dQ buffer to add into (the atomic variant), or None."""
    B, H, T, D = q.shape
    if dq_acc is not None:
        dq_acc.zero_()
    grid = (triton.cdiv(T, cfg.block_n), B * H)
    sm_scale = 1.0 / math.sqrt(D)
    dq_arg = dk if dq_acc is None else dq_acc  # never touched when ATOMIC_DQ is False
    _attn_bwd_dkdv_kernel[grid](q, k, v, do, dk, dv, lse, delta, dq_arg,
                                *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
                                *_strides(dv), *_strides(dq_arg), H, T, sm_scale * LOG2E, sm_scale,
                                CAUSAL=causal, ATOMIC_DQ=dq_acc is not None, PRECISION=precision,
                                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_D=D,
                                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _launch_dq(q, k, v, do, dq, lse, delta, causal, precision, cfg):
    B, H, T, D = q.shape
    grid = (triton.cdiv(T, cfg.block_m), B * H)
    sm_scale = 1.0 / math.sqrt(D)
    _attn_bwd_dq_kernel[grid](q, k, v, do, dq, lse, delta, *_strides(q), *_strides(k), *_strides(v),
                              *_strides(do), *_strides(dq), H, T, sm_scale * LOG2E, sm_scale,
                              CAUSAL=causal, PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                              HEAD_D=D, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


class _FlashAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, causal, deterministic):
        B, H, T, D = q.shape
        precision = "ieee" if q.dtype == torch.float32 else "tf32"  # no TF32 rounding for fp32 inputs
        o = torch.empty_like(q)  # q's layout when q is dense: o.transpose(1, 2) is then contiguous
        lse = torch.empty((B * H, T), device=q.device, dtype=torch.float32)
        launch = lambda cfg: _launch_fwd(q, k, v, o, lse, causal, precision, cfg)
        launch(_choose("fwd", q, causal, launch))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.precision, ctx.deterministic = causal, precision, deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = _last_dim_contiguous(do)
        B, H, T, D = q.shape
        causal, precision = ctx.causal, ctx.precision
        delta = torch.empty_like(lse)
        _attn_bwd_delta_kernel[(triton.cdiv(T, 64), B * H)](o, do, delta, *_strides(o), *_strides(do),
                                                            H, T, BLOCK_M=64, HEAD_D=D)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        if ctx.deterministic or not candidates("dkdv_atomic", D, q.dtype, _arch(q)):
            # dK, dV by key blocks, then dQ by query blocks: 7 matmuls per tile
            dq = torch.empty_like(q)
            launch = lambda cfg: _launch_dkdv(q, k, v, do, dk, dv, lse, delta, None, causal, precision, cfg)
            launch(_choose("dkdv", q, causal, launch))
            launch = lambda cfg: _launch_dq(q, k, v, do, dq, lse, delta, causal, precision, cfg)
            launch(_choose("dq", q, causal, launch))
        else:  # one pass, dQ added in fp32 by atomics: 5 matmuls per tile, dQ's last bits vary run to run
            dq_acc = torch.empty(q.shape, device=q.device, dtype=torch.float32)  # (B, H, T, D), zeroed per launch
            launch = lambda cfg: _launch_dkdv(q, k, v, do, dk, dv, lse, delta, dq_acc, causal, precision, cfg)
            launch(_choose("dkdv_atomic", q, causal, launch))
            dq = (dq_acc * (1.0 / math.sqrt(D))).to(q.dtype)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, causal=False, deterministic=True):
    """softmax(q k^T / sqrt(D), causal mask) v for q, k, v of shape (B, H, T, D); differentiable.

    deterministic=True (the default, what training uses): a backward whose gradients are the
    same bits on every run. False: FlashAttention-2's five-matmul backward with dQ summed by
    fp32 atomics, faster, with dQ's last bits varying from run to run (see the module docstring);
    on sm_80 at D = 128 it has no config that fits its registers, and runs the deterministic one.
    """
    _check(q, k, v)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    if INTERPRET and q.dtype == torch.bfloat16:  # the interpreter gets bf16 arithmetic wrong: run in fp32
        return _FlashAttention.apply(q.float(), k.float(), v.float(), causal, deterministic).to(q.dtype)
    return _FlashAttention.apply(q, k, v, causal, deterministic)


# ---------------------------------------------------------------------- PyTorch reference

def attention_ref(q, k, v, causal=False):
    """The plain math, in the input dtype like eager PyTorch. (B, H, Tq, D), (B, H, Tk, D) -> (B, H, Tq, D)."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, Tq, Tk)
    if causal:  # query i attends keys 0..i
        keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
