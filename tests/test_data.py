"""nanollava.data: prompt ids against the official LLaVA procedure, images against CLIPImageProcessor, the
dataset's bad-row handling, collate, and the batch plan."""
import functools
import json
import re
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from nanollava.data import (CLIP_MEAN, IGNORE_INDEX, SHORT_ANSWER, SYSTEM, DataError, LLaVADataset, batch_indices,
                            collate, continuation_ids, conversation_ids, epoch_order, expand2square, load_image,
                            prompt_ids)
from nanollava.tokenizer import load_tokenizer, train_tokenizer
from oracles import hf_llama_tokenizer, tokenizer_image_token

# ----------------------------------------------------------------------------- the official procedure

class SlowLlamaTokenizer:
    """`tokenizer(text).input_ids` of HF transformers 4.37's slow LlamaTokenizer(legacy=False, add_bos_token=True),
    the tokenizer the newest official LLaVA trains with (nanollava's turn_boundary="4.37"; the release's 4.31 form
    is tested against the official goldens in test_official.py), rebuilt on sentencepiece: add_dummy_prefix is switched off,
    "▁" goes in front of the text, the text is split at special tokens, and a chunk that starts with "▁" or
    " " is encoded as "<unk>" + chunk with the <unk> pieces dropped."""

    def __init__(self, path):
        spm = pytest.importorskip("sentencepiece")
        raw = spm.SentencePieceProcessor(model_file=str(path)).serialized_model_proto()
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(raw + b"\x1a\x02\x18\x00")  # NormalizerSpec.add_dummy_prefix = false
        self.unk_len = len(self.sp.encode("<unk>"))

    def _tokenize(self, text):
        if not text.startswith(("▁", " ")):
            return self.sp.encode(text)
        return self.sp.encode("<unk>" + text)[self.unk_len:]

    def __call__(self, text):
        if not text:
            return [1]
        chunks = [c for c in re.split("(<unk>|<s>|</s>)", "▁" + text.replace("▁", " ")) if c]
        ids = []
        for c in chunks:
            ids += [{"<unk>": 0, "<s>": 1, "</s>": 2}[c]] if c in ("<unk>", "<s>", "</s>") else self._tokenize(c)
        if len(ids) > 1 and chunks[0] == "▁":  # a lone "▁" before a leading special token is dropped
            ids = ids[1:]
        return [1] + ids


def transformers_tokenizer(path):
    """transformers' own LlamaTokenizer(legacy=False), BOS added as add_bos_token=True does."""
    hf = hf_llama_tokenizer(path)

    def encode(text):
        ids = hf(text).input_ids
        return ids if ids[:1] == [1] else [1] + ids  # add BOS as add_bos_token=True does
    return encode


def official_prompt(pairs):
    """Official conv_vicuna_v1.get_prompt(): sep " ", sep2 "</s>"; an open last turn ends in "ASSISTANT:"."""
    prompt = SYSTEM + " "
    for q, a in pairs:
        prompt += f"USER: {q} " + (f"ASSISTANT: {a}</s>" if a is not None else "ASSISTANT:")
    return prompt


def official_ids(prompt, tokenizer, image_token_index):
    # Official preprocess_v1 / preprocess_plain: tokenizer_image_token for rows with an image, else tokenizer().
    return tokenizer_image_token(prompt, tokenizer, image_token_index) if "<image>" in prompt else tokenizer(prompt)


@functools.lru_cache
def _tokenizers(path):
    # Both oracles tokenize text after </s> as transformers 4.37 does: "USER" (11889) ":".
    return load_tokenizer(path, turn_boundary="4.37"), {"slow (official)": SlowLlamaTokenizer(path),
                                  "transformers": transformers_tokenizer(path)}


def _spans(ids, labels):
    """Contiguous supervised runs of ids."""
    runs, run = [], []
    for i, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            runs, run = (runs + [run] if run else runs), []
        else:
            assert label == i
            run.append(i)
    return runs + [run] if run else runs


