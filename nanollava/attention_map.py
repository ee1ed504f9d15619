"""
Where the answer looked: the attention that an answer's tokens give to each image patch, as a heatmap.

The model's attention is not touched: forward hooks on every layer's q_proj and k_proj record the projections
during one teacher-forced forward over prompt + answer (the KV cache and the fused kernels never expose the
weights), and RoPE and the softmax are recomputed here, in fp32, for the queries that predicted the answer's
tokens only. The weights are the model's own (softmax over every key the query sees, the BOS sink included);
the map is their share on each patch, renormalised over the image.

    python -m nanollava.attention_map --model out/stage2/model --world data/world   # how often it looks at the cell asked about
"""
import argparse
import json
import math
import os
import re
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageChops

from nanollava.data import CLIP_MEAN, IMAGE, expand2square, prompt_ids
from nanollava.llama import apply_rope, rope

LAYERS = -1  # the map is the last layer's: it finds the cell asked about most often (README); "mean" averages all


@torch.inference_mode()
def image_attention(model, input_ids, pixel_values, answer_ids):
    """input_ids (T,) holding one image placeholder, pixel_values (1, 3, S, S), answer_ids (n,) without eos ->
    (L, nh, n, P): for each layer and head, the attention weights from the position that predicted answer token i
    (the last prompt position for i = 0) to the P image patches."""
    llm = model.language_model
    cfg = llm.config
    caught = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, key=(i, w): caught.__setitem__(key, out))
             for i, layer in enumerate(llm.layers) for w, m in (("q", layer.self_attn.q_proj), ("k", layer.self_attn.k_proj))]
    answer = torch.as_tensor(list(answer_ids), dtype=torch.long, device=input_ids.device)
    if len(answer) == 0:
        raise ValueError("the answer is empty: there is no attention to map")
    ids = torch.cat([input_ids, answer[:-1]])[None]  # the last answer token is predicted, never a query here
    try:
        x, _, _ = model.embed(ids, pixel_values)
        llm(inputs_embeds=x, select=torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device))  # no logits needed
    finally:
        for h in hooks:
            h.remove()
    P, T, n = model.config.vision.num_patches, x.shape[1], len(answer)
    pos = int((input_ids == model.image_token_id).nonzero()[0, 0])  # patches at pos .. pos + P - 1
    first = T - n  # the query of the last prompt position
    nh, hs = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    cos, sin = rope(torch.arange(T, device=x.device)[None], hs, cfg.rope_theta, max(cfg.max_position_embeddings, T), torch.float32)
    causal = torch.arange(T, device=x.device)[None, :] <= torch.arange(first, T, device=x.device)[:, None]  # (n, T)
    out = []
    for i in range(cfg.num_hidden_layers):
        q = apply_rope(caught[i, "q"].float().view(1, T, nh, hs).transpose(1, 2), cos, sin)[:, :, first:]  # (1, nh, n, hs)
        k = apply_rope(caught[i, "k"].float().view(1, T, -1, hs).transpose(1, 2), cos, sin)  # (1, nkv, T, hs)
        k = k.repeat_interleave(nh // k.shape[1], dim=1)
        w = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~causal, float("-inf")).softmax(-1)  # (1, nh, n, T)
        out.append(w[0, :, :, pos:pos + P])
    return torch.stack(out)


def patch_grid(weights, vision, layers=LAYERS):
    """(L, nh, n, P) -> (g, g) share of the image attention on each patch (sums to 1), rows top to bottom;
    averaged over heads and answer tokens, and over all layers ("mean") or one layer (an index)."""
    w = weights.mean(0) if layers == "mean" else weights[layers]
    w = w.mean((0, 1))
    g = vision.image_size // vision.patch_size
    return (w / w.sum().clamp(min=1e-12)).view(g, g)


