"""
Prepares what nanollava trains on: base models and data, in the official formats.

The synthetic world (default): images of shapes drawn by nanollava/world.py, LLaVA-format JSON
for both stages, a held-out question file, and the tiny base models the recipe starts from (a
CLIP vision tower and a Vicuna-style Llama with its own tokenizer), each pretrained briefly on
the world. Everything is a function of --seed; parts already built are reused (each part writes
a marker last, holding the flags it was built with); --force rebuilds.

    python prepare.py                                    # data/world, under 3 minutes on a 2-core CPU
    python prepare.py --n-train 400 --vit-steps 50 --llm-steps 50 --root /tmp/small
    python prepare.py --force                            # rebuild everything

The real LLaVA-1.5 (weights from the Hugging Face hub, needs `pip install huggingface_hub`; image
sets by resumable HTTP): downloads what it can, checks which rows have their image, writes
DIR/llava-1.5/manifest-7b.json.

    python prepare.py --recipe llava-1.5 --size 7b --root DIR
    python prepare.py --recipe llava-1.5 --size 13b --root DIR --image-sets none   # only check and write the manifest
"""
import argparse
import functools
import http.client
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--recipe", default="world", choices=["world", "llava-1.5"], help="the synthetic world, or the official LLaVA-1.5 weights and data")
parser.add_argument("--root", default="data", help="output root: the world goes to ROOT/world, LLaVA-1.5 to ROOT/llava-1.5")
parser.add_argument("--force", action="store_true", help="rebuild parts that are already complete")
parser.add_argument("--seed", type=int, default=1337, help="seed of everything in the world (scenes, text, model init, batches)")
# the world
parser.add_argument("--image-size", type=int, default=72, help="image side in pixels (divisible by 3: a 3x3 grid of named positions)")
parser.add_argument("--patch-size", type=int, default=24, help="vision tower patch size; image-size / 3 puts one cell in each image token")
parser.add_argument("--n-train", type=int, default=15000, help="training images (stage 1 captions one each; stage 2 rows several each)")
parser.add_argument("--n-eval", type=int, default=300, help="held-out evaluation images (layouts never seen in training)")
parser.add_argument("--eval-questions", type=int, default=2, help="questions per evaluation image")
parser.add_argument("--n-text", type=int, default=200, help="text-only stage 2 rows")
# the base models and their pretraining
parser.add_argument("--vit-width", type=int, default=128, help="vision tower hidden size (intermediate is 4x)")
parser.add_argument("--vit-layers", type=int, default=3, help="vision tower layers (LLaVA uses the output of the second to last)")
parser.add_argument("--vit-heads", type=int, default=4, help="vision tower attention heads")
parser.add_argument("--vit-steps", type=int, default=500, help="vision tower pretraining steps (per-patch shape attributes)")
parser.add_argument("--vit-images", type=int, default=8000, help="training images the vision tower pretrains on (the first ones)")
parser.add_argument("--vit-batch", type=int, default=64, help="vision tower pretraining batch size (images)")
parser.add_argument("--vit-lr", type=float, default=2e-3, help="vision tower pretraining peak learning rate")
parser.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary (259 of it are <unk>, <s>, </s> and the byte fallback)")
parser.add_argument("--llm-width", type=int, default=128, help="language model hidden size (intermediate is 8/3 x)")
parser.add_argument("--llm-layers", type=int, default=2, help="language model layers")
parser.add_argument("--llm-heads", type=int, default=8, help="language model attention heads")
parser.add_argument("--llm-steps", type=int, default=700, help="language model pretraining steps (the world's questions, captions and facts)")
parser.add_argument("--llm-batch", type=int, default=32, help="language model pretraining batch size (half chats or captions, half facts)")
parser.add_argument("--llm-lr", type=float, default=3e-3, help="language model pretraining peak learning rate")
# LLaVA-1.5
parser.add_argument("--size", default="7b", choices=["7b", "13b"], help="Vicuna size for --recipe llava-1.5")
parser.add_argument("--image-sets", default="all", help="image sets to download for --recipe llava-1.5: all, none (only check), or a comma list of pretrain,coco,gqa,textvqa,vg")