ROWS = {
    "single turn": [("<image>\nWhat is in the picture?", "A cat on a mat.")],
    "multi turn": [("<image>\nWhat colour is the bus?", "Red."), ("And the car?", "Blue, with white stripes."),
                   (f"How many wheels?\n{SHORT_ANSWER}", "4")],
    "text only": [("Write a haiku about the sea.", "Waves fold into foam\nsalt wind on the harbour wall\ngulls "
                   "argue at dusk"), ("Now in French.", "Les vagues se plient")],
    "newlines and unicode": [("<image>\nDescribe it.", "Line one.\n\nLine two: 中文, emoji 😀, café — ✓\n- a\n- b")],
    "spaces": [("<image>\n  What?  ", "  leading and trailing spaces  "), ("tabs\tand\nnewlines", "\tok\n")],
    "code answer": [("<image>\nCode?", "def f(x):\n    return x ** 2\n")],
}


@pytest.mark.parametrize("oracle", ["slow (official)", "transformers"])
@pytest.mark.parametrize("name", list(ROWS))
@pytest.mark.parametrize("image_token_id", [-200, 32000])
def test_vicuna_ids_equal_the_official_procedure(sp_model_path, name, oracle, image_token_id):
    tok, oracles = _tokenizers(sp_model_path)
    pairs = ROWS[name]
    # The official code strips a turn that holds <image> and re-prepends "<image>\n".
    off_pairs = [(("<image>\n" + q.replace("<image>", "").strip()) if "<image>" in q else q, a) for q, a in pairs]
    conversations = [{"from": f, "value": v} for q, a in pairs for f, v in (("human", q), ("gpt", a))]
    ids, labels = conversation_ids(conversations, tok, "vicuna_v1", image_token_id)
    expected = official_ids(official_prompt(off_pairs), oracles[oracle], image_token_id)
    assert ids == expected, f"{name}: ours {ids}\nofficial {expected}"
    # The loss covers exactly each answer and its </s>.
    spans = _spans(ids, labels)
    assert len(spans) == len(pairs)
    for span, (_, answer) in zip(spans, pairs):
        assert span[-1] == tok.eos_id and tok.decode(span[:-1]) == answer
    # The inference prompt is the training row cut before the last answer. Prompts take every message verbatim
    # (as the official inference code does), so they are given the questions as training formed them.
    open_turns = off_pairs[:-1] + [(off_pairs[-1][0], None)]
    p_ids = prompt_ids(open_turns, tok, image_token_id)
    assert p_ids == official_ids(official_prompt(off_pairs[:-1] + [(off_pairs[-1][0], None)]), oracles[oracle],
                                 image_token_id)
    assert ids[:len(p_ids)] == p_ids


@pytest.mark.parametrize("oracle", ["slow (official)", "transformers"])
def test_plain_ids_equal_the_official_procedure(sp_model_path, oracle):
    tok, oracles = _tokenizers(sp_model_path)
    captions = ["a red bus parked by the road", "Two dogs.\nOne cat. 中文 😀", "  spaced  "]
    if oracle == "transformers":
        # A chunk that starts with a space: transformers 5's Metaspace adds no "▁" in front of one, while the
        # 4.x slow tokenizer the official code used (and sentencepiece, and we) do: [1, -200, 29871, 259, ...].
        captions.pop()
    for caption in captions:
        rows = [{"from": "human", "value": "<image>\nignored question"}, {"from": "gpt", "value": caption}]
        ids, labels = conversation_ids(rows, tok, "plain", -200)
        # Official preprocess_plain: the human value becomes "<image>"; text = "<image>" + caption + "\n".
        assert ids == official_ids("<image>" + caption + "\n", oracles[oracle], -200)
        assert labels[:2] == [IGNORE_INDEX] * 2 and labels[2:] == ids[2:]
        assert tok.decode(ids[2:]) == caption + "\n"


