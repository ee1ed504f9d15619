"""LLaVA-1.5 data: prompt templates with exact loss masks, CLIP image preprocessing, the dataset, and batching.

Matches the official haotian-liu/LLaVA training code (`preprocess_plain`, `preprocess_v1`,
`tokenizer_image_token`, `expand2square`, CLIPImageProcessor, `LengthGroupedSampler`) with deliberate
differences (the README's "Fidelity to the release" lists each, with its test):
- ids and labels are built segment by segment, so the loss covers exactly each answer and its </s> by
  construction. The official code re-tokenizes and counts, and silently masks a whole sample on a count
  mismatch ("WARNING: tokenization mismatch"). Segments are cut only before a "▁" that starts an answer
  (" {answer}") or at a special token, and no Llama piece holds "▁" after another character, so encoding
  segment by segment gives the same ids as encoding the whole prompt (tests/test_official.py checks it
  against the official code's own outputs).
- text is text: "</s>" written in a message is never the end-of-sequence id.
- bad rows (malformed, whitespace-only, missing or corrupt images, too long) are skipped and counted, never fatal.

Prompts (REFERENCE.md); in training rows the image placeholder goes at the start of the first question:
  plain:     <s> <image> {caption}\n                      loss on "{caption}\n"
  vicuna_v1: <s> {SYSTEM} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>
                                                          loss on " {a}" and </s> of every turn
After each </s>, "USER:" is tokenized as the release was trained, "US" "ER" ":" (tok.turn_boundary, see
Tokenizer.encode_after_special). Inference prompts (prompt_ids) take every message verbatim, as the official
model_vqa_loader does.
Benchmark the loader: python -m nanollava.data --bench /tmp/bench   (makes photo-like JPEGs there first)
"""
import json
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile

IGNORE_INDEX = -100  # label of a position the loss skips (torch's cross_entropy default ignore_index)
IMAGE = "<image>"  # the placeholder in dataset text; in ids it becomes image_token_id
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SHORT_ANSWER = "Answer the question using a single word or phrase."
TEMPLATES = ("plain", "vicuna_v1")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS: a bigger image is a decompression bomb


class DataError(ValueError):
    """A bad row or image. `reason` is the short name it is counted under."""

    def __init__(self, message, reason="malformed row"):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------- templates

