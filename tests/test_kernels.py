"""
Triton kernels against their plain PyTorch references: outputs and every gradient.

On a CPU the kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1).
On a GPU, `TRITON_INTERPRET=0 pytest tests/test_kernels.py` runs the compiled kernels,
bf16 included. Tolerances: fp32 within 1e-4 of an fp64 reference; fp16 and bf16 by
FlashAttention's rule, the kernel's error against an fp32 reference at most twice the
error the eager reference makes in the same half precision.
"""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import kernels
from kernels import attention_ref, flash_attention, rms_norm, rms_norm_ref, tune
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


@pytest.mark.parametrize("T, D, causal", [(17, 32, False), (130, 64, False), (130, 128, True)])
def test_attention_atomic_backward_fp32(T, D, causal):
    """The five-matmul backward (dQ added by atomics), against fp64 PyTorch math."""
    qkv, dout = _qkv(T, D, seed=T + D + causal)
    fn = lambda q, k, v: flash_attention(q, k, v, causal, deterministic=False)
    got = _forward_backward(fn, qkv, dout, torch.float32)
    want = _forward_backward(lambda q, k, v: attention_ref(q, k, v, causal), qkv, dout, torch.float64)
    _check_close(ATTN_NAMES, got, want, atol=1e-4)


@pytest.mark.parametrize("dtype", HALF)
def test_attention_atomic_backward_half(dtype):
    qkv, dout = _qkv(130, 64, seed=3)
    qkv, dout = [x.to(dtype) for x in qkv], dout.to(dtype)
    got = _forward_backward(lambda q, k, v: flash_attention(q, k, v, True, deterministic=False), qkv, dout, dtype)
    ref = lambda q, k, v: attention_ref(q, k, v, True)
    _check_half(ATTN_NAMES, got, _forward_backward(ref, qkv, dout, dtype),
                _forward_backward(ref, qkv, dout, torch.float32))


@pytest.mark.parametrize("deterministic", [True, False])
def test_attention_very_negative_scores(deterministic):
    """Every score of a row far below 0 (L < -128 in log2 units): a key row past T loaded as zeros
    gives S = 0 and exp2(0 - L) = inf, which must be masked wherever dQ sums over keys."""
    B, H, T, D = 1, 2, 65, 32  # one key block of 128 (or 64): keys 65.. are the tail
    g = torch.Generator().manual_seed(5)
    k = torch.randn(B, H, T, D, generator=g) + 3.0
    q = -8.0 * k.mean(2, keepdim=True).expand(B, H, T, D).contiguous()  # q . k ~ -8 * 9 * 32 for all keys
    v, dout = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    qkv = [x.to(DEVICE) for x in (q, k, v)]
    got = _forward_backward(lambda q, k, v: flash_attention(q, k, v, False, deterministic), qkv, dout.to(DEVICE),
                            torch.float32)
    want = _forward_backward(lambda q, k, v: attention_ref(q, k, v, False), qkv, dout.to(DEVICE), torch.float64)
    _check_close(ATTN_NAMES, got, want, atol=1e-4)


@pytest.fixture
def unpinned():
    yield
    for kernel in tune.CANDIDATES:
        tune.pin(kernel, None)


def _all_configs(kernel, D):
    """Every candidate of `kernel` at head dim D, over the GPU generations, in fp32 (the interpreter's)."""
    out = []
    for arch in (90, 80):
        out += [c for c in tune.candidates(kernel, D, torch.float32, arch) if c not in out]
    return out


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("D", [64, 128])
def test_attention_every_candidate_config(D, deterministic, unpinned):
    """Autotuning may pick any candidate: each one, pinned, against fp64 PyTorch math (the other tests
    run the defaults). T = 130 walks several key blocks and a causal diagonal for every block size."""
    used = ["fwd", "dkdv", "dq"] if deterministic else ["fwd", "dkdv_atomic"]
    lists = {kernel: _all_configs(kernel, D) for kernel in used}
    qkv, dout = _qkv(130, D, seed=D + deterministic, B=1, H=1)
    want = _forward_backward(lambda q, k, v: attention_ref(q, k, v, True), qkv, dout, torch.float64)
    for i in range(max(map(len, lists.values()))):
        for kernel, cfgs in lists.items():
            tune.pin(kernel, cfgs[i % len(cfgs)])
        got = _forward_backward(lambda q, k, v: flash_attention(q, k, v, True, deterministic), qkv, dout,
                                torch.float32)
        _check_close([f"{n} at {dict(tune._PINNED)}" for n in ATTN_NAMES], got, want, atol=1e-4)


