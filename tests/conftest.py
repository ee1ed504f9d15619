"""Shared test setup: the repo root on sys.path, Triton's interpreter on CPU, the fixtures folder."""
import os
import sys
from pathlib import Path

import pytest

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before kernels/ is imported.
# On a GPU machine run the suite with TRITON_INTERPRET=0 to test the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The interpreter runs each Triton program's small matmuls through numpy: OpenBLAS threads only fight over 2 cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # transformers is only an oracle here: keep its chatter out

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT.parent / "shared" / "fixtures"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (torchrun, a browser, the kernel compiler); "
                            "CI runs them, `-m 'not slow'` skips them locally")


@pytest.fixture
def sp_model_path():
    """The real Llama-2 / Vicuna tokenizer.model, or a skip naming why it is missing."""
    path = FIXTURES / "llama2-tokenizer.model"
    if not path.exists():
        pytest.skip(f"fixture {path} is absent (it ships in ../shared/fixtures beside the repo)")
    return path


def run(cmd, **kw):
    """Runs a nanollava script; on failure the assertion shows its output."""
    import subprocess
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small world made by prepare.py (shared by the training, sampling and end-to-end tests): its manifest."""
    root = tmp_path_factory.mktemp("world")
    run([sys.executable, "prepare.py", "--root", root, "--n-train", "160", "--n-eval", "12", "--n-text", "16",
         "--vit-steps", "10", "--llm-steps", "60", "--llm-batch", "16", "--seed", "0"])
    return root / "world" / "manifest.json"


SMALL = ["--batch1", "8", "--batch2", "8", "--micro-batch", "4", "--max-len", "256"]  # a few seconds a stage


@pytest.fixture(scope="session")
def trained(tiny_world, tmp_path_factory):
    """Both stages, 4 steps each, two processes under torchrun (gloo), on the tiny world: the output directory."""
    out = tmp_path_factory.mktemp("trained")
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
         "--data", tiny_world, "--out", out, "--max-steps", "4", *SMALL])
    return out