def _pairs(conversations, open_end=False):
    """LLaVA turns [{"from": "human"|"gpt", "value": ...}, ...] or (question, answer) pairs -> checked pairs;
    the last answer is None exactly when open_end (a prompt for generation)."""
    if conversations and isinstance(conversations[0], dict):
        if any(not isinstance(t, dict) or not isinstance(t.get("value"), str) for t in conversations):
            raise DataError("a turn that is not {'from': ..., 'value': str}")
        roles = [t.get("from") for t in conversations]
        if roles != ["human", "gpt"] * (len(roles) // 2) + ["human"] * (len(roles) % 2):
            raise DataError(f"turns must alternate human, gpt, ...; got {roles}", "role order")
        values = [t["value"] for t in conversations] + [None] * (len(roles) % 2)
        pairs = list(zip(values[::2], values[1::2]))
    else:
        pairs = [tuple(p) for p in conversations]
        if any(len(p) != 2 or not isinstance(p[0], str) or not isinstance(p[1], (str, type(None))) for p in pairs):
            raise DataError("turns must be (question, answer) pairs of strings")
    if not pairs or any(a is None for _, a in pairs[:-1]) or (pairs[-1][1] is None) != open_end:
        raise DataError("every question needs an answer" if not open_end else "the last turn must be unanswered",
                        "no answer")
    if any(a is not None and IMAGE in a for _, a in pairs):
        raise DataError(f"{IMAGE} inside an answer", "image marker in answer")
    return pairs


def _prepare(conversations, template):
    """A training row -> (pairs, has_image), with the image marker moved to the front of the first question as
    "<image>\n{question}" (the official preprocess_multimodal, except that it keeps the marker's turn)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}, expected one of {TEMPLATES}")
    pairs = _pairs(conversations)
    has_image = any(IMAGE in q for q, _ in pairs)
    if template == "plain":
        if len(pairs) != 1 or not has_image:
            raise DataError("the plain template needs one image and one caption", "plain needs image + caption")
        if not pairs[0][1].strip():
            raise DataError("an empty caption", "empty text")
        return [(IMAGE, pairs[0][1])], True  # official preprocess_plain replaces the question by the image
    # Official preprocess_multimodal: a turn holding the marker loses it and is stripped; the image then
    # goes first as "<image>\n". We put it in the first question even when a row had it in a later one.
    pairs = [(q.replace(IMAGE, "").strip() if IMAGE in q else q, a) for q, a in pairs]
    if has_image:
        pairs[0] = (IMAGE + "\n" + pairs[0][0].strip(), pairs[0][1])
    if any(not q.strip() for q, _ in pairs[1 if has_image else 0:]) or any(not a.strip() for _, a in pairs):
        raise DataError("an empty question or answer", "empty text")
    return pairs, has_image


def _vicuna(pairs, tok, image_token_id, system=SYSTEM):
    """ids and labels of "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>..." (an open
    last turn ends in "ASSISTANT:") as conv_vicuna_v1.get_prompt() + tokenizer_image_token make them. Segments:
    the text before the marker; the text after it (a new tokenizer call, so a new dummy prefix: "\n" becomes
    "▁" (29871) "<0x0A>" (13)); each " {answer}" (cut before its "▁"); after every </s> the next turn, encoded
    as text after a special token (tok.turn_boundary: "US" "ER" ":" as the release trained)."""
    ids, labels = [tok.bos_id], [IGNORE_INDEX]

    def add(new, supervised):
        ids.extend(new)
        labels.extend(new if supervised else [IGNORE_INDEX] * len(new))

    for k, (q, a) in enumerate(pairs):
        head = (system + " USER: " if system else "USER: ") if k == 0 else "USER: "
        encode = tok.encode if k == 0 else tok.encode_after_special
        before, marker, after = (head + q).partition(IMAGE)
        if marker:
            add(encode(before), False)  # ends in a lone "▁" when the marker follows "USER: ", as officially
            add([image_token_id], False)
            add(tok.encode(after + " ASSISTANT:"), False)
        else:
            add(encode(before + " ASSISTANT:"), False)
        if a is None:
            break
        add(tok.encode(" " + a, prefix=False), True)
        add([tok.eos_id], True)
    return ids, labels


def conversation_ids(conversations, tok, template, image_token_id, system=SYSTEM):
    """A training row -> (ids, labels): lists of ints, labels IGNORE_INDEX where the loss is masked.
    system="" leaves vicuna_v1's system prompt out (prepare.py pretrains the world's LLM on such chats)."""
    pairs, has_image = _prepare(conversations, template)
    if template == "vicuna_v1":
        return _vicuna(pairs, tok, image_token_id, system)
    # plain: official tokenizer_image_token encodes each chunk around <image> on its own, dummy prefix included.
    caption = tok.encode(pairs[0][1] + "\n")
    return [tok.bos_id, image_token_id] + caption, [IGNORE_INDEX, IGNORE_INDEX] + caption


def prompt_ids(turns, tok, image_token_id, system=SYSTEM):
    """vicuna_v1 prompt ending in "ASSISTANT:" for generation, as the official inference code builds it
    (model_vqa_loader, the CLI): every message verbatim, whitespace kept, so "<image>\nWhat does the sign say?  "
    ends in "say?   ASSISTANT:" and a question that is only "<image>" is followed by " ASSISTANT:".
    turns: [(question, answer), ..., (question, None)] or LLaVA turns ending with a human one. "<image>" marks
    the image: at most once, in the first question, where the caller puts it (the official loaders put
    "<image>\n" in front of the question). system="" leaves the system prompt out."""
    pairs = _pairs(turns, open_end=True)
    if pairs[0][0].count(IMAGE) > 1 or any(IMAGE in q for q, _ in pairs[1:]):
        raise DataError(f"{IMAGE} can only be in the first question, once")
    if any(not q for q, _ in pairs) or any(a == "" for _, a in pairs):
        # The official get_prompt() writes an empty message as "USER:" with no separator: never trained on.
        raise DataError("an empty question or answer", "empty text")
    return _vicuna(pairs, tok, image_token_id, system)[0]


def continuation_ids(question, tok):
    """The next turn as it follows a generated </s>: feed [tok.eos_id] + these when keeping the KV cache."""
    if IMAGE in question:
        raise DataError(f"{IMAGE} can only be in the first question")
    return tok.encode_after_special("USER: " + question + " ASSISTANT:")


# ----------------------------------------------------------------------------- images

def _open_image(path, max_pixels):
    """Decode a file fully, or raise one DataError that names it (never a PIL traceback)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
            img = Image.open(path)
        if img.width * img.height > max_pixels:
            raise DataError(f"{path}: {img.width}x{img.height} is over the {max_pixels} pixel limit", "bad image")
        # Image.open reads only the header. Decode now, with truncated files as errors even if another
        # library set PIL's process-wide LOAD_TRUNCATED_IMAGES (which would fill the rest with grey).
        allow_truncated, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated
        return img
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such image file", "image missing") from None
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, EOFError, ...: all mean "bad file"
        raise DataError(f"{path}: cannot decode the image ({type(e).__name__}: {e})", "bad image") from None


