"""nanollava's ids against outputs of the official LLaVA code itself, on the real Vicuna tokenizer.model.

../shared/fixtures/official/goldens.json (its `about` says how it was made): training ids and labels of stage-1
and stage-2 rows and the ids of inference prompts, from the release (commit 44e0562, transformers 4.31.0) and
the newest official code (4.37.2), each with legacy false (vicuna-7b-v1.5's tokenizer_config) and true.
tests/goldens/after_special.json (made by tests/goldens/make_after_special.py with those transformers
versions): how each tokenizes text after </s> and <s>, branch by branch of the rule.
"""
import functools
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import FIXTURES
from test_data import _spans  # contiguous supervised runs of ids
from nanollava.data import IGNORE_INDEX, IMAGE, DataError, LLaVADataset, conversation_ids, prompt_ids
from nanollava.tokenizer import load_tokenizer

GOLDENS = FIXTURES / "official" / "goldens.json"
AFTER_SPECIAL = Path(__file__).resolve().parent / "goldens" / "after_special.json"
# Official mode -> nanollava's turn_boundary. The release mode is loaded with no turn_boundary: it is the default.
MODES = {"4.31-nonlegacy": None, "4.37-nonlegacy": "4.37", "4.31-legacy": "legacy", "4.37-legacy": "legacy"}
RELEASE = "4.31-nonlegacy"


@functools.lru_cache
def goldens():
    for path in (GOLDENS, FIXTURES / "llama2-tokenizer.model"):
        if not path.exists():
            pytest.skip(f"fixture {path} is absent (it ships in ../shared/fixtures beside the repo)")
    return json.loads(GOLDENS.read_text(encoding="utf-8"))


@functools.lru_cache
def tokenizer(mode):
    goldens()
    boundary = MODES[mode]
    path = FIXTURES / "llama2-tokenizer.model"
    return load_tokenizer(path) if boundary is None else load_tokenizer(path, turn_boundary=boundary)


def _rows(stage):
    """Rows as the dataset reads them: an image row without the marker gets "<image>\\n" in its first turn."""
    out = []
    for row in goldens()[f"{stage}_rows"]:
        conv = [dict(t) for t in row["conversations"]]
        if "image" in row and not any(IMAGE in t["value"] for t in conv[::2]):
            conv[0]["value"] = IMAGE + "\n" + conv[0]["value"]
        out.append((row, conv))
    return out


def _blank(row):
    return any(not t["value"].strip() for t in row["conversations"])


def _diff(ours, want):
    k = next((i for i, (x, y) in enumerate(zip(ours, want)) if x != y), min(len(ours), len(want)))
    return f"first difference at {k}: ours {ours[k:k + 6]} official {want[k:k + 6]} (lengths {len(ours)}, {len(want)})"


@pytest.mark.parametrize("mode", list(MODES))
def test_training_ids_and_labels_equal_the_official(mode):
    """Every stage-1 and stage-2 row: the official ids exactly, and its labels wherever it did not mask the whole
    sample. Where it did ("tokenization mismatch": ASSISTANT: inside an answer), the ids still agree and
    nanollava's loss covers exactly each answer and its </s>. Whitespace-only messages are skipped on purpose."""
    tok, want_all = tokenizer(mode), goldens()["training"][mode]
    compared = masked = blank = 0
    for stage, template in (("stage1", "plain"), ("stage2", "vicuna_v1")):
        for row, conv in _rows(stage):
            want = want_all[stage][row["id"]]
            if "error" in want:
                continue  # the official code crashes on this row: nothing to compare with
            if template == "vicuna_v1" and _blank(row):
                with pytest.raises(DataError) as info:
                    conversation_ids(conv, tok, template, goldens()["image_token_index"])
                assert info.value.reason == "empty text", row["id"]
                blank += 1
                continue
            ids, labels = conversation_ids(conv, tok, template, goldens()["image_token_index"])
            assert ids == want["ids"], f"{mode} {row['id']}: {_diff(ids, want['ids'])}"
            if want["warning"]:
                masked += 1
                assert set(want["labels"]) == {IGNORE_INDEX}
                answers = [t["value"] for t in conv[1::2]]
                spans = _spans(ids, labels)
                assert [tok.decode(s[:-1]) for s in spans] == answers and all(s[-1] == tok.eos_id for s in spans)
            else:
                assert labels == want["labels"], f"{mode} {row['id']} labels: {_diff(labels, want['labels'])}"
            compared += 1
    n_rows = len(goldens()["stage1_rows"]) + len(goldens()["stage2_rows"])
    assert compared + blank == n_rows and compared >= 60 and masked == 4 and blank == 6, (compared, masked, blank)


def test_release_turn_boundary_is_us_er():
    """The release's text after each </s> in a multi-turn row starts "US" "ER" ":", and it is nanollava's default."""
    want, tok = goldens()["training"][RELEASE]["stage2"], tokenizer(RELEASE)
    assert tok.turn_boundary == "release"
    boundaries = 0
    for row, conv in _rows("stage2"):
        ids = want[row["id"]]["ids"]
        for k in [k for k, i in enumerate(ids[:-1]) if i == tok.eos_id]:
            assert ids[k + 1:k + 4] == [3308, 1001, 29901], row["id"]
            boundaries += 1
    assert boundaries > 40
    assert tok.encode_after_special("USER:") == [3308, 1001, 29901]
    assert tokenizer("4.37-nonlegacy").encode_after_special("USER:") == [11889, 29901]
    assert tokenizer("4.31-legacy").encode_after_special("USER:") == [3148, 1001, 29901]


