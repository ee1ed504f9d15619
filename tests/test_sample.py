"""sample.py on tiny random checkpoints: streaming, batches, chat on one KV cache, the official prompt and greedy
tokens against transformers, the evaluation loop (its scorers: test_eval.py), and bad input. In-process where possible, else subprocess."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import sample
from nanollava.data import read_rows
from nanollava.templates import IMAGE, SYSTEM, continuation_ids, prompt_ids
from nanollava.eval import normalize_answer
from nanollava.llama import LlamaConfig
from nanollava.llava import LLaVA, LLaVAConfig
from nanollava.tokenizer import train_tokenizer
from nanollava.vit import ViTConfig
from oracles import hf_llama_tokenizer, released_config, tokenizer_image_token

ROOT = Path(__file__).resolve().parents[1]
VISION = dict(image_size=42, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
Q1, Q2, Q3 = "What color is the star?", "Describe the image.", "Which shape is at the top left of the picture?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random nanollava checkpoint (llava-hf layout, its own small tokenizer with <image> and <pad>, context 256)
    and two non-square images beside it."""
    d = tmp_path_factory.mktemp("tiny")
    texts = [SYSTEM, "USER: ASSISTANT: " + Q1 + Q2 + Q3, "There is a red circle at the top left. é € 😀"] * 4
    tok = train_tokenizer(texts, 360)
    tok.add_special_tokens(["<image>", "<pad>"])
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=256)
    model = LLaVA(LLaVAConfig(ViTConfig(**VISION), text, image_token_id=tok.image_id, pad_token_id=tok.pad_id))
    with torch.no_grad():  # larger weights than the init: more varied greedy answers
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    model.save_pretrained(d)
    tok.save(d)
    Image.new("RGB", (60, 40), (200, 30, 30)).save(d / "red.png")
    Image.fromarray((torch.rand(50, 30, 3) * 255).byte().numpy()).save(d / "noise.png")
    return d


@pytest.fixture(scope="module")
def loaded(tiny):
    return sample.load(tiny)


EVAL_QUESTIONS = [{"question_id": 7, "image": "imgs/a.png", "text": Q1, "answer": "red", "category": "color"},
                  {"question_id": 8, "image": "imgs/b.png", "text": Q3, "answer": "star", "category": "kind"},
                  {"question_id": 9, "image": "imgs/b.png", "text": Q1, "answer": "blue", "category": "color"}]


@pytest.fixture(scope="module")
def cli(tiny, tmp_path_factory):
    """Every command-line run of this module, started together at once: each process spends seconds importing
    torch, so running them side by side keeps the module fast. Indexing waits for a run: (returncode, stdout, stderr)."""
    d = tmp_path_factory.mktemp("cli")
    (d / "imgs").mkdir()
    shutil.copy(tiny / "red.png", d / "imgs" / "a.png")
    shutil.copy(tiny / "noise.png", d / "imgs" / "b.png")
    (d / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in EVAL_QUESTIONS))
    (d / "truncated.png").write_bytes((tiny / "noise.png").read_bytes()[:200])
    (d / "notes.png").write_text("not an image")
    shutil.copy(d / "truncated.png", d / "imgs" / "c.png")
    (d / "bad-second.jsonl").write_text("".join(json.dumps({**q, "image": f"imgs/{im}"}) + "\n"
                                                for q, im in zip(EVAL_QUESTIONS, ["a.png", "c.png"])))
    (d / "kept.jsonl").write_text("the previous run's answers\n")
    shutil.copytree(tiny, d / "broken-model")
    (d / "broken-model" / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes()[:5000])
    greedy = ["--model", tiny, "--temperature", 0]
    runs = {
        "stream": (greedy + ["--image", tiny / "red.png", "--prompt", Q1, "--max-new-tokens", 24], None),
        "batch": (greedy + ["--image", tiny / "noise.png", "--prompt", Q3, "--prompt", Q2, "--max-new-tokens", 16], None),
        "chat": (greedy + ["--image", tiny / "red.png", "--chat", "--max-new-tokens", 12], f"{Q1}\n{Q3}\n"),
        "eval": (["--model", tiny, "--eval", d / "questions.jsonl", "--answers", d / "answers.jsonl", "--batch-size", 2,
                  "--max-new-tokens", 10], None),
        "c.png": (["--model", tiny, "--eval", d / "bad-second.jsonl", "--answers", d / "kept.jsonl", "--batch-size", 1,
                   "--max-new-tokens", 4], None),
        "missing.png": (greedy + ["--image", d / "missing.png"], None),
        "truncated.png": (greedy + ["--image", d / "truncated.png"], None),
        "notes.png": (greedy + ["--image", d / "notes.png"], None),
        "model.safetensors": (["--model", d / "broken-model", "--image", tiny / "red.png"], None),
        "context": (greedy + ["--image", tiny / "red.png", "--prompt", "star " * 300], None),
    }
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}  # nine processes share the cores
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *map(str, args)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", cwd=ROOT, env=env)
             for name, (args, _) in runs.items()}

    class Results(dict):
        def __missing__(self, name):
            out, err = procs[name].communicate(runs[name][1], timeout=300)
            self[name] = (procs[name].returncode, out, err)
            return self[name]

    yield Results(), d
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_stream_prints_what_decoding_the_whole_answer_gives(loaded):
    _, tok, _ = loaded
    ids = tok.encode("é€😀 and ok") + [tok.eos_id]  # multi-byte characters arrive as several byte pieces
    out = io.StringIO()
    stream, parts = sample.Stream(tok, out), []
    for i in ids:
        before = out.getvalue()
        stream(torch.tensor([i]))
        parts.append(out.getvalue()[len(before):])
    stream.finish()
    assert out.getvalue() == tok.decode(ids) + "\n" == "é€😀 and ok\n"
    assert "\ufffd" not in "".join(parts), f"a half character was printed: {parts}"


