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


def released_config(version, text, mm_hidden_size):
    """config.json of an official liuhaotian LLaVA checkpoint with the key set as released (REFERENCE.md and
    REFERENCE-NEXT.md D, A2): model_type "llava" as llava-hf's, the Llama keys at the top level, no text_config.
    text: the tiny Llama's sizes, which replace the 7B ones."""
    llama = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "bos_token_id": 1, "eos_token_id": 2,
             "hidden_act": "silu", "initializer_range": 0.02, "pad_token_id": 0, "pretraining_tp": 1, "rope_scaling": None,
             "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True, "num_key_value_heads": text["num_attention_heads"]}
    mm = {"mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": mm_hidden_size, "mm_vision_select_layer": -2,
          "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": False,
          "freeze_mm_mlp_adapter": False, "use_mm_proj": True}
    if version == "1.0":  # LLaVA-Lightning-7B-delta-v1-1: linear projector, <im_start>/<im_end>, 224 px tower
        mm.update(mm_vision_tower="openai/clip-vit-large-patch14", mm_use_im_start_end=True, transformers_version="4.28.0.dev0")
        del mm["mm_use_im_patch_token"]
        llama.update(max_sequence_length=2048, rms_norm_eps=1e-6)
    elif version == "1.5":  # liuhaotian/llava-v1.5-7b
        mm.update(mm_projector_type="mlp2x_gelu", mm_vision_select_feature="patch", image_aspect_ratio="pad",
                  tokenizer_model_max_length=2048, tokenizer_padding_side="right", transformers_version="4.31.0")
    elif version == "1.6":  # liuhaotian/llava-v1.6-vicuna-7b
        mm.update(mm_projector_type="mlp2x_gelu", mm_vision_select_feature="patch", image_aspect_ratio="anyres",
                  mm_patch_merge_type="spatial_unpad", unfreeze_mm_vision_tower=True, mm_vision_tower_lr=2e-6,
                  mm_projector_lr=None, image_crop_resolution=224, image_split_resolution=224,
                  image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                  tokenizer_model_max_length=4096, tokenizer_padding_side="right", transformers_version="4.36.2")
    return {**llama, **text, **mm}
