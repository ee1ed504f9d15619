"""
Prepares what nanollava trains on: base models and data, in the official formats.

The synthetic world (default): images of shapes drawn by nanollava/world.py, LLaVA-format JSON
for both stages, a held-out question file, and the tiny base models the recipe starts from (a
CLIP vision tower and a Vicuna-style Llama with its own tokenizer), each pretrained briefly on
the world (nanollava/standins.py). Everything is a function of --seed; parts already built are reused:
each part's marker is removed before the part is rebuilt and written last, holding the flags it was built
with and the files it made, and a part is reused only when both still hold; --force rebuilds.

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
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from nanollava import download, standins
from nanollava import world as W
from nanollava.checkpoint import write_json

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
parser.add_argument("--n-custom", type=int, default=400, help="custom/: counting fine-tuning images (a quarter as many held out)")
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


def fail(msg):
    """A user-caused failure: one sentence on stderr, exit status 2."""
    print(f"prepare.py: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def writable(d):
    """Makes d if needed and tries a file in it: permissions, root and read-only mounts are told apart only by trying."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        fail(f"cannot write in {d} ({e.strerror}); choose another --root or make it writable")


# ============================================================================================ parts and markers

def contents(d, names):
    """What a part made, as its marker records it: a file's size in bytes, a folder's number of files."""
    return {n: sum(1 for _ in (d / n).iterdir()) if (d / n).is_dir() else (d / n).stat().st_size for n in names}