def test_image_goes_in_the_first_turn_only(sp_model_path):
    tok, _ = _tokenizers(sp_model_path)
    reference, _ = conversation_ids([("<image>\nWhat is it?", "A dog."), ("Sure?", "Yes.")], tok, "vicuna_v1", -200)
    for moved in ([("What is it?<image>", "A dog."), ("Sure?", "Yes.")],
                  [("What is it?", "A dog."), ("<image>\nSure?", "Yes.")],
                  [("What is it?\n<image>", "A dog."), ("Sure?<image>", "Yes.")]):
        ids, _ = conversation_ids(moved, tok, "vicuna_v1", -200)
        assert ids == reference and ids.count(-200) == 1, moved
    first_turn_end = reference.index(tok.eos_id)
    assert reference.index(-200) < first_turn_end
    with pytest.raises(DataError, match="answer"):
        conversation_ids([("<image>\nq", "an <image> in the answer")], tok, "vicuna_v1", -200)


def test_chat_without_the_system_prompt(sp_model_path):
    """system="" (how prepare.py pretrains the world's LLM) drops exactly the system prompt's tokens."""
    tok, _ = _tokenizers(sp_model_path)
    for turns in ([("<image>\nWhat is it?", "A dog."), ("Sure?", "Yes.")], [("What is it?", "A dog.")]):
        ids, labels = conversation_ids(turns, tok, "vicuna_v1", -200)
        short, short_labels = conversation_ids(turns, tok, "vicuna_v1", -200, system="")
        cut = len(tok.encode(SYSTEM + " USER:")) - len(tok.encode("USER:"))
        assert short[:3] == [tok.bos_id] + tok.encode("USER:")[:2] and cut > 20
        assert short[1:] == ids[1 + cut:] and short_labels[1:] == labels[1 + cut:]


def test_continuation_ids_follow_an_eos(sp_model_path):
    tok, _ = _tokenizers(sp_model_path)
    first = prompt_ids([("<image>\nWhat is it?", None)], tok, 32000)
    answer = tok.encode(" A dog.", prefix=False)
    both = prompt_ids([("<image>\nWhat is it?", "A dog."), ("Is it big?", None)], tok, 32000)
    assert both == first + answer + [tok.eos_id] + continuation_ids("Is it big?", tok)
    llava_turns = [{"from": "human", "value": "<image>\nWhat is it?"}]
    assert prompt_ids(llava_turns, tok, 32000) == first
    with pytest.raises(DataError):
        continuation_ids("<image>\nagain", tok)


def test_bad_conversations_raise(sp_model_path):
    tok, _ = _tokenizers(sp_model_path)
    bad = {"role order": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}],
           "no answer": [{"from": "human", "value": "q"}],
           "empty text": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}],
           "malformed row": [{"from": "human"}, {"from": "gpt", "value": "a"}]}
    for reason, conversations in bad.items():
        with pytest.raises(DataError) as info:
            conversation_ids(conversations, tok, "vicuna_v1", -200)
        assert info.value.reason == reason
    with pytest.raises(DataError, match="plain"):
        conversation_ids([("text only", "caption")], tok, "plain", -200)


# ----------------------------------------------------------------------------- images

