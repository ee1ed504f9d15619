"""
nanollava against transformers' LlavaForConditionalGeneration on the same weights, each side measured in one run
and the ratio printed: a stage-2 training step, a LoRA step against PEFT, greedy decoding, and loading a checkpoint;
and nanollava's server (nanollava/serve.py) with eight clients at once against the same requests one at a time.

    python bench.py train --steps 20                          # prepare.py's world: 16 rows, forward+backward+AdamW
    python bench.py lora --threads 1                          # LoRA r 16 step vs PEFT: 4 blocks of 512, vocab 32064
    python bench.py lora --model llava-1.5-7b-hf --rank 128 --alpha 256 --device cuda   # on a GPU
    python bench.py decode                                    # a tiny random world-sized checkpoint, 64 tokens
    python bench.py decode --model out/stage2/model --repeats 9
    python bench.py load --model out/stage2/model             # from_pretrained to a ready model, both sides
    python bench.py decode --model llava-1.5-7b-hf --device cuda   # on a GPU
    python bench.py decode --next                             # LLaVA-1.6: a tiny llava_next checkpoint, a 2 x 2 tile image
    python bench.py serve --model out/stage2/model --threads 1  # the server: 8 clients at once vs one at a time

The two sides alternate inside each repeat, so a change in machine load hits both alike; medians (train: means)
are reported (lora: CPU time on a CPU, which other work on a shared machine does not inflate as it does wall
time). transformers and peft are test-only dependencies of nanollava: they are imported here only. The kernels'
own benchmark (Triton against SDPA and eager PyTorch) is kernels/bench.py. `serve` needs a model with its tokenizer
(default out/stage2/model, what train.py writes); its requests carry the world's eval images when prepare.py's
world is there, random pictures otherwise.
"""
import argparse
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image

import kernels
from nanollava import anyres
from nanollava.anyres import AnyResConfig
from nanollava import lora
from nanollava.checkpoint import read_json
from nanollava.data import LLaVADataset, collate
from nanollava.templates import DataError, IMAGE, prompt_ids
from nanollava.llava import LLaVA, LLaVAConfig, expand_image_tokens
from nanollava.llama import LlamaConfig
from nanollava.recipes import RECIPES
from nanollava.tokenizer import load_tokenizer
from nanollava.vit import ViTConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SERVE_MODEL = "out/stage2/model"

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("what", choices=["train", "lora", "decode", "load", "serve"], help="the training step, the LoRA step, greedy decoding, loading, or the server")
parser.add_argument("--model", help="lora, decode, load: a llava-hf layout checkpoint (default: a tiny random one); "
                                    "serve: any model sample.py reads (default " + SERVE_MODEL + ")")
parser.add_argument("--data", default=RECIPES["world"].data, help="train: prepare.py's manifest (its CLIP, Vicuna and stage-2 data); serve: its eval images, if it is there")
parser.add_argument("--steps", type=int, default=20, help="train, lora: timed steps after 2 warm-up steps")
parser.add_argument("--micro-batch", type=int, default=None, help="train, lora: rows in the batch (default 16, lora 4)")
parser.add_argument("--rank", type=int, default=16, help="lora: LoRA rank r")
parser.add_argument("--alpha", type=float, default=32, help="lora: LoRA alpha (scale alpha / r)")
parser.add_argument("--lora-dropout", type=float, default=0.05, help="lora: dropout on the LoRA input (official 0.05)")
parser.add_argument("--next", action="store_true", help="decode, load without --model: a tiny LLaVA-1.6 (AnyRes, llava_next) checkpoint, against LlavaNextForConditionalGeneration")
parser.add_argument("--tokens", type=int, default=64, help="decode: new tokens per generation (eos ignored by both); serve: at most this many per answer")
parser.add_argument("--repeats", type=int, default=None, help="decode, load, serve: timed repeats after a warm-up (default 5; serve 3)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ...")
parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bfloat16 on cuda, float32 on cpu")
parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
parser.add_argument("--seed", type=int, default=1337, help="train: seeds the projector's init")


