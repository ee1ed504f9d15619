"""
Compile-time report: every Triton kernel compiled for sm_90 (H100) and sm_80 (A100), bf16, at
the configs attention() and norm() may launch for the Vicuna-7B and ViT-L/14-336 shapes, read
as a kernel engineer would. No GPU is needed: Triton compiles for a GPUTarget without one, and
the CUDA tools inside the triton wheel (cuobjdump) read the cubin.

    python -m kernels.report                 # about 5-10 minutes on 2 CPU cores, seconds once cached
    python -m kernels.report --arch 90       # one architecture

Per kernel and config it prints:
- regs: registers per thread; spill: local memory per thread in bytes (spills, 0 wanted);
- smem: shared memory per program (Triton's dynamic allocation plus the static part);
- blk/SM: programs that fit one SM at once by registers, shared memory and warps;
- tc/tile: tensor-core instructions the whole program issues per tile (one iteration of the
  inner loop), from the SASS: HGMMA (wgmma, issued once per warp group of 4 warps) on sm_90,
  HMMA (mma.sync, once per warp) on sm_80, with the instruction shapes;
- work: the multiply-adds those instructions do per tile over what the tile's matmuls need
  (fwd 2, dq 3, dkdv 4, dkdv_atomic 5 of BLOCK_M x BLOCK_N x D each). 1.00 is no duplicated
  work; 1.50 was dkdv at (64, 64, 8 warps), where two warp groups computed the same rows.

This is a reading of compiled code, not a GPU run: it shows spills, occupancy and duplicated
tensor-core work, not time. tests/test_kernels.py runs it and asserts the rules above.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said out loud (no warning)

# name, B, H, T, D, causal; and the RMSNorm widths (8192 rows each)
SHAPES = [("Vicuna-7B", 4, 32, 2048, 128, True), ("ViT-L/14-336", 32, 16, 577, 64, False)]
NORM_WIDTHS = [4096, 5120]
ARCHS = {90: dict(name="sm_90", smem=228 * 1024), 80: dict(name="sm_80", smem=164 * 1024)}  # smem per SM
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32
MATMULS_PER_TILE = {"fwd": 2, "dq": 3, "dkdv": 4, "dkdv_atomic": 5}  # each BLOCK_M x BLOCK_N x D
INTS = {"H", "T", "M", "N"}  # upper-case arguments that are integers, not pointers


@dataclass
class Row:
    arch: int
    shape: str
    kernel: str
    config: str
    regs: int
    spill: int          # bytes of local memory per thread
    smem: int           # bytes per program
    blocks: int         # programs per SM
    limiter: str        # what bounds blocks: regs, smem or warps
    tc: dict            # SASS tensor-core instruction -> static count
    loops: int          # inner-loop bodies in the kernel (the static count covers each once)
    tc_per_tile: float  # instructions the program issues per tile
    work: float         # issued multiply-adds / needed ones, per tile (nan where no matmul)


def _tools():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_kernel(fn, arch, num_warps, num_stages, constexprs, fp32_ptrs=(), ints=None):
    """triton.compile of a @triton.jit fn for sm_<arch>, bf16 pointers except fp32_ptrs."""
    import triton
    import triton.compiler
    from triton.backends.compiler import GPUTarget
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name.isupper() and name not in INTS:
            sig[name] = "*fp32" if name in fp32_ptrs else "*bf16"
        else:
            sig[name] = "fp32" if "scale" in name or name == "eps" else "i32"
        # What the launcher tells the compiler at these shapes: 16-byte aligned pointers, strides
        # and sizes divisible by 16 where they are (T = 577 is not).
        value = (ints or {}).get(name, 16)
        if sig[name] != "fp32" and value % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def read_cubin(kernel):
    """(registers, local bytes, static shared bytes, Counter of tensor-core SASS instructions)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(_tools(), "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True, check=True).stdout
    field = lambda key: int(re.search(rf"\b{key}:(\d+)", usage.stdout).group(1))
    local = field("LOCAL") + field("STACK")
    return field("REG"), local, field("SHARED"), Counter(re.findall(r"\b(H[G]?MMA\.[0-9x]+)\.\S+", sass))


def _macs(instr, num_warps):
    """Multiply-adds one static tensor-core instruction does across the program, and its issue count."""
    if instr.startswith("HGMMA."):  # HGMMA.64x128x16: m x n x k, one issue per warp group
        m, n, k = map(int, instr.split(".")[1].split("x"))
        return m * n * k * num_warps // 4, num_warps // 4
    m, n, k = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}[instr.split(".")[1]]
    return m * n * k * num_warps, num_warps  # HMMA: one issue per warp