def test_streamed_stdout_is_only_the_answer(tiny, loaded, cli):
    model, tok, pre = loaded
    ids = sample.answer(model, tok, pre, [(tiny / "red.png", Q1)], max_new_tokens=24)[0]
    rc, out, err = cli[0]["stream"]
    assert rc == 0, err
    assert out == tok.decode(ids) + "\n", f"stdout {out!r} vs answer {tok.decode(ids)!r}"
    assert "first token after" in err and "tokens/s" in err and "loaded" in err


def test_batch_equals_each_alone(tiny, loaded, cli):
    model, tok, pre = loaded
    items = [(tiny / "red.png", Q1), (tiny / "noise.png", Q3), (None, Q2), (tiny / "noise.png", Q2)]
    alone = [sample.answer(model, tok, pre, [item], max_new_tokens=16)[0] for item in items]
    both = sample.answer(model, tok, pre, items, max_new_tokens=16)
    assert both == alone
    assert len({tuple(a) for a in alone}) > 1, "the random model answers everything alike: the test shows nothing"
    # and through the command line: one image with two prompts, answers in order
    rc, out, err = cli[0]["batch"]
    assert rc == 0, err
    assert out == tok.decode(alone[1]) + "\n" + tok.decode(alone[3]) + "\n"


def test_pairing_rules():
    assert sample.pair(["a", "b"], ["p", "q"]) == [("a", "p"), ("b", "q")]
    assert sample.pair(["a"], ["p", "q"]) == [("a", "p"), ("a", "q")]
    assert sample.pair(["a", "b"], ["p"]) == [("a", "p"), ("b", "p")]
    assert sample.pair(["a"], []) == [("a", sample.DEFAULT_PROMPT)]
    assert sample.pair([], ["p"]) == [(None, "p")]
    with pytest.raises(ValueError, match="2 --image and 3 --prompt"):
        sample.pair(["a", "b"], ["p", "q", "r"])


def test_chat_keeps_the_cache(tiny, loaded, cli):
    model, tok, pre = loaded
    calls, generate = [], model.generate

    def spy(input_ids, *a, **kw):
        calls.append((input_ids.shape[1], kw.get("cache") is not None))
        return generate(input_ids, *a, **kw)

    model.generate, out = spy, io.StringIO()
    try:
        turns = sample.chat(model, tok, pre(tiny / "red.png")[None], None, max_new_tokens=12, temperature=0.0,
                            stdin=io.StringIO(f"{Q1}\n{Q3}\n\nnever read\n"), out=out)
    finally:
        del model.generate
    assert len(turns) == 2 and out.getvalue() == "".join(tok.decode(t) + "\n" for t in turns)
    first = prompt_ids([(IMAGE + "\n" + Q1, None)], tok, model.image_token_id)
    cont = continuation_ids(Q3, tok)
    closing = 1 if len(turns[0]) < 12 else 2  # </s>, after the last token if the answer stopped without one
    assert calls == [(len(first), True), (closing + len(cont), True)], f"the second turn re-encoded the conversation: {calls}"
    # the second answer equals a fresh run on the whole two-turn prompt, without a cache
    full = first + turns[0] + [tok.eos_id] + cont
    fresh = model.generate(torch.tensor([full]), pre(tiny / "red.png")[None], max_new_tokens=12, eos_id=tok.eos_id)
    assert sample.until_eos(fresh[0], tok.eos_id) == turns[1]
    # and on the command line: stdin ends the chat with EOF
    rc, stdout, err = cli[0]["chat"]
    assert rc == 0, err
    assert stdout == out.getvalue() and err.count("USER: ") == 3  # two questions, then EOF