def overlay(image, grid, out_path, min_side=336):
    """Writes the image as the model saw it (padded to a square with the CLIP mean) as a spotlight: each patch
    dimmed by its share of the attention (the brightest patch as it is, one with none at a fifth), so the shapes'
    own colours stay readable. A PNG written whole (temp file, then rename)."""
    img = (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB")
    img = expand2square(img, tuple(int(x * 255) for x in CLIP_MEAN))
    side = max(min_side, img.width)
    img = img.resize((side, side), Image.BICUBIC)
    g = grid.shape[0]
    rel = (grid / grid.max().clamp(min=1e-12)).tolist()
    light = Image.new("L", img.size)
    for r in range(g):
        for c in range(g):
            box = (c * side // g, r * side // g, (c + 1) * side // g, (r + 1) * side // g)
            light.paste(round(255 * (0.2 + 0.8 * rel[r][c])), box)
    out = ImageChops.multiply(img, Image.merge("RGB", (light,) * 3))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=out_path.parent)
    os.close(fd)
    try:
        out.save(tmp, format="PNG")
        os.replace(tmp, out_path)
    except BaseException:
        os.unlink(tmp)
        raise
    return out_path


# ----------------------------------------------------------------------------- the measurement on the world

def target_cell(question, scene):
    """The one cell a world question is about: the position it names, or the one shape it names; else None."""
    from nanollava.world import COLOR_NAMES, KINDS, POSITIONS
    words = set(re.findall(r"[a-z]+", question.lower()))
    named = [i for i, p in enumerate(POSITIONS) if p in words]
    if named:
        return named[0] if len(named) == 1 else None
    kinds, colors = words & set(KINDS), words & set(COLOR_NAMES)
    if not kinds and not colors:
        return None
    hits = [s["cell"] for s in scene["shapes"] if (not kinds or s["kind"] in kinds) and (not colors or s["color"] in colors)]
    return hits[0] if len(hits) == 1 else None


def measure(model, tok, load, world, n=300, categories=("color", "kind", "position", "size")):
    """For held-out questions about one cell: how often the map's brightest patch is that cell, per layer choice,
    and the mean share on it; chance is 1/9. Prints one line per choice and returns {choice: (hit rate, share)}."""
    manifest = json.loads((Path(world) / "manifest.json").read_text())
    root = Path(world) / manifest["eval"]["image_root"]
    scenes = json.loads((Path(world) / "scenes.json").read_text())["eval"]
    rows = [json.loads(line) for line in open(Path(world) / manifest["eval"]["questions"])]
    dev = model.language_model.lm_head.weight.device
    choices = ["mean"] + list(range(model.config.text.num_hidden_layers))
    hits, shares, used = {c: 0 for c in choices}, {c: 0.0 for c in choices}, 0
    for row in rows:
        if used == n:
            break
        scene = scenes[row["image"]]  # scenes.json: {"eval": {image path: scene}}
        cell = target_cell(row["text"].split("\n")[0], scene)
        if row["category"] not in categories or cell is None:
            continue
        ids = torch.tensor(prompt_ids([(IMAGE + "\n" + row["text"], None)], tok, model.image_token_id), device=dev)
        pixels = load(root / row["image"])[None].to(dev)
        answer = [t for t in model.generate(ids[None], pixels, max_new_tokens=8, eos_id=tok.eos_id)[0].tolist() if t != tok.eos_id]
        if not answer:
            continue
        w = image_attention(model, ids, pixels, answer)
        used += 1
        for c in choices:
            grid = patch_grid(w, model.config.vision, c).flatten()
            hits[c] += int(grid.argmax()) == cell
            shares[c] += float(grid[cell])
    result = {c: (hits[c] / max(used, 1), shares[c] / max(used, 1)) for c in choices}
    print(f"{used} held-out questions about one cell ({', '.join(categories)}); chance 1/9 = 0.111")
    for c, (hit, share) in result.items():
        print(f"  {'mean of layers' if c == 'mean' else f'layer {c}':>15}: brightest patch is the cell asked about "
              f"{hit:.3f}, mean share on it {share:.3f}")
    return result


if __name__ == "__main__":
    from nanollava.data import load_image
    from nanollava.llava import LLaVA
    from nanollava.tokenizer import load_tokenizer
    ap = argparse.ArgumentParser(description="how often the answer's attention falls on the cell a world question is about")
    ap.add_argument("--model", default="out/stage2/model", help="a world model (train.py's stage-2 output)")
    ap.add_argument("--world", default="data/world", help="the world prepare.py made (manifest.json, scenes.json)")
    ap.add_argument("--n", type=int, default=300, help="questions to measure")
    a = ap.parse_args()
    m = LLaVA.from_pretrained(a.model)
    torch.manual_seed(0)
    measure(m, load_tokenizer(a.model), lambda p: load_image(p, m.config.vision.image_size), a.world, a.n)
