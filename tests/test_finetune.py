"""train.py as a fine-tune (nanollava/finetune.py): stage 2 from --init (a released LLaVA) in full or with LoRA,
from --projector (an official mm_projector.bin), on a LLaVA data file; two processes equal one, kill -9 resumes,
the frozen base stays bit-identical, PEFT on transformers' Llava equals the merged export, bad input exits 2."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from conftest import ROOT, SMALL, run
from test_train import losses

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def tune(world, out, *extra, launcher=(sys.executable,)):
    return [*launcher, "train.py", "--data", world, "--out", out, *SMALL, "--stage", "2", *extra]


@pytest.fixture(scope="module")
def data_file(tiny_world, tmp_path_factory):
    """The tiny world's stage-2 rows as one LLaVA JSON file (absolute paths), as users have their data."""
    world, manifest = tiny_world.parent, json.loads(tiny_world.read_text())
    d = tmp_path_factory.mktemp("custom")
    (d / "train.json").write_text((world / manifest["stage2"]["data"]).read_text())
    return d / "train.json", world / manifest["stage2"]["image_root"]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_two_processes_equal_one_from_init(trained, data_file, tmp_path, lora):
    init = trained / "stage2" / "model"
    data, images = data_file
    extra = ["--init", init, "--image-root", images, "--max-steps", "3", "--lr2", "1e-3"]
    extra += ["--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.0", "--projector-lr", "1e-4"] if lora else []
    run(tune(data, tmp_path / "one", *extra))
    run(tune(data, tmp_path / "two", *extra, launcher=TORCHRUN))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [x[:2] for x in a] == [(2, 1), (2, 2), (2, 3)] and a[-1][2] != a[0][2]
    for (_, i, la), (_, _, lb) in zip(a, b):
        assert abs(la - lb) <= 1e-4 * abs(la), f"step {i}: one process {la}, two processes {lb}"
    base, out = load_file(init / "model.safetensors"), load_file(tmp_path / "two" / "stage2" / "model" / "model.safetensors")
    assert set(base) == set(out)
    meta = FileSystemReader(str(tmp_path / "two" / "stage2" / "ckpt" / "step_0000003")).read_metadata()
    saved = {k for k in meta.state_dict_metadata if k.startswith("model.")}
    if not lora:  # the LM learns in full, the tower not at all
        assert not torch.equal(base["multi_modal_projector.linear_1.weight"], out["multi_modal_projector.linear_1.weight"])
        assert all(torch.equal(v, out[k]) for k, v in base.items() if k.startswith("vision_tower."))
        return
    # the checkpoint holds the trainable state only: A, B and the projector
    assert saved and all(".lora_" in k or k.startswith("model.multi_modal_projector.") for k in saved), sorted(saved)[:5]
    # the base weights the adapters do not touch are bit-identical after the run; the targets are base + (alpha/r) B A
    adapter = load_file(tmp_path / "two" / "stage2" / "adapter" / "adapter_model.safetensors")
    targets = 0
    for k, v in base.items():
        name = k.removeprefix("language_model.model.").removesuffix(".weight")  # the file: llava-hf hub keys
        a_key = f"base_model.model.model.language_model.{name}.lora_A.weight"
        if a_key in adapter:
            delta = adapter[a_key.replace("lora_A", "lora_B")] @ adapter[a_key] * 2.0
            assert (out[k] - v - delta).abs().max() <= 1e-6, k
            targets += 1
        elif not k.startswith("multi_modal_projector."):
            assert torch.equal(v, out[k]), f"frozen base weight {k} changed"
    assert targets == 7 * 2 and adapter["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"].abs().sum() > 0
    # PEFT on transformers' Llava of the --init model with OUT/stage2/adapter is the merged export
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    from nanollava.llava import expand_image_tokens
    ours = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "two" / "stage2" / "model").eval()
    theirs = peft.PeftModel.from_pretrained(transformers.LlavaForConditionalGeneration.from_pretrained(init),
                                            tmp_path / "two" / "stage2" / "adapter").eval()
    cfg = ours.config
    ids = expand_image_tokens(torch.tensor([[1, 5, cfg.image_token_index, 7, 8, 9]]), cfg.image_token_index, cfg.image_seq_length).input_ids
    px = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    with torch.no_grad():
        d = (ours(input_ids=ids, pixel_values=px).logits - theirs(input_ids=ids, pixel_values=px).logits).abs().max()
    assert d <= 1e-4, f"PEFT with the adapter vs the merged export: logits differ by {d}"


