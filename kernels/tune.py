"""
Which launch config (block sizes, warps, pipeline stages) each flash attention kernel of
`kernels/flash.py` runs with, and how one is chosen.

Each kernel ("fwd", "dkdv", "dq", "dkdv_atomic") has a short candidate list per head dim
and GPU generation (CANDIDATES, AMPERE). On a GPU the candidates are timed once per
(kernel, head dim, causal, dtype, T bucket, device) on the real inputs and the fastest is
kept; elsewhere, or with KERNELS_FLASH_TUNE=0, the first one runs. pin() fixes one.
`python -m kernels.report` compiles every candidate for sm_80 and sm_90.
"""
import os
from typing import NamedTuple

import torch


class Config(NamedTuple):
    """One launch config: query rows and key rows per block, warps per program, pipeline stages."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# What each kernel is timed over on sm_90, per head dim (16 and 32 use 64's list); AMPERE
# replaces some lists on older GPUs. The first is the default wherever nothing is timed: the
# CPU interpreter, KERNELS_FLASH_TUNE=0. The rules, which `python -m kernels.report` checks on
# the compiled code (tests/test_kernels.py runs it):
# - no duplicated work: the tensor-core instructions of a tile do exactly its matmuls. The usual
#   cause is a row dim (BLOCK_M in fwd and dq, BLOCK_N in dkdv) under 16 x num_warps, where
#   Triton gives two warp groups the same rows (dkdv at (64, 64, 8 warps) did 1.5x the work);
# - dq's BLOCK_N is at least 64: narrower, two of its three matmuls are shared-memory bound;
# - no 8-warp forward under 128 x 128 scores (the Triton tutorial drops those on Hopper);
# - fwd and dq: BLOCK_M a multiple of BLOCK_N, dkdv: BLOCK_N a multiple of BLOCK_M (the
#   causal diagonal block is walked in whole blocks);
# - nothing spills registers and at least one program fits an SM, in bf16.
# "dkdv_atomic" is the dK/dV kernel that also adds dQ (deterministic=False).
CANDIDATES = {
    "fwd": {64: [Config(128, 128, 8, 3), Config(64, 64, 4, 3)],  # 128 rows on 4 warps spill
            128: [Config(64, 64, 4, 3), Config(64, 32, 4, 4)]},   # 128 rows spill at D = 128
    "dkdv": {64: [Config(32, 128, 8, 3), Config(32, 64, 4, 3)],
             128: [Config(32, 128, 8, 3), Config(32, 64, 4, 3)]},
    "dq": {64: [Config(128, 64, 8, 3), Config(64, 64, 4, 3)],
           128: [Config(64, 64, 4, 3), Config(128, 64, 8, 3)]},
    "dkdv_atomic": {64: [Config(32, 128, 8, 3), Config(32, 64, 4, 3)],
                    128: [Config(32, 128, 8, 3), Config(32, 64, 4, 3)]},
}
# sm_80 keeps mma operands in registers (Hopper's wgmma reads them from shared memory), so
# its backward runs out of registers sooner. At D = 128 no config of the atomic dK/dV kernel
# tried compiled without spills or duplicated work ((32|64, 64|128, 4|8 warps), 2-3 stages):
# there `deterministic=False` runs the deterministic backward.
AMPERE = {
    ("dkdv", 128): [Config(64, 64, 8, 3), Config(64, 64, 8, 2)],
    ("dq", 128): [Config(64, 64, 4, 3), Config(64, 64, 8, 3)],
    ("dq", 64): [Config(64, 64, 4, 1), Config(128, 64, 8, 1)],  # 2-3 stages spill 8-24 bytes
    ("dkdv_atomic", 128): [],
    ("dkdv_atomic", 64): [Config(32, 64, 4, 3), Config(64, 64, 4, 2)],
}
TUNE = os.environ.get("KERNELS_FLASH_TUNE", "1") != "0"  # 0: always the first candidate (reproducible bits)
_PINNED = {}  # kernel name -> Config, set by pin()
_TUNED = {}   # (kernel, D, causal, dtype, T bucket, device) -> the fastest candidate


def candidates(kernel, D, dtype=torch.bfloat16, arch=90):
    """The configs `kernel` may run with at head dim D on sm_<arch> (sm_90 and newer take the
    Hopper lists, older GPUs AMPERE's where it has one). fp32 (exact dots, no TF32) is the
    test path, not a fast one: one stage keeps its shared memory down."""
    D = max(D, 64)
    cfgs = AMPERE.get((kernel, D), CANDIDATES[kernel][D]) if arch < 90 else CANDIDATES[kernel][D]
    return [c._replace(num_stages=1) for c in cfgs] if dtype == torch.float32 else cfgs


def _arch(q):
    """sm_<arch> of q's GPU as an int (90 for an H100); 90 off the GPU (the interpreter)."""
    if not q.is_cuda:
        return 90
    major, minor = torch.cuda.get_device_capability(q.device)
    return 10 * major + minor


def pin(kernel, config):
    """Run `kernel` ("fwd", "dkdv", "dq", "dkdv_atomic") with `config` (a Config, or a tuple
    (block_m, block_n, num_warps, num_stages)) from now on; None goes back to tuning."""
    if kernel not in CANDIDATES:
        raise ValueError(f"unknown flash kernel {kernel!r}; choose one of {', '.join(CANDIDATES)}")
    if config is None:
        _PINNED.pop(kernel, None)
        return
    c = Config(*config)
    rows, inner = (c.block_n, c.block_m) if kernel.startswith("dkdv") else (c.block_m, c.block_n)
    if rows % inner:
        raise ValueError(f"pin({kernel!r}): {'block_n' if kernel.startswith('dkdv') else 'block_m'} must be a "
                         f"multiple of the other block size, got {tuple(c)}")
    _PINNED[kernel] = c


def t_bucket(T):
    """The sequence-length part of the tuning key: T rounded up to a power of two (at least
    128), so that right-padded batches of nearby lengths share one choice instead of each
    new T being timed again."""
    return max(128, 1 << (T - 1).bit_length())  # = triton.next_power_of_2(T), without needing triton


def _choose(kernel, q, causal, launch):
    """The config to launch `kernel` with; launch(cfg) runs it once (for timing)."""
    if kernel in _PINNED:
        return _PINNED[kernel]
    B, H, T, D = q.shape
    cfgs = candidates(kernel, D, q.dtype, _arch(q))
    if not (TUNE and q.is_cuda and len(cfgs) > 1):
        return cfgs[0]
    key = (kernel, D, causal, q.dtype, t_bucket(T), q.device)
    if key not in _TUNED:  # each candidate runs about 20 ms on the real inputs; the last launch overwrites
        from triton.testing import do_bench
        ms = [do_bench(lambda: launch(c), warmup=5, rep=20) for c in cfgs]
        _TUNED[key] = cfgs[ms.index(min(ms))]
    return _TUNED[key]
