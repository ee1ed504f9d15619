"""LoRA against PEFT: the layer (output and gradients), adapters nanollava writes loaded by PEFT on transformers'
Llava, adapters PEFT writes loaded by sample.py --adapter, merge and unmerge, and adapters that do not fit."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers import LlavaForConditionalGeneration

import sample
from conftest import ROOT
from nanollava import lora
from nanollava.checkpoint import CheckpointError
from nanollava.templates import SYSTEM
from nanollava.llama import LlamaConfig
from nanollava.llava import LLaVA, LLaVAConfig
from nanollava.tokenizer import train_tokenizer
from nanollava.vit import ViTConfig
from oracles import close

Q = "What color is the star?"
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random nanollava checkpoint in llava-hf layout with its own small tokenizer, and an image beside it."""
    d = tmp_path_factory.mktemp("base")
    tok = train_tokenizer([SYSTEM, "USER: ASSISTANT: " + Q, "There is a red circle at the top left."] * 4, 340)
    tok.add_special_tokens(["<image>", "<pad>"])
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # GQA: k/v narrower
    vision = ViTConfig(image_size=42, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    model = LLaVA(LLaVAConfig(vision, text, image_token_id=tok.image_id, pad_token_id=tok.pad_id))
    with torch.no_grad():  # larger weights than the init: more varied greedy answers
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    model.save_pretrained(d)
    tok.save(d)
    Image.fromarray((torch.rand(50, 30, 3) * 255).byte().numpy()).save(d / "noise.png")
    return d


def trained_adapter(model, seed):
    """Random A, B and projector, as after some training (B starts at zero, which would hide a wrong B)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.3 if "lora_" in n else 0.05))


def hf_inputs(model, tok, pre, image):
    """nanollava's prompt for one image and the same ids as transformers' Llava takes them (one <image> per patch)."""
    ids, _, px = sample.encode(model, tok, pre, [(image, Q)])
    row = ids[0].tolist()
    i = row.index(model.image_token_id)
    hf_ids = torch.tensor([row[:i] + [model.image_token_id] * model.config.vision.num_patches + row[i + 1:]])
    return ids, hf_ids, px


def test_layer_equals_peft_output_and_gradients():
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear
    torch.manual_seed(0)
    linear = nn.Linear(48, 40)
    torch.manual_seed(1)
    ours = lora.LoRALinear(copy.deepcopy(linear), r=8, alpha=16, dropout=0.3)
    torch.manual_seed(1)
    theirs = PeftLinear(copy.deepcopy(linear), "default", LoraConfig(r=8, lora_alpha=16, lora_dropout=0.3), r=8, lora_alpha=16)
    A, B = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
    assert torch.equal(ours.lora_A.weight, A) and not ours.lora_B.weight.any(), "init differs from PEFT's (seeded alike)"
    bound = 1 / 48 ** 0.5  # Kaiming-uniform with a = sqrt(5): uniform in +-1/sqrt(in)
    assert ours.lora_A.weight.abs().max() <= bound and ours.lora_A.weight.abs().max() > 0.9 * bound
    with torch.no_grad():
        B.normal_()
        ours.lora_B.weight.copy_(B)
    for m in (ours, theirs):
        m.weight.requires_grad_(False)
        m.bias.requires_grad_(False)
    x = torch.randn(3, 5, 48)
    up = torch.randn(3, 5, 40)
    results = []
    for m, a, b in ((ours, ours.lora_A.weight, ours.lora_B.weight), (theirs, A, B)):
        m.train()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(2)  # the same dropout mask on both sides
        y = m(xi)
        y.backward(up)
        results.append((y.detach(), a.grad, b.grad, xi.grad))
    for what, o, t in zip(("output", "grad A", "grad B", "grad x"), *results):
        close(o, t, 1e-6, f"LoRALinear vs PEFT's lora.Linear, {what}")
    with torch.no_grad():
        m.eval()
        close(ours.eval()(x), theirs(x), 1e-6, "eval mode (no dropout)")


def test_inject_leaves_the_vision_tower_and_trains_only_lora_and_projector(base):
    model = lora.inject(LLaVA.from_pretrained(base), r=4, alpha=8)
    names = lora.mark_trainable(model)
    layers = lora.lora_layers(model)
    assert len(layers) == 7 * 2 and all(n.startswith("language_model.layers.") for n in layers)
    assert not any("vision_tower" in n for n, _ in model.named_modules() if "lora" in n)
    assert {n for n in names if not n.startswith("multi_modal_projector.")} == \
        {f"{n}.lora_{s}.weight" for n in layers for s in "AB"}
    assert {n for n in names if n.startswith("multi_modal_projector.")} == \
        {n for n, _ in model.multi_modal_projector.named_parameters(prefix="multi_modal_projector")}
    k = model.language_model.layers[0].self_attn.k_proj
    assert (k.lora_A.weight.shape, k.lora_B.weight.shape) == ((4, 64), (32, 4))  # GQA: 2 kv heads of 16


def test_merge_then_unmerge_gives_the_base_weights_back(base):
    model = lora.inject(LLaVA.from_pretrained(base), r=4, alpha=8)
    lora.mark_trainable(model)
    trained_adapter(model, 1)
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    ids = torch.tensor([[1, 5, model.image_token_id, 7, 8]])
    px = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        unmerged = model(ids, px)
        lora.merge(model)
        merged = model(ids, px)
        lora.unmerge(model)
    close(merged, unmerged, 1e-4, "logits with the adapter merged vs applied beside the base")
    changed = [n for n, p in model.named_parameters() if n in before and "language_model.layers" in n and "proj" in n]
    assert len(changed) == 14
    for n, p in model.named_parameters():
        if n in before:
            close(p, before[n], 1e-6, f"{n} after merge and unmerge")
    lora.merge(model)
    assert (model.language_model.layers[1].mlp.down_proj.weight - before["language_model.layers.1.mlp.down_proj.weight"]).abs().max() > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients(base):
    model = lora.inject(LLaVA.from_pretrained(base), r=4, alpha=8, dropout=0.2).train()
    lora.mark_trainable(model)
    trained_adapter(model, 2)
    ids = torch.tensor([[1, 5, model.image_token_id, 7, 8, 9, 10]])
    px = torch.randn(1, 3, 42, 42)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.language_model.grad_checkpointing = ckpt
        torch.manual_seed(3)
        model(ids, px, labels=ids).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        close(grads[1][n], grads[0][n], 1e-6, f"gradient of {n} with checkpointing vs without")


def test_nanollava_adapter_loads_in_peft_on_transformers_llava(base, tmp_path):
    model = lora.inject(LLaVA.from_pretrained(base), r=4, alpha=8, dropout=0.05)
    lora.mark_trainable(model)
    trained_adapter(model, 4)
    lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["modules_to_save"]) == (4, 8, 0.05, ["multi_modal_projector"])
    hf = LlavaForConditionalGeneration.from_pretrained(base).eval()
    tok, pre = sample.load(base)[1:]
    ids, hf_ids, px = hf_inputs(model, tok, pre, base / "noise.png")
    with torch.no_grad():
        plain = hf(input_ids=hf_ids, pixel_values=px).logits
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    wrapped = [n for n, m in theirs.named_modules() if n.endswith(".lora_A")]
    assert len(wrapped) == 14 and not any("vision_tower" in n for n in wrapped), wrapped
    merged = lora.unload(model).eval()
    assert not lora.lora_layers(merged) and all("lora" not in k for k in merged.state_dict())
    with torch.no_grad():
        ref = theirs(input_ids=hf_ids, pixel_values=px).logits
        close(merged(ids, px), ref, 1e-4, "nanollava merged vs PEFT on transformers' Llava")
    assert (ref - plain).abs().max() > 0.1, "the adapter changes nothing: the comparison would not see a wrong one"


def test_peft_adapter_gives_the_same_greedy_text_through_sample_py(base, tmp_path):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(5)
    hf = LlavaForConditionalGeneration.from_pretrained(base).eval()
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=PEFT_TARGETS, exclude_modules=r".*vision_tower.*",
                        modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    theirs = get_peft_model(hf, config)
    trained_adapter(theirs, 6)
    theirs.save_pretrained(tmp_path / "peft")
    theirs.eval()
    model, tok, pre = sample.load(base)
    ids, hf_ids, px = hf_inputs(model, tok, pre, base / "noise.png")
    with torch.no_grad():
        out = theirs.generate(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=px, max_new_tokens=12,
                              do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    ref = sample.until_eos(out[0, hf_ids.shape[1]:], tok.eos_id)
    plain = sample.answer(model, tok, pre, [(base / "noise.png", Q)], max_new_tokens=12)[0]
    assert ref != plain, "the adapter does not change the greedy answer: the comparison would not see a wrong one"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    p = subprocess.run([sys.executable, "sample.py", "--model", base, "--adapter", tmp_path / "peft", "--image", base / "noise.png",
                        "--prompt", Q, "--temperature", "0", "--max-new-tokens", "12"], cwd=ROOT, capture_output=True,
                       text=True, encoding="utf-8", env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == tok.decode(ref) + "\n", f"sample.py --adapter {p.stdout!r} vs PEFT's {tok.decode(ref)!r}"


def edit_adapter(src, dst, edit):
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def test_an_adapter_that_does_not_fit_is_refused_in_one_sentence(base, tmp_path):
    model = lora.inject(LLaVA.from_pretrained(base), r=4, alpha=8)
    lora.mark_trainable(model)
    good = tmp_path / "good"
    lora.save_adapter(model, good)
    q = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    cases = {  # name -> (edit of the tensors, what the sentence must say)
        "wider": (lambda t: t.update({q: torch.zeros(4, 96)}), f"{q} has shape \\(4, 96\\), this base needs \\(4, 64\\)"),
        "rank": (lambda t: t.update({q: torch.zeros(6, 64)}), f"{q} has shape \\(6, 64\\), not rank r = 4"),
        "deeper": (lambda t: t.update({q.replace("layers.0", "layers.5"): torch.zeros(4, 64)}),
                   "layers.5.self_attn.q_proj.lora_A.weight targets language_model.layers.5.self_attn.q_proj, which is not"),
        "tower": (lambda t: t.update({"base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                                      torch.zeros(4, 32)}), "targets vision_tower.layers.0.self_attn.q_proj, which is not"),
        "unpaired": (lambda t: t.pop(q.replace("lora_A", "lora_B")), "has no lora_B partner"),
        "projector": (lambda t: t.update({"base_model.model.model.multi_modal_projector.linear_1.weight": torch.zeros(64, 33)}),
                      "linear_1.weight has shape \\(64, 33\\)"),
    }
    for name, (edit, msg) in cases.items():
        d = edit_adapter(good, tmp_path / name, edit)
        with pytest.raises(CheckpointError, match=msg) as e:
            lora.load_adapter(LLaVA.from_pretrained(base), d)
        assert str(d / "adapter_model.safetensors") in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
    p = subprocess.run([sys.executable, "sample.py", "--model", base, "--adapter", tmp_path / "wider", "--prompt", Q],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.splitlines()) == 1, p.stderr
    assert "wider/adapter_model.safetensors" in p.stderr and q in p.stderr, p.stderr