def log(msg):
    print(msg, flush=True)


def done(marker, config):
    """A part is complete when its marker (written last) holds the flags it was built with."""
    try:
        return json.loads(Path(marker).read_text())["config"] == config
    except (OSError, ValueError, KeyError):
        return False


def finish(marker, config, **info):
    Path(marker).write_text(json.dumps({"config": config, **info}, indent=1) + "\n")


def write_json(obj, path, indent=None):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)


# ============================================================================================ the world

def build_world(args, out):
    """Images, stage1.json, stage2.json, eval.jsonl, scenes.json (the ground truth of every image)."""
    from nanollava import world as W
    for p in ["images", "stage1.json", "stage2.json", "eval.jsonl", "scenes.json"]:
        shutil.rmtree(out / p, ignore_errors=True) if (out / p).is_dir() else (out / p).unlink(missing_ok=True)
    rng = random.Random(args.seed)
    train = W.sample_scenes(rng, args.n_train)
    evals = W.sample_scenes(rng, args.n_eval, exclude={s.key() for s in train})  # held-out layouts
    stage1, stage2, questions = [], [], []
    jobs = []
    for split, scenes in [("train", train), ("eval", evals)]:
        (out / "images" / split).mkdir(parents=True)
        jobs += [(scene, args.image_size, out / "images" / split / f"{i:06d}.png") for i, scene in enumerate(scenes)]
    with multiprocessing.get_context("spawn").Pool(min(os.cpu_count() or 1, 8)) as pool:  # drawing is most of the time
        pool.starmap(draw_png, jobs, chunksize=256)
    for i, scene in enumerate(train):
        image = f"train/{i:06d}.png"
        stage1.append(W.stage1_row(scene, rng, f"world-{i:06d}", image))
        stage2.extend(W.stage2_rows(scene, rng, f"world-{i:06d}", image))
    stage2.extend(W.text_only_row(rng, f"text-{i:06d}") for i in range(args.n_text))
    rng.shuffle(stage2)
    for i, scene in enumerate(evals):
        types = [W.QTYPES[(i * args.eval_questions + j) % len(W.QTYPES)] for j in range(args.eval_questions)]
        questions.extend(W.eval_rows(scene, rng, len(questions), f"eval/{i:06d}.png", types))
    write_json(stage1, out / "stage1.json")
    write_json(stage2, out / "stage2.json")
    (out / "eval.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    write_json({"train": {f"train/{i:06d}.png": s.asdict() for i, s in enumerate(train)},
                "eval": {f"eval/{i:06d}.png": s.asdict() for i, s in enumerate(evals)}}, out / "scenes.json")
    return {"train_images": len(train), "eval_images": len(evals), "stage1_rows": len(stage1),
            "stage2_rows": len(stage2), "eval_questions": len(questions)}


def draw_png(scene, size, path):
    from nanollava.world import draw
    draw(scene, size).save(path, compress_level=1)  # fast: the world is rebuilt, not shipped


def schedule(step, steps, lr, warmup=0.05):
    """Linear warmup then cosine to a tenth of the peak."""
    w = max(1, int(warmup * steps))
    if step < w:
        return lr * (step + 1) / w
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w))))


