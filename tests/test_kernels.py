"""
Triton kernels against their plain PyTorch references: outputs and every gradient.

On a CPU the kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1).
On a GPU, `TRITON_INTERPRET=0 pytest tests/test_kernels.py` runs the compiled kernels,
bf16 included. Tolerances: fp32 within 1e-4 of an fp64 reference; fp16 and bf16 by
FlashAttention's rule, the kernel's error against an fp32 reference at most twice the
error the eager reference makes in the same half precision.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import attention_ref, flash_attention, rms_norm, rms_norm_ref
from kernels.flash import INTERPRET

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cpu" if INTERPRET else "cuda"
HALF = [torch.float16] if INTERPRET else [torch.float16, torch.bfloat16]  # bf16 is wrong in the interpreter
# Where the half-precision reference is exact, twice its zero error leaves no room for the
# kernel's fp32 rounding: at T = 1 softmax is exactly 1 and dq = dk = 0, which eager fp16
# hits exactly while the kernel lands within ~1e-6 (dP and delta are the same sum taken in
# two orders). This floor is 1/100 of one fp16 ulp at 1.0 (9.8e-4).
FLOOR = 1e-5


def _diff(name, got, want):
    d = (got.double() - want.double()).abs()
    return d.max().item(), f"{name}: max abs diff {d.max().item():.3e}, mean abs diff {d.mean().item():.3e}"


def _forward_backward(fn, inputs, dout, dtype):
    """fn on the inputs cast to dtype (fresh leaves, strides kept); returns [output, grad of each input]."""
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out = fn(*xs)
    return [out, *torch.autograd.grad(out, xs, dout.to(dtype))]


def _check_close(names, got, want, atol):
    for name, g, w in zip(names, got, want):
        err, msg = _diff(name, g, w)
        assert err <= atol, msg


def _check_half(names, got, ref_half, ref_fp32):
    """FlashAttention's rule: |kernel - ref_fp32| <= 2 |ref_half - ref_fp32| (+ FLOOR)."""
    for name, g, h, w in zip(names, got, ref_half, ref_fp32):
        err, msg = _diff(name, g, w)
        ref_err, ref_msg = _diff("eager " + name, h, w)
        assert err <= 2 * ref_err + FLOOR, f"{msg}; {ref_msg} (allowed twice that)"


# ---------------------------------------------------------------------------- attention

ATTN_NAMES = ["out", "dq", "dk", "dv"]


def _qkv(T, D, seed, B=2, H=2):
    """q, k, v as the model makes them: (B, T, H, D) projections viewed as (B, H, T, D)."""
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(B, T, H, D, generator=g).transpose(1, 2) for _ in range(3)]
    dout = torch.randn(B, H, T, D, generator=g)
    return [x.to(DEVICE) for x in qkv], dout.to(DEVICE)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("T", [1, 17, 64, 65, 577])
def test_attention_fp32(T, D, causal):
    qkv, dout = _qkv(T, D, seed=T * D + causal)
    assert T == 1 or not qkv[0].is_contiguous()  # strides are passed, nothing is copied
    got = _forward_backward(lambda q, k, v: flash_attention(q, k, v, causal), qkv, dout, torch.float32)
    want = _forward_backward(lambda q, k, v: attention_ref(q, k, v, causal), qkv, dout, torch.float64)
    _check_close(ATTN_NAMES, got, want, atol=1e-4)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("T", [1, 17, 64, 65, 577])
def test_attention_half(T, D, causal, dtype):
    qkv, dout = _qkv(T, D, seed=T * D + causal)
    qkv, dout = [x.to(dtype) for x in qkv], dout.to(dtype)  # the same values in every precision below
    got = _forward_backward(lambda q, k, v: flash_attention(q, k, v, causal), qkv, dout, dtype)
    ref = lambda q, k, v: attention_ref(q, k, v, causal)
    _check_half(ATTN_NAMES, got, _forward_backward(ref, qkv, dout, dtype),
                _forward_backward(ref, qkv, dout, torch.float32))


def test_attention_fused_qkv_slices():
    """q, k, v sliced from one (B, T, 3, H, D) projection are strided with gaps; dO is strided too."""
    B, T, H, D = 2, 65, 2, 32
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(DEVICE)
    inputs = [x.transpose(1, 2) for x in qkv.unbind(2)]  # (B, H, T, D) each
    dout = torch.randn(B, T, H, D, generator=g).to(DEVICE).transpose(1, 2)
    got = _forward_backward(lambda q, k, v: flash_attention(q, k, v, True), inputs, dout, torch.float32)
    want = _forward_backward(lambda q, k, v: attention_ref(q, k, v, True), inputs, dout, torch.float64)
    _check_close(ATTN_NAMES, got, want, atol=1e-4)