def occupancy(arch, regs, smem, num_warps):
    """Programs per SM and what bounds them (registers are allocated per warp in units of 256)."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    limits = {"regs": REGS_PER_SM // (regs_per_warp * num_warps),
              "smem": ARCHS[arch]["smem"] // (smem + 1024),  # the CUDA runtime keeps 1 KB per program
              "warps": MAX_WARPS_PER_SM // num_warps}
    limiter = min(limits, key=limits.get)
    return min(limits[limiter], MAX_BLOCKS_PER_SM), limiter


def measure(arch, shape, kernel, cfg, fn, constexprs, fp32_ptrs, ints, loops, needed_macs):
    """Compiles one kernel and reads it into a Row. loops: inner-loop bodies in the kernel;
    needed_macs: multiply-adds the matmuls of one tile need (0 for kernels without matmuls)."""
    k = compile_kernel(fn, arch, cfg.num_warps, cfg.num_stages, constexprs, fp32_ptrs, ints)
    regs, local, static_smem, tc = read_cubin(k)
    smem = k.metadata.shared + static_smem
    blocks, limiter = occupancy(arch, regs, smem, cfg.num_warps)
    issued = sum(n * _macs(i, cfg.num_warps)[0] for i, n in tc.items())
    issues = sum(n * _macs(i, cfg.num_warps)[1] for i, n in tc.items())
    work = issued / loops / needed_macs if needed_macs else (float("nan") if not issued else float("inf"))
    return Row(arch, shape, kernel, ",".join(map(str, cfg)), regs, local, smem, blocks, limiter, dict(tc), loops,
               issues / loops, work)


def jobs(archs):
    """What to compile: (arch, shape, kernel, config) for every kernel and candidate config."""
    import triton

    from .tune import Config, candidates
    from .rmsnorm import _num_warps
    out = []
    for arch in archs:
        for name, B, H, T, D, causal in SHAPES:
            out += [(arch, name, kernel, cfg) for kernel in MATMULS_PER_TILE for cfg in candidates(kernel, D, arch=arch)]
            out.append((arch, name, "delta", Config(64, D, 4, 1)))  # its launch: BLOCK_M = 64, default warps
        for N in NORM_WIDTHS:
            BLOCK_N = triton.next_power_of_2(N)
            out += [(arch, f"8192x{N}", kernel, Config(1, BLOCK_N, _num_warps(BLOCK_N), 3))
                    for kernel in ("rmsnorm_fwd", "rmsnorm_bwd")]
    return out


def run_job(job):
    """Compiles one job's kernel with the constexprs its launcher passes; its Row."""
    from . import flash, rmsnorm
    arch, shape, kernel, cfg = job
    if kernel.startswith("rmsnorm"):
        fn = rmsnorm._rms_norm_fwd_kernel if kernel == "rmsnorm_fwd" else rmsnorm._rms_norm_bwd_kernel
        fp32 = {"RSTD", "DW"}
        ints = dict(M=8192, N=int(shape.split("x")[1]))
        return measure(arch, shape, kernel, cfg, fn, dict(BLOCK_N=cfg.block_n), fp32, ints, 1, 0)
    B, H, T, D, causal = next(s[1:] for s in SHAPES if s[0] == shape)
    ints = dict(H=H, T=T)
    if kernel == "delta":
        return measure(arch, shape, kernel, cfg, flash._attn_bwd_delta_kernel, dict(BLOCK_M=64, HEAD_D=D),
                       {"DELTA"}, ints, 1, 0)
    cx = dict(CAUSAL=causal, PRECISION="tf32", HEAD_D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
    fp32 = {"LSE", "DELTA"}
    if kernel.startswith("dkdv"):
        fn, loops = flash._attn_bwd_dkdv_kernel, 2 if causal else 1  # causal: the diagonal block, then the rest
        cx["ATOMIC_DQ"] = kernel == "dkdv_atomic"
        fp32 |= {"DQ"} if cx["ATOMIC_DQ"] else set()
    else:  # unmasked key blocks, then the masked ones (diagonal or tail)
        fn, loops = (flash._attn_fwd_kernel if kernel == "fwd" else flash._attn_bwd_dq_kernel), 2
    needed = MATMULS_PER_TILE[kernel] * cfg.block_m * cfg.block_n * D
    return measure(arch, shape, kernel, cfg, fn, cx, fp32, ints, loops, needed)


HEADER = (f"{'arch':<6} {'shape':<13} {'kernel':<12} {'config':<13} {'regs':>4} {'spill':>5} {'smem':>7} "
          f"{'blk/SM':>9} {'tc/tile':>7} {'work':>5}  tensor-core instructions (static count in SASS)")


def format_row(r):
    work = "-" if r.work != r.work else f"{r.work:.2f}"  # nan: no matmul in this kernel
    tc = ", ".join(f"{i} x{n}" for i, n in sorted(r.tc.items())) or "none"
    return (f"{ARCHS[r.arch]['name']:<6} {r.shape:<13} {r.kernel:<12} {r.config:<13} {r.regs:>4} {r.spill:>5} "
            f"{r.smem / 1024:>5.1f}KB {r.blocks:>3} {r.limiter:<5} {r.tc_per_tile:>7.0f} {work:>5}  {tc}")


def report(archs=(90, 80), workers=2):
    """Compiles everything for each arch, `workers` kernels at a time; prints the table in order."""
    from concurrent.futures import ProcessPoolExecutor
    print("config: BLOCK_M,BLOCK_N,num_warps,num_stages (delta: 64,D,4,-; RMSNorm: 1,BLOCK_N,num_warps,stages); bf16")
    print(HEADER, flush=True)
    rows = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for row in pool.map(run_job, jobs(archs)):
            print(format_row(row), flush=True)
            rows.append(row)
    return rows


def problems(rows):
    """The rules every row must keep, as sentences (empty when all hold)."""
    out = []
    for r in rows:
        where = f"{ARCHS[r.arch]['name']} {r.shape} {r.kernel} ({r.config})"
        if r.spill:
            out.append(f"{where} spills {r.spill} bytes per thread")
        if r.blocks < 1:
            out.append(f"{where} does not fit an SM ({r.regs} registers, {r.smem} bytes of shared memory)")
        if r.kernel in MATMULS_PER_TILE and abs(r.work - 1) > 1e-9:
            out.append(f"{where} issues {r.work:.2f}x the tensor-core work its tile needs")
        if r.kernel not in MATMULS_PER_TILE and r.tc:
            out.append(f"{where} has tensor-core instructions but no matmul")
    return out


def main():
    parser = argparse.ArgumentParser(description="compile the Triton kernels for sm_90 and sm_80 and read the result")
    parser.add_argument("--arch", type=int, choices=sorted(ARCHS), action="append",
                        help="compute capability to compile for (repeatable; default both 90 and 80)")
    parser.add_argument("--workers", type=int, default=2, help="kernels compiled at once (processes)")
    parser.add_argument("--json", help="also write the rows to this file (written whole, then renamed)")
    args = parser.parse_args()
    try:  # exit 3: this machine cannot compile for a GPU (the test skips with the sentence printed)
        import triton  # noqa: F401
    except ImportError as e:
        print(f"kernels.report: triton failed to import ({e}); nothing to compile")
        return 3
    if not os.path.exists(os.path.join(_tools(), "cuobjdump")):
        print(f"kernels.report: no cuobjdump in {_tools()} (this triton wheel ships no CUDA tools)")
        return 3
    from .flash import INTERPRET
    if INTERPRET:  # the kernels were decorated as interpreted functions, which do not compile
        print("kernels.report: TRITON_INTERPRET=1 is set; run it as TRITON_INTERPRET=0 python -m kernels.report")
        return 2
    rows = report(tuple(args.arch or (90, 80)), args.workers)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
        os.replace(tmp, args.json)
    bad = problems(rows)
    print("\n".join(bad) if bad else f"all {len(rows)} kernels: no spills, >= 1 program per SM, no duplicated "
                                     f"tensor-core work")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
