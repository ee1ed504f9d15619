"""
Benchmark the Triton kernels against PyTorch on one GPU, and check their bf16 accuracy there.

    python -m kernels.bench                      # everything, a few minutes on an H100
    python -m kernels.bench --only attention     # or --only rmsnorm

Attention, bf16: TFLOP/s of flash_attention (both backwards: the deterministic default and
the five-matmul atomic one) against F.scaled_dot_product_attention held to each of two
backends, flash (FlashAttention-2) and cuDNN (the faster one on Hopper), forward and
forward+backward, at the CLIP ViT-L/14-336 shape (B=32, H=16, T=577, D=64, non-causal) and
the Vicuna-7B shape (B=4, H=32, T=2048, D=128, causal). Each line prints both sides and
the ratio (ours / theirs, above 1 = we beat it); a backend this PyTorch or GPU lacks is
reported as such. FLOPs: 4 B H T^2 D forward, half of it when causal; the backward 2.5x
the forward. The first call of each shape also times the autotuning candidates (warm-up).

RMSNorm, bf16, 8192 rows of 4096 and of 5120: GB/s of rms_norm and of eager rms_norm_ref,
both counted by the bytes that must move: read x, write out (forward); then read x and
dout, write dx (backward).

Each shape is first checked in bf16 against an fp32 reference by FlashAttention's rule
(the kernel's error at most twice that of the eager bf16 reference) and prints pass/FAIL;
the exit status is 1 if any check fails. Without a GPU it prints one line and exits 0.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

parser = argparse.ArgumentParser(description="Triton kernels vs PyTorch: speed and bf16 accuracy on one GPU")
parser.add_argument("--only", choices=["all", "attention", "rmsnorm"], default="all", help="which kernels to measure")
parser.add_argument("--warmup", type=int, default=25, help="warm-up time per measurement in ms (do_bench)")
parser.add_argument("--rep", type=int, default=100, help="timed repetitions per measurement, in ms (do_bench)")
parser.add_argument("--no-check", action="store_true", help="skip the bf16 accuracy checks")

ATTENTION_SHAPES = [  # name, B, H, T, D, causal
    ("ViT-L/14-336", 32, 16, 577, 64, False),
    ("Vicuna-7B", 4, 32, 2048, 128, True),
]
RMSNORM_SHAPES = [(8192, 4096), (8192, 5120)]  # rows, hidden
DTYPE = torch.bfloat16
DEVICE = "cuda"


def forward_backward(fn, inputs, dout, dtype):
    """fn on the inputs cast to dtype (fresh leaves); returns [output, grad of each input]."""
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out = fn(*xs)
    return [out, *torch.autograd.grad(out, xs, dout.to(dtype))]


def check(label, names, fn, ref, inputs, dout):
    """FlashAttention's rule: |kernel - ref_fp32| <= 2 |ref_bf16 - ref_fp32|, per tensor."""
    got = forward_backward(fn, inputs, dout, DTYPE)
    ref_half = forward_backward(ref, inputs, dout, DTYPE)
    ref_fp32 = forward_backward(ref, inputs, dout, torch.float32)
    ok, notes = True, []
    for name, g, h, w in zip(names, got, ref_half, ref_fp32):
        err = (g.float() - w).abs().max().item()
        ref_err = (h.float() - w).abs().max().item()
        ok &= err <= 2 * ref_err + 1e-5
        notes.append(f"{name} {err:.1e} (eager {ref_err:.1e})")
    del got, ref_half, ref_fp32
    torch.cuda.empty_cache()
    print(f"  check {label}: {'pass' if ok else 'FAIL'}  max abs err vs fp32: " + ", ".join(notes))
    return ok


def timed(fn, args):
    from triton.testing import do_bench
    return do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")


def report(label, unit, amount, ms_kernel, ms_torch, torch_name):
    """amount: TFLOP or GB per call; prints it per second for each side and their ratio."""
    ours, theirs = amount / (ms_kernel * 1e-3), amount / (ms_torch * 1e-3)
    verdict = "beats" if ours > theirs else "behind"
    print(f"  {label:<18} triton {ours:8.1f} {unit}   {torch_name:<10} {theirs:8.1f} {unit}   ratio {ours / theirs:5.2f}"
          f"  ({verdict} {torch_name})")