@pytest.mark.parametrize("mode", list(MODES))
def test_prompt_ids_equal_model_vqa_loaders(mode):
    """The 40 inference prompts (conv_vicuna_v1 + tokenizer_image_token as model_vqa_loader builds them, one and
    several turns, whitespace around the question kept): the same ids."""
    tok, g = tokenizer(mode), goldens()
    assert len(g["prompts"]) == 40
    for k, (turns, want) in enumerate(zip(g["prompts"], g["prompt_ids"][mode])):
        ids = prompt_ids([tuple(t) for t in turns], tok, g["image_token_index"])
        assert ids == want, f"{mode} prompt {k} {turns}: {_diff(ids, want)}"


def test_prompts_keep_whitespace_as_the_official_loader():
    """The two cases the official loader builds differently from a stripped question."""
    tok = tokenizer(RELEASE)
    sign = prompt_ids([("<image>\nWhat does the sign say?  ", None)], tok, -200)
    assert tok.decode(sign[sign.index(-200) + 1:]) == "\nWhat does the sign say?   ASSISTANT:"
    alone = prompt_ids([("<image>", None)], tok, -200)
    # tokenizer_image_token encodes " ASSISTANT:" as a new chunk: its own dummy prefix before the space.
    assert alone[alone.index(-200) + 1:] == tok.encode(" ASSISTANT:")
    assert alone != prompt_ids([("<image>\n", None)], tok, -200)
    for bad in ([("<image>\n<image>", None)], [("<image>\nq", "a"), ("<image>", None)], [("", None)]):
        with pytest.raises(DataError):
            prompt_ids(bad, tok, -200)


@pytest.mark.parametrize("mode", list(MODES))
def test_text_after_a_special_token_equals_transformers(mode):
    """Text after </s> and <s> in one call of the slow LlamaTokenizer, every branch of the rule: the cut piece
    looked up again ("US" "ER"), a cut piece missing from the vocabulary (<unk>), a lone "▁" (newline, emoji),
    a chunk starting with a space or "▁" (kept), several boundaries in one text."""
    if not AFTER_SPECIAL.exists():
        pytest.skip(f"{AFTER_SPECIAL} is absent: make it with tests/goldens/make_after_special.py")
    tok = tokenizer(mode)
    cases = json.loads(AFTER_SPECIAL.read_text(encoding="utf-8"))[mode]["ids"]
    assert len(cases) >= 19
    for text, want in cases.items():
        parts = re.split("(<s>|</s>)", text)  # the special tokens are placed as ids, as data.py places </s>
        ids = [tok.bos_id] + tok.encode(parts[0])
        for special, chunk in zip(parts[1::2], parts[2::2]):
            ids += [tok.piece_to_id(special)] + tok.encode_after_special(chunk)
        assert ids == want, f"{mode} {text!r}: {_diff(ids, want)}"


def test_dataset_reads_the_official_rows(tmp_path):
    """LLaVADataset on the official corpus: the release ids and labels per row, whitespace-only rows counted."""
    g = goldens()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(tmp_path / "x.png")
    (tmp_path / "rows.json").write_text(json.dumps(g["stage2_rows"]))
    ds = LLaVADataset(tmp_path / "rows.json", tmp_path, tokenizer(RELEASE), "vicuna_v1", g["image_token_index"],
                      image_size=14, max_len=100_000)
    want = g["training"][RELEASE]["stage2"]
    blank = [r["id"] for r in g["stage2_rows"] if _blank(r)]
    assert ds.skipped() == {"empty text": blank} and len(ds) == len(g["stage2_rows"]) - len(blank)
    for i in range(len(ds)):
        s = ds[i]
        w = want[s["id"]]
        assert s["input_ids"].tolist() == w["ids"], s["id"]
        if not w["warning"]:
            assert s["labels"].tolist() == w["labels"], s["id"]
        assert (s["pixel_values"] is None) == ("image" not in ds.row(i)) and s["input_ids"].dtype == torch.long


def test_special_token_strings_in_text_stay_text():
    """Officially "</s>" written in a message is the end-of-sequence token (and shifts the mask counts); in
    nanollava a message is text: its pieces decode back to it and </s> ends each answer only."""
    tok = tokenizer(RELEASE)
    turns = [("<image>\nWhat do <s> and </s> mean?", "<s> starts a text, </s> ends it; <unk> is unknown."),
             ("Say </s>USER: now", "</s>USER:")]
    ids, labels = conversation_ids(turns, tok, "vicuna_v1", -200)
    spans = _spans(ids, labels)
    assert [tok.decode(s[:-1]) for s in spans] == [a for _, a in turns]
    assert ids.count(tok.eos_id) == 2 and ids.count(tok.bos_id) == 1 and tok.unk_id not in ids
    assert "What do <s> and </s> mean?" in tok.decode(ids)
