"""
Ask a LLaVA-1.5 model about images: one answer, a batch, a chat, or an evaluation.

Reads any directory LLaVA.from_pretrained reads: nanollava's own (train.py writes out/stage2/model), llava-hf's,
or the official liuhaotian layout (with --vision-tower DIR when its CLIP tower is not a local directory). The
prompt is built as the official LLaVA-1.5 builds it (vicuna_v1 template, tokenizer_image_token chunking, image
padded to a square with the CLIP mean), so greedy decoding of an official checkpoint gives the official tokens.
stdout carries only the answers (for --eval the metric lines); the rest goes to stderr. The question files, the
official scorers and the evaluation loop are nanollava/eval.py; the speed against transformers, and the server's
with eight clients at once, is bench.py.

    python sample.py --image x.jpg                                     # the newest stage-2 model, answer streamed
    python sample.py --image x.jpg --prompt "What color is the star?" --temperature 0
    python sample.py --image a.png --image b.png --prompt "What is this?"   # one left-padded batch
    python sample.py --image x.jpg --chat                              # multi-turn on stdin, KV cache kept
    python sample.py --eval                                            # the world's held-out questions, scored
    python sample.py --eval questions.jsonl --image-root DIR --answers answers.jsonl
    python sample.py --score answers.jsonl                             # re-score an answers file, no model
    python sample.py --serve [--host 127.0.0.1 --port 8000]            # OpenAI-compatible API and chat page
    python sample.py --image x.jpg --attention out.png                 # where the answer looked, as a heatmap
    python sample.py --model llava-v1.5-7b --vision-tower clip-vit-large-patch14-336 --image x.jpg   # on a GPU

Several images and prompts: N of each go pairwise; one image goes with every prompt and one prompt with every
image; with no image the questions are text-only. They run as one left-padded batch and print one answer per line,
in order (a single answer streams token by token). Bad input (a missing or broken image, an unreadable model
directory, a prompt longer than the context, a flag out of its range) ends with one line on stderr and exit status 2.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

import kernels
from nanollava.checkpoint import read_json
from nanollava.data import CLIP_MEAN, CLIP_STD, IMAGE, DataError, continuation_ids, load_image, prompt_ids
from nanollava import lora
from nanollava.eval import evaluate, read_answers, read_questions, score
from nanollava.llava import LLaVA
from nanollava.tokenizer import load_tokenizer

DEFAULT_MODEL = "out/stage2/model"
WORLD_MANIFEST = "data/world/manifest.json"
DEFAULT_PROMPT = "Describe the image."
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag, exit 2 (argparse would print the usage block first)
        self.exit(2, f"{self.prog}: error: {message}\n")


def checked(kind, ok, rule):
    """An argparse type: kind(text), refused unless ok(value), with the rule in the message (the flag is added)."""
    def parse(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


parser = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None, help=f"model directory (default {DEFAULT_MODEL}, train.py's stage-2 output); nanollava's, llava-hf's or official LLaVA-1.5's layout")
parser.add_argument("--vision-tower", default=None, help="CLIP directory for an official LLaVA-1.5 checkpoint whose mm_vision_tower is not local")
parser.add_argument("--adapter", default=None, help="LoRA adapter directory in PEFT's format (nanollava's or one PEFT wrote for --model), merged at load")
parser.add_argument("--image", action="append", default=[], help="image file; repeat for a batch")
parser.add_argument("--prompt", action="append", default=[], help=f"question (default {DEFAULT_PROMPT!r}); repeat for a batch")
parser.add_argument("--temperature", type=checked(float, lambda t: t >= 0, "0 or more"), default=0.2, help="0 = greedy; 0.2 is the official CLI's default")
parser.add_argument("--top-p", type=checked(float, lambda p: 0 < p <= 1, "in (0, 1]"), default=1.0, help="nucleus sampling: sample from the smallest set of tokens whose probability reaches this")
parser.add_argument("--max-new-tokens", type=checked(int, lambda n: n > 0, "1 or more"), default=None, help="answer length limit (default 512 as the official CLI; 128 for --eval as the official eval scripts)")
parser.add_argument("--seed", type=int, default=1337, help="seed of the sampling")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ... (default cuda if available)")
parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help="weights and activations: auto = bfloat16 on cuda, float32 on cpu")
parser.add_argument("--threads", type=checked(int, lambda n: n > 0, "1 or more"), default=None, help="CPU threads for torch (default: torch's choice, one per core)")
parser.add_argument("--kernels", default="auto", choices=kernels.BACKENDS, help="attention and RMSNorm: auto = Triton on cuda, PyTorch on cpu")
parser.add_argument("--chat", action="store_true", help="multi-turn conversation on stdin, ended by EOF or an empty line; the image goes in the first turn, the KV cache is kept")
parser.add_argument("--eval", nargs="?", const="", default=None, metavar="QUESTIONS", help="answer a LLaVA question file (JSON lines: question_id, image, text[, answer]) greedily and score it; without a file, the world's held-out set from " + WORLD_MANIFEST)
parser.add_argument("--image-root", default=None, help="--eval: the directory the questions' image paths are relative to (default: the question file's)")
parser.add_argument("--answers", default=None, help="--eval: the answers file to write, LLaVA's format (default out/eval/<questions>-answers.jsonl)")
parser.add_argument("--batch-size", type=checked(int, lambda n: n > 0, "1 or more"), default=16, help="--eval: questions per left-padded batch")
parser.add_argument("--score", default=None, metavar="ANSWERS", help="score an answers file that holds the reference answers (as --eval writes it); needs no model")
parser.add_argument("--serve", action="store_true", help="serve the model: OpenAI-compatible /v1/chat/completions and a chat page at / (nanollava/serve.py)")
parser.add_argument("--host", default="127.0.0.1", help="--serve: the address to listen on (default loopback only)")
parser.add_argument("--port", type=checked(int, lambda n: 0 < n < 65536, "from 1 to 65535"), default=8000, help="--serve: the port")
parser.add_argument("--attention", default=None, metavar="PNG", help="with one --image: write it with a heatmap of the attention the answer gives to each image patch (nanollava/attention_map.py)")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- model, prompts, generation

def load(model_dir, vision_tower=None, device="cpu", dtype=torch.float32, adapter=None):
    """The model (with a LoRA adapter merged in), its tokenizer, and its image preprocessing: size from the vision
    config, mean and std from preprocessor_config.json (beside the model, else the tower) or CLIP's, square padding."""
    model = LLaVA.from_pretrained(model_dir, vision_tower, dtype)
    model = (lora.unload(lora.load_adapter(model, adapter)) if adapter else model).to(device)
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
    return model, tok, lambda image: load_image(image, size, pad=True, mean=tuple(mean), std=tuple(std))


