"""
The offline world's stand-ins for CLIP and Vicuna, and how they are pretrained (called by prepare.py).

The real recipe starts from two pretrained models; the world starts from two tiny ones that learn, in a
minute or two on a CPU, the skills LLaVA relies on:

- the tower (`pretrain_clip`): from each patch's layer -2 feature, what lies in the patch's cell
  (`clip_targets`, one linear head per attribute, `CLIP_HEADS`);
- the language model (`pretrain_vicuna`): to answer about an image given as 9 vectors, one per cell, each the
  mean of the embeddings of the cell's words (`cell_means`), which is where stage 1 later puts the projected
  image; half of each batch is the scenes' facts (`fact_documents`, `mixed_batch_loss`).

Both are saved in the official formats (CLIP's and Vicuna's config.json and model.safetensors), so the rest of
nanollava cannot tell them from the real ones. Everything is a function of the seed: same seed, same numbers.
"""
import functools
import json
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollava import world as W
from nanollava.checkpoint import from_scratch
from nanollava.data import collate, load_image
from nanollava.templates import IGNORE_INDEX, IMAGE, SYSTEM, conversation_ids
from nanollava.llama import Llama, LlamaConfig
from nanollava.schedule import cosine_lr
from nanollava.tokenizer import train_tokenizer
from nanollava.vit import ViT, ViTConfig


def read_scenes(world_dir):
    """scenes.json as {split: {image path: Scene}}: the ground truth of every image."""
    raw = json.loads((world_dir / "scenes.json").read_text())
    return {split: {p: W.Scene(**{**sc, "shapes": [W.Shape(**s) for s in sc["shapes"]]}) for p, sc in images.items()}
            for split, images in raw.items()}