def expand2square(img, fill):
    """Official LLaVA: paste centred on a square canvas of the CLIP mean colour (stage 2, 'pad')."""
    w, h = img.size
    if w == h:
        return img
    canvas = Image.new(img.mode, (max(w, h),) * 2, fill)
    canvas.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


def load_image(image, size=336, pad=True, mean=CLIP_MEAN, std=CLIP_STD, max_pixels=MAX_PIXELS):
    """A path or PIL image -> (3, size, size) float tensor, as LLaVA: RGB, [pad], CLIPImageProcessor."""
    img = image if isinstance(image, Image.Image) else _open_image(image, max_pixels)
    img = img.convert("RGB")  # grayscale, RGBA (alpha dropped, as the official .convert('RGB')), palette
    if pad:
        img = expand2square(img, tuple(int(x * 255) for x in mean))  # (122, 116, 104)
    # CLIPImageProcessor: shortest edge -> size with PIL bicubic; the long edge is int(size * long / short),
    # truncated (transformers' get_resize_output_image_size); then a centre crop with floor offsets.
    w, h = img.size
    long = int(size * max(w, h) / min(w, h))
    w, h = (size, long) if w <= h else (long, size)
    img = img.resize((w, h), Image.BICUBIC)
    top, left = (h - size) // 2, (w - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # (3, S, S) uint8: float math on a
    x = x.float().div_(255)                                             # contiguous tensor is ~4x faster
    return x.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))


# ----------------------------------------------------------------------------- dataset