def _photo(w, h, seed=0):
    """Photo-like: smooth gradients plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 128 / (w + h)], -1) + rng.normal(0, 30, (h, w, 3))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [336, 64])
def test_images_equal_clip_image_processor(tmp_path, size):
    pytest.importorskip("transformers")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # the PIL (slow) one
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    fill = tuple(int(x * 255) for x in CLIP_MEAN)
    assert fill == (122, 116, 104)
    files = []
    modes = [("L", "png"), ("RGBA", "png"), ("P", "png")]
    for k, (w, h) in enumerate([(500, 400), (400, 500), (333, 333), (7, 300), (300, 7), (1001, 37)]):
        img = _photo(w, h, seed=k)
        for mode, ext in [("RGB", "jpg"), modes[k % 3]]:  # every shape as a JPEG, and in one other mode
            converted = img.convert(mode) if mode != "RGBA" else Image.merge("RGBA", (*img.split(), img.convert("L")))
            files.append(tmp_path / f"{w}x{h}_{mode}.{ext}")
            converted.save(files[-1])
    for path in files:
        for pad in (True, False):
            ours = load_image(path, size=size, pad=pad)
            rgb = Image.open(path).convert("RGB")  # the official order: RGB first, then expand2square
            ref = proc(expand2square(rgb, fill) if pad else rgb, return_tensors="np",
                       input_data_format="channels_last")["pixel_values"][0]
            diff = (ours - torch.from_numpy(ref)).abs()
            assert ours.shape == (3, size, size) and ours.dtype == torch.float32
            assert diff.max() <= 1e-6, f"{path.name} pad={pad}: max diff {diff.max():.2e}, mean {diff.mean():.2e}"
    assert torch.equal(load_image(Image.open(files[0]), size=size), load_image(files[0], size=size))


def test_expand2square_matches_official_placement():
    wide = expand2square(Image.new("RGB", (10, 4), (255, 255, 255)), (1, 2, 3))
    assert wide.size == (10, 10) and wide.getpixel((0, 2)) == (1, 2, 3) and wide.getpixel((0, 3)) == (255,) * 3
    tall = expand2square(Image.new("RGB", (3, 10), (255, 255, 255)), (1, 2, 3))
    assert tall.size == (10, 10) and tall.getpixel((2, 0)) == (1, 2, 3) and tall.getpixel((3, 0)) == (255,) * 3


def test_image_errors_name_the_file(tmp_path):
    _photo(500, 400).save(tmp_path / "good.jpg")
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut_end.jpg").write_bytes(data[:-2])
    (tmp_path / "garbage.jpg").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "text.jpg").write_text("not an image")
    Image.new("1", (9500, 9500)).save(tmp_path / "bomb.png")  # 90M pixels in 11 kB
    cases = {"missing.jpg": "image missing", "truncated.jpg": "bad image", "cut_end.jpg": "bad image",
             "garbage.jpg": "bad image", "text.jpg": "bad image", "bomb.png": "bad image"}
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        for allow_truncated in (False, True):  # another library may have told PIL to accept truncated files
            ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated
            for name, reason in cases.items():
                with pytest.raises(DataError, match=re.escape(name)) as info:
                    load_image(tmp_path / name, size=32)
                assert info.value.reason == reason
            assert ImageFile.LOAD_TRUNCATED_IMAGES == allow_truncated
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    with pytest.raises(DataError, match="pixel limit"):
        load_image(tmp_path / "good.jpg", max_pixels=1000)
    assert load_image(tmp_path / "good.jpg", size=32).shape == (3, 32, 32)


# ----------------------------------------------------------------------------- dataset

@functools.lru_cache
def _small_tok():
    tok = train_tokenizer([SYSTEM, "USER: ASSISTANT: What is in the picture? A cat on a mat. Describe it."] * 20, 300)
    tok.add_special_tokens(["<image>", "<pad>"])
    return tok


def _row(i, image=None, q="<image>\nWhat is in the picture?", a="A cat on a mat.", extra=()):
    conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}, *extra]
    return {"id": f"r{i}", **({"image": image} if image else {}), "conversations": conv}


@pytest.fixture
def dataset_dir(tmp_path):
    (tmp_path / "img").mkdir()
    for k in range(4):
        _photo(60 + 10 * k, 50, seed=k).save(tmp_path / "img" / f"{k}.jpg")
    data = (tmp_path / "img" / "0.jpg").read_bytes()
    (tmp_path / "img" / "broken.jpg").write_bytes(data[: len(data) // 2])
    rows = [
        _row(0, "0.jpg"), _row(1, "1.jpg", extra=[{"from": "human", "value": "More?"},
                                                    {"from": "gpt", "value": "No more."}]),
        _row(2, q="Text only question?"), _row(3, "2.jpg", q="No marker: image goes first."),
        _row(4, "missing.jpg"),                                                   # image missing
        _row(5, "broken.jpg"),                                                    # bad image (at __getitem__)
        _row(6, "3.jpg", extra=[{"from": "human", "value": "unanswered"}]),       # no answer
        {"id": "r7", "image": "0.jpg", "conversations": [{"from": "gpt", "value": "a"},
                                                         {"from": "human", "value": "q"}]},  # role order
        _row(8, "0.jpg", a="   "),                                                # empty text
        {"id": "r9", "image": "0.jpg"},                                           # malformed row
        _row(10, q="<image>\nmarker but no image"),                               # image marker without image
        _row(11, "1.jpg", a="word " * 200),                                       # truncated, kept
    ]
    return tmp_path, rows


def _dataset(tmp_path, rows, fmt="json", **kw):
    path = tmp_path / f"rows.{fmt}"
    text = json.dumps(rows) if fmt == "json" else "\n".join(json.dumps(r) for r in rows) + "\n{broken json\n"
    path.write_text(text)
    kw = {"template": "vicuna_v1", "image_token_id": 301, "image_size": 32, "max_len": 300, "image_seq_len": 16,
          **kw}
    return LLaVADataset(path, tmp_path / "img", _small_tok(), **kw)


def test_dataset_counts_bad_rows(dataset_dir):
    tmp_path, rows = dataset_dir
    for fmt in ("json", "jsonl"):
        ds = _dataset(tmp_path, rows, fmt)
        assert len(ds) == 6 and ds.n_rows == 12 + (fmt == "jsonl")
        assert list(ds.has_image) == [True, True, False, True, True, True]
        assert all(ds.lengths > 0)
        samples = [ds[i] for i in range(len(ds))]
        assert [s is None for s in samples] == [False, False, False, False, True, False]
        skipped = ds.skipped()
        assert {k: v for k, v in skipped.items() if k != "malformed row"} == {
            "image missing": ["r4"], "bad image": ["r5"], "no answer": ["r6"], "role order": ["r7"],
            "empty text": ["r8"], "image marker without image": ["r10"]}
        assert skipped["malformed row"] == (["r9"] if fmt == "json" else ["r9", 12])  # 12: the broken JSONL line
        line = ds.summary()
        assert "\n" not in line and "bad image 1 (e.g. r5)" in line and "image missing 1 (e.g. r4)" in line, line
        assert line.startswith(f"rows.{fmt}: {ds.n_rows} rows, 5 used, {ds.n_rows - 5} skipped"), line
        s = samples[0]
        assert s["id"] == "r0" and s["pixel_values"].shape == (3, 32, 32) and s["input_ids"].dtype == torch.long
        assert (s["input_ids"] == 301).sum() == 1 and samples[2]["pixel_values"] is None
        assert (samples[3]["input_ids"] == 301).sum() == 1  # an image row without the marker gets it
        long = samples[5]
        assert len(long["input_ids"]) == 300 - 15 and (long["labels"] != IGNORE_INDEX).any()  # truncated, kept


def test_dataset_too_long_rows_are_dropped(dataset_dir):
    tmp_path, rows = dataset_dir
    ds = _dataset(tmp_path, rows[:4], max_len=190)  # answers start at ~183 > 190 - 15 in image rows
    assert [ds[i] is None for i in range(4)] == [True, True, False, True]
    assert "too long 3 (e.g. r0, r1, r3)" in ds.summary(), ds.summary()


def test_dataset_strict_names_the_row(dataset_dir):
    tmp_path, rows = dataset_dir
    with pytest.raises(DataError, match=r"row 4 \(id r4\).*missing\.jpg"):
        _dataset(tmp_path, rows, strict=True)
    ds = _dataset(tmp_path, rows[:4] + [rows[5]], strict=True)
    with pytest.raises(DataError, match=r"row 4 \(id r5\).*broken\.jpg"):
        ds[4]


def test_dataloader_workers_report_bad_rows(dataset_dir):
    tmp_path, rows = dataset_dir
    ds = _dataset(tmp_path, rows)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=partial(collate, pad_id=0))
    batches = [b for b in loader if b is not None]
    assert sum(len(b["ids"]) for b in batches) == 5  # one bad image dropped, the epoch goes on
    assert ds.skipped()["bad image"] == ["r5"]  # seen in a worker, counted in the main process


def test_collate_pads_and_orders_images():
    def sample(n, image, k):
        return {"input_ids": torch.arange(1, n + 1), "labels": torch.full((n,), k), "id": k,
                "pixel_values": torch.full((3, 4, 4), float(k)) if image else None}
    batch = collate([sample(3, True, 7), None, sample(5, False, 8), sample(2, True, 9)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5], [1, 2, 0, 0, 0]]
    assert batch["labels"].tolist()[2] == [9, 9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"].tolist()[0] == [True, True, True, False, False]
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["pixel_values"][:, 0, 0, 0].tolist() == [7, 9]
    assert batch["ids"] == [7, 8, 9]
    assert collate([sample(2, False, 1)], pad_id=0)["pixel_values"] is None
    assert collate([None, None], pad_id=0) is None


# ----------------------------------------------------------------------------- batching

def test_batch_indices_shard_and_cover():
    n, world, b, accum = 1003, 4, 8, 2
    g = world * b * accum
    per_rank = [batch_indices(n, world, r, seed=1, epoch=0, batch_size=b, grad_accum=accum) for r in range(world)]
    flat = [i for rank in per_rank for mb in rank for i in mb]
    assert len(flat) == len(set(flat)) == n // g * g  # disjoint; the last partial step is dropped
    assert all(len(mb) == b for rank in per_rank for mb in rank) and len({len(r) for r in per_rank}) == 1
    order = epoch_order(n, 1, 0, g, b)
    for s in range(n // g):  # micro-batch j of step s on rank r is where the contract says
        for j in range(accum):
            for r in range(world):
                lo = s * g + (j * world + r) * b
                assert per_rank[r][s * accum + j] == order[lo:lo + b]
    assert per_rank[0] == batch_indices(n, world, 0, seed=1, epoch=0, batch_size=b, grad_accum=accum)
    assert per_rank[0] != batch_indices(n, world, 0, seed=1, epoch=1, batch_size=b, grad_accum=accum)
    assert per_rank[0] != batch_indices(n, world, 0, seed=2, epoch=0, batch_size=b, grad_accum=accum)


@pytest.mark.parametrize("group", [False, True])
def test_batch_indices_resume(group):
    n, world, b, accum = 500, 2, 4, 3
    rng = np.random.default_rng(0)
    lengths, has_image = rng.integers(5, 400, n), rng.random(n) < 0.7
    kw = dict(seed=0, epoch=3, batch_size=b, grad_accum=accum, group_by_modality_length=group, lengths=lengths,
              has_image=has_image)
    for r in range(world):
        full = batch_indices(n, world, r, **kw)
        for steps_done in (0, 1, 5, len(full) // accum):
            assert batch_indices(n, world, r, start=steps_done * b * world * accum, **kw) == full[steps_done * accum:]
        assert batch_indices(n, world, r, start=b * world, **kw) == full[1:]  # mid-step, at a micro-batch round
    with pytest.raises(ValueError):
        batch_indices(n, world, 0, start=3, **kw)


def test_group_by_modality_length():
    n, world, b, accum = 2000, 4, 4, 2
    g = world * b * accum
    rng = np.random.default_rng(1)
    lengths, has_image = rng.integers(5, 600, n), rng.random(n) < 0.6
    kw = dict(seed=0, epoch=0, batch_size=b, grad_accum=accum, group_by_modality_length=True, lengths=lengths,
              has_image=has_image)
    per_rank = [batch_indices(n, world, r, **kw) for r in range(world)]
    flat = [i for rank in per_rank for mb in rank for i in mb]
    assert len(flat) == len(set(flat)) == n // g * g
    order = epoch_order(n, 0, 0, g, b, True, lengths, has_image)
    steps = [order[s:s + g] for s in range(0, len(order), g)]
    mixed = [s for s in steps if len({bool(has_image[i]) for i in s}) > 1]
    assert len(mixed) <= 1 and (not mixed or mixed[0] == steps[-1])  # only the leftovers' last step mixes
    for step in steps[:-1]:  # its micro-batches carry about equal token totals (the official balancing)
        totals = [sum(lengths[step[k:k + b]]) for k in range(0, g, b)]
        assert max(totals) - min(totals) <= max(lengths[step]), totals
    assert order != epoch_order(n, 0, 1, g, b, True, lengths, has_image)