def done(marker, config):
    """A part is complete when its marker (written last) holds the flags it was built with, and every file it
    lists is there with the size (or folder with the number of files) it had."""
    try:
        info = json.loads(Path(marker).read_text())
        return info["config"] == config and contents(Path(marker).parent, info["files"]) == info["files"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


# ============================================================================================ the world

WORLD_FILES = ["images/train", "images/eval", "stage1.json", "stage2.json", "eval.jsonl", "scenes.json", "custom"]


def build_world(args, out):
    """Images, stage1.json, stage2.json, eval.jsonl, scenes.json (the ground truth of every image)."""
    for p in ["images", "stage1.json", "stage2.json", "eval.jsonl", "scenes.json", "custom"]:
        shutil.rmtree(out / p, ignore_errors=True) if (out / p).is_dir() else (out / p).unlink(missing_ok=True)
    rng = random.Random(args.seed)
    train = W.sample_scenes(rng, args.n_train)
    evals = W.sample_scenes(rng, args.n_eval, exclude={s.key() for s in train})  # held-out layouts
    # custom/: a small fine-tuning set of one question type, "How many KIND/COLOR shapes are there?", in LLaVA's
    # format (train.json + images, held-out questions on new layouts); its own random stream leaves the rest as it was
    crng = random.Random(args.seed + 1)
    custom_train = W.sample_scenes(crng, args.n_custom)
    custom_eval = W.sample_scenes(crng, args.n_custom // 4, exclude={s.key() for s in train + evals + custom_train})
    stage1, stage2, questions = [], [], []
    jobs = [(scene, args.image_size, out / "custom" / "images" / f"{split}-{i:06d}.png")
            for split, scenes in [("train", custom_train), ("eval", custom_eval)] for i, scene in enumerate(scenes)]
    (out / "custom" / "images").mkdir(parents=True)
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
    write_json([W.count_rows(s, crng, f"count-{i:06d}", f"train-{i:06d}.png") for i, s in enumerate(custom_train)],
               out / "custom" / "train.json", indent=None)
    custom_q = [{"question_id": i, "image": f"eval-{i:06d}.png", "text": q + W.SHORT, "answer": a, "category": "count_one"}
                for i, (q, a) in enumerate(W.count_one(s, crng) for s in custom_eval)]
    (out / "custom" / "eval.jsonl").write_text("".join(json.dumps(q) + "\n" for q in custom_q))
    write_json(stage1, out / "stage1.json", indent=None)
    write_json(stage2, out / "stage2.json", indent=None)
    tmp = out / "eval.jsonl.tmp"
    tmp.write_text("".join(json.dumps(q) + "\n" for q in questions))
    os.replace(tmp, out / "eval.jsonl")
    write_json({"train": {f"train/{i:06d}.png": s.asdict() for i, s in enumerate(train)},
                "eval": {f"eval/{i:06d}.png": s.asdict() for i, s in enumerate(evals)}}, out / "scenes.json", indent=None)
    return {"train_images": len(train), "eval_images": len(evals), "stage1_rows": len(stage1),
            "stage2_rows": len(stage2), "eval_questions": len(questions), "custom_rows": len(custom_train),
            "custom_questions": len(custom_q)}


def draw_png(scene, size, path):
    W.draw(scene, size).save(path, compress_level=1)  # fast: the world is rebuilt, not shipped


def prepare_world(args):
    out = Path(args.root) / "world"
    world_cfg = {k: getattr(args, k) for k in ["seed", "image_size", "n_train", "n_eval", "eval_questions", "n_text", "n_custom"]}
    clip_cfg = {**world_cfg, **{k: getattr(args, k) for k in ["patch_size", "vit_width", "vit_layers", "vit_heads",
                                                              "vit_steps", "vit_images", "vit_batch", "vit_lr"]}}
    vicuna_cfg = {**world_cfg, **{k: getattr(args, k) for k in ["vocab_size", "llm_width", "llm_layers", "llm_heads",
                                                                "llm_steps", "llm_batch", "llm_lr"]}}
    clip = lambda: standins.pretrain_clip(
        out, out / "base/clip", seed=args.seed, image_size=args.image_size, patch_size=args.patch_size,
        width=args.vit_width, layers=args.vit_layers, heads=args.vit_heads, steps=args.vit_steps,
        images=args.vit_images, batch=args.vit_batch, lr=args.vit_lr, log=log)
    vicuna = lambda: standins.pretrain_vicuna(
        out, out / "base/vicuna", seed=args.seed, vocab_size=args.vocab_size, width=args.llm_width,
        layers=args.llm_layers, heads=args.llm_heads, steps=args.llm_steps, batch=args.llm_batch, lr=args.llm_lr, log=log)
    parts = [("world", out / ".done-world", world_cfg, lambda: build_world(args, out)),
             ("base/clip", out / "base/clip/.done", clip_cfg, clip),
             ("base/vicuna", out / "base/vicuna/.done", vicuna_cfg, vicuna)]
    manifest = {"clip": "base/clip", "vicuna": "base/vicuna",
                "stage1": {"data": "stage1.json", "image_root": "images"},
                "stage2": {"data": "stage2.json", "image_root": "images"},
                "eval": {"questions": "eval.jsonl", "image_root": "images"}}
    todo = [name for name, marker, cfg, _ in parts if args.force or not done(marker, cfg)]
    try:
        same_manifest = json.loads((out / "manifest.json").read_text()) == manifest
    except (OSError, ValueError):
        same_manifest = False
    if todo or not same_manifest:  # a complete world on a read-only mount is used as it is
        writable(out)
    for name, marker, cfg, build in parts:
        if name not in todo:
            log(f"{name}: complete, reused ({marker} matches the flags and the files)")
            continue
        t0 = time.time()
        log(f"{name}: building")
        marker.unlink(missing_ok=True)  # first: a part killed while it is rebuilt is never taken as done
        (out / "manifest.json").unlink(missing_ok=True)
        if name.startswith("base/"):
            shutil.rmtree(marker.parent, ignore_errors=True)
            marker.parent.mkdir(parents=True)
        info = build()
        files = WORLD_FILES if name == "world" else sorted(f.name for f in marker.parent.iterdir())
        write_json({"config": cfg, **info, "files": contents(marker.parent, files)}, marker, indent=1)
        log(f"{name}: done in {time.time() - t0:.1f}s: {json.dumps(info)}")
    if todo or not same_manifest:  # an identical manifest is left as it is
        write_json(manifest, out / "manifest.json", indent=1)
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
        info.pop("config"), info.pop("files")
        files = ", ".join(sorted(f.name for f in (out / "base" / name).iterdir() if not f.name.startswith(".")))
        log(f"  base/{name}/  {files}, {size(out / 'base' / name)}\n    pretraining: {json.dumps(info)}")
    log(f"  manifest.json  {json.dumps(json.loads((out / 'manifest.json').read_text()))}")


# ============================================================================================ LLaVA-1.5

def prepare_llava(args):
    root = Path(args.root) / "llava-1.5"
    writable(root)
    known = ["pretrain", *download.IMAGE_SETS]
    sets = [] if args.image_sets == "none" else known if args.image_sets == "all" else args.image_sets.split(",")
    unknown = [s for s in sets if s not in known]
    if unknown:
        fail(f"unknown image set {unknown[0]!r} in --image-sets; choose from {', '.join(known)} (ocr_vqa is fetched by hand)")
    try:
        download.fetch_llava(root, args.size, sets, log)
    except download.DownloadError as e:
        sys.exit(f"prepare.py: {e}")
    manifest, missing = download.check_llava(root, args.size)
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
            fail(f"--image-size {args.image_size} must be divisible by 3 and by --patch-size {args.patch_size}")
        if args.llm_width % args.llm_heads or args.vit_width % args.vit_heads:
            fail(f"--llm-width {args.llm_width} and --vit-width {args.vit_width} must be divisible by their --llm-heads "
                 f"{args.llm_heads} and --vit-heads {args.vit_heads}")
        prepare_world(args)
    else:
        prepare_llava(args)