def sdpa(backend, causal):
    """F.scaled_dot_product_attention held to one backend (which raises where it cannot run the inputs)."""
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fn


def bench_attention(args):
    from torch.nn.attention import SDPBackend

    from kernels import attention_ref, flash_attention
    from kernels.tune import _arch, candidates
    ok = True
    for name, B, H, T, D, causal in ATTENTION_SHAPES:
        print(f"attention {name}: B={B} H={H} T={T} D={D} {'causal' if causal else 'non-causal'}, bf16")
        q, k, v, dout = (torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE) for _ in range(4))
        ours = {"det": lambda q, k, v: flash_attention(q, k, v, causal),
                "atomic": lambda q, k, v: flash_attention(q, k, v, causal, deterministic=False)}
        theirs = {}
        for label, backend in [("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)]:
            try:  # a backend this build or GPU lacks raises here: report it and go on
                sdpa(backend, causal)(q, k, v)
                theirs[label] = sdpa(backend, causal)
            except RuntimeError as e:
                print(f"  {label}: not available here ({str(e).splitlines()[0][:100]})")
        if not candidates("dkdv_atomic", D, DTYPE, _arch(q)):
            print("  atomic: no config fits this GPU at this head dim; it runs the deterministic backward")
        if not args.no_check:
            ref = lambda q, k, v: attention_ref(q, k, v, causal)
            for variant, fn in ours.items():
                ok &= check(f"{name} {variant}", ["out", "dq", "dk", "dv"], fn, ref, [q, k, v], dout)
        flops = 4 * B * H * T * T * D / (2 if causal else 1)
        with torch.no_grad():
            ms_ours = timed(lambda: ours["det"](q, k, v), args)
            for label, fn in theirs.items():
                report("fwd", "TFLOP/s", flops / 1e12, ms_ours, timed(lambda: fn(q, k, v), args), label)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        fwd_bwd = lambda fn: timed(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout), args)
        ms_ours = {variant: fwd_bwd(fn) for variant, fn in ours.items()}
        for label, fn in theirs.items():
            ms_theirs = fwd_bwd(fn)
            for variant, ms in ms_ours.items():
                report(f"fwd+bwd ({variant})", "TFLOP/s", 3.5 * flops / 1e12, ms, ms_theirs, label)
        del q, k, v, dout
        torch.cuda.empty_cache()
    return ok


def bench_rmsnorm(args):
    from kernels import rms_norm, rms_norm_ref
    ok = True
    eps = 1e-5
    for M, N in RMSNORM_SHAPES:
        print(f"rmsnorm: {M} rows x {N}, bf16")
        x = torch.randn(M, N, device=DEVICE, dtype=DTYPE)
        w = (1 + 0.1 * torch.randn(N, device=DEVICE)).to(DTYPE)
        dout = torch.randn_like(x)
        ours = lambda x, w: rms_norm(x, w, eps)
        theirs = lambda x, w: rms_norm_ref(x, w, eps)
        if not args.no_check:
            ok &= check(f"{M}x{N}", ["out", "dx", "dweight"], ours, theirs, [x, w], dout)
        nbytes = M * N * x.element_size()
        with torch.no_grad():
            ms = [timed(lambda: fn(x, w), args) for fn in (ours, theirs)]
        report("fwd", "GB/s", 2 * nbytes / 1e9, *ms, "eager")
        x, w = x.requires_grad_(), w.requires_grad_()
        ms = [timed(lambda: torch.autograd.grad(fn(x, w), (x, w), dout), args) for fn in (ours, theirs)]
        report("fwd+bwd", "GB/s", 5 * nbytes / 1e9, *ms, "eager")
    return ok


def main():
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("kernels.bench: no CUDA GPU here, nothing to measure (CPU tests: pytest tests/test_kernels.py)")
        return 0
    from kernels.flash import INTERPRET
    if INTERPRET:
        print("kernels.bench: TRITON_INTERPRET=1 is set; unset it to measure the compiled kernels")
        return 1
    import triton
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    ok = True
    if args.only in ("all", "attention"):
        ok &= bench_attention(args)
    if args.only in ("all", "rmsnorm"):
        ok &= bench_rmsnorm(args)
    if not args.no_check:
        print("bf16 checks: " + ("all pass" if ok else "some FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
