"""train.py on a small world: two processes equal one, frozen weights stay put, kill -9 resumes step for
step, SIGTERM saves, a NaN stops with the last good checkpoint named, the export loads in transformers."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from conftest import ROOT, SMALL, run


pytestmark = pytest.mark.slow  # whole training runs under torchrun


def train(world, out, *extra):
    return run([sys.executable, "train.py", "--data", world, "--out", out, *SMALL, *extra])


def losses(out):
    return [(r["stage"], r["step"], r["loss"]) for r in map(json.loads, open(out / "log.jsonl"))]


def test_two_processes_equal_one_and_frozen_weights_stay(tiny_world, trained, tmp_path):
    one, two = tmp_path / "one", trained  # `trained`: the same run under torchrun with two processes
    train(tiny_world, one, "--max-steps", "4")
    a, b = losses(one), losses(two)
    assert [x[:2] for x in a] == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (2, 3), (2, 4)]
    for (s, i, la), (_, _, lb) in zip(a, b):
        assert abs(la - lb) <= 1e-4 * abs(la), f"stage {s} step {i}: one process {la}, two processes {lb}"
    # the tower is frozen in both stages: bit-identical to the CLIP checkpoint it started from
    clip = load_file(tiny_world.parent / "base" / "clip" / "model.safetensors")
    model = load_file(two / "stage2" / "model" / "model.safetensors")
    for k, v in clip.items():
        assert torch.equal(model["vision_tower." + k], v), f"frozen tower weight {k} changed"
    # stage 1 trains the projector alone: its checkpoint holds nothing else
    meta = FileSystemReader(str(two / "stage1" / "ckpt" / "step_0000004")).read_metadata()
    trained = [k for k in meta.state_dict_metadata if k.startswith("model.")]
    assert trained and all(k.startswith("model.multi_modal_projector.") for k in trained), trained


def test_loss_falls_in_both_stages(tiny_world, tmp_path):
    """Five epochs of one global batch (the same 8 rows each step): each stage's loss falls."""
    world, manifest = tiny_world.parent, json.loads(tiny_world.read_text())
    small = {"clip": str(world / manifest["clip"]), "vicuna": str(world / manifest["vicuna"])}
    for stage in ("stage1", "stage2"):
        rows = json.loads((world / manifest[stage]["data"]).read_text())[:8]
        (tmp_path / f"{stage}.json").write_text(json.dumps(rows))
        small[stage] = {"data": str(tmp_path / f"{stage}.json"), "image_root": str(world / manifest[stage]["image_root"])}
    (tmp_path / "manifest.json").write_text(json.dumps(small))
    train(tmp_path / "manifest.json", tmp_path / "out", "--epochs1", "5", "--epochs2", "5", "--lr1", "1e-3", "--lr2", "1e-3")
    for stage in (1, 2):
        curve = [loss for s, _, loss in losses(tmp_path / "out") if s == stage]
        assert len(curve) == 5 and curve[-1] < 0.9 * curve[0], f"stage {stage} loss did not fall: {curve}"


def test_kill_9_resumes_step_for_step_and_sigterm_saves(tiny_world, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    args = ["--stage", "1", "--max-steps", "6", "--save-every", "2"]
    train(tiny_world, ref, *args)
    cmd = [sys.executable, "train.py", "--data", tiny_world, "--out", killed, *SMALL, *args]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)  # mid-run, possibly mid-save
    p.wait()
    assert (killed / "stage1" / "ckpt" / "latest").exists()
    run(cmd)
    assert losses(killed) == losses(ref), "the resumed run's losses differ from the uninterrupted run's"
    # SIGTERM: saves and exits cleanly, and the rerun finishes
    term = tmp_path / "term"
    cmd = [sys.executable, "train.py", "--data", tiny_world, "--out", term, *SMALL, "--stage", "1", "--max-steps", "12", "--save-every", "100"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not ((term / "log.jsonl").exists() and (term / "log.jsonl").read_text()):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and "SIGTERM, saved step" in out, out[-2000:]
    step = int((term / "stage1" / "ckpt" / "latest").read_text().split("_")[1])
    assert 1 <= step < 12
    run(cmd)
    assert [r[1] for r in losses(term)] == list(range(1, 13))


def test_nan_loss_stops_naming_last_good_checkpoint(tiny_world, tmp_path):
    p = subprocess.run([sys.executable, "train.py", "--data", tiny_world, "--out", tmp_path, *SMALL, "--stage", "1",
                        "--max-steps", "8", "--save-every", "1", "--lr1", "1e30", "--warmup-ratio", "0"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0
    assert "the loss is nan" in p.stderr or "the loss is inf" in p.stderr, p.stderr[-2000:]
    assert "The last good checkpoint is" in p.stderr and "step_" in p.stderr, p.stderr[-2000:]


def test_export_loads_in_transformers_with_same_logits(trained):
    transformers = pytest.importorskip("transformers")
    from nanollava import LLaVA
    from nanollava.llava import expand_image_tokens
    d = trained / "stage2" / "model"
    ours = LLaVA.from_pretrained(d)
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(d).eval()
    P = ours.config.vision.num_patches
    ids = torch.tensor([[1, 5, ours.image_token_id, 7, 8, 9]])
    hf_ids = expand_image_tokens(ids, ours.image_token_id, P).input_ids  # llava-hf repeats <image> P times
    px = torch.randn(1, 3, ours.config.vision.image_size, ours.config.vision.image_size)
    with torch.no_grad():
        d_max = (ours(ids, px) - theirs(input_ids=hf_ids, pixel_values=px).logits).abs().max()
    assert d_max <= 1e-4, f"exported model: nanollava vs transformers logits differ by {d_max}"
