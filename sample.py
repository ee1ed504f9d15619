"""
Ask a LLaVA-1.5 or 1.6 model about images: one answer, a batch, a chat, an evaluation, or a speed benchmark.

Reads any directory LLaVA.from_pretrained reads: nanollava's own (train.py writes out/stage2/model), llava-hf's,
or the official liuhaotian layout (with --vision-tower DIR when its CLIP tower is not a local directory). The
prompt is built as the official LLaVA-1.5 builds it (vicuna_v1 template, tokenizer_image_token chunking, image
padded to a square with the CLIP mean), so greedy decoding of an official checkpoint gives the official tokens.
LLaVA-1.6 (AnyRes) models get their tiles (nanollava/anyres.py) and the template their config implies
(llava_v1, mistral_instruct, chatml_direct, which stops on <|im_end|>); --template NAME overrides it.
stdout carries only the answers (for --eval the metric lines, for --bench the numbers); the rest goes to stderr.

    python sample.py --image x.jpg                                     # the newest stage-2 model, answer streamed
    python sample.py --image x.jpg --prompt "What color is the star?" --temperature 0
    python sample.py --image a.png --image b.png --prompt "What is this?"   # one left-padded batch
    python sample.py --image x.jpg --chat                              # multi-turn on stdin, KV cache kept
    python sample.py --eval                                            # the world's held-out questions, scored
    python sample.py --eval questions.jsonl --image-root DIR --answers answers.jsonl
    python sample.py --score answers.jsonl                             # re-score an answers file, no model
    python sample.py --bench                                           # vs transformers on a tiny random model
    python sample.py --model llava-v1.5-7b --vision-tower clip-vit-large-patch14-336 --image x.jpg   # on a GPU

Several images and prompts: N of each go pairwise; one image goes with every prompt and one prompt with every
image; with no image the questions are text-only. They run as one left-padded batch and print one answer per line,
in order (a single answer streams token by token). Bad input (a missing or broken image, an unreadable model
directory, a prompt longer than the context) ends with one line on stderr and exit status 2.
"""
import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

import kernels
from nanollava.checkpoint import read_json
from typing import NamedTuple

from nanollava import anyres
from nanollava.anyres import AnyResConfig
from nanollava.data import (CLIP_MEAN, CLIP_STD, IMAGE, TEMPLATES, DataError, open_image, continuation_ids, load_image,
                            prompt_ids, stop_id, template_for)
from nanollava.llava import LLaVA, expand_image_tokens
from nanollava.tokenizer import load_tokenizer

DEFAULT_MODEL = "out/stage2/model"
WORLD_MANIFEST = "data/world/manifest.json"
DEFAULT_PROMPT = "Describe the image."
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None, help=f"model directory (default {DEFAULT_MODEL}, train.py's stage-2 output); nanollava's, llava-hf's or official LLaVA-1.5's layout")
parser.add_argument("--vision-tower", default=None, help="CLIP directory for an official LLaVA-1.5 checkpoint whose mm_vision_tower is not local (1.6: only its config is read)")
parser.add_argument("--template", default=None, choices=TEMPLATES[1:], help="chat template (default: the one the checkpoint's config implies: vicuna_v1 for 1.5, llava_v1, mistral_instruct or chatml_direct for 1.6)")
parser.add_argument("--image", action="append", default=[], help="image file; repeat for a batch")
parser.add_argument("--prompt", action="append", default=[], help=f"question (default {DEFAULT_PROMPT!r}); repeat for a batch")
parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy; 0.2 is the official CLI's default")
parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: sample from the smallest set of tokens whose probability reaches this")
parser.add_argument("--max-new-tokens", type=int, default=None, help="answer length limit (default 512 as the official CLI; 128 for --eval as the official eval scripts)")
parser.add_argument("--seed", type=int, default=1337, help="seed of the sampling")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ... (default cuda if available)")
parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help="weights and activations: auto = bfloat16 on cuda, float32 on cpu")
parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice, one per core)")
parser.add_argument("--kernels", default="auto", choices=kernels.BACKENDS, help="attention and RMSNorm: auto = Triton on cuda, PyTorch on cpu")
parser.add_argument("--chat", action="store_true", help="multi-turn conversation on stdin, ended by EOF or an empty line; the image goes in the first turn, the KV cache is kept")
parser.add_argument("--eval", nargs="?", const="", default=None, metavar="QUESTIONS", help="answer a LLaVA question file (JSON lines: question_id, image, text[, answer]) greedily and score it; without a file, the world's held-out set from " + WORLD_MANIFEST)
parser.add_argument("--image-root", default=None, help="--eval: the directory the questions' image paths are relative to (default: the question file's)")
parser.add_argument("--answers", default=None, help="--eval: the answers file to write, LLaVA's format (default out/eval/<questions>-answers.jsonl)")
parser.add_argument("--batch-size", type=int, default=16, help="--eval: questions per left-padded batch")
parser.add_argument("--score", default=None, metavar="ANSWERS", help="score an answers file that holds the reference answers (as --eval writes it); needs no model")
parser.add_argument("--bench", action="store_true", help="tokens/s and time to first token of nanollava and transformers on one checkpoint (a tiny random world-sized one unless --model)")
parser.add_argument("--bench-anyres", action="store_true", help="--bench without --model: a tiny LLaVA-1.6 (llava_next, AnyRes) checkpoint and a 2 x 2 tile image")
parser.add_argument("--bench-tokens", type=int, default=64, help="--bench: new tokens per generation (eos ignored by both)")
parser.add_argument("--bench-repeats", type=int, default=5, help="--bench: timed repeats after a warm-up; medians are reported")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- model, prompts, generation