def pretrain_clip(args, world_dir, out):
    """A tiny CLIP vision tower, pretrained to predict from each patch's layer -2 feature (what LLaVA feeds
    the projector) the shape in the patch's cell (kind or empty, colour, size), the background tone and
    the cell itself. Without the cell head the features hold almost no position (a linear probe finds the
    cell 26% of the time) and the LLM cannot tell "the shape in the northwest" from the others; at full
    weight it slows the kind head down. Images go through load_image, the preprocessing LLaVA applies later."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from nanollava import world as W
    from nanollava.data import load_image
    from nanollava.vit import ViT, ViTConfig
    torch.manual_seed(args.seed)
    S, P = args.image_size, args.patch_size
    cfg = ViTConfig(image_size=S, patch_size=P, hidden_size=args.vit_width, intermediate_size=4 * args.vit_width,
                    num_hidden_layers=args.vit_layers, num_attention_heads=args.vit_heads)
    vit = ViT(cfg)
    g = S // P  # patch grid; patch (i, j) lies in cell (3i // g, 3j // g)
    cell_of = torch.tensor([(3 * i // g) * 3 + 3 * j // g for i in range(g) for j in range(g)])
    scenes = json.loads((world_dir / "scenes.json").read_text())

    def tensors(split, n=None):
        paths = list(scenes[split])[:n]
        x = torch.stack([load_image(world_dir / "images" / p, S) for p in paths])  # (N, 3, S, S)
        labels = []
        for p in paths:
            sc = scenes[split][p]
            scene = W.Scene(**{**sc, "shapes": [W.Shape(**s) for s in sc["shapes"]]})
            kind, color, size = W.patch_labels(scene)
            labels.append([kind, color, size, [int(scene.tone == "light")] * 9, list(range(9))])
        return x, torch.tensor(labels)[:, :, cell_of]  # (N, 5, g*g): targets per patch

    x_train, y_train = tensors("train", args.vit_images)  # each loaded in about 1 ms: a part of the whole
    x_eval, y_eval = tensors("eval")
    names = ["kind", "color", "size", "tone", "cell"]
    weights = [1.0, 1.0, 1.0, 1.0, 0.3]
    heads = nn.ModuleList(nn.Linear(cfg.hidden_size, n) for n in [1 + len(W.KINDS), len(W.COLORS), len(W.SIZES), 2, 9])
    params = list(vit.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.vit_lr, betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)

    def losses(x, y):
        feats = vit(x)  # (B, g*g, C): hidden_states[-2] without CLS
        logits = [h(feats) for h in heads]
        loss = sum(w * F.cross_entropy(l.flatten(0, 1), y[:, k].flatten(), ignore_index=-1)
                   for k, (l, w) in enumerate(zip(logits, weights)))
        return loss, logits

    t0 = time.time()
    for step in range(args.vit_steps):
        for group in opt.param_groups:
            group["lr"] = schedule(step, args.vit_steps, args.vit_lr)
        idx = torch.randint(len(x_train), (args.vit_batch,), generator=gen)
        loss, _ = losses(x_train[idx], y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.vit_steps - 1:
            log(f"  clip step {step:4d} | loss {loss.item():.4f} | {time.time() - t0:.1f}s")
    vit.eval()
    with torch.no_grad():
        loss, logits = losses(x_eval, y_eval)
    acc = {}
    for k, name in enumerate(names):
        y, pred = y_eval[:, k], logits[k].argmax(-1)
        acc[name] = round(((pred == y) & (y >= 0)).sum().item() / (y >= 0).sum().item(), 4)
    y, pred = y_eval[:, 0], logits[0].argmax(-1)
    acc["kind_of_shapes"] = round(((pred == y) & (y > 0)).sum().item() / (y > 0).sum().item(), 4)  # cells not empty
    vit.save_pretrained(out)
    params = sum(p.numel() for p in vit.parameters())
    return {"params": params, "train_loss": round(loss.item(), 4), "eval_accuracy": acc, "seconds": round(time.time() - t0, 1)}


def pretrain_vicuna(args, world_dir, out):
    """A tiny Llama pretrained on the world's text, each document with its image given the way the image
    tokens will give it: 9 positions, one per cell, each holding the mean of the embeddings of the words that
    describe the cell (world.cell_words). So the model learns to answer from 9 vectors in the image's place,
    the skill stage 1 then hooks the projected image into (Vicuna brings it from its own pretraining); without
    it stage 1 cannot lower its loss at all. Half of each batch is the stage 2 questions, each as a chat of
    its own (vicuna_v1 without the system prompt, learned on the answer as Vicuna's chat tuning), and the
    stage 1 captions; the other half is each training scene's facts (world.facts, learned on every token),
    where each look-up is learned next to its key: without them the held-out questions reached 0.57 from
    words, with them 0.80 (the README has the runs). The detailed descriptions are left out (3x longer, they
    would pad every batch). The tokenizer is trained on all the world's text, with Llama's id conventions.
    Scored on the held-out questions with their scenes in words."""
    import torch
    import torch.nn.functional as F
    from nanollava import world as W
    from nanollava.data import IGNORE_INDEX, IMAGE, SYSTEM, collate, conversation_ids
    from nanollava.llama import Llama, LlamaConfig
    from nanollava.tokenizer import train_tokenizer
    torch.manual_seed(args.seed)
    stage1 = json.loads((world_dir / "stage1.json").read_text())
    stage2 = json.loads((world_dir / "stage2.json").read_text())
    evals = [json.loads(line) for line in (world_dir / "eval.jsonl").read_text().splitlines()]
    scenes = {p: W.Scene(**{**sc, "shapes": [W.Shape(**x) for x in sc["shapes"]]})
              for split in json.loads((world_dir / "scenes.json").read_text()).values() for p, sc in split.items()}

    def chat(row):  # the vicuna_v1 prompt as text, for the tokenizer to learn "USER:", "ASSISTANT:" and the cells
        words = " ".join(W.cell_words(scenes[row["image"]])) if "image" in row else ""
        conv = [t["value"].replace(IMAGE, words) for t in row["conversations"]]
        return SYSTEM + "".join(f" USER: {q} ASSISTANT: {a}" for q, a in zip(conv[::2], conv[1::2]))
    rng = random.Random(args.seed)
    fact_texts = [(image, W.facts(scene, rng)) for image, scene in scenes.items() if image.startswith("train/")]
    tok = train_tokenizer([chat(row) for row in stage2 + stage1] + [text for _, text in fact_texts], args.vocab_size)
    tok.save(out)
    SLOT = tok.vocab_size  # where the image goes in the ids, as image_token_id will mark it in LLaVA
    cell_ids = functools.lru_cache(maxsize=None)(tok.encode)  # a cell's words recur across scenes and questions

    def doc(row, template):  # a dataset sample with SLOT expanded into 9 positions, and the cells' word ids
        ids, labels = conversation_ids(row["conversations"], tok, template, SLOT, system="")
        cells = [cell_ids(w) for w in W.cell_words(scenes[row["image"]])] if "image" in row else []
        if cells:
            k = ids.index(SLOT)
            ids, labels = ids[:k] + [SLOT] * 9 + ids[k + 1:], labels[:k] + [IGNORE_INDEX] * 9 + labels[k + 1:]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": None, "id": cells}

    def asked(image, q, a):  # one question about an image, as a row
        return {"image": image, "conversations": [{"from": "human", "value": IMAGE + "\n" + q}, {"from": "gpt", "value": a}]}

    def questions(row):  # a stage 2 row as one-question rows, the image in each
        if "image" not in row:
            return [row]
        turns = [t["value"].replace(IMAGE + "\n", "") for t in row["conversations"]]
        return [asked(row["image"], q, a) for q, a in zip(turns[::2], turns[1::2])]
    rows = [(q, "vicuna_v1") for row in stage2 if not row["id"].endswith("-detail") for q in questions(row)]
    rows += [(row, "plain") for row in stage1]
    chats = range(len(rows))  # the chats and captions, then the facts
    rows += [(asked(image, "", text), "plain") for image, text in fact_texts]  # plain: the image, then the text
    facts = range(len(chats), len(rows))
    built = functools.lru_cache(maxsize=None)(lambda i: doc(*rows[i]))  # only the rows a batch draws are tokenized
    held = [doc(asked(q["image"], q["text"], q["answer"]), "vicuna_v1") for q in evals]

    w = args.llm_width
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=w, intermediate_size=(8 * w // 3 + 63) // 64 * 64,
                      num_hidden_layers=args.llm_layers, num_attention_heads=args.llm_heads,
                      max_position_embeddings=2048)
    llm = Llama(cfg)
    llm.init_weights(std=0.06)  # Llama's 0.02 is for width 4096: at width 128 the questions stay at chance 2x longer

    def batch(chunk):  # right-padded embeddings (B, T, C) with the cell vectors at the SLOT positions, and labels
        b = collate(chunk, pad_id=0)
        ids, cells = b["input_ids"], [c for cs in b["ids"] for c in cs]
        x = llm.embed_tokens(ids.masked_fill(ids == SLOT, 0))
        if cells:
            n = max(map(len, cells))
            words = torch.tensor([c + [-1] * (n - len(c)) for c in cells])  # (cells, n)
            keep = (words >= 0).unsqueeze(-1).float()
            means = (llm.embed_tokens(words.clamp(min=0)) * keep).sum(1) / keep.sum(1)
            x = x.masked_scatter((ids == SLOT).unsqueeze(-1), means)
        return x, b["labels"]

    opt = torch.optim.AdamW(llm.parameters(), lr=args.llm_lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0, n_facts = time.time(), args.llm_batch // 2
    for step in range(args.llm_steps):
        for group in opt.param_groups:
            group["lr"] = schedule(step, args.llm_steps, args.llm_lr)
        logits, targets = [], []
        for pool, n in [(chats, args.llm_batch - n_facts), (facts, n_facts)]:  # apart: facts are longer, less padding
            x, labels = batch([built(i) for i in rng.sample(pool, n)])
            t = labels[:, 1:]
            logits.append(llm(inputs_embeds=x, select=F.pad(t != IGNORE_INDEX, (0, 1))))  # only where a token is learned
            targets.append(t[t != IGNORE_INDEX])
        loss = F.cross_entropy(torch.cat(logits), torch.cat(targets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.llm_steps - 1:
            log(f"  vicuna step {step:4d} | loss {loss.item():.4f} | {time.time() - t0:.1f}s")
    llm.eval()
    right = 0  # a question is right when every answer token (and </s>) is the argmax: what greedy decoding gives
    with torch.no_grad():
        for i in range(0, len(held), 64):
            x, labels = batch(held[i:i + 64])
            pred = llm(inputs_embeds=x)[:, :-1].argmax(-1)
            right += ((pred == labels[:, 1:]) | (labels[:, 1:] == IGNORE_INDEX)).all(-1).sum().item()
    llm.save_pretrained(out)
    return {"params": sum(p.numel() for p in llm.parameters()), "vocab_size": tok.vocab_size,
            "train_loss": round(loss.item(), 4), "eval_accuracy_from_words": round(right / len(held), 4),
            "seconds": round(time.time() - t0, 1)}


def prepare_world(args):
    out = Path(args.root) / "world"
    out.mkdir(parents=True, exist_ok=True)
    world_cfg = {k: getattr(args, k) for k in ["seed", "image_size", "n_train", "n_eval", "eval_questions", "n_text"]}
    clip_cfg = {**world_cfg, **{k: getattr(args, k) for k in ["patch_size", "vit_width", "vit_layers", "vit_heads",
                                                              "vit_steps", "vit_images", "vit_batch", "vit_lr"]}}
    vicuna_cfg = {**world_cfg, **{k: getattr(args, k) for k in ["vocab_size", "llm_width", "llm_layers", "llm_heads",
                                                                "llm_steps", "llm_batch", "llm_lr"]}}
    parts = [("world", out / ".done-world", world_cfg, lambda: build_world(args, out)),
             ("base/clip", out / "base/clip/.done", clip_cfg, lambda: pretrain_clip(args, out, out / "base/clip")),
             ("base/vicuna", out / "base/vicuna/.done", vicuna_cfg, lambda: pretrain_vicuna(args, out, out / "base/vicuna"))]
    for name, marker, cfg, build in parts:
        if done(marker, cfg) and not args.force:
            log(f"{name}: complete, reused ({marker} matches the flags)")
            continue
        t0 = time.time()
        log(f"{name}: building")
        (out / "manifest.json").unlink(missing_ok=True)
        if name.startswith("base/"):
            shutil.rmtree(marker.parent, ignore_errors=True)
            marker.parent.mkdir(parents=True)
        info = build()
        finish(marker, cfg, **info)
        log(f"{name}: done in {time.time() - t0:.1f}s: {json.dumps(info)}")
    write_json({"clip": "base/clip", "vicuna": "base/vicuna",
                "stage1": {"data": "stage1.json", "image_root": "images"},
                "stage2": {"data": "stage2.json", "image_root": "images"},
                "eval": {"questions": "eval.jsonl", "image_root": "images"}}, out / "manifest.json", indent=1)
    show_world(out)


def show_world(out):
    """What the output looks like: a row of each file, counts, sizes, the base models and their pretraining."""
    def size(p):
        n = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        return f"{n / 2**20:.1f} MiB"
    log(f"\n{out}/")
    for split in ["train", "eval"]:
        d = out / "images" / split
        log(f"  images/{split}/  {sum(1 for _ in d.iterdir())} PNGs, {size(d)}")
    for name in ["stage1.json", "stage2.json"]:
        rows = json.loads((out / name).read_text())
        text_only = sum("image" not in r for r in rows)
        turns = sum(len(r["conversations"]) // 2 for r in rows)
        log(f"  {name}  {len(rows)} rows ({text_only} text-only, {turns} Q/A turns), {size(out / name)}; a row:")
        row = next(r for r in rows if len(r["conversations"]) > 2) if name == "stage2.json" else rows[0]
        log("    " + json.dumps(row))
    lines = (out / "eval.jsonl").read_text().splitlines()
    log(f"  eval.jsonl  {len(lines)} questions; a row:\n    {lines[0]}")
    for name in ["clip", "vicuna"]:
        info = json.loads((out / "base" / name / ".done").read_text())
        info.pop("config")
        files = ", ".join(sorted(f.name for f in (out / "base" / name).iterdir() if not f.name.startswith(".")))
        log(f"  base/{name}/  {files}, {size(out / 'base' / name)}\n    pretraining: {json.dumps(info)}")
    log(f"  manifest.json  {json.dumps(json.loads((out / 'manifest.json').read_text()))}")


# ============================================================================================ LLaVA-1.5

HUB = {  # name -> (repo, repo type, files to fetch, folder under the recipe root)
    "clip": ("openai/clip-vit-large-patch14-336", "model", ["*.json", "*.txt", "pytorch_model.bin"], "clip-vit-large-patch14-336"),
    "vicuna": ("lmsys/vicuna-{size}-v1.5", "model", ["*.json", "tokenizer.model", "*.bin"], "vicuna-{size}-v1.5"),
    "pretrain": ("liuhaotian/LLaVA-Pretrain", "dataset", ["blip_laion_cc_sbu_558k.json"], "LLaVA-Pretrain"),
    "instruct": ("liuhaotian/LLaVA-Instruct-150K", "dataset", ["llava_v1_5_mix665k.json"], "LLaVA-Instruct-150K"),
    "pretrain-images": ("liuhaotian/LLaVA-Pretrain", "dataset", ["images.zip"], "LLaVA-Pretrain"),  # stage 1's 558k images
}
IMAGE_SETS = {  # stage 2 sources, as in the official README: name -> [(url, zip unpacks into, folder it makes)]
    "coco": [("http://images.cocodataset.org/zips/train2017.zip", "coco", "coco/train2017")],
    "gqa": [("https://downloads.cs.stanford.edu/nlp/data/gqa/images.zip", "gqa", "gqa/images")],
    "textvqa": [("https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip", "textvqa", "textvqa/train_images")],
    "vg": [("https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip", "vg", "vg/VG_100K"),
           ("https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip", "vg", "vg/VG_100K_2")],
}
MANUAL = {"ocr_vqa": "ocr_vqa/images: run the official OCR-VQA download script (dataset.json and loadDataset.py, "
                     "https://drive.google.com/drive/folders/1_GYPY5UkUy7HIcR0zq3ZCFgeZN7BAfm_) and save every image as .jpg"}


class DownloadError(Exception):
    pass


def download(url, dest, chunk=1 << 20, timeout=30):
    """Fetches url to dest, resuming a partial dest.part with an HTTP Range request. The file is
    renamed to dest only once its size matches what the server announced, so an interrupted
    download is never taken for a complete one."""
    dest = Path(dest)
    if dest.exists():
        return dest
    part = Path(f"{dest}.part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            if have and r.status == 206:  # "bytes start-end/total"
                total = int(r.headers["Content-Range"].rsplit("/", 1)[1])
            else:  # the server ignored the range: start over
                have, total = 0, int(r.headers.get("Content-Length", -1))
            with open(part, "ab" if have else "wb") as f:
                while block := r.read(chunk):
                    f.write(block)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the range starts at the end: the .part is already whole
            os.replace(part, dest)
            return dest
        raise DownloadError(f"{url} answered HTTP {e.code}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, reset, cut short
        raise DownloadError(f"cannot fetch {url} ({type(e).__name__}: {getattr(e, 'reason', e)}); "
                            f"run again to resume from {part}") from None
    got = part.stat().st_size
    if total >= 0 and got != total:
        raise DownloadError(f"{url} stopped at {got} of {total} bytes; run again to resume from {part}")
    os.replace(part, dest)
    return dest


def unzip(archive, into):
    """Extracts archive into a folder; a marker written last tells a finished extraction from an interrupted one."""
    marker = Path(into) / f".{Path(archive).name}.extracted"
    if not marker.exists():
        log(f"extracting {archive} into {into}")
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(into)
        except (zipfile.BadZipFile, OSError) as e:
            raise DownloadError(f"cannot extract {archive} ({e}); delete it and run again") from None
        marker.write_text("ok\n")


def hub_fetch(name, root, size):
    """snapshot_download of one hub repo into root/<folder> (resumable, cached); a marker skips it when done."""
    repo, kind, patterns, folder = (s.format(size=size) if isinstance(s, str) else s for s in HUB[name])
    local = root / folder
    marker = local / f".{name}.complete"
    if marker.exists():
        return local
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        sys.exit("prepare.py --recipe llava-1.5 downloads from the Hugging Face hub: pip install huggingface_hub")
    log(f"downloading {repo} into {local}")
    try:
        snapshot_download(repo, repo_type=kind, allow_patterns=patterns, local_dir=local)
    except Exception as e:  # no network, a proxy, a gated repo: one sentence, no traceback
        while e.__cause__ or e.__context__:  # the root cause: "ConnectError: [Errno 111] Connection refused"
            e = e.__cause__ or e.__context__
        why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        raise DownloadError(f"cannot download {repo} from the Hugging Face hub ({why}); check the network "
                            f"(or HF_ENDPOINT) and run again, finished files are kept") from None
    marker.write_text("ok\n")
    return local


def fetch_llava(root, size, image_sets):
    for name in ["clip", "vicuna", "pretrain", "instruct"]:
        hub_fetch(name, root, size)
    if "pretrain" in image_sets:
        unzip(hub_fetch("pretrain-images", root, size) / "images.zip", root / "LLaVA-Pretrain" / "images")
    for name in image_sets:
        for url, into, made in IMAGE_SETS.get(name, []):
            archive = root / "downloads" / f"{name}-{Path(url).name}"
            if (root / into / f".{archive.name}.extracted").exists():
                continue
            if (root / made).is_dir() and any((root / made).iterdir()):
                log(f"{root / made} is not empty: taken as put there by hand, not downloaded")
                continue
            archive.parent.mkdir(parents=True, exist_ok=True)
            log(f"downloading {url} into {archive}")
            unzip(download(url, archive), root / into)


def check_llava(root, size):
    """Counts, per source, the rows whose image is present; writes filtered data files when some are
    missing and returns the manifest (paths relative to root) and what is missing, in sentences."""
    manifest = {"clip": HUB["clip"][3], "vicuna": HUB["vicuna"][3].format(size=size), "counts": {}}
    missing = []
    for key in ["clip", "vicuna"]:
        d = root / manifest[key]
        if not (d / "config.json").is_file():
            missing.append(f"{key}: {d} has no config.json (download {HUB[key][0].format(size=size)})")
    listings = {}  # folder -> set of file names, one listdir per folder

    def present(path):
        folder, name = os.path.split(path)
        if folder not in listings:
            listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        return name in listings[folder]

    for stage, data, image_root in [("stage1", "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", "LLaVA-Pretrain/images"),
                                    ("stage2", "LLaVA-Instruct-150K/llava_v1_5_mix665k.json", ".")]:
        if not (root / data).is_file():
            missing.append(f"{stage}: {root / data} is missing")
            continue
        rows, keep, counts = json.loads((root / data).read_text()), [], {}
        for row in rows:
            source = "text" if "image" not in row else (row["image"].split("/")[0] if stage == "stage2" else "blip_laion_cc_sbu")
            c = counts.setdefault(source, {"rows": 0, "present": 0})
            c["rows"] += 1
            if "image" not in row or present(os.path.join(root, image_root, row["image"])):
                c["present"] += 1
                keep.append(row)
        if len(keep) < len(rows):
            data = data.replace(".json", ".present.json")
            write_json(keep, root / data)
            for source, c in counts.items():
                if c["present"] < c["rows"]:
                    where = MANUAL.get(source) or next((f"{m} (from {u})" for k, sets in IMAGE_SETS.items()
                                                        for u, _, m in sets if source == k), str(root / image_root))
                    missing.append(f"{stage} {source}: {c['rows'] - c['present']} of {c['rows']} images missing; they go in {where}")
        manifest[stage] = {"data": data, "image_root": image_root}
        manifest["counts"][stage] = counts
    return manifest, missing


def prepare_llava(args):
    root = Path(args.root) / "llava-1.5"
    root.mkdir(parents=True, exist_ok=True)
    known = ["pretrain", *IMAGE_SETS]
    sets = [] if args.image_sets == "none" else known if args.image_sets == "all" else args.image_sets.split(",")
    unknown = [s for s in sets if s not in known]
    if unknown:
        sys.exit(f"unknown image set {unknown[0]!r}; choose from {', '.join(known)} (ocr_vqa is fetched by hand)")
    try:
        fetch_llava(root, args.size, sets)
    except DownloadError as e:
        sys.exit(f"prepare.py: {e}")
    manifest, missing = check_llava(root, args.size)
    for m in missing:
        log(f"missing: {m}")
    if "stage1" not in manifest or "stage2" not in manifest or any(m.startswith(("clip:", "vicuna:")) for m in missing):
        sys.exit(f"prepare.py: {root} lacks a base model or a dataset file (listed above); no manifest written")
    path = root / f"manifest-{args.size}.json"
    write_json(manifest, path, indent=1)
    log(f"wrote {path}:\n{json.dumps(manifest, indent=1)}")


if __name__ == "__main__":
    args = parser.parse_args()
    log(f"prepare.py {json.dumps(vars(args))}")
    if args.recipe == "world":
        if args.image_size % 3 or args.image_size % args.patch_size:
            sys.exit(f"--image-size {args.image_size} must be divisible by 3 and by --patch-size {args.patch_size}")
        if args.llm_width % args.llm_heads or args.vit_width % args.vit_heads:
            sys.exit(f"--llm-width {args.llm_width} and --vit-width {args.vit_width} must be divisible by their --llm-heads "
                     f"{args.llm_heads} and --vit-heads {args.vit_heads}")
        prepare_world(args)
    else:
        prepare_llava(args)