def test_pin_checks_the_config(unpinned):
    with pytest.raises(ValueError, match="bogus"):
        tune.pin("bogus", (64, 64, 4, 3))
    with pytest.raises(ValueError, match="multiple"):
        tune.pin("fwd", (64, 128, 4, 3))  # the causal diagonal needs BLOCK_M a multiple of BLOCK_N
    tune.pin("dkdv", (32, 64, 4, 2))
    q = types.SimpleNamespace(shape=(1, 1, 64, 64), is_cuda=True, dtype=torch.bfloat16, device="cuda:0")
    assert tune._choose("dkdv", q, True, launch=None) == tune.Config(32, 64, 4, 2)


def test_tuning_is_keyed_on_a_t_bucket(monkeypatch):
    """One timing per (kernel, D, causal, dtype, T bucket): T = 577 and T = 600 share one, 2048 gets its own."""
    timed = []

    def do_bench(fn, warmup, rep):
        fn()
        timed.append(seen[-1])
        return 1.0 if seen[-1] == cfgs[1] else 2.0  # the second candidate is the faster

    seen, cfgs = [], tune.candidates("fwd", 64)
    import triton.testing
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(tune, "TUNE", True)
    monkeypatch.setattr(tune, "_TUNED", {})
    monkeypatch.setattr(tune, "_arch", lambda q: 90)
    fake = lambda T: types.SimpleNamespace(shape=(2, 4, T, 64), is_cuda=True, dtype=torch.bfloat16, device="cuda:0")
    assert [tune.t_bucket(T) for T in (1, 577, 600, 2048)] == [128, 1024, 1024, 2048]
    for T in (577, 600, 577):
        assert tune._choose("fwd", fake(T), False, seen.append) == cfgs[1]
    assert timed == cfgs
    tune._choose("fwd", fake(2048), False, seen.append)
    tune._choose("fwd", fake(600), True, seen.append)  # causality is part of the key
    assert len(timed) == 3 * len(cfgs)


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


def _without_triton(code, cuda=False):
    """Runs `code` in a fresh Python where `import triton` fails (and, if cuda, a GPU seems present)."""
    prefix = "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
    if cuda:
        prefix += "import torch; torch.cuda.is_available = lambda: True\n"
    r = subprocess.run([sys.executable, "-c", prefix + code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def test_imports_and_falls_back_without_triton():
    """With triton unimportable, kernels imports silently and attention/norm use PyTorch."""
    r = _without_triton(
        "import torch, kernels\n"
        "from kernels.flash import HAS_TRITON; assert not HAS_TRITON\n"
        "q = torch.randn(1, 2, 5, 16)\n"
        "o = kernels.attention(q, q, q, 'causal')\n"
        "y = kernels.norm(torch.randn(3, 8), torch.ones(8), 1e-5)\n"
        "assert o.shape == q.shape and y.shape == (3, 8)\n"
        "try:\n    kernels.use('triton')\nexcept ValueError:\n    pass\n"
        "else:\n    raise AssertionError('use(triton) should raise without triton')\n"
    )
    assert r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)


def test_dispatcher_falls_back_to_sdpa(spies):
    """Head dims the kernel lacks and B * H past the grid's limit go to SDPA instead of raising;
    fp32 on CUDA does too (checked on a stand-in: no CUDA tensor here)."""
    kernels.use("triton")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 9, 80, generator=g).to(DEVICE) for _ in range(3))  # D = 80
    _check_close(["D=80"], [kernels.attention(q, k, v, "causal")], [attention_ref(q, k, v, True)], atol=1e-5)
    q = torch.randn(65536, 1, 2, 16, generator=g).to(DEVICE)  # B * H = 65536
    _check_close(["B*H=65536"], [kernels.attention(q, q, q, None)], [attention_ref(q, q, q)], atol=1e-5)
    assert spies["flash_attention"] == 0
    with pytest.raises(ValueError, match="head dims"):
        flash_attention(*(torch.randn(1, 1, 4, 80).to(DEVICE) for _ in range(3)))
    with pytest.raises(ValueError, match="B \\* H"):
        flash_attention(q, q, q)
    cuda = lambda dtype: types.SimpleNamespace(is_cuda=True, dtype=dtype)
    assert not kernels._flash_serves(cuda(torch.float32), None, None)
    small = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
    assert kernels._flash_serves(small, small, small)