class Images(NamedTuple):
    """An AnyRes model's images: every image's tiles, concatenated (sum of 1 + rows*cols, 3, S, S), and each
    image's (width, height). LLaVA-1.5's are a plain (N, 3, S, S) tensor."""
    tiles: torch.Tensor
    sizes: list


def image_args(pixels):
    """generate's keyword arguments for a batch's images (None, a tensor, or Images)."""
    if isinstance(pixels, Images):
        return {"pixel_values": pixels.tiles, "image_sizes": pixels.sizes}
    return {"pixel_values": pixels}


def image_positions(model, pixels):
    """The positions an image takes in the sequence beyond its placeholder (the longest, for AnyRes)."""
    if pixels is None:
        return 0
    if isinstance(pixels, Images):
        a, v = model.config.anyres, model.config.vision
        return max(anyres.num_tokens(s, a.pinpoints, v.image_size, v.image_size // v.patch_size, a.hf) for s in pixels.sizes) - 1
    return model.config.vision.num_patches - 1


def load(model_dir, vision_tower=None, device="cpu", dtype=torch.float32):
    """The model, its tokenizer, and its image preprocessing: size from the vision config, mean and std from
    preprocessor_config.json (beside the model, else beside the tower) or CLIP's, square padding with the mean
    (LLaVA-1.5) or AnyRes tiles (1.6: pre returns Images)."""
    model = LLaVA.from_pretrained(model_dir, vision_tower, dtype).to(device)
    tok = load_tokenizer(model_dir)
    if tok.image_id is not None and model.image_token_id >= 0 and tok.image_id != model.image_token_id:
        raise DataError(f"{model_dir}: the tokenizer's <image> is {tok.image_id} but the model's is {model.image_token_id}")
    tower = vision_tower or read_json(Path(model_dir) / "config.json").get("mm_vision_tower")
    stats = {}
    for d in (model_dir, tower):
        if d and (Path(d) / "preprocessor_config.json").is_file():
            stats = read_json(Path(d) / "preprocessor_config.json")
            break
    size, mean, std = model.config.vision.image_size, stats.get("image_mean", CLIP_MEAN), stats.get("image_std", CLIP_STD)
    if model.config.anyres is not None:
        a = model.config.anyres

        def pre(image):
            img = image if hasattr(image, "size") else open_image(image)
            return Images(anyres.process_anyres_image(img, a.pinpoints, size, a.hf, tuple(mean), tuple(std)), [img.size])
        return model, tok, pre
    return model, tok, lambda image: load_image(image, size, pad=True, mean=tuple(mean), std=tuple(std))


def encode(model, tok, pre, items, template="vicuna_v1"):
    """[(image or None, question)] -> left-padded input_ids (B, T), attention_mask (B, T), pixel_values (N, 3, S, S)
    or None. Each row is the vicuna_v1 prompt with the image first in the question, as the official eval scripts."""
    rows = [prompt_ids([(q if image is None else IMAGE + "\n" + q, None)], tok, model.image_token_id, template)
            for image, q in items]
    T = max(map(len, rows))
    pixels = [pre(image) if image is not None else None for image, _ in items]
    longest = max(len(r) + image_positions(model, px) for r, px in zip(rows, pixels))
    if longest >= model.config.text.max_position_embeddings:  # checked here too so that it fails before any output
        raise ValueError(f"the prompt is {longest} tokens with its image features; the context holds "
                         f"{model.config.text.max_position_embeddings}")
    ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
    pixels = [px for px in pixels if px is not None]
    dev = model.language_model.lm_head.weight.device
    if pixels and isinstance(pixels[0], Images):
        return ids.to(dev), mask.to(dev), Images(torch.cat([p.tiles for p in pixels]).to(dev), [p.sizes[0] for p in pixels])
    return ids.to(dev), mask.to(dev), torch.stack(pixels).to(dev) if pixels else None


def until_eos(row, eos_id):
    row = row.tolist() if torch.is_tensor(row) else list(row)
    return row[:row.index(eos_id)] if eos_id in row else row


class Clock:
    """on_token hook that times generation: time to first token (image, prefill, one sample) and decode rate."""

    def __init__(self, then=None):
        self.then, self.start, self.times = then, time.perf_counter(), []

    def __call__(self, tok):
        if tok.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if self.then is not None:
            self.then(tok)

    def report(self, prompt_tokens, rows=1):
        if not self.times:
            return
        first, n = (self.times[0] - self.start) * 1000, len(self.times)
        rate = f", decode {rows * (n - 1) / (self.times[-1] - self.times[0]):.1f} tokens/s" if n > 1 else ""
        log(f"[{rows} x {prompt_tokens} prompt tokens with image features: first token after {first:.1f} ms, "
            f"{n} steps{rate}]")


class Stream:
    """Prints an answer as it grows: decodes all of it so far and prints the new suffix, so multi-byte characters
    split over byte pieces print whole (a trailing U+FFFD may still be completed, so it waits)."""

    def __init__(self, tok, out=None, stop=None):
        self.tok, self.out, self.ids, self.shown = tok, out or sys.stdout, [], ""
        self.stop = tok.eos_id if stop is None else stop

    def __call__(self, token):  # on_token: (1,) ids
        if int(token[0]) != self.stop:
            self.ids.append(int(token[0]))
            self._show(self.tok.decode(self.ids).rstrip("\ufffd"))

    def _show(self, text):
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def finish(self):
        self._show(self.tok.decode(self.ids))
        self.out.write("\n")
        self.out.flush()


def pair(images, prompts):
    """N images with N prompts pairwise, one image with every prompt, one prompt with every image; no image: text only."""
    prompts = prompts or [DEFAULT_PROMPT]
    if not images:
        return [(None, p) for p in prompts]
    if len(prompts) == 1 or len(images) == 1 or len(images) == len(prompts):
        n = max(len(images), len(prompts))
        return [(images[i % len(images)], prompts[i % len(prompts)]) for i in range(n)]
    raise DataError(f"{len(images)} --image and {len(prompts)} --prompt: give as many of each, or one of either")


def respond(model, tok, batch, max_new_tokens=512, temperature=0.0, top_p=1.0, stream=False, template="vicuna_v1"):
    """Answers to an encoded batch as lists of ids (the stop token dropped); streamed to stdout if asked (one row)."""
    ids, mask, pixels = batch
    stop = stop_id(tok, template)
    printer = Stream(tok, stop=stop) if stream else None
    clock = Clock(printer)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         eos_id=stop, on_token=clock, **image_args(pixels))
    if printer:
        printer.finish()
    clock.report(ids.shape[1] + image_positions(model, pixels), ids.shape[0])
    return [until_eos(row, stop) for row in out]


def answer(model, tok, pre, items, max_new_tokens=512, temperature=0.0, top_p=1.0, stream=False, template="vicuna_v1"):
    """Answers to [(image or None, question)] as lists of ids (the stop token dropped), in one batch."""
    return respond(model, tok, encode(model, tok, pre, items, template), max_new_tokens, temperature, top_p, stream, template)


def chat(model, tok, pixels=None, first=None, max_new_tokens=512, temperature=0.2, top_p=1.0, stdin=None, out=None,
         template="vicuna_v1"):
    """A conversation on one KV cache at the model's context size, as the official CLI but without re-encoding
    each turn: the image (pixels (1, 3, S, S) or None) and the system prompt go in the first turn; each later turn
    feeds the </s> that closed the previous answer (after its last token, if it stopped without one) and
    "USER: {q} ASSISTANT:". Returns every turn's answer ids."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    cache = model.new_cache(1, model.config.text.max_position_embeddings)
    dev, stop = cache.k[0].device, stop_id(tok, template)
    pixels = None if pixels is None else Images(pixels.tiles.to(dev), pixels.sizes) if isinstance(pixels, Images) else pixels.to(dev)
    turns, feed, q = [], None, first
    while True:
        if q is None:
            sys.stderr.write("USER: ")
            sys.stderr.flush()
            q = stdin.readline().rstrip("\r\n")
            if not q.strip():
                log("")
                return turns
        else:
            log(f"USER: {q}")
        if feed is None:
            ids = prompt_ids([(q if pixels is None else IMAGE + "\n" + q, None)], tok, model.image_token_id, template)
        else:
            ids = feed + continuation_ids(q, tok, template)
        sys.stderr.write("ASSISTANT: ")
        sys.stderr.flush()
        context = cache.len + len(ids) + (image_positions(model, pixels) if feed is None else 0)
        printer = Stream(tok, out, stop)
        clock = Clock(printer)
        new = model.generate(torch.tensor([ids], device=dev), max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, eos_id=stop, cache=cache, on_token=clock,
                             **image_args(pixels if feed is None else None))[0].tolist()
        printer.finish()
        clock.report(context)
        turns.append(until_eos(new, stop))
        feed = [stop] if new[-1] == stop else [new[-1], stop]  # the last token is not cached yet
        q = None


# ----------------------------------------------------------------------------- evaluation

ARTICLES = {"a", "an", "the"}
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
LETTERS = ("A", "B", "C", "D", "E")


def normalize_answer(text):
    """VQA-style normalisation, kept simple: lowercase, punctuation to spaces (a decimal point stays, apostrophes
    go), number words to digits, articles dropped, whitespace collapsed."""
    text = re.sub(r"(?<!\d)\.|\.(?!\d)|[^\w\s.]", " ", text.lower().replace("'", ""))
    return " ".join(NUMBERS.get(w, w) for w in text.split() if w not in ARTICLES)


def pope_label(text):
    """Official eval_pope.py: keep the first sentence, drop commas; "no" if its words hold No, no or not, else "yes"."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def parse_letter(text):
    """Official eval_science_qa.py: the answer if it is an option letter, else "X. ..." at the start, else
    "The answer is X." / "The answer is X"; None when nothing parses (counted wrong)."""
    text = text.replace("\n", ". ")
    if text.strip() in LETTERS:
        return text.strip()
    m = re.match(r"([A-E])\. ", text) or re.search(r"The answer is ([A-E])\.", text) or re.search(r"The answer is ([A-E])", text)
    return m.group(1) if m else None


def pope_metrics(preds, refs):
    p = [pope_label(t) == "yes" for t in preds]
    y = [r.strip().lower() == "yes" for r in refs]
    tp, fp = sum(a and b for a, b in zip(p, y)), sum(a and not b for a, b in zip(p, y))
    tn, fn = sum(not a and not b for a, b in zip(p, y)), sum(not a and b for a, b in zip(p, y))
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "yes-ratio": sum(p) / len(p), "accuracy": (tp + tn) / len(p)}