def read_rows(path, bad="raise"):
    """A JSON list or JSONL file -> [(where, row)], where = "line N" (1-based, blank lines counted) or "item N"
    of a JSON list, so that a message can name the row as an editor shows it. A JSONL line that is not JSON
    raises one DataError naming the file and the line (bad="raise"), or becomes (where, None) (bad="keep": the
    training set counts it as a malformed row)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the file ({e})") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
        return [(f"item {n}", row) for n, row in enumerate(rows)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                if bad == "raise":
                    raise DataError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
                out.append((f"line {n}", None))
    return out


class LLaVADataset(torch.utils.data.Dataset):
    """LLaVA JSON/JSONL rows {id, image?, conversations} -> dicts of input_ids, labels, pixel_values, id.

    Cheap checks run at load (bad rows are left out of the dataset and counted); image decoding and the
    length check run in __getitem__, which returns None for a bad row (collate drops it). max_len counts the
    sequence the LLM sees, where one image placeholder stands for image_seq_len positions (576 for CLIP-L/14
    at 336 px); a row truncated to no supervised token is dropped as "too long". strict=True raises instead.
    """

    REASONS = ("malformed row", "role order", "no answer", "empty text", "image marker in answer",
               "plain needs image + caption", "image marker without image", "image missing", "bad image",
               "too long")

    def __init__(self, path, image_root, tok, template, image_token_id, image_size=336, pad=True, max_len=2048,
                 strict=False, mean=CLIP_MEAN, std=CLIP_STD, image_seq_len=576):
        self.path, self.image_root, self.tok, self.template = str(path), str(image_root), tok, template
        self.image_token_id, self.image_size, self.pad, self.max_len = image_token_id, image_size, pad, max_len
        self.strict, self.mean, self.std, self.image_seq_len = strict, mean, std, image_seq_len
        rows = [row for _, row in read_rows(path, bad="keep")]
        self.n_rows = len(rows)
        self._load_skips = {}  # reason -> ids of rows left out at load
        blobs, row_numbers, lengths, has_image = [], [], [], []
        for n, row in enumerate(rows):
            try:
                row = self._check(row, n)
            except DataError as e:
                row_id = row.get("id", n) if isinstance(row, dict) else n
                if strict:
                    raise DataError(f"{path} row {n} (id {row_id}): {e}", e.reason) from None
                self._load_skips.setdefault(e.reason, []).append(row_id)
                continue
            blobs.append(json.dumps(row).encode())
            row_numbers.append(n)
            lengths.append(sum(len(t["value"].split()) for t in row["conversations"]))
            has_image.append("image" in row)
        # Rows live in one numpy byte buffer, not a list of dicts: DataLoader workers are forked, and merely
        # reading a Python object writes its refcount, so a list of 665k dicts slowly gets copied into every
        # worker (pytorch issue 13246). A numpy buffer is one object and stays shared.
        self._blob = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        self._offsets = np.cumsum([0] + [len(b) for b in blobs])
        self._row_numbers = np.array(row_numbers, dtype=np.int64)
        self.lengths = np.array(lengths, dtype=np.int64)  # words, as LLaVA's modality_lengths
        self.has_image = np.array(has_image, dtype=bool)
        # Failures found in __getitem__ happen in worker processes: record them in shared memory, one code
        # per row (0 = fine), so summary() in the main process sees them.
        self._status = torch.zeros(len(blobs), dtype=torch.uint8).share_memory_()

    def _check(self, row, n):
        if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
            raise DataError("not a row with a 'conversations' list")
        image = row.get("image")
        if image is not None and not isinstance(image, str):
            raise DataError("'image' must be one relative path")
        conversations = [dict(t) if isinstance(t, dict) else t for t in row["conversations"]]
        questions = [t.get("value") for t in conversations[::2] if isinstance(t, dict)]
        marked = any(isinstance(q, str) and IMAGE in q for q in questions)
        if image is None and marked:
            raise DataError(f"{IMAGE} in a row without an image", "image marker without image")
        if image is not None and not marked and conversations and isinstance(conversations[0], dict) \
                and isinstance(conversations[0].get("value"), str):
            conversations[0]["value"] = IMAGE + "\n" + conversations[0]["value"]  # an image goes in the first turn
        _prepare(conversations, self.template)
        if image is not None and not os.path.isfile(os.path.join(self.image_root, image)):
            raise DataError(f"{os.path.join(self.image_root, image)}: no such image file", "image missing")
        out = {"id": row.get("id", n), "conversations": conversations}
        return out if image is None else {**out, "image": image}

    def __len__(self):
        return len(self._offsets) - 1

    def row(self, i):
        return json.loads(self._blob[self._offsets[i]:self._offsets[i + 1]].tobytes())

    def __getitem__(self, i):
        row = self.row(i)
        try:
            ids, labels = conversation_ids(row["conversations"], self.tok, self.template, self.image_token_id)
            room = self.max_len - (self.image_seq_len - 1) * ("image" in row)
            if len(ids) > room:
                ids, labels = ids[:room], labels[:room]
                if all(label == IGNORE_INDEX for label in labels):
                    raise DataError(f"no answer token within max_len {self.max_len}", "too long")
            pixels = None
            if "image" in row:
                pixels = load_image(os.path.join(self.image_root, row["image"]), self.image_size, self.pad,
                                    self.mean, self.std)
        except DataError as e:
            self._status[i] = self.REASONS.index(e.reason) + 1
            if self.strict:
                raise DataError(f"{self.path} row {self._row_numbers[i]} (id {row['id']}): {e}", e.reason) from None
            return None
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixels,
                "id": row["id"]}

    def skipped(self):
        """reason -> ids of the rows skipped so far (at load, and in __getitem__ in any process)."""
        out = {reason: list(ids) for reason, ids in self._load_skips.items()}
        for i in torch.nonzero(self._status).flatten().tolist():
            out.setdefault(self.REASONS[self._status[i] - 1], []).append(self.row(i)["id"])
        return out

    def summary(self, first=3):
        """One line: rows, rows used, skips per reason with their first few ids."""
        skipped = self.skipped()
        n_bad = sum(len(ids) for ids in skipped.values())
        parts = [f"{reason} {len(ids)} (e.g. {', '.join(map(str, ids[:first]))})" for reason, ids in skipped.items()]
        return (f"{os.path.basename(self.path)}: {self.n_rows} rows, {self.n_rows - n_bad} used, {n_bad} skipped"
                + (": " + "; ".join(parts) if parts else ""))


def collate(samples, pad_id):
    """Drop None, right-pad: input_ids with pad_id, labels with IGNORE_INDEX, attention_mask True on real
    tokens; pixel_values (n_images, 3, S, S) in the order the image placeholders appear, or None. Returns None
    if every sample was bad."""
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    n, t = len(samples), max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, t), dtype=torch.bool)
    for b, s in enumerate(samples):
        k = len(s["input_ids"])
        input_ids[b, :k], labels[b, :k], attention_mask[b, :k] = s["input_ids"], s["labels"], True
    images = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": torch.stack(images) if images else None, "ids": [s["id"] for s in samples]}


# ----------------------------------------------------------------------------- batching

def _even_chunks(indices, lengths, num_chunks):
    """Official split_to_even_chunks: longest first, each to the chunk with the least total length so far."""
    if len(indices) % num_chunks:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    size, chunks, totals = len(indices) // num_chunks, [[] for _ in range(num_chunks)], [0] * num_chunks
    for i in sorted(indices, key=lambda i: -lengths[i]):  # stable, like the official sorted(..., reverse=True)
        c = totals.index(min(totals))
        chunks[c].append(i)
        totals[c] = totals[c] + lengths[i] if len(chunks[c]) < size else float("inf")
    return chunks


def epoch_order(n, seed, epoch, global_batch, micro_batch, group_by_modality_length=False, lengths=None,
                has_image=None):
    """This epoch's order of sample indices, the same on every rank, cut to whole steps of global_batch.

    Plain: a permutation from (seed, epoch). Grouped (LLaVA's group_by_modality_length): each modality is
    shuffled and cut into megabatches of global_batch; the full megabatches are shuffled together; each is
    sorted by length and split into global_batch // micro_batch micro-batches of equal total length (which
    balances work across ranks: micro-batches are not of similar lengths, just like the official sampler).
    The two modalities' leftovers form one last, mixed megabatch. What does not fill a step is dropped
    (fewer than global_batch samples, a different set each epoch), so every rank gets the same number of
    micro-batches.
    """
    rng = np.random.default_rng([seed, epoch])
    if not group_by_modality_length:
        order = rng.permutation(n)
    else:
        if lengths is None or has_image is None:
            raise ValueError("group_by_modality_length needs lengths and has_image")
        has_image = np.asarray(has_image, dtype=bool)
        megabatches, leftovers = [], []
        for modality in (True, False):
            idx = rng.permutation(np.flatnonzero(has_image == modality))
            full = len(idx) // global_batch * global_batch
            megabatches += [idx[i:i + global_batch] for i in range(0, full, global_batch)]
            leftovers.append(idx[full:])
        megabatches = [megabatches[i] for i in rng.permutation(len(megabatches))]
        megabatches = [np.concatenate(_even_chunks(mb.tolist(), lengths, global_batch // micro_batch))
                       for mb in megabatches]
        order = np.concatenate(megabatches + leftovers)
    return order[: len(order) // global_batch * global_batch].tolist()


def batch_indices(n, num_replicas, rank, seed, epoch, batch_size, grad_accum=1, group_by_modality_length=False,
                  lengths=None, has_image=None, start=0):
    """This rank's micro-batches (lists of dataset indices) for the rest of the epoch, in the order it runs them.

    The contract, with B = batch_size (micro-batch per rank), W = num_replicas, A = grad_accum, G = B * W * A:
    - every rank computes the same epoch_order; optimizer step s uses its global samples [s*G, (s+1)*G);
    - inside step s, micro-batch j (0 <= j < A) of rank r holds order[s*G + (j*W + r)*B : ... + B];
    - the list returned here is rank r's micro-batches from `start` on: with start=0, entry s*A + j is
      micro-batch j of step s;
    - start = global samples already consumed (a multiple of B*W, e.g. steps_done * G): resuming from it
      yields exactly the micro-batches that were not run yet, on every rank.
    Feed it to DataLoader(dataset, batch_sampler=..., collate_fn=partial(collate, pad_id=...)).
    """
    if start % (batch_size * num_replicas):
        raise ValueError(f"start {start} is not a multiple of batch_size * num_replicas")
    global_batch = batch_size * num_replicas * grad_accum
    if n < global_batch:
        raise ValueError(f"{n} samples do not fill one step of global batch {global_batch}")
    order = epoch_order(n, seed, epoch, global_batch, batch_size, group_by_modality_length, lengths, has_image)
    slots = range(start // batch_size + rank, len(order) // batch_size, num_replicas)
    return [order[t * batch_size:(t + 1) * batch_size] for t in slots]


# ----------------------------------------------------------------------------- loader benchmark

def _bench(directory, n=512, workers=2, batch=16, size=336):
    """Samples/s of the stage-2 loader on photo-like 500x400 JPEGs (made in `directory` if absent)."""
    import time
    from functools import partial
    from nanollava.tokenizer import train_tokenizer
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = f"img{i:04d}.jpg"
        if not os.path.exists(os.path.join(directory, name)):
            yy, xx = np.mgrid[0:400, 0:500]
            base = np.stack([xx * 0.4, yy * 0.5, (xx + yy) * 0.2], -1) + rng.normal(0, 25, (400, 500, 3))
            Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(os.path.join(directory, name), quality=90)
        question = "What is in the picture? Describe the colours and the shapes in detail."
        rows.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": IMAGE + "\n" + question},
            {"from": "gpt", "value": "A smooth gradient from dark blue to orange, covered in fine noise. " * 4}]})
    with open(os.path.join(directory, "bench.json"), "w") as f:
        json.dump(rows, f)
    tok = train_tokenizer([r["conversations"][1]["value"] + " " + SYSTEM for r in rows[:8]], 400)
    ds = LLaVADataset(os.path.join(directory, "bench.json"), directory, tok, "vicuna_v1", image_token_id=-200,
                      image_size=size, pad=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=True,
                                         collate_fn=partial(collate, pad_id=tok.pad_id))
    batches = iter(loader)
    next(batches)  # the clock starts once the workers are up and the first batch is out
    t0 = time.perf_counter()
    seen = sum(len(b["ids"]) for b in batches)
    dt = time.perf_counter() - t0
    print(f"{seen} samples at {size} px (pad) in {dt:.2f} s with {workers} workers: {seen / dt:.1f} samples/s"
          f" ({seen / dt / max(workers, 1):.1f} per worker); {ds.summary()}")


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Measure the LLaVA data loader.")
    parser.add_argument("--bench", required=True, help="directory for the generated JPEGs and bench.json")
    parser.add_argument("--n", type=int, default=512, help="number of images/samples")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader num_workers")
    parser.add_argument("--size", type=int, default=336, help="image size")
    args = parser.parse_args()
    _bench(args.bench, args.n, args.workers, size=args.size)