def test_lora_kill_9_resumes_step_for_step(trained, tiny_world, tmp_path):
    args = ["--init", trained / "stage2" / "model", "--lora-r", "4", "--max-steps", "5", "--save-every", "1", "--grad-checkpointing"]
    run(tune(tiny_world, tmp_path / "ref", *args))
    cmd = tune(tiny_world, tmp_path / "killed", *args)
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = tmp_path / "killed" / "log.jsonl", time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    run(cmd)
    assert losses(tmp_path / "killed") == losses(tmp_path / "ref"), "the resumed LoRA run's losses differ"


def test_lr_0_from_official_projector_exports_that_projector(tiny_world, tmp_path):
    world, manifest = tiny_world.parent, json.loads(tiny_world.read_text())
    vision = json.loads((world / manifest["clip"] / "config.json").read_text())
    text = json.loads((world / manifest["vicuna"] / "config.json").read_text())
    dv, dt = vision.get("vision_config", vision)["hidden_size"], text["hidden_size"]
    g = torch.Generator().manual_seed(3)
    official = {"model.mm_projector.0.weight": torch.randn(dt, dv, generator=g), "model.mm_projector.0.bias": torch.randn(dt, generator=g),
                "model.mm_projector.2.weight": torch.randn(dt, dt, generator=g), "model.mm_projector.2.bias": torch.randn(dt, generator=g)}
    torch.save(official, tmp_path / "mm_projector.bin")
    run(tune(tiny_world, tmp_path / "out", "--projector", tmp_path / "mm_projector.bin", "--lr2", "0", "--max-steps", "1"))
    out = load_file(tmp_path / "out" / "stage2" / "model" / "model.safetensors")
    for old, new in (("0", "linear_1"), ("2", "linear_2")):
        for p in ("weight", "bias"):
            assert torch.equal(out[f"multi_modal_projector.{new}.{p}"], official[f"model.mm_projector.{old}.{p}"]), (new, p)


def test_bad_input_is_one_sentence_exit_2_nothing_written(tiny_world, data_file, tmp_path):
    world, manifest = tiny_world.parent, json.loads(tiny_world.read_text())
    data, images = data_file
    torch.save({"model.mm_projector.0.weight": torch.zeros(3, 3)}, tmp_path / "shape.bin")
    torch.save({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}, tmp_path / "keys.bin")
    bad_rows = tmp_path / "bad.json"
    bad_rows.write_text(json.dumps([{"id": 1, "image": "nope.png", "conversations": [{"from": "human", "value": "hi"},
                                                                                     {"from": "gpt", "value": "yo"}]},
                                    {"id": 2, "conversations": [{"from": "gpt", "value": "no question"}]}]))
    cases = {  # flags -> what the sentence must name
        "plain vicuna": (["--init", world / manifest["vicuna"]], "plain Vicuna"),
        "projector shape": (["--projector", tmp_path / "shape.bin"], "model.mm_projector.0.weight has shape"),
        "projector keys": (["--projector", tmp_path / "keys.bin"], "model.layers.0.mlp.up_proj.weight is not a projector weight"),
        "lora stage 1": (["--lora-r", "8", "--stage", "1"], "--stage is 1"),
        "rows all fail": (["--data", bad_rows, "--image-root", images, "--vision-tower", world / manifest["clip"],
                                   "--language-model", world / manifest["vicuna"]], "2 rows, 0 used, 2 skipped"),
        "no image root": (["--data", data, "--vision-tower", world / manifest["clip"], "--language-model", world / manifest["vicuna"]], "--image-root"),
    }
    for name, (flags, words) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        p = subprocess.run(tune(tiny_world, out, *flags), cwd=ROOT, capture_output=True, text=True)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and words in lines[0], (name, p.returncode, p.stderr[-1500:])
        assert not out.exists(), f"{name}: {out} was written"