def encode(model, tok, pre, items):
    """[(image or None, question)] -> left-padded input_ids (B, T), attention_mask (B, T), pixel_values (N, 3, S, S)
    or None. Each row is the vicuna_v1 prompt with the image first in the question, as the official eval scripts."""
    rows = [prompt_ids([(q if image is None else IMAGE + "\n" + q, None)], tok, model.image_token_id) for image, q in items]
    T = max(map(len, rows))
    longest = max(len(r) + (model.config.vision.num_patches - 1) * (image is not None) for r, (image, _) in zip(rows, items))
    if longest >= model.config.text.max_position_embeddings:  # checked here too so that it fails before any output
        raise ValueError(f"the prompt is {longest} tokens with its image features; the context holds "
                         f"{model.config.text.max_position_embeddings}")
    ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
    pixels = [pre(image) for image, _ in items if image is not None]
    dev = model.language_model.lm_head.weight.device
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

    def __init__(self, tok, out=None):
        self.tok, self.out, self.ids, self.shown = tok, out or sys.stdout, [], ""

    def __call__(self, token):  # on_token: (1,) ids
        if int(token[0]) != self.tok.eos_id:
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


def respond(model, tok, batch, max_new_tokens=512, temperature=0.0, top_p=1.0, stream=False):
    """Answers to an encoded batch as lists of ids (eos dropped); streamed to stdout if asked (one row)."""
    ids, mask, pixels = batch
    printer = Stream(tok) if stream else None
    clock = Clock(printer)
    out = model.generate(ids, pixels, mask, max_new_tokens, temperature, top_p, eos_id=tok.eos_id, on_token=clock)
    if printer:
        printer.finish()
    clock.report(ids.shape[1] + (0 if pixels is None else model.config.vision.num_patches - 1), ids.shape[0])
    return [until_eos(row, tok.eos_id) for row in out]


def answer(model, tok, pre, items, max_new_tokens=512, temperature=0.0, top_p=1.0, stream=False):
    """Answers to [(image or None, question)] as lists of ids (eos dropped), in one batch."""
    return respond(model, tok, encode(model, tok, pre, items), max_new_tokens, temperature, top_p, stream)