def test_attention_bf16_runs_on_cpu():
    """The interpreter path upcasts bf16 to fp32; the result must still be bf16 and right."""
    qkv, dout = _qkv(65, 64, seed=0)
    qkv, dout = [x.bfloat16() for x in qkv], dout.bfloat16()
    got = _forward_backward(lambda q, k, v: flash_attention(q, k, v, True), qkv, dout, torch.bfloat16)
    assert all(g.dtype == torch.bfloat16 for g in got)
    ref = lambda q, k, v: attention_ref(q, k, v, True)
    _check_half(ATTN_NAMES, got, _forward_backward(ref, qkv, dout, torch.bfloat16),
                _forward_backward(ref, qkv, dout, torch.float32))


# ------------------------------------------------------------------------------ RMSNorm

NORM_NAMES = ["out", "dx", "dweight"]


def _norm_inputs(N, dtype, seed):
    """111 rows (3 x 37: not a multiple of the programs) of width N, a weight near 1."""
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(3, 37, N, generator=g)
    w = 1 + 0.5 * torch.randn(N, generator=g)
    dout = torch.randn(3, 37, N, generator=g)
    return [t.to(DEVICE, dtype) for t in (x, w)], dout.to(DEVICE, dtype)


@pytest.mark.parametrize("N", [64, 1000, 4096])
def test_rms_norm_fp32(N):
    xw, dout = _norm_inputs(N, torch.float32, seed=N)
    got = _forward_backward(lambda x, w: rms_norm(x, w, 1e-5), xw, dout, torch.float32)
    want = _forward_backward(lambda x, w: rms_norm_ref(x, w, 1e-5), xw, dout, torch.float64)
    _check_close(NORM_NAMES, got, want, atol=1e-4)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("N", [64, 1000, 4096])
def test_rms_norm_half(N, dtype):
    xw, dout = _norm_inputs(N, dtype, seed=N)
    got = _forward_backward(lambda x, w: rms_norm(x, w, 1e-5), xw, dout, dtype)
    ref = lambda x, w: rms_norm_ref(x, w, 1e-5)
    _check_half(NORM_NAMES, got, _forward_backward(ref, xw, dout, dtype),
                _forward_backward(ref, xw, dout, torch.float32))


# --------------------------------------------------------------------------- dispatcher

@pytest.fixture
def spies(monkeypatch):
    """Count the calls that reach the Triton functions; restore the backend afterwards."""
    calls = {"flash_attention": 0, "rms_norm": 0}

    def spy(name):
        real = getattr(kernels, name)

        def wrapped(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(kernels, "BACKEND", kernels.BACKEND)
    for name in calls:
        monkeypatch.setattr(kernels, name, spy(name))
    return calls


def _small():
    (q, k, v), _ = _qkv(17, 32, seed=1)
    x = torch.randn(5, 64, device=DEVICE)
    w = torch.randn(64, device=DEVICE)
    return q, k, v, x, w


def test_use_triton_routes_to_triton(spies):
    q, k, v, x, w = _small()
    kernels.use("triton")
    out = kernels.attention(q, k, v, "causal")
    y = kernels.norm(x, w, 1e-5)
    assert spies == {"flash_attention": 1, "rms_norm": 1}
    _check_close(["attention"], [out], [attention_ref(q, k, v, True)], atol=1e-4)
    _check_close(["norm"], [y], [rms_norm_ref(x, w, 1e-5)], atol=1e-4)
    # A mask, or Tq != Tk (decoding with a KV cache), goes to PyTorch's SDPA even so.
    mask = torch.ones(1, 1, 17, 17, dtype=torch.bool, device=DEVICE).tril()
    _check_close(["masked"], [kernels.attention(q, k, v, mask=mask)], [out], atol=1e-4)
    kernels.attention(q[:, :, -1:], k, v, None)
    assert spies["flash_attention"] == 1


def test_use_torch_routes_to_reference(spies):
    q, k, v, x, w = _small()
    kernels.use("torch")
    out = kernels.attention(q, k, v, "causal")
    y = kernels.norm(x, w, 1e-5)
    assert spies == {"flash_attention": 0, "rms_norm": 0}
    _check_close(["attention"], [out], [attention_ref(q, k, v, True)], atol=1e-5)
    assert torch.equal(y, rms_norm_ref(x, w, 1e-5))


def test_auto_follows_the_device(spies):
    q, k, v, x, w = _small()
    kernels.use("auto")
    kernels.attention(q, k, v, None)
    kernels.norm(x, w, 1e-5)
    n = 1 if q.is_cuda else 0
    assert spies == {"flash_attention": n, "rms_norm": n}


def test_use_rejects_unknown_backend(spies):
    with pytest.raises(ValueError, match="bogus"):
        kernels.use("bogus")


def test_imports_and_falls_back_without_triton():
    """With triton unimportable, kernels imports silently and attention/norm use PyTorch."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, kernels\n"
        "from kernels.flash import HAS_TRITON; assert not HAS_TRITON\n"
        "q = torch.randn(1, 2, 5, 16)\n"
        "o = kernels.attention(q, q, q, 'causal')\n"
        "y = kernels.norm(torch.randn(3, 8), torch.ones(8), 1e-5)\n"
        "assert o.shape == q.shape and y.shape == (3, 8)\n"
        "try:\n    kernels.use('triton')\nexcept ValueError:\n    pass\n"
        "else:\n    raise AssertionError('use(triton) should raise without triton')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