# ----------------------------------------------------------------------------- the official LLaVA-1.5 procedure

def official_pixels(path, size, processor):
    """LLaVA's expand2square with the CLIP mean as bytes, then transformers' CLIPImageProcessor."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    fill = tuple(int(x * 255) for x in processor.image_mean)
    canvas = Image.new("RGB", (max(w, h),) * 2, fill)
    canvas.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return processor(canvas, return_tensors="pt")["pixel_values"]


def test_official_checkpoint_prompt_and_greedy_tokens(tiny, tmp_path, sp_model_path):
    transformers = pytest.importorskip("transformers")
    spm = pytest.importorskip("sentencepiece")
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig as HFLlamaConfig, LlamaForCausalLM
    torch.manual_seed(1)
    text = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=512, tie_word_embeddings=False)
    llm = LlamaForCausalLM(HFLlamaConfig(**text)).eval()
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION, hidden_act="quick_gelu")).eval()
    projector = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()
    with torch.no_grad():
        for p in list(llm.parameters()) + list(projector.parameters()):
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    tower.save_pretrained(tmp_path / "clip")
    off = tmp_path / "llava-v1.5"  # liuhaotian's layout: Vicuna's keys plus model.mm_projector.{0,2}, tokenizer.model
    off.mkdir()
    sd = {**llm.state_dict(), **{f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}}
    torch.save({k: v.contiguous() for k, v in sd.items()}, off / "pytorch_model.bin")
    (off / "config.json").write_text(json.dumps(released_config("1.5", text, 32)))  # as liuhaotian/llava-v1.5-7b ships it
    shutil.copy(sp_model_path, off / "tokenizer.model")

    model, tok, pre = sample.load(off, vision_tower=tmp_path / "clip")
    ids, _, pixels = sample.encode(model, tok, pre, [(tiny / "noise.png", Q1)])
    # the official prompt: conv_vicuna_v1 with "<image>\n" before the question, tokenizer_image_token on the
    # HF Llama tokenizer with legacy=False (built from tokenizer.model as transformers' converter does)
    hf_tok = hf_llama_tokenizer(sp_model_path, add_bos_token=True)
    official_tokenizer_image_token = lambda prompt, tok: tokenizer_image_token(prompt, lambda t: tok(t).input_ids, -200, tok.bos_token_id)
    prompt = f"{SYSTEM} USER: <image>\n{Q1} ASSISTANT:"
    assert ids[0].tolist() == official_tokenizer_image_token(prompt, hf_tok)
    processor = CLIPImageProcessor(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42})
    ref_pixels = official_pixels(tiny / "noise.png", 42, processor)
    assert (pixels - ref_pixels).abs().max() < 1e-5
    # greedy tokens against a loop over transformers' modules: hidden_states[-2] without CLS -> projector -> Llama
    ours = sample.answer(model, tok, pre, [(tiny / "noise.png", Q1)], max_new_tokens=8)[0]
    seq = official_tokenizer_image_token(prompt, hf_tok)
    pos, ref = seq.index(-200), []
    with torch.no_grad():
        feats = projector(tower(ref_pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
        emb = llm.model.embed_tokens(torch.tensor([seq[:pos] + seq[pos + 1:]]))
        emb = torch.cat([emb[:, :pos], feats, emb[:, pos:]], 1)
        for _ in range(8):
            t = int(llm(inputs_embeds=emb).logits[0, -1].argmax())
            if t == hf_tok.eos_token_id:
                break
            ref.append(t)
            emb = torch.cat([emb, llm.model.embed_tokens(torch.tensor([[t]]))], 1)
    assert ours == ref, f"greedy tokens {ours} vs the official computation {ref}"


# ----------------------------------------------------------------------------- evaluation

def test_eval_writes_llava_answers_and_scores(loaded, cli):
    model, tok, pre = loaded
    results, d = cli
    rc, out, err = results["eval"]
    assert rc == 0, err
    answers = [row for _, row in read_rows(d / "answers.jsonl")]
    assert [a["question_id"] for a in answers] == [7, 8, 9]
    assert all({"question_id", "prompt", "text", "answer_id", "model_id", "answer"} <= a.keys() for a in answers)
    alone = [tok.decode(sample.answer(model, tok, pre, [(d / q["image"], q["text"])], 10)[0]).strip() for q in EVAL_QUESTIONS]
    assert [a["text"] for a in answers] == alone  # greedy, batched with left padding, equals each alone
    acc = sum(normalize_answer(a["text"]) == a["answer"] for a in answers) / 3
    assert out == f"accuracy: {acc:.4f} (n=3)\n", out
    assert "color:" in err and "kind:" in err  # per-category details on stderr


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("name", ["missing.png", "truncated.png", "notes.png", "model.safetensors", "context"])
def test_bad_input_is_one_line_and_exit_2(cli, name):
    rc, out, err = cli[0][name]  # a missing, truncated or non-image file, a broken checkpoint, a prompt over the context
    assert rc == 2 and out == "", f"exit {rc}, stdout {out!r}, stderr {err}"
    assert len(err.splitlines()) == 1 and name in err and "Traceback" not in err, err



def test_a_bad_image_late_in_the_questions_leaves_the_answers_file_as_it_was(cli):
    rc, out, err = cli[0]["c.png"]  # the first question is answered, the second image is truncated
    assert rc == 2 and len(err.strip().splitlines()) >= 1 and "c.png" in err.strip().splitlines()[-1], err
    d = cli[1]
    assert (d / "kept.jsonl").read_text() == "the previous run's answers\n"
    assert not [p.name for p in d.iterdir() if p.name.startswith("kept.jsonl.")]


@pytest.mark.parametrize("flag,value", [("--max-new-tokens", "0"), ("--max-new-tokens", "-3"), ("--temperature", "-1"),
                                        ("--top-p", "0"), ("--top-p", "2"), ("--top-p", "-1"), ("--batch-size", "0"),
                                        ("--batch-size", "-1"), ("--threads", "0")])
def test_out_of_range_flags_are_refused_at_parse_time_naming_the_flag(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        sample.parser.parse_args(["--image", "x.png", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and flag in err and value in err, err


@pytest.mark.parametrize("line,message", [
    ('{"question_id": 2, "text": 42}', "line 3: 'text' must be a string, not a number"),
    ('{"question_id": 2, "text": null}', "line 3: 'text' must be a string, not null"),
    ('{"question_id": 2, "text": "q", "image": 5}', "line 3: 'image' must be a string, not a number"),
    ('{"question_id": 2, "text": "q"', "line 3: not valid JSON"),
])
def test_bad_question_rows_are_one_sentence_naming_file_and_line(tiny, tmp_path, capsys, line, message):
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"question_id": 1, "text": Q1}) + "\n\n" + line + "\n")
    rc = sample.main(["--model", str(tiny), "--eval", str(path), "--answers", str(tmp_path / "a.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and f"{path}, {message}" in err, err


def test_generate_right_aligns_rows_with_different_image_counts(tiny, loaded):
    """Rows of equal token length, one with an image, one without: no padding in the mask, yet after the image
    expands they differ in length, and generation needs them to end together (left padding)."""
    model, tok, pre = loaded
    a = tok.encode(Q1)
    b = tok.encode(Q3 + " " + Q3)[:len(tok.encode(Q1)) + 1]
    rows = torch.tensor([[tok.bos_id, model.image_token_id] + a, [tok.bos_id] + b])
    assert rows.shape[1] == len(a) + 2 == len(b) + 1
    px = pre(tiny / "noise.png")[None]
    alone = [model.generate(rows[:1], px, max_new_tokens=8, eos_id=-1), model.generate(rows[1:], None, max_new_tokens=8, eos_id=-1)]
    for mask in (None, torch.ones_like(rows)):
        both = model.generate(rows, px, mask, max_new_tokens=8, eos_id=-1)
        assert torch.equal(both, torch.cat(alone)), f"mask {mask}: {both.tolist()} vs {torch.cat(alone).tolist()}"