def chat(model, tok, pixels=None, first=None, max_new_tokens=512, temperature=0.2, top_p=1.0, stdin=None, out=None):
    """A conversation on one KV cache at the model's context size, as the official CLI but without re-encoding
    each turn: the image (pixels (1, 3, S, S) or None) and the system prompt go in the first turn; each later turn
    feeds the </s> that closed the previous answer (after its last token, if it stopped without one) and
    "USER: {q} ASSISTANT:". Returns every turn's answer ids."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    cache = model.new_cache(1, model.config.text.max_position_embeddings)
    pixels = None if pixels is None else pixels.to(cache.k[0].device)
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
            ids = prompt_ids([(q if pixels is None else IMAGE + "\n" + q, None)], tok, model.image_token_id)
        else:
            ids = feed + continuation_ids(q, tok)
        sys.stderr.write("ASSISTANT: ")
        sys.stderr.flush()
        context = cache.len + len(ids) + (model.config.vision.num_patches - 1 if pixels is not None and feed is None else 0)
        printer = Stream(tok, out)
        clock = Clock(printer)
        new = model.generate(torch.tensor([ids], device=cache.k[0].device), pixels if feed is None else None,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, eos_id=tok.eos_id,
                             cache=cache, on_token=clock)[0].tolist()
        printer.finish()
        clock.report(context)
        turns.append(until_eos(new, tok.eos_id))
        feed = [tok.eos_id] if new[-1] == tok.eos_id else [new[-1], tok.eos_id]  # the last token is not cached yet
        q = None


# ----------------------------------------------------------------------------- main

def run(args):
    if args.score:
        return score(read_answers(args.score))
    device = args.device
    dtype = DTYPES[args.dtype] or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if args.kernels == "triton" and not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise DataError("--kernels triton on the CPU needs TRITON_INTERPRET=1 (Triton's interpreter)")
    kernels.use(args.kernels)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_dir = args.model or DEFAULT_MODEL
    if not Path(model_dir).is_dir():
        raise DataError(f"no model directory {model_dir}" + (": train one (train.py) or pass --model DIR" if args.model is None else ""))
    if args.eval is None and not args.chat and not args.image and not args.prompt and not args.serve:
        raise DataError("nothing to ask: give --image and/or --prompt, or --chat, --eval, --score, --serve")
    if args.attention and (len(args.image) != 1 or len(args.prompt) > 1 or args.chat or args.eval is not None):
        raise DataError("--attention needs exactly one --image and at most one --prompt")
    if args.eval is not None:  # the question file is checked whole before the model loads
        questions_path, root = args.eval, args.image_root
        if not questions_path:
            if not Path(WORLD_MANIFEST).is_file():
                raise DataError(f"no question file given and no {WORLD_MANIFEST}: run prepare.py, or pass --eval FILE")
            manifest = read_json(WORLD_MANIFEST)["eval"]
            questions_path = str(Path(WORLD_MANIFEST).parent / manifest["questions"])
            root = root or str(Path(WORLD_MANIFEST).parent / manifest["image_root"])
        root = root or str(Path(questions_path).parent)
        questions = read_questions(questions_path, root)
        answers_path = args.answers or f"out/eval/{Path(questions_path).stem}-answers.jsonl"
        model_id = "/".join(Path(model_dir).resolve().parts[-2:])
    t0 = time.perf_counter()
    model, tok, pre = load(model_dir, args.vision_tower, device, dtype, args.adapter)
    seconds = time.perf_counter() - t0

    def header():  # printed once the inputs are known to be good, so that bad input gives one line only
        sampling = "greedy" if args.eval is not None or args.temperature == 0 else \
            f"temperature {args.temperature}, top-p {args.top_p}, seed {args.seed}"
        log(f"sample.py: model {model_dir}, device {device}, {str(dtype).removeprefix('torch.')}, kernels {args.kernels}, {sampling}")
        log(f"loaded in {seconds:.1f} s: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"{model.config.vision.image_size} px images, {model.config.vision.num_patches} image tokens, "
            f"context {model.config.text.max_position_embeddings}")

    if args.eval is not None:
        header()
        max_new = 128 if args.max_new_tokens is None else args.max_new_tokens  # the official eval scripts' 128

        def greedy(items):  # one left-padded batch of [(image path or None, question)] -> answer texts
            ids, mask, pixels = encode(model, tok, pre, items)
            out = model.generate(ids, pixels, mask, max_new, temperature=0.0, eos_id=tok.eos_id)
            return [tok.decode(until_eos(row, tok.eos_id)).strip() for row in out]

        return score(evaluate(greedy, questions, root, answers_path, model_id, args.batch_size))
    if args.serve:
        from nanollava import serve
        name = "/".join(Path(model_dir).resolve().parts[-2:])
        header()
        return serve.serve(model, tok, pre, name, args.host, args.port)
    max_new = 512 if args.max_new_tokens is None else args.max_new_tokens  # the official CLI's 512
    if args.chat:
        if len(args.image) > 1 or len(args.prompt) > 1:
            raise DataError("--chat takes at most one --image and one --prompt (the first question)")
        pixels = pre(args.image[0])[None] if args.image else None
        header()
        return chat(model, tok, pixels, (args.prompt or [None])[0], max_new, args.temperature, args.top_p)
    items = pair(args.image, args.prompt)
    batch = encode(model, tok, pre, items)
    header()
    answers = respond(model, tok, batch, max_new, args.temperature, args.top_p, stream=len(items) == 1)
    if args.attention:
        from nanollava.attention_map import image_attention, overlay, patch_grid
        ids, _, pixels = batch
        grid = patch_grid(image_attention(model, ids[0], pixels, answers[0]), model.config.vision)
        log(f"attention over the {grid.numel()} image patches written to {overlay(args.image[0], grid.cpu(), args.attention)}")
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