def metric_kind(refs):
    """POPE if every reference is yes/no, letters if every one is an option letter, else exact match."""
    if all(r.strip().lower() in ("yes", "no") for r in refs):
        return "pope"
    return "letter" if all(r.strip() in LETTERS for r in refs) else "exact"


def metrics(preds, refs, kind=None):
    """{name: value} for answers against references, the metric chosen by metric_kind; accuracy always last."""
    kind = kind or metric_kind(refs)
    if kind == "pope":
        return pope_metrics(preds, refs)
    if kind == "letter":
        hits = [parse_letter(p) == r.strip() for p, r in zip(preds, refs)]
    else:
        hits = [normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs)]
    return {"accuracy": sum(hits) / len(hits)}


def score(records, out=None):
    """Prints the metric lines of answer records (text, answer[, category]) to stdout, per category to stderr."""
    rows = [r for r in records if r.get("answer") is not None]
    if not rows:
        log(f"{len(records)} answers, none with a reference answer: nothing to score")
        return {}
    refs, preds = [str(r["answer"]) for r in rows], [r["text"] for r in rows]
    kind = metric_kind(refs)
    result = metrics(preds, refs, kind)
    categories = sorted({str(r["category"]) for r in rows if "category" in r})
    for c in categories:
        sub = [(p, a) for p, a, r in zip(preds, refs, rows) if str(r.get("category")) == c]
        m = metrics([p for p, _ in sub], [a for _, a in sub], kind)
        log(f"  {c}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) + f" (n={len(sub)})")
    log(f"{kind} metrics over {len(rows)} answers with references ({len(records) - len(rows)} without)")
    for name, value in result.items():
        print(f"{name}: {value:.4f} (n={len(rows)})", file=out or sys.stdout, flush=True)
    return result


def read_rows(path):
    """A JSON-lines file (or a JSON list) of dicts; one DataError naming the file and line otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON lines ({e})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: every row must be a JSON object")
    return rows


def check_questions(questions, image_root):
    """Fails before any work on a row without question_id or text, or an image that is not there."""
    for n, q in enumerate(questions):
        if "text" not in q or "question_id" not in q:
            raise DataError(f"question row {n} has no question_id or text")
        if q.get("image") and not os.path.isfile(os.path.join(image_root, q["image"])):
            raise DataError(f"{os.path.join(image_root, q['image'])}: no such image file (question {q['question_id']})")
    return questions


def evaluate(model, tok, pre, questions, image_root, answers_path, model_id, batch_size=16, max_new_tokens=128,
             template="vicuna_v1"):
    """Greedy answers to LLaVA question rows, written to answers_path as LLaVA's answer rows (plus the reference
    answer and category when known) as they come. Returns the answer rows."""
    check_questions(questions, image_root)
    Path(answers_path).parent.mkdir(parents=True, exist_ok=True)
    records, t0 = [], time.perf_counter()
    with open(answers_path, "w", encoding="utf-8") as f:
        for i in range(0, len(questions), batch_size):
            batch = questions[i:i + batch_size]
            items = [(os.path.join(image_root, q["image"]) if q.get("image") else None, q["text"]) for q in batch]
            ids, mask, pixels = encode(model, tok, pre, items, template)
            stop = stop_id(tok, template)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, temperature=0.0, eos_id=stop,
                                 **image_args(pixels))
            for q, row in zip(batch, out):
                rec = {"question_id": q["question_id"], "prompt": q["text"], "text": tok.decode(until_eos(row, stop)).strip(),
                       "answer_id": uuid.uuid4().hex[:22], "model_id": model_id, "metadata": {}}
                rec.update({k: q[k] for k in ("answer", "category") if k in q})
                f.write(json.dumps(rec) + "\n")
                records.append(rec)
            f.flush()
            done = i + len(batch)
            log(f"[{done}/{len(questions)}] {done / (time.perf_counter() - t0):.1f} questions/s")
    log(f"answers written to {answers_path}")
    return records


# ----------------------------------------------------------------------------- benchmark

def tiny_checkpoint(out_dir, width=128, layers=2, llava_next=False):
    """A random checkpoint (llava-hf layout) of the default world's model size, as prepare.py and train.py build it:
    LLM hidden 128 (heads of 32, MLP 8/3 x), 2 layers, vocabulary 1024 + <image> + <pad> padded to 1088; tower
    hidden 128, 3 layers, 72 px images in 24 px patches (9 image tokens). llava_next=True: a LLaVA-1.6 (AnyRes) one,
    the released pinpoints scaled to 72 px tiles."""
    from nanollava.llama import LlamaConfig
    from nanollava.llava import LLaVAConfig
    from nanollava.vit import ViTConfig
    torch.manual_seed(0)
    vision = ViTConfig(image_size=72, patch_size=24, hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4)
    text = LlamaConfig(vocab_size=1088, hidden_size=width, intermediate_size=(8 * width // 3 + 63) // 64 * 64,
                       num_hidden_layers=layers, num_attention_heads=width // 32, max_position_embeddings=2048)
    tiles = AnyResConfig(tuple((a * 72 // 336, b * 72 // 336) for a, b in anyres.PINPOINTS)) if llava_next else None
    LLaVA(LLaVAConfig(vision, text, image_token_id=1024, pad_token_id=1025, anyres=tiles)).save_pretrained(out_dir)
    return out_dir


def bench(model_dir, device, dtype, n_new, repeats):
    """nanollava's generate and transformers' LlavaForConditionalGeneration.generate on the same checkpoint, prompt
    and greedy settings, exactly n_new tokens each (eos ignored): time to first token (image, prefill and one token,
    timed as a 1-token generation) and decode tokens/s ((n_new - 1) / (time(n_new) - time(1))), medians of repeats."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration  # test-only: imported here only
    from transformers.utils.logging import disable_progress_bar
    disable_progress_bar()
    kind = read_json(Path(model_dir) / "config.json").get("model_type")
    if kind not in ("llava", "llava_next"):
        raise DataError(f"{model_dir}: --bench needs a llava-hf layout checkpoint (transformers cannot read the official one)")
    ours = LLaVA.from_pretrained(model_dir, dtype=dtype, conventions="transformers").to(device)
    cls = LlavaForConditionalGeneration if kind == "llava" else LlavaNextForConditionalGeneration
    theirs = cls.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    cfg, img = ours.config, ours.image_token_id
    g = torch.Generator().manual_seed(0)
    if any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        tok = load_tokenizer(model_dir)
        ids = torch.tensor([prompt_ids([(IMAGE + "\n" + DEFAULT_PROMPT, None)], tok, img)])
    else:  # as long as the vicuna_v1 prompt of a short question
        ids = torch.cat([torch.tensor([1]), torch.randint(3, img, (35,), generator=g), torch.tensor([img]),
                         torch.randint(3, img, (12,), generator=g)])[None]
    S, P = cfg.vision.image_size, cfg.vision.num_patches
    pixels, ours_kw, hf_kw = torch.randn(1, 3, S, S, generator=g).to(device), {}, {}
    if cfg.anyres is not None:  # an image 2 x 2 tiles large (at 336-px tiles, 640 x 480: 2340 image tokens)
        size = (S * 40 // 21, S * 10 // 7)
        P = anyres.num_tokens(size, cfg.anyres.pinpoints, S, S // cfg.vision.patch_size, hf=True)
        n = anyres.num_tiles(size, cfg.anyres.pinpoints, S, hf=True)
        pixels = torch.randn(n, 3, S, S, generator=g).to(device)
        ours_kw, hf_kw = {"image_sizes": [size]}, {"image_sizes": torch.tensor([[size[1], size[0]]], device=device)}
    hf_ids = expand_image_tokens(ids, img, P).input_ids.to(device)  # llava-hf repeats <image> P times
    hf_pixels = pixels[None] if cfg.anyres is not None else pixels  # transformers' LlavaNext: (N, tiles, 3, S, S)
    ids = ids.to(device)
    runs = {"nanollava": lambda n: ours.generate(ids, pixels, max_new_tokens=n, eos_id=-1, **ours_kw),
            "transformers": lambda n: theirs.generate(input_ids=hf_ids, pixel_values=hf_pixels, attention_mask=torch.ones_like(hf_ids),
                                                      max_new_tokens=n, min_new_tokens=n, do_sample=False, **hf_kw)[:, hf_ids.shape[1]:]}

    def timed(fn, n):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = fn(n)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    log(f"bench: {model_dir} on {device} ({dtype}), prompt {ids.shape[1] + P - 1} positions with {P} image tokens, "
        f"{n_new} new tokens, {repeats} repeats, {torch.get_num_threads()} threads")
    tokens = {name: timed(fn, n_new)[1][0].tolist() for name, fn in runs.items()}  # warm-up
    times = {name: ([], []) for name in runs}
    for _ in range(repeats):  # interleaved, so that a change in machine load hits both alike
        for name, fn in runs.items():
            times[name][0].append(timed(fn, 1)[0])
            times[name][1].append(timed(fn, n_new)[0])
    results = {}
    for name, (first, full) in times.items():
        first, full = statistics.median(first), statistics.median(full)
        results[name] = (first, (n_new - 1) / (full - first))
        print(f"{name:>12}: time to first token {first * 1000:7.2f} ms, decode {results[name][1]:8.1f} tokens/s", flush=True)
    same = next((i for i, (a, b) in enumerate(zip(*tokens.values())) if a != b), n_new)
    log(f"greedy tokens agree for the first {same} of {n_new}")
    (ttft, rate), (their_ttft, their_rate) = results["nanollava"], results["transformers"]
    print(f"nanollava / transformers: decode {rate / their_rate:.2f}x the tokens/s, "
          f"time to first token {ttft / their_ttft:.2f}x as long", flush=True)
    return results


# ----------------------------------------------------------------------------- main

def run(args):
    if args.score:
        return score(read_rows(args.score))
    device = args.device
    dtype = DTYPES[args.dtype] or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if args.kernels == "triton" and not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise DataError("--kernels triton on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter)")
    kernels.use(args.kernels)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.bench:
        if args.model:
            return bench(args.model, device, dtype, args.bench_tokens, args.bench_repeats)
        with tempfile.TemporaryDirectory() as tmp:
            return bench(tiny_checkpoint(tmp, llava_next=args.bench_anyres), device, dtype, args.bench_tokens, args.bench_repeats)
    model_dir = args.model or DEFAULT_MODEL
    if not Path(model_dir).is_dir():
        raise DataError(f"no model directory {model_dir}" + (": train one (train.py) or pass --model DIR" if args.model is None else ""))
    if args.eval is None and not args.chat and not args.image and not args.prompt:
        raise DataError("nothing to ask: give --image and/or --prompt, or --chat, --eval, --score, --bench")
    t0 = time.perf_counter()
    model, tok, pre = load(model_dir, args.vision_tower, device, dtype)
    template = args.template or template_for(read_json(Path(model_dir) / "config.json"))
    seconds = time.perf_counter() - t0

    def header():  # printed once the inputs are known to be good, so that bad input gives one line only
        sampling = "greedy" if args.eval is not None or args.temperature == 0 else \
            f"temperature {args.temperature}, top-p {args.top_p}, seed {args.seed}"
        log(f"sample.py: model {model_dir}, device {device}, {str(dtype).removeprefix('torch.')}, kernels {args.kernels}, "
            f"{sampling}, template {template}" + (", AnyRes" if model.config.anyres is not None else ""))
        log(f"loaded in {seconds:.1f} s: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"{model.config.vision.image_size} px images, {model.config.vision.num_patches} image tokens, "
            f"context {model.config.text.max_position_embeddings}")

    if args.eval is not None:
        questions_path, root = args.eval, args.image_root
        if not questions_path:
            if not Path(WORLD_MANIFEST).is_file():
                raise DataError(f"no question file given and no {WORLD_MANIFEST}: run prepare.py, or pass --eval FILE")
            manifest = read_json(WORLD_MANIFEST)["eval"]
            questions_path = str(Path(WORLD_MANIFEST).parent / manifest["questions"])
            root = root or str(Path(WORLD_MANIFEST).parent / manifest["image_root"])
        root = root or str(Path(questions_path).parent)
        questions = check_questions(read_rows(questions_path), root)
        answers_path = args.answers or f"out/eval/{Path(questions_path).stem}-answers.jsonl"
        model_id = "/".join(Path(model_dir).resolve().parts[-2:])
        header()
        records = evaluate(model, tok, pre, questions, root, answers_path, model_id, args.batch_size, args.max_new_tokens or 128,
                           template)
        return score(records)
    max_new = args.max_new_tokens or 512
    if args.chat:
        if len(args.image) > 1 or len(args.prompt) > 1:
            raise DataError("--chat takes at most one --image and one --prompt (the first question)")
        pixels = pre(args.image[0]) if args.image else None
        pixels = pixels[None] if torch.is_tensor(pixels) else pixels
        header()
        return chat(model, tok, pixels, (args.prompt or [None])[0], max_new, args.temperature, args.top_p, template=template)
    items = pair(args.image, args.prompt)
    batch = encode(model, tok, pre, items, template)
    header()
    answers = respond(model, tok, batch, max_new, args.temperature, args.top_p, stream=len(items) == 1, template=template)
    if len(items) > 1:
        for (image, q), ids in zip(items, answers):
            log(f"--- {image or '(no image)'}: {q}")
            print(tok.decode(ids), flush=True)
    return answers


def main(argv=None):
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:  # DataError, CheckpointError, TokenizerError, too-long prompts, unreadable files
        print(f"sample.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
