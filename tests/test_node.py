"""The GPU node's path, as far as a CPU tests it: the loop's collectives through a group that refuses host tensors
as NCCL does (two processes), an all-bad stage-1 micro-batch, the micro-batch fitted to the world size before
anything loads, DataLoader workers that outlive SIGTERM, the shared --out check, and the FLOPs behind MFU
against torch's FlopCounterMode."""
import json
import os
import signal
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, run
from node_worker import register_like_nccl


pytestmark = pytest.mark.slow  # two processes under torchrun


def test_like_nccl_refuses_host_tensors():
    """The stand-in is faithful: a group with the accelerator's backend alone (torch 2.13's default on a GPU) refuses
    a CPU tensor with NCCL's error, which is how every GPU run used to crash at its first step."""
    register_like_nccl()
    dist.init_process_group("cuda:likenccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.ones(2))
    finally:
        dist.destroy_process_group()


def test_loop_collectives_through_a_group_like_nccl(tiny_world, tmp_path):
    """Two ranks whose group is made as on a GPU node, its accelerator backend refusing host tensors: a stage-1 step
    where rank 1's micro-batch had only bad samples, and stage-2 steps with two micro-batches per rank (unclipped and
    clipped), each equal (loss and every trained weight after an SGD step) to the same step in plain PyTorch on one
    process."""
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/node_worker.py", tiny_world, tmp_path])
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank_{rank}.json").read_text())
        assert "is not the same directory on every node" in seen["not_shared"], seen
        assert seen["stage2_clipped"]["grad_norm"] > 1, "the clipped step did not clip"
        for stage in ("stage1", "stage2", "stage2_clipped"):
            s = seen[stage]
            assert abs(s["loss"] - s["reference"]) <= 1e-5 * abs(s["reference"]), f"rank {rank} {stage}: loss {s['loss']} vs reference {s['reference']}"
            assert s["max_diff"] <= 1e-6, f"rank {rank} {stage}: weights after the step differ from the reference's by {s['max_diff']} ({s.get('worst')})"
        assert seen["stage2"]["n_params"] > 4, "stage 2 compared the projector alone"
        assert min(seen["moved"]) > 1e-3, f"the reference step barely moved the weights ({seen['moved']}): the comparison shows nothing"


def test_micro_batch_fitted_to_the_world_before_loading(tmp_path):
    from nanollava.recipes import RECIPES, StageRecipe, fit_micro_batch
    r7 = RECIPES["llava-1.5-7b"]
    assert fit_micro_batch(1, r7.stage1, 16).micro_batch == 16  # 256 = 16 x 16 x 1, not 32 x 16
    assert fit_micro_batch(2, r7.stage2, 16).micro_batch == 8   # 128 = 8 x 16 x 1
    assert fit_micro_batch(2, r7.stage2, 8).micro_batch == 16   # the design card's node: unchanged
    assert fit_micro_batch(1, RECIPES["world"].stage1, 8).micro_batch == 4  # 32 = 4 x 8
    assert fit_micro_batch(1, StageRecipe(lr=1, batch=12, epochs=1, micro_batch=5), 2).micro_batch == 3  # 4 and 5 do not divide 6
    assert "not a multiple of the 3 processes" in fit_micro_batch(1, RECIPES["world"].stage1, 3)
    # train.py says so before it reads the manifest (absent here), i.e. before any rank loads a model
    env = {**os.environ, "WORLD_SIZE": "3"}
    p = __import__("subprocess").run([sys.executable, "train.py", "--data", tmp_path / "absent.json"], cwd=ROOT, env=env,
                                     capture_output=True, text=True)
    assert p.returncode == 2 and "global batch 32 is not a multiple of the 3 processes" in p.stderr, p.stderr[-2000:]


def test_save_interval_is_the_recipes():
    import train
    recipe = train.recipe_from_args(train.parser.parse_args(["--recipe", "llava-1.5-13b"]))
    assert (recipe.stage1.save_every, recipe.stage2.save_every) == (500, 1000)
    assert train.parser.parse_args([]).save_every is None  # the flag, when given, replaces both
    assert train.recipe_from_args(train.parser.parse_args([])).stage1.save_every == 50


class Terminated(torch.utils.data.Dataset):
    """Each item sends SIGTERM to its own worker, as torchrun's SIGTERM to the process group reaches the workers."""
    def __len__(self):
        return 3

    def __getitem__(self, i):
        os.kill(os.getpid(), signal.SIGTERM)
        return i


def test_dataloader_workers_outlive_sigterm():
    from nanollava.fsdp import ignore_sigterm
    loader = torch.utils.data.DataLoader(Terminated(), batch_size=1, num_workers=1, worker_init_fn=ignore_sigterm)
    assert [int(x) for x in loader] == [0, 1, 2]


def test_step_flops_against_torch_flop_counter():
    """The matmul FLOPs of a forward and backward, counted by torch's FlopCounterMode, equal flop_parts' in both
    stages (CPU attention is not counted by FlopCounterMode, so the attention parts are checked by hand)."""
    import kernels
    from torch.utils.flop_counter import FlopCounterMode
    from nanollava import LLaVA, LLaVAConfig, LlamaConfig, ViTConfig
    from nanollava.flops import flop_parts, peak_flops
    torch.manual_seed(0)
    cfg = LLaVAConfig(ViTConfig(image_size=28, patch_size=14, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                num_attention_heads=2), LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                num_hidden_layers=2, num_attention_heads=2), image_token_id=127, pad_token_id=126)
    model = LLaVA(cfg)
    model.vision_tower.requires_grad_(False)
    ids = torch.tensor([[1, 5, 127, 9, 10, 11, 12], [1, 127, 20, 21, 22, 23, 24]])
    labels = ids.clone()
    labels[:, :3] = -100
    px = torch.randn(2, 3, 28, 28)
    T = 7 + 4 - 1  # each <image> becomes P = 4 features
    kernels.use("torch")
    try:
        for stage in (2, 1):
            model.language_model.requires_grad_(stage == 2)
            with FlopCounterMode(display=False) as counter:
                model(ids, px, labels=labels).backward()
            parts = flop_parts(cfg, stage, tokens=2 * T, sq_tokens=2 * T ** 2, supervised=int((labels[:, 1:] != -100).sum()), images=2)
            ours = parts["lm_weights"] + parts["tower_weights"] + parts["projector"]
            assert ours == counter.get_total_flops(), f"stage {stage}: flop_parts {ours}, FlopCounterMode {counter.get_total_flops()}"
    finally:
        kernels.use("auto")
    # causal LM attention: QK^T and AV over half the T x T square, 2 FLOPs a multiply-add, x3 with backward
    assert parts["lm_attention"] == 3 * 2 * 2 * (T * T / 2) * 64 * 2 * 2
    assert parts["tower_attention"] == 2 * 2 * 2 * 5 * 5 * 64 * 2  # 2 layers run, 5 positions, full square, forward only
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Tesla T4") is None
