"""sample.py on a tiny random LLaVA-1.6 (AnyRes) checkpoint in llava-hf's llava_next layout: batches of images
with different tile counts, the chat on one cache, --template and its stop token, the command line."""
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import sample
from nanollava.anyres import PINPOINTS, AnyResConfig
from nanollava.templates import IMAGE, SYSTEM, continuation_ids, prompt_ids, stop_id
from nanollava.llama import LlamaConfig
from nanollava.llava import LLaVA, LLaVAConfig
from nanollava.tokenizer import train_tokenizer
from nanollava.vit import ViTConfig

ROOT = Path(__file__).resolve().parents[1]
Q1, Q2 = "What color is the star?", "Which shape is at the top left?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny16")
    tok = train_tokenizer([SYSTEM, "USER: ASSISTANT: [INST] [/INST] " + Q1 + Q2, "system user assistant"] * 4, 360)
    tok.add_special_tokens(["<image>", "<pad>", "<|im_start|>", "<|im_end|>"])
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    vision = ViTConfig(image_size=42, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2)
    pinpoints = tuple((a // 8, b // 8) for a, b in PINPOINTS)  # 42-px tiles
    model = LLaVA(LLaVAConfig(vision, text, tok.image_id, tok.pad_id, AnyResConfig(pinpoints)))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    model.save_pretrained(d)
    tok.save(d)
    Image.new("RGB", (80, 70), (200, 30, 30)).save(d / "wide.png")  # 2 x 2 tiles
    Image.fromarray((torch.rand(120, 35, 3) * 255).byte().numpy()).save(d / "tall.png")  # 3 x 1 tiles
    return d


def test_batch_with_different_tile_counts_equals_each_alone(tiny):
    model, tok, pre = sample.load(tiny)
    assert model.config.anyres is not None and isinstance(pre(tiny / "wide.png"), sample.Images)
    items = [(tiny / "wide.png", Q1), (tiny / "tall.png", Q2), (None, Q2)]
    for template in ("llava_v1", "chatml_direct"):
        alone = [sample.answer(model, tok, pre, [it], max_new_tokens=12, template=template)[0] for it in items]
        assert sample.answer(model, tok, pre, items, max_new_tokens=12, template=template) == alone
        assert len({tuple(a) for a in alone}) > 1


def test_chat_stops_on_the_template_stop_token(tiny):
    model, tok, pre = sample.load(tiny)
    out = io.StringIO()
    turns = sample.chat(model, tok, pre(tiny / "wide.png"), None, max_new_tokens=10, temperature=0.0,
                        stdin=io.StringIO(f"{Q1}\n{Q2}\n\n"), out=out, template="chatml_direct")
    stop = stop_id(tok, "chatml_direct")
    assert stop == tok.piece_to_id("<|im_end|>") and len(turns) == 2
    first = prompt_ids([(IMAGE + "\n" + Q1, None)], tok, model.image_token_id, template="chatml_direct")
    full = first + turns[0] + [stop] + continuation_ids(Q2, tok, "chatml_direct")
    images = pre(tiny / "wide.png")
    fresh = model.generate(torch.tensor([full]), images.tiles, max_new_tokens=10, eos_id=stop, image_sizes=images.sizes)
    assert sample.until_eos(fresh[0], stop) == turns[1]


def test_command_line_template_batch_and_eval(tiny, tmp_path):
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question_id": i, "image": name, "text": Q1, "answer": "red"}) + "\n"
                                              for i, name in enumerate(["wide.png", "tall.png"])))
    base = [sys.executable, str(ROOT / "sample.py"), "--model", str(tiny), "--temperature", "0", "--max-new-tokens", "8"]
    runs = [base + ["--image", str(tiny / "wide.png"), "--image", str(tiny / "tall.png"), "--prompt", Q1,
                    "--template", "mistral_instruct"],
            base + ["--eval", str(tmp_path / "q.jsonl"), "--image-root", str(tiny), "--answers", str(tmp_path / "a.jsonl")]]
    procs = [subprocess.Popen(r, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in runs]
    (out1, err1), (out2, err2) = [p.communicate(timeout=300) for p in procs]
    assert procs[0].returncode == 0, err1
    assert "template mistral_instruct, AnyRes" in err1 and len(out1.splitlines()) == 2
    model, tok, pre = sample.load(tiny)
    want = sample.answer(model, tok, pre, [(tiny / "wide.png", Q1), (tiny / "tall.png", Q1)], max_new_tokens=8,
                         template="mistral_instruct")
    assert out1.splitlines() == [tok.decode(a) for a in want]
    assert procs[1].returncode == 0, err2
    assert "template llava_v1" in err2 and len((tmp_path / "a.jsonl").read_text().splitlines()) == 2