def test_warns_once_when_triton_fails_on_a_gpu_machine():
    r = _without_triton("import warnings; warnings.simplefilter('always')\n"
                        "import torch, kernels\n"
                        "kernels.norm(torch.randn(3, 8), torch.ones(8), 1e-5)\n"
                        "kernels.attention(*(torch.randn(1, 2, 5, 16) for _ in range(3)), 'causal')\n",
                        cuda=True)
    assert r.stderr.count("triton failed to import") == 1 and "use PyTorch" in r.stderr, r.stderr


# ------------------------------------------------------------------------ compile report

@pytest.fixture(scope="module")
def compile_report(tmp_path_factory):
    """`python -m kernels.report` (every kernel for sm_90 and sm_80, bf16): its rows as dicts."""
    out = tmp_path_factory.mktemp("report") / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-m", "kernels.report", "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if r.returncode == 3:  # the report's own word that this machine cannot compile for a GPU
        pytest.skip(r.stdout.strip().splitlines()[-1])
    assert out.exists(), f"kernels.report exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_compile_report_covers_every_kernel(compile_report):
    from kernels.report import ARCHS, NORM_WIDTHS, SHAPES
    seen = {(r["arch"], r["shape"], r["kernel"], r["config"]) for r in compile_report}
    assert len(seen) == len(compile_report)
    for arch in ARCHS:
        for name, B, H, T, D, causal in SHAPES:
            for kernel in tune.CANDIDATES:
                for cfg in tune.candidates(kernel, D, arch=arch):
                    assert (arch, name, kernel, ",".join(map(str, cfg))) in seen
            assert any(r["arch"] == arch and r["shape"] == name and r["kernel"] == "delta" for r in compile_report)
        for N in NORM_WIDTHS:
            assert {r["kernel"] for r in compile_report if r["arch"] == arch and r["shape"] == f"8192x{N}"} == \
                {"rmsnorm_fwd", "rmsnorm_bwd"}


def test_compile_report_no_spills_and_fits_an_sm(compile_report):
    for r in compile_report:
        assert r["spill"] == 0, f"{r['arch']} {r['shape']} {r['kernel']} ({r['config']}) spills {r['spill']} bytes"
        assert r["blocks"] >= 1, f"{r} does not fit one SM"


def test_compile_report_no_duplicated_matmul_work(compile_report):
    """Tensor-core multiply-adds issued per tile, from the SASS instruction shapes and counts (HGMMA m x n x k
    once per warp group, HMMA.16816 = m16n8k16 once per warp), equal what the tile's matmuls need."""
    from kernels.report import MATMULS_PER_TILE, SHAPES
    shapes = {name: D for name, B, H, T, D, causal in SHAPES}
    for r in compile_report:
        warps = int(r["config"].split(",")[2])
        issued = 0
        for instr, n in r["tc"].items():
            if instr.startswith("HGMMA."):
                m, nn, k = map(int, instr.split(".")[1].split("x"))
                issued += n * m * nn * k * (warps // 4)
            else:
                assert instr == "HMMA.16816", instr  # bf16 on sm_80 and below: m16n8k16
                issued += n * 16 * 8 * 16 * warps
        where = f"{r['arch']} {r['shape']} {r['kernel']} ({r['config']}): {r['tc']}"
        if r["kernel"] not in MATMULS_PER_TILE:
            assert issued == 0, where
            continue
        bm, bn = map(int, r["config"].split(",")[:2])
        needed = MATMULS_PER_TILE[r["kernel"]] * bm * bn * shapes[r["shape"]]
        assert issued == needed * r["loops"], f"{where}: {issued / r['loops'] / needed:.2f}x the work a tile needs"


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures on a GPU; this checks the no-GPU path")
def test_bench_without_a_gpu_says_so():
    r = subprocess.run([sys.executable, "-m", "kernels.bench"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "no CUDA GPU here" in r.stdout, (r.stdout, r.stderr)