def pretrain(params, steps, peak, weight_decay, step_loss, log, name, clip_norm=None):
    """The loop both stand-ins share: AdamW (betas 0.9, 0.95), linear warmup over 5 % of the steps then cosine to
    a tenth of the peak (nanollava.schedule), a line every 50 steps. step_loss(step) gives the batch's loss."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=peak, betas=(0.9, 0.95), weight_decay=weight_decay)
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, peak, warmup=max(1, int(0.05 * steps)), floor=0.1)
        loss = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"  {name} step {step:4d} | loss {loss.item():.4f} | {time.time() - t0:.1f}s")
    return loss


# ============================================================================================ the tower

# the per-patch heads: (name, classes, loss weight). Without the cell head the features hold almost no position
# (a linear probe finds the cell 26% of the time) and the LLM cannot tell "the shape in the northwest" from the
# others; at full weight it slows the kind head down.
CLIP_HEADS = [("kind", 1 + len(W.KINDS), 1.0), ("color", len(W.COLORS), 1.0), ("size", len(W.SIZES), 1.0),
              ("tone", 2, 1.0), ("cell", 9, 0.3)]


def clip_targets(scene, cell_of):
    """What each patch should tell, (5, g*g): its cell's shape (kind, 0 when empty; colour; size; -1 where there
    is none), the background tone and the cell itself. cell_of maps patch -> cell (a patch lies in one cell)."""
    kind, color, size = W.patch_labels(scene)
    return torch.tensor([kind, color, size, [int(scene.tone == "light")] * 9, list(range(9))])[:, cell_of]


def clip_losses(vit, heads, x, y):
    """The weighted sum of the heads' cross-entropies over every patch, and the heads' logits (B, g*g, classes)."""
    feats = vit(x)  # (B, g*g, C): hidden_states[-2] without CLS
    logits = [h(feats) for h in heads]
    loss = sum(w * F.cross_entropy(l.flatten(0, 1), y[:, k].flatten(), ignore_index=-1)
               for k, (l, (_, _, w)) in enumerate(zip(logits, CLIP_HEADS)))
    return loss, logits


def clip_accuracy(logits, y):
    """Per head, the share of patches (with a target) it gets right; kind_of_shapes counts non-empty cells only."""
    acc = {}
    for k, (name, _, _) in enumerate(CLIP_HEADS):
        target, pred = y[:, k], logits[k].argmax(-1)
        acc[name] = round(((pred == target) & (target >= 0)).sum().item() / (target >= 0).sum().item(), 4)
    target, pred = y[:, 0], logits[0].argmax(-1)
    acc["kind_of_shapes"] = round(((pred == target) & (target > 0)).sum().item() / (target > 0).sum().item(), 4)
    return acc


def pretrain_clip(world_dir, out, *, seed, image_size, patch_size, width, layers, heads, steps, images, batch, lr,
                  log=print):
    """A tiny CLIP vision tower (width, layers, heads; intermediate 4x width), pretrained for steps batches of
    batch images drawn from the first `images` training images to predict, from each patch's layer -2 feature
    (what LLaVA feeds the projector), what lies in its cell (CLIP_HEADS). Images go through load_image, the
    preprocessing LLaVA applies later. Saved to out; returns the summary prepare.py records."""
    torch.manual_seed(seed)
    S, P = image_size, patch_size
    cfg = ViTConfig(image_size=S, patch_size=P, hidden_size=width, intermediate_size=4 * width,
                    num_hidden_layers=layers, num_attention_heads=heads)
    vit = from_scratch(ViT, cfg)  # built on meta, materialised, initialised: the weights of ViT(cfg)
    g = S // P  # patch grid; patch (i, j) lies in cell (3i // g, 3j // g)
    cell_of = torch.tensor([(3 * i // g) * 3 + 3 * j // g for i in range(g) for j in range(g)])
    scenes = read_scenes(world_dir)

    def tensors(split, n=None):  # images (N, 3, S, S) and targets (N, 5, g*g)
        paths = list(scenes[split])[:n]
        x = torch.stack([load_image(world_dir / "images" / p, S) for p in paths])
        return x, torch.stack([clip_targets(scenes[split][p], cell_of) for p in paths])

    x_train, y_train = tensors("train", images)  # each loaded in about 1 ms: a part of the whole
    x_eval, y_eval = tensors("eval")
    head_layers = nn.ModuleList(nn.Linear(cfg.hidden_size, n) for _, n, _ in CLIP_HEADS)
    gen = torch.Generator().manual_seed(seed)

    def step_loss(step):
        idx = torch.randint(len(x_train), (batch,), generator=gen)
        return clip_losses(vit, head_layers, x_train[idx], y_train[idx])[0]

    t0 = time.time()
    pretrain([*vit.parameters(), *head_layers.parameters()], steps, lr, 0.01, step_loss, log, "clip")
    vit.eval()
    with torch.no_grad():
        loss, logits = clip_losses(vit, head_layers, x_eval, y_eval)
    vit.save_pretrained(out)
    return {"params": sum(p.numel() for p in vit.parameters()), "train_loss": round(loss.item(), 4),
            "eval_accuracy": clip_accuracy(logits, y_eval), "seconds": round(time.time() - t0, 1)}


# ============================================================================================ the language model

def chat_text(row, scenes):
    """A row as the vicuna_v1 prompt in text, the image replaced by its cells' words: what the tokenizer learns
    from ("USER:", "ASSISTANT:" and every cell's words become tokens)."""
    words = " ".join(W.cell_words(scenes[row["image"]])) if "image" in row else ""
    conv = [t["value"].replace(IMAGE, words) for t in row["conversations"]]
    return SYSTEM + "".join(f" USER: {q} ASSISTANT: {a}" for q, a in zip(conv[::2], conv[1::2]))


def asked(image, q, a):
    """One question about an image, as a LLaVA row."""
    return {"image": image, "conversations": [{"from": "human", "value": IMAGE + "\n" + q}, {"from": "gpt", "value": a}]}


def one_question_rows(row):
    """A stage 2 row as one-question rows, the image in each: a quarter of a multi-turn row's cost for the same
    gain per step."""
    if "image" not in row:
        return [row]
    turns = [t["value"].replace(IMAGE + "\n", "") for t in row["conversations"]]
    return [asked(row["image"], q, a) for q, a in zip(turns[::2], turns[1::2])]


def fact_documents(scenes, rng):
    """(image, text) for each training scene: world.facts, where each look-up sits right after its key. Learned on
    every token, they teach a 2-layer model to find the shape a question names: from words the held-out questions
    reached 0.57 without them, 0.80 with them (the README has the runs)."""
    return [(image, W.facts(scene, rng)) for image, scene in scenes.items() if image.startswith("train/")]


def cell_sample(row, template, tok, slot, scenes, cell_ids):
    """A dataset sample with the image's one slot id expanded into 9 slots (one per cell, as the 9 image tokens
    will be), and in "id" the word ids of each cell, from which cell_means makes the 9 vectors."""
    ids, labels = conversation_ids(row["conversations"], tok, template, slot, system="")
    cells = [cell_ids(w) for w in W.cell_words(scenes[row["image"]])] if "image" in row else []
    if cells:
        k = ids.index(slot)
        ids, labels = ids[:k] + [slot] * 9 + ids[k + 1:], labels[:k] + [IGNORE_INDEX] * 9 + labels[k + 1:]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": None, "id": cells}


def cell_means(llm, samples, slot):
    """The image's stand-in: right-padded input embeddings (B, T, C) in which each slot position holds the mean of
    the embeddings of its cell's words ("northwest small red circle dark"), and the labels (B, T). With the scene
    written out as text instead, stage 1 could not lower its loss; from these 9 vectors it learns as in the paper."""
    b = collate(samples, pad_id=0)
    ids, cells = b["input_ids"], [c for cs in b["ids"] for c in cs]
    x = llm.embed_tokens(ids.masked_fill(ids == slot, 0))
    if cells:
        n = max(map(len, cells))
        words = torch.tensor([c + [-1] * (n - len(c)) for c in cells])  # (cells, n)
        keep = (words >= 0).unsqueeze(-1).float()
        means = (llm.embed_tokens(words.clamp(min=0)) * keep).sum(1) / keep.sum(1)
        x = x.masked_scatter((ids == slot).unsqueeze(-1), means)
    return x, b["labels"]


def mixed_batch_loss(llm, parts, slot):
    """One loss over a batch made of parts (lists of samples) embedded apart (the facts are longer: less padding),
    only at the positions whose next token is learned."""
    logits, targets = [], []
    for samples in parts:
        x, labels = cell_means(llm, samples, slot)
        t = labels[:, 1:]
        logits.append(llm(inputs_embeds=x, select=F.pad(t != IGNORE_INDEX, (0, 1))))  # only where a token is learned
        targets.append(t[t != IGNORE_INDEX])
    return F.cross_entropy(torch.cat(logits), torch.cat(targets))


def greedy_accuracy(llm, held, slot, batch=64):
    """The share of samples whose every answer token (and </s>) is the argmax: what greedy decoding gives."""
    right = 0
    with torch.no_grad():
        for i in range(0, len(held), batch):
            x, labels = cell_means(llm, held[i:i + batch], slot)
            pred = llm(inputs_embeds=x)[:, :-1].argmax(-1)
            right += ((pred == labels[:, 1:]) | (labels[:, 1:] == IGNORE_INDEX)).all(-1).sum().item()
    return right / len(held)


def pretrain_vicuna(world_dir, out, *, seed, vocab_size, width, layers, heads, steps, batch, lr, log=print):
    """A tiny Llama (width, layers, heads; intermediate 8/3 x width) pretrained on the world's text, each document
    with its image as cell_means gives it. Half of each batch is the stage 2 questions, each a chat of its own
    (vicuna_v1 without the system prompt, learned on the answer as Vicuna's chat tuning), and the stage 1
    captions; the other half is the facts documents (learned on every token). The detailed descriptions are left
    out (3x longer, they would pad every batch). The tokenizer is trained on all of that text, with Llama's id
    conventions. Scored on the held-out questions with their scenes as cell means. Saved (with the tokenizer) to
    out; returns the summary prepare.py records."""
    torch.manual_seed(seed)
    stage1 = json.loads((world_dir / "stage1.json").read_text())
    stage2 = json.loads((world_dir / "stage2.json").read_text())
    evals = [json.loads(line) for line in (world_dir / "eval.jsonl").read_text().splitlines()]
    scenes = {p: s for split in read_scenes(world_dir).values() for p, s in split.items()}
    rng = random.Random(seed)
    facts = fact_documents(scenes, rng)
    tok = train_tokenizer([chat_text(row, scenes) for row in stage2 + stage1] + [text for _, text in facts], vocab_size)
    tok.save(out)
    slot = tok.vocab_size  # where the image goes in the ids, as image_token_id will mark it in LLaVA
    cell_ids = functools.lru_cache(maxsize=None)(tok.encode)  # a cell's words recur across scenes and questions
    sample = functools.partial(cell_sample, tok=tok, slot=slot, scenes=scenes, cell_ids=cell_ids)

    rows = [(q, "vicuna_v1") for row in stage2 if not row["id"].endswith("-detail") for q in one_question_rows(row)]
    rows += [(row, "plain") for row in stage1]
    chats = range(len(rows))  # the chats and captions, then the facts
    rows += [(asked(image, "", text), "plain") for image, text in facts]  # plain: the image, then the text
    fact_rows = range(len(chats), len(rows))
    built = functools.lru_cache(maxsize=None)(lambda i: sample(*rows[i]))  # only the rows a batch draws are tokenized
    held = [sample(asked(q["image"], q["text"], q["answer"]), "vicuna_v1") for q in evals]

    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=width, intermediate_size=(8 * width // 3 + 63) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=2048)
    llm = from_scratch(Llama, cfg)
    llm.init_weights(std=0.06)  # Llama's 0.02 is for width 4096: at width 128 the questions stay at chance 2x longer
    n_facts = batch // 2

    def step_loss(step):
        parts = [[built(i) for i in rng.sample(pool, n)] for pool, n in [(chats, batch - n_facts), (fact_rows, n_facts)]]
        return mixed_batch_loss(llm, parts, slot)

    t0 = time.time()
    loss = pretrain(llm.parameters(), steps, lr, 0.0, step_loss, log, "vicuna", clip_norm=1.0)
    llm.eval()
    accuracy = greedy_accuracy(llm, held, slot)
    llm.save_pretrained(out)
    return {"params": sum(p.numel() for p in llm.parameters()), "vocab_size": tok.vocab_size,
            "train_loss": round(loss.item(), 4), "eval_accuracy_from_words": round(accuracy, 4),
            "seconds": round(time.time() - t0, 1)}