def transformers_llava(model_type="llava"):
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
    from transformers.utils.logging import disable_progress_bar
    disable_progress_bar()
    return LlavaNextForConditionalGeneration if model_type == "llava_next" else LlavaForConditionalGeneration


def synced(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def tiny_checkpoint(out_dir, width=128, layers=2, vocab=1088, llava_next=False):
    """A random checkpoint (llava-hf layout) of the default world's model size, as prepare.py and train.py build it:
    LLM hidden 128 (heads of 32, MLP 8/3 x), 2 layers, vocabulary 1024 + <image> + <pad> padded to 1088; tower
    hidden 128, 3 layers, 72 px images in 24 px patches (9 image tokens). llava_next=True: LLaVA-1.6's AnyRes over
    the released pinpoints scaled to 72 px tiles."""
    torch.manual_seed(0)
    vision = ViTConfig(image_size=72, patch_size=24, hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4)
    text = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=(8 * width // 3 + 63) // 64 * 64,
                       num_hidden_layers=layers, num_attention_heads=width // 32, max_position_embeddings=2048)
    tiles = AnyResConfig(tuple((a * 72 // 336, b * 72 // 336) for a, b in anyres.PINPOINTS)) if llava_next else None
    LLaVA(LLaVAConfig(vision, text, image_token_id=1024, pad_token_id=1025, anyres=tiles)).save_pretrained(out_dir)
    return out_dir


def checked_llava_hf(model_dir):
    if read_json(Path(model_dir) / "config.json").get("model_type") not in ("llava", "llava_next"):
        raise DataError(f"{model_dir}: the benchmark needs a llava-hf layout checkpoint (transformers cannot read the official one)")


# ----------------------------------------------------------------------------- the stage-2 training step

def bench_train(manifest_path, steps, micro_batch, device, seed):
    """Forward, backward and AdamW on one stage-2 batch of prepare.py's world, the tower frozen, both models
    from the same weights; mean step time of `steps` steps after 2 warm-up steps."""
    LlavaForConditionalGeneration = transformers_llava()
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        raise DataError(f"no manifest {manifest_path}: run prepare.py, or pass --data")
    manifest = json.loads(manifest_path.read_text())
    at = lambda p: manifest_path.parent / p
    torch.manual_seed(seed)
    ours = LLaVA.from_base(at(manifest["clip"]), at(manifest["vicuna"]))
    tok = load_tokenizer(at(manifest["vicuna"]))
    tok.add_special_tokens(["<image>", "<pad>"])
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = LlavaForConditionalGeneration.from_pretrained(d, attn_implementation="sdpa")
    ours, theirs = ours.to(device), theirs.to(device)
    S, P = ours.config.vision.image_size, ours.config.vision.num_patches
    ds = LLaVADataset(at(manifest["stage2"]["data"]), at(manifest["stage2"]["image_root"]), tok, "vicuna_v1",
                      ours.image_token_id, image_size=S, image_seq_len=P)
    b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate([ds[i] for i in range(micro_batch)], tok.pad_id).items()}
    # transformers wants each <image> already repeated P times
    hf_ids, hf_mask, hf_labels, _ = expand_image_tokens(b["input_ids"], ours.image_token_id, P, b["attention_mask"],
                                                        b["labels"], pad_id=tok.pad_id)
    steps_of = {"nanollava": lambda: ours(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"]),
                "transformers": lambda: theirs(input_ids=hf_ids, pixel_values=b["pixel_values"], attention_mask=hf_mask, labels=hf_labels).loss}
    opts, times = {}, {"nanollava": 0.0, "transformers": 0.0}
    for name, model, tower in (("nanollava", ours, ours.vision_tower), ("transformers", theirs, theirs.model.vision_tower)):
        model.train().requires_grad_(True)
        tower.requires_grad_(False)
        opts[name] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for i in range(2 + steps):
        for name in times:
            t0 = synced(device)
            steps_of[name]().backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            times[name] += (synced(device) - t0) / steps if i >= 2 else 0.0
    print(f"stage-2 step, batch {hf_ids.shape[0]} x {hf_ids.shape[1]} tokens, {torch.get_num_threads()} threads:", flush=True)
    for name, t in times.items():
        print(f"{name:>12}: {1e3 * t:7.1f} ms a step", flush=True)
    print(f"nanollava / transformers: {times['transformers'] / times['nanollava']:.2f}x the steps/s", flush=True)
    return times


# ----------------------------------------------------------------------------- the LoRA step against PEFT

def batch_for(model, batch, text_tokens, device):
    """input_ids with one image placeholder after <s>, labels on the second half of the text; and the same batch as
    transformers' Llava takes it (one placeholder per patch, labels -100 over the image)."""
    g = torch.Generator().manual_seed(1)
    P, img = model.config.vision.num_patches, model.image_token_id
    text = torch.randint(3, img, (batch, text_tokens), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, 1), img), text], 1)
    labels = ids.clone()
    labels[:, :2 + text_tokens // 2] = -100
    hf_ids = torch.cat([ids[:, :1], torch.full((batch, P), img), text], 1)
    hf_labels = torch.cat([labels[:, :1], torch.full((batch, P), -100), labels[:, 2:]], 1)
    px = torch.randn(batch, 3, model.config.vision.image_size, model.config.vision.image_size, generator=g)
    return [t.to(device) for t in (ids, labels, px, hf_ids, hf_labels)]


def state_bytes(opt):
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def bench_lora(model_dir, rank=16, alpha=32, dropout=0.05, batch=4, text_tokens=64, steps=5, device="cpu",
               dtype=torch.float32, out=sys.stdout):
    """Times one LoRA stage-2 step of nanollava and of PEFT on transformers' Llava on model_dir (llava-hf layout).
    Returns {"nanollava": seconds, "peft": seconds, "ratio": peft / nanollava}."""
    from peft import PeftModel
    LlavaForConditionalGeneration = transformers_llava()
    ours = lora.inject(LLaVA.from_pretrained(model_dir, dtype=dtype), rank, alpha, dropout).to(device)
    lora.mark_trainable(ours)
    with torch.no_grad():  # B starts at zero; a nonzero B makes the comparison of the losses below mean something
        for m in lora.lora_layers(ours).values():
            m.lora_B.weight.normal_(0, 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        lora.save_adapter(ours, tmp)
        hf = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
        theirs = PeftModel.from_pretrained(hf, tmp, is_trainable=True).to(device)
    ids, labels, px, hf_ids, hf_labels = batch_for(ours, batch, text_tokens, device)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        l_ours, l_theirs = float(ours(ids, px, labels=labels)), float(theirs(input_ids=hf_ids, pixel_values=px, labels=hf_labels).loss)
    print(f"loss without dropout: nanollava {l_ours:.6f}, PEFT {l_theirs:.6f} (difference {abs(l_ours - l_theirs):.2g})", file=out)
    ours.train(), theirs.train()
    sides = {"nanollava": (ours, lambda: ours(ids, px, labels=labels)),
             "peft": (theirs, lambda: theirs(input_ids=hf_ids, pixel_values=px, labels=hf_labels).loss)}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, (m, _) in sides.items()}
    times = {k: [] for k in sides}
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    for i in range(2 + steps):  # the two sides alternate, so a slower minute of a shared machine hits both
        for k, (m, loss_fn) in sides.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = clock()
            loss_fn().backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= 2:
                times[k].append(clock() - t0)
    result = {k: statistics.median(v) for k, v in times.items()}
    result["ratio"] = result["peft"] / result["nanollava"]
    for k, (m, _) in sides.items():
        n = sum(p.numel() for p in m.parameters() if p.requires_grad)
        print(f"{k:9s}  step {result[k]:.3f} s  trainable {n:,} parameters  AdamW state {state_bytes(opts[k]) / 2**20:.2f} MiB", file=out)
    what = "wall" if device.startswith("cuda") else "CPU"
    print(f"nanollava is {result['ratio']:.2f}x PEFT's speed ({what} time, median of {steps} steps, r {rank}, batch {batch})", file=out)
    return result


# ----------------------------------------------------------------------------- greedy decoding

def bench_decode(model_dir, device, dtype, n_new, repeats):
    """nanollava's generate and transformers' generate on the same checkpoint, prompt and greedy settings, exactly
    n_new tokens each (eos ignored): time to first token (image, prefill and one token, timed as a 1-token
    generation) and decode tokens/s ((n_new - 1) / (time(n_new) - time(1))), medians of repeats."""
    checked_llava_hf(model_dir)
    ours = LLaVA.from_pretrained(model_dir, dtype=dtype, conventions="transformers").to(device)
    kind = read_json(Path(model_dir) / "config.json")["model_type"]
    theirs = transformers_llava(kind).from_pretrained(model_dir, dtype=dtype).to(device).eval()
    cfg, img = ours.config, ours.image_token_id
    g = torch.Generator().manual_seed(0)
    if any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        ids = prompt_ids([(IMAGE + "\n" + "Describe the image.", None)], load_tokenizer(model_dir), img)
    else:  # as long as the vicuna_v1 prompt of a short question
        ids = [1] + torch.randint(3, img, (35,), generator=g).tolist() + [img] + torch.randint(3, img, (12,), generator=g).tolist()
    S, P = cfg.vision.image_size, cfg.vision.num_patches
    pixels = torch.randn(1, 3, S, S, generator=g).to(device=device, dtype=dtype)
    hf_pixels, ours_kw, hf_kw = pixels, {}, {}
    if cfg.anyres is not None:  # an image of 2 x 2 tiles (at 336-px tiles, 640 x 480: 2340 image tokens)
        size = (S * 40 // 21, S * 10 // 7)
        P = anyres.num_tokens(size, cfg.anyres.pinpoints, S, S // cfg.vision.patch_size, hf=True)
        n = anyres.num_tiles(size, cfg.anyres.pinpoints, S, hf=True)
        pixels = torch.randn(n, 3, S, S, generator=g).to(device=device, dtype=dtype)
        hf_pixels = pixels[None]  # transformers' LlavaNext: (N, tiles, 3, S, S), image_sizes (height, width)
        ours_kw, hf_kw = {"image_sizes": [size]}, {"image_sizes": torch.tensor([[size[1], size[0]]], device=device)}
    ids = torch.tensor([ids], device=device)
    hf_ids = expand_image_tokens(ids, img, P).input_ids  # llava-hf repeats <image> P times
    runs = {"nanollava": lambda n: ours.generate(ids, pixels, max_new_tokens=n, eos_id=-1, **ours_kw),
            "transformers": lambda n: theirs.generate(input_ids=hf_ids, pixel_values=hf_pixels, attention_mask=torch.ones_like(hf_ids),
                                                      max_new_tokens=n, min_new_tokens=n, do_sample=False, **hf_kw)[:, hf_ids.shape[1]:]}

    def timed(fn, n):
        t = synced(device)
        with torch.no_grad():
            out = fn(n)
        return synced(device) - t, out

    print(f"decode: {model_dir} on {device} ({dtype}), prompt {ids.shape[1] + P - 1} positions with {P} image tokens, "
          f"{n_new} new tokens, {repeats} repeats, {torch.get_num_threads()} threads", file=sys.stderr, flush=True)
    tokens = {name: timed(fn, n_new)[1][0].tolist() for name, fn in runs.items()}  # warm-up
    times = {name: ([], []) for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name][0].append(timed(fn, 1)[0])
            times[name][1].append(timed(fn, n_new)[0])
    results = {}
    for name, (first, full) in times.items():  # decode time paired within each repeat, so a slow moment cancels
        decode = statistics.median(b - a for a, b in zip(first, full))
        first = statistics.median(first)
        results[name] = (first, (n_new - 1) / decode)
        print(f"{name:>12}: time to first token {first * 1000:7.2f} ms, decode {results[name][1]:8.1f} tokens/s", flush=True)
    same = next((i for i, (a, b) in enumerate(zip(*tokens.values())) if a != b), n_new)
    print(f"greedy tokens agree for the first {same} of {n_new}", file=sys.stderr, flush=True)
    (ttft, rate), (their_ttft, their_rate) = results["nanollava"], results["transformers"]
    print(f"nanollava / transformers: decode {rate / their_rate:.2f}x the tokens/s, "
          f"time to first token {ttft / their_ttft:.2f}x as long", flush=True)
    return results


# ----------------------------------------------------------------------------- loading

def bench_load(model_dir, device, dtype, repeats):
    """from_pretrained of each side, from the checkpoint's files to a model ready on the device, medians of repeats
    after a warm-up (the warm-up fills the page cache, so both read from memory)."""
    checked_llava_hf(model_dir)
    LlavaForConditionalGeneration = transformers_llava(read_json(Path(model_dir) / "config.json")["model_type"])
    runs = {"nanollava": lambda: LLaVA.from_pretrained(model_dir, dtype=dtype).to(device),
            "transformers": lambda: LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(device).eval()}
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t = synced(device)
            model = fn()
            times[name].append(synced(device) - t)
            del model
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"load: {model_dir} on {device} ({dtype}), {repeats} repeats:", flush=True)
    for name, t in medians.items():
        print(f"{name:>12}: {1e3 * t:8.1f} ms", flush=True)
    print(f"nanollava / transformers: {medians['transformers'] / medians['nanollava']:.2f}x as fast", flush=True)
    return medians


# ----------------------------------------------------------------------------- the server

def _ask(port, body):
    """One streamed request with the standard library: (start, first content, end, text, completion tokens)."""
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0, first, text, usage = time.perf_counter(), None, [], None
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    for line in r:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        ev = json.loads(line[6:])
        usage = ev.get("usage") or usage
        if ev["choices"] and ev["choices"][0]["delta"].get("content"):
            first = first or time.perf_counter()
            text.append(ev["choices"][0]["delta"]["content"])
    c.close()
    return t0, first, time.perf_counter(), "".join(text), usage["completion_tokens"]


def _clients(port, bodies, repeats, conn):
    """The benchmark's clients, in their own process: each repeat serves the requests one at a time, then all at
    once from one thread each."""
    from concurrent.futures import ThreadPoolExecutor
    rounds = []
    for _ in range(repeats):
        alone = [_ask(port, b) for b in bodies]
        with ThreadPoolExecutor(len(bodies)) as pool:
            together = list(pool.map(lambda b: _ask(port, b), bodies))
        rounds.append((alone, together))
    conn.send(rounds)


def bench_serve(model_dir, world_manifest, device, dtype, n_new, repeats, clients=8):
    """Eight clients at once against the same requests one at a time, on a server in this process (clients in
    another): total answer tokens/s (all completion tokens over the wall time from the first request to the last
    answer), the ratio, and time to first token alone and under load; medians over repeats."""
    import multiprocessing
    import socket
    import uvicorn
    import sample  # the model, its tokenizer and its image preprocessing, as `sample.py --serve` loads them
    from nanollava.serve import Limits, create_app
    if not Path(model_dir).is_dir():
        raise DataError(f"no model directory {model_dir}: train one (train.py) or pass --model DIR")
    model, tok, pre = sample.load(model_dir, None, device, dtype)
    name = "/".join(Path(model_dir).resolve().parts[-2:])
    manifest = Path(world_manifest)
    if manifest.is_file():
        root = manifest.parent / json.loads(manifest.read_text())["eval"]["image_root"]
        files = sorted((root / "eval").glob("*.png"))[:clients] or sorted(root.rglob("*.png"))[:clients]
        images = [f.read_bytes() for f in files]
    else:
        images = []
    if len(images) < clients:  # no world: random pictures
        g = torch.Generator().manual_seed(0)
        for _ in range(clients - len(images)):
            buf = io.BytesIO()
            Image.fromarray((torch.rand(72, 72, 3, generator=g) * 255).byte().numpy()).save(buf, format="PNG")
            images.append(buf.getvalue())
    bodies = [{"model": name, "temperature": 0, "max_tokens": n_new, "stream": True,
               "stream_options": {"include_usage": True},
               "messages": [{"role": "user", "content": [
                   {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(im).decode()}},
                   {"type": "text", "text": "Describe the image in detail."}]}]} for im in images]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model, tok, pre, name, Limits(max_batch=clients)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    print(f"serve bench: {name}, {clients} requests (world images, 'Describe the image in detail.', greedy, at most "
          f"{n_new} tokens), {repeats} repeats after a warm-up, {torch.get_num_threads()} threads", file=sys.stderr, flush=True)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_clients, args=(port, bodies, repeats + 1, child))
    p.start()
    rounds = parent.recv()[1:]  # the first round warms up
    p.join()
    server.should_exit = True

    def rate(results):  # all answer tokens over the wall time of the whole set
        return sum(r[4] for r in results) / (max(r[2] for r in results) - min(r[0] for r in results))

    seq = statistics.median(rate(a) for a, _ in rounds)
    par = statistics.median(rate(t) for _, t in rounds)
    ttft_alone = statistics.median((r[1] - r[0]) * 1000 for a, _ in rounds for r in a)
    ttft_load = [(r[1] - r[0]) * 1000 for _, t in rounds for r in t]
    same = sum(x[3] == y[3] for a, t in rounds for x, y in zip(a, t))
    tokens = statistics.median(sum(r[4] for r in a) for a, _ in rounds)
    print(f"one at a time: {seq:8.1f} tokens/s; time to first token {ttft_alone:.1f} ms (median)", flush=True)
    print(f"{clients} at once:    {par:8.1f} tokens/s; time to first token {statistics.median(ttft_load):.1f} ms "
          f"median, {max(ttft_load):.1f} ms worst", flush=True)
    print(f"batched / one at a time: {par / seq:.2f}x the tokens/s ({tokens:.0f} answer tokens a round; "
          f"{same} of {len(rounds) * clients} answers identical both ways)", flush=True)
    return seq, par


def main(argv=None):
    args = parser.parse_args(argv)
    args.repeats = args.repeats if args.repeats is not None else 3 if args.what == "serve" else 5
    for flag, value in (("--steps", args.steps), ("--micro-batch", args.micro_batch if args.micro_batch is not None else 1), ("--tokens", args.tokens),
                        ("--repeats", args.repeats), ("--threads", args.threads or 1)):
        if value < 1:
            parser.error(f"{flag} must be 1 or more, not {value}")
    dtype = DTYPES[args.dtype] if args.dtype else torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kernels.use("auto")
    try:
        if args.what == "train":
            return bench_train(args.data, args.steps, args.micro_batch or 16, args.device, args.seed)
        if args.what == "serve":
            return bench_serve(args.model or SERVE_MODEL, args.data, args.device, dtype, args.tokens, args.repeats)
        with tempfile.TemporaryDirectory() as tmp:
            if args.what == "lora":  # the 1.63x of the README: 4 blocks of width 512, llava-hf's 32064 vocabulary
                model_dir = args.model or tiny_checkpoint(tmp, width=512, layers=4, vocab=32064)
                print(f"lora: {model_dir} on {args.device} ({dtype}), r {args.rank}, alpha {args.alpha}, dropout "
                      f"{args.lora_dropout}, batch {args.micro_batch or 4} x 64 text tokens, {torch.get_num_threads()} threads", flush=True)
                return bench_lora(model_dir, args.rank, args.alpha, args.lora_dropout, args.micro_batch or 4, 64, args.steps,
                                  args.device, dtype)
            model_dir = args.model or tiny_checkpoint(tmp, llava_next=args.next)
            if args.what == "decode":
                return bench_decode(model_dir, args.device, dtype, args.tokens, args.repeats)
            return bench_load(model_dir, args.device, dtype, args.repeats)
    except (ValueError, OSError) as e:  # DataError, CheckpointError: one line, exit 2
        print(f"bench.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
