"""The models against transformers on tiny random checkpoints written in each official layout."""
import json
import os
import subprocess
import sys
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, LlamaConfig as HFLlamaConfig,
                          LlamaForCausalLM, LlavaForConditionalGeneration)

from nanollava import LLaVA, Llama, ViT
from nanollava.checkpoint import CheckpointError
from nanollava.llava import PRESETS, expand_image_tokens
from oracles import close, hf_llava, released_config, save_bin

torch.manual_seed(0)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=42,
              patch_size=14, projection_dim=32, hidden_act="quick_gelu")
TEXT = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
IMAGE_ID = 318  # inside the vocabulary, like llava-hf's <image> = 32000


hf_llava = partial(hf_llava, vision=VISION, text=TEXT, image_id=IMAGE_ID)


def prompt(model_image_id, n=9):
    """A prompt with the image in the middle, and the same prompt as llava-hf expects it (n placeholders)."""
    left, right = torch.randint(3, 300, (7,)).tolist(), torch.randint(3, 300, (5,)).tolist()
    ours = torch.tensor([[1] + left + [model_image_id] + right])
    theirs = expand_image_tokens(torch.tensor([[1] + left + [IMAGE_ID] + right]), IMAGE_ID, n).input_ids
    return ours, theirs


def test_vit_matches_clip_vision_model(tmp_path):
    hf = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    hf.save_pretrained(tmp_path / "v")
    vit = ViT.from_pretrained(tmp_path / "v")
    px = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        ref = hf(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        close(vit(px), ref, 1e-5, "ViT features vs CLIPVisionModel hidden_states[-2][:, 1:]")


def test_vit_reads_full_clip_checkpoint_bin(tmp_path):
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    hf = CLIPModel(CLIPConfig(text_config=text, vision_config=VISION)).eval()
    save_bin(hf, tmp_path / "clip")
    vit = ViT.from_pretrained(tmp_path / "clip")  # text tower dropped by the explicit list
    px = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        ref = hf.vision_model(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        close(vit(px), ref, 1e-5, "ViT from a full CLIPModel .bin")


@pytest.mark.parametrize("safe", [True, False])
def test_llama_matches_llama_for_causal_lm_sharded(tmp_path, safe):
    hf = LlamaForCausalLM(HFLlamaConfig(**TEXT)).eval()
    if safe:
        hf.save_pretrained(tmp_path / "l", max_shard_size="60KB")
        assert (tmp_path / "l" / "model.safetensors.index.json").exists()
    else:  # fp16 shards, as lmsys ships Vicuna, loaded into fp32
        save_bin(hf, tmp_path / "l", shards=2, half=True)
        hf.half().float()
    llm = Llama.from_pretrained(tmp_path / "l")
    ids = torch.randint(0, 320, (2, 33))
    with torch.no_grad():
        close(llm(ids), hf(ids).logits, 1e-4, "Llama logits vs LlamaForCausalLM")


def test_llava_hf_both_layouts_and_save_roundtrip(tmp_path):
    hf, d = hf_llava(tmp_path)
    px = torch.randn(1, 3, 42, 42)
    ours_ids, hf_ids = prompt(IMAGE_ID)
    with torch.no_grad():
        ref = hf(input_ids=hf_ids, pixel_values=px).logits
    # the same weights in the hub's layout (vision_tower.vision_model.*, language_model.model.*) and in the
    # layout transformers 4.52+ wrote (model.vision_tower.vision_model.*, model.language_model.*, lm_head.*)
    sd = load_file(d / "model.safetensors")
    tower = {k: v for k, v in sd.items() if k.startswith("vision_tower.")}
    rest = {k: v for k, v in sd.items() if not k.startswith("vision_tower.")}
    hub = {**rest, **{k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tower.items()}}
    new = {k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
           .replace("vision_tower.", "model.vision_tower.", 1).replace("multi_modal_projector.", "model.multi_modal_projector."): v
           for k, v in hub.items()}
    layouts = [d]
    for name, tensors in (("hub", hub), ("new", new)):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text((d / "config.json").read_text())
        layouts.append(tmp_path / name)
    for path in layouts:
        model = LLaVA.from_pretrained(path)
        assert model.image_token_id == IMAGE_ID
        with torch.no_grad():
            close(model(ours_ids, px), ref, 1e-4, f"LLaVA logits vs LlavaForConditionalGeneration ({path.name})")
    model.save_pretrained(tmp_path / "ours", max_shard_bytes=200_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    again = LLaVA.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        close(back(input_ids=hf_ids, pixel_values=px).logits, ref, 1e-4, "transformers loading nanollava's save")
        close(again(ours_ids, px), ref, 1e-4, "nanollava reloading its own save")


def test_official_layout_matches_official_computation(tmp_path):
    """liuhaotian layout: Vicuna's keys + model.mm_projector.{0,2}, the CLIP tower in its own directory, config.json
    with the released keys (model_type "llava", no text_config); LLaVA-1.0's is refused by name."""
    hf, _ = hf_llava(tmp_path)
    clip = tmp_path / "clip"
    hf.model.vision_tower.save_pretrained(clip)
    off = tmp_path / "official"
    off.mkdir()
    sd = {"model." + k: v for k, v in hf.model.language_model.state_dict().items()}
    sd["lm_head.weight"] = hf.lm_head.weight
    for i, lin in ((0, hf.model.multi_modal_projector.linear_1), (2, hf.model.multi_modal_projector.linear_2)):
        sd[f"model.mm_projector.{i}.weight"], sd[f"model.mm_projector.{i}.bias"] = lin.weight, lin.bias
    torch.save({k: v.detach().half() for k, v in sd.items()}, off / "pytorch_model.bin")  # fp16 pickles, as shipped
    # LLaVA-1.6 loads (tests/test_anyres.py); these 1.5 weights under its config lack the newline and the tuned tower
    for version, refused in (("1.0", "mm_projector_type is 'linear'"), ("1.6", "no tensor for model.image_newline")):
        (off / "config.json").write_text(json.dumps(released_config(version, TEXT, 64)))
        with pytest.raises(CheckpointError, match=refused):
            LLaVA.from_pretrained(off, vision_tower=clip)
    (off / "config.json").write_text(json.dumps(released_config("1.5", TEXT, 64)))  # as liuhaotian/llava-v1.5-7b ships it
    with pytest.raises(CheckpointError, match="vision_tower=DIR"):
        LLaVA.from_pretrained(off)
    model = LLaVA.from_pretrained(off, vision_tower=clip)
    assert model.image_token_id == -200
    px = torch.randn(1, 3, 42, 42)
    ids, _ = prompt(-200)
    with torch.no_grad():  # the official computation, in fp32 from the same fp16 weights
        hf.half().float()
        feats = hf.model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = hf.model.multi_modal_projector(feats)
        pos = int((ids[0] == -200).nonzero())
        emb = hf.model.language_model.embed_tokens(ids.clamp(min=0))
        emb = torch.cat([emb[:, :pos], feats, emb[:, pos + 1:]], 1)
        ref = hf.lm_head(hf.model.language_model(inputs_embeds=emb).last_hidden_state)
        close(model(ids, px), ref, 1e-4, "official LLaVA-1.5 layout vs CLIP -> projector -> Llama")



def test_plain_vicuna_or_clip_is_not_a_llava(tmp_path):
    LlamaForCausalLM(HFLlamaConfig(**TEXT)).save_pretrained(tmp_path / "vicuna")
    save_bin(LlamaForCausalLM(HFLlamaConfig(**TEXT)), tmp_path / "vicuna-bin")  # as lmsys ships it
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(tmp_path / "clip-vision")
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    save_bin(CLIPModel(CLIPConfig(text_config=text, vision_config=VISION)), tmp_path / "clip")  # as openai ships it
    for name, what in (("vicuna", "Vicuna"), ("vicuna-bin", "Vicuna"), ("clip-vision", "CLIP"), ("clip", "CLIP")):
        with pytest.raises(CheckpointError, match=f"{name} is a plain {what}.*, not a LLaVA") as e:
            LLaVA.from_pretrained(tmp_path / name)
        assert len(str(e.value).splitlines()) == 1

def test_kv_cache_decoding_equals_full_forward(tmp_path):
    hf, d = hf_llava(tmp_path)
    model = LLaVA.from_pretrained(d)
    ids, _ = prompt(IMAGE_ID)
    px = torch.randn(1, 3, 42, 42)
    steps = []
    out = model.generate(ids, px, max_new_tokens=20, eos_id=-1, on_token=steps.append)
    assert out.shape == (1, 20)
    seq = ids
    with torch.no_grad():
        cache = model.new_cache(1, 64)
        x, _, _ = model.embed(ids, px)
        cached = [model.language_model(inputs_embeds=x, cache=cache)[:, -1]]
        for t in out[0, :-1]:
            cached.append(model.language_model(t.view(1, 1), cache=cache)[:, -1])
        for i, t in enumerate(out[0]):
            full = model(seq, px)[:, -1]
            close(cached[i], full, 1e-5, f"cached logits vs full forward at step {i}")
            assert int(full.argmax()) == int(t), f"greedy token {i} differs from the full forward"
            seq = torch.cat([seq, t.view(1, 1)], 1)


def test_left_padded_batch_equals_each_alone(tmp_path):
    _, d = hf_llava(tmp_path)
    model = LLaVA.from_pretrained(d)
    a, _ = prompt(IMAGE_ID)
    b = torch.tensor([[1, 5, 6, IMAGE_ID, 7]])
    px = torch.randn(2, 3, 42, 42)
    alone = [model.generate(r, px[i:i + 1], max_new_tokens=12, eos_id=-1) for i, r in enumerate((a, b))]
    pad = a.shape[1] - b.shape[1]
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    both = model.generate(batch, px, attention_mask=mask, max_new_tokens=12, eos_id=-1)
    assert torch.equal(both[0], alone[0][0]) and torch.equal(both[1], alone[1][0])


def test_bf16_end_to_end(tmp_path):
    _, d = hf_llava(tmp_path)
    model = LLaVA.from_pretrained(d, dtype=torch.bfloat16)
    ids, _ = prompt(IMAGE_ID)
    px = torch.randn(1, 3, 42, 42)
    assert model(ids, px).dtype == torch.bfloat16
    labels = ids.clone()
    loss = model(ids, px, labels=labels)
    loss.backward()
    assert torch.isfinite(loss) and model.multi_modal_projector.linear_1.weight.grad is not None
    assert model.generate(ids, px, max_new_tokens=5, temperature=0.7, top_p=0.9).shape[0] == 1


def test_preset_parameter_counts():
    counts = {}
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            m = LLaVA(cfg)
        counts[name] = [sum(p.numel() for p in mod.parameters())
                        for mod in (m, m.vision_tower, m.multi_modal_projector, m.language_model)]
    assert counts["llava-1.5-7b"] == [7_062_902_784, 303_507_456, 20_979_712, 6_738_415_616]
    assert counts["llava-1.5-13b"] == [13_350_839_296, 303_507_456, 31_467_520, 13_015_864_320]


def test_from_base_adds_image_and_pad_tokens(tmp_path):
    hf, _ = hf_llava(tmp_path)
    hf.model.vision_tower.save_pretrained(tmp_path / "clip")
    LlamaForCausalLM(HFLlamaConfig(**TEXT)).save_pretrained(tmp_path / "vicuna")
    model = LLaVA.from_base(tmp_path / "clip", tmp_path / "vicuna")
    assert (model.image_token_id, model.config.pad_token_id, model.config.text.vocab_size) == (320, 321, 384)
    ids = torch.tensor([[1, 320, 9, 10]])
    assert model(ids, torch.randn(1, 3, 42, 42)).shape == (1, 3 + 9, 384)


def test_bad_checkpoints_fail_with_one_clear_error(tmp_path):
    hf = LlamaForCausalLM(HFLlamaConfig(**TEXT))
    hf.save_pretrained(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="does not exist"):
        Llama.from_pretrained(tmp_path / "nowhere")
    sd = load_file(tmp_path / "ok" / "model.safetensors")
    for name, edit, msg in [("missing", lambda s: s.pop("model.norm.weight"), "no tensor for model.norm.weight"),
                            ("shape", lambda s: s.update({"model.norm.weight": torch.ones(3)}), "model.norm.weight has shape"),
                            ("extra", lambda s: s.update({"model.bogus": torch.ones(3)}), "unexpected tensor model.bogus")]:
        d = tmp_path / name
        d.mkdir()
        s = dict(sd)
        edit(s)
        save_file(s, d / "model.safetensors")
        (d / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
        with pytest.raises(CheckpointError, match=msg):
            Llama.from_pretrained(d)
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (tmp_path / "ok" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        Llama.from_pretrained(tmp_path / "ok")
    torch.save({"x": 1}, tmp_path / "ok" / "pytorch_model.bin")
    (tmp_path / "ok" / "model.safetensors").unlink()
    (tmp_path / "ok" / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="pytorch_model.bin is truncated"):
        Llama.from_pretrained(tmp_path / "ok")


LOAD_PEAK = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from nanollava import Llama
def status(field):  # kB; VmHWM is the peak resident size of this process (not inherited across exec, unlike ru_maxrss)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
before = status("VmRSS:")
m = Llama.from_pretrained(sys.argv[1])
print((status("VmHWM:") - before) * 1024)
"""


def test_loading_peak_memory_is_close_to_checkpoint_size(tmp_path):
    """Built on the meta device and filled tensor by tensor: peak resident memory stays near the weights' size."""
    from nanollava.llama import LlamaConfig
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8)
    with torch.device("meta"):
        llm = Llama(cfg)
    llm.to_empty(device="cpu")
    llm.save_pretrained(tmp_path / "big")
    size = sum(p.numel() * 4 for p in llm.parameters())
    del llm
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    peak = int(subprocess.check_output([sys.executable, "-c", LOAD_PEAK, str(tmp_path / "big"), root]))
    print(f"loading {size / 2**20:.0f} MiB: peak resident growth {peak / 2**20:.0f} MiB, ratio {peak / size:.2f}")
    assert peak <= 1.3 * size, f"peak {peak / 2**20:.0f} MiB is {peak / size:.2f}x the checkpoint's {size / 2**20:.0f} MiB"


def test_triton_path_equals_torch_path():
    """A tiny LLaVA forward and backward through the Triton kernels (interpreted on CPU) equals the PyTorch path."""
    import kernels
    from nanollava import LLaVAConfig, LlamaConfig, ViTConfig
    torch.manual_seed(0)
    cfg = LLaVAConfig(ViTConfig(image_size=28, patch_size=14, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2), LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=2), image_token_id=127, pad_token_id=126)
    model = LLaVA(cfg)
    ids = torch.tensor([[1, 5, 127, 9, 10, 11, 12], [1, 127, 20, 21, 22, 126, 126]])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    px = torch.randn(2, 3, 28, 28)
    results = {}
    for backend in ("torch", "triton"):
        kernels.use(backend)
        try:
            model.zero_grad()
            loss = model(ids, px, mask, labels=ids.masked_fill(mask == 0, -100))
            loss.backward()
            results[backend] = (model(ids, px, mask).detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                                if p.grad is not None})
        finally:
            kernels.use("auto")
    (la, ga), (lb, gb) = results["torch"], results["triton"]
    close(lb, la, 1e-4, "logits, Triton vs PyTorch")
    assert ga.keys() == gb.keys()
    for n in ga:
        close(gb[n], ga[n], 1e-4, f"gradient of {n}, Triton vs PyTorch")
