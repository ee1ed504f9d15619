"""nanollava.tokenizer against SentencePiece itself and against a tokenizer.json written by transformers."""
import functools
import json
import random
import time

import pytest

from nanollava.tokenizer import TokenizerError, load_tokenizer, train_tokenizer
from oracles import hf_llama_tokenizer

spm = pytest.importorskip("sentencepiece")

CORPUS = [
    "", " ", "  ", "   leading", "trailing   ", "repeated    spaces  inside", "a\nb", "\n", "\nline after newline",
    "\n\n\ttabs\tand\nnewlines\n", "windows\r\nline\r\nends", "emoji 😀🎉👍🏽 and flags 🇫🇷", "中文分词 日本語のテキスト 한국어",
    "accents: déjà vu, naïve café, Ærøskøbing, straße", "digits 0123456789 3.14159 1,000,000 -42",
    "def f(x):\n    return x ** 2  # code\n", "if (a && b) { return [1, 2]; }", "<s>literal</s> <unk> <image> <pad>",
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.", " USER: ", "USER: <image>\nWhat is this? ASSISTANT:",
    " ASSISTANT: A cat.</s>USER: ", "Answer the question using a single word or phrase.",
    "▁already▁escaped", "zero\u200bwidth and bom\ufeff", "x" * 300, "The quick brown fox jumps over the lazy dog.",
]


@functools.lru_cache
def _sp(path, dummy_prefix=True):
    sp = spm.SentencePieceProcessor(model_file=str(path))
    if not dummy_prefix:
        # Append NormalizerSpec {add_dummy_prefix: false} (ModelProto field 3, field 3 = 0): protobuf merges a
        # repeated sub-message field, so this is what HF's slow LlamaTokenizer(legacy=False) does via protobuf.
        raw = sp.serialized_model_proto() + b"\x1a\x02\x18\x00"
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(raw)
    return sp


@functools.lru_cache
def _tok(path):
    return load_tokenizer(path)


def _random_texts(n, seed=0):
    rng = random.Random(seed)
    chars = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,:;!?'\"()[]{}<>/\\-_=+*&#@~\n\t\r") + \
        list("éàüñçøßæ中文日本語한국어😀🎉👍🏽ΩЖ▁\u200b")
    words = " ".join(CORPUS).split()
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            out.append("".join(rng.choice(chars) for _ in range(rng.randint(0, 40))))
        else:
            out.append((" " * rng.randint(0, 3)).join(rng.choice(words) for _ in range(rng.randint(0, 12))))
    return out


def _first_difference(a, b):
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at {k}: ours {a[k:k + 5]} vs reference {b[k:k + 5]}"


def test_encode_matches_sentencepiece(sp_model_path):
    tok, sp, sp_np = _tok(sp_model_path), _sp(sp_model_path), _sp(sp_model_path, dummy_prefix=False)
    for text in CORPUS + _random_texts(3000):
        ours, ref = tok.encode(text), sp.encode(text)
        assert ours == ref, f"{text!r}: {_first_difference(ours, ref)}"
        ours, ref = tok.encode(text, prefix=False), sp_np.encode(text)
        assert ours == ref, f"{text!r} (prefix=False): {_first_difference(ours, ref)}"


def test_decode_matches_sentencepiece(sp_model_path):
    tok, sp = _tok(sp_model_path), _sp(sp_model_path)
    for text in CORPUS + _random_texts(500, seed=1):
        ids = sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids), text
        if "▁" not in text:
            assert tok.decode(ids) == text
    rng = random.Random(2)  # arbitrary ids: control tokens, <unk>, broken UTF-8 byte runs
    for _ in range(3000):
        ids = [rng.randrange(32000) if rng.random() < 0.5 else rng.randrange(300) for _ in range(rng.randint(0, 12))]
        assert tok.decode(ids) == sp.decode(ids), ids


def test_llama_conventions(sp_model_path):
    t0 = time.perf_counter()
    tok = load_tokenizer(sp_model_path)
    seconds = time.perf_counter() - t0
    print(f"converting tokenizer.model took {seconds:.2f} s")
    assert seconds < 5, f"converting the 32,000-piece model took {seconds:.1f} s"
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id, tok.vocab_size) == (0, 1, 2, 0, None, 32000)
    assert tok.id_to_piece(3) == "<0x00>" and tok.id_to_piece(258) == "<0xFF>" and tok.piece_to_id("▁") == 29871
    assert tok.encode("\nhi") == [29871, 13, 2918]  # a lone "▁" before "<0x0A>"
    assert tok.decode([1, 22172, 2, 3186]) == "hello world"  # control tokens vanish


def test_tokenizer_json_written_by_transformers(sp_model_path, tmp_path):
    sp = _sp(sp_model_path)
    # transformers 5 converts tokenizer.model only with protobuf installed; oracles does the same conversion
    # (SentencePieceExtractor) by hand: vocabulary and scores from sentencepiece, merges by transformers.
    hf = hf_llama_tokenizer(sp_model_path)
    hf.add_special_tokens({"additional_special_tokens": ["<image>"]})
    hf.add_special_tokens({"pad_token": "<pad>"})
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    tok, ref = load_tokenizer(tmp_path), _tok(sp_model_path)
    assert (tok.image_id, tok.pad_id, tok.vocab_size) == (32000, 32001, 32002)
    for text in CORPUS + _random_texts(500, seed=3):
        assert tok.encode(text) == ref.encode(text) == sp.encode(text), text
        assert tok.encode(text, prefix=False) == ref.encode(text, prefix=False), text
    assert tok.decode([32000, 22172, 32001, 2]) == "hello"


def test_save_load_roundtrip(sp_model_path, tmp_path):
    tok = load_tokenizer(sp_model_path)
    assert tok.add_special_tokens(["<image>", "<pad>"]) == [32000, 32001]
    assert tok.add_special_tokens(["<pad>", "</s>"]) == [32001, 2]  # known tokens keep their id
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["legacy"] is False and config["pad_token"] == "<pad>"
    back = load_tokenizer(tmp_path)
    assert [back.id_to_piece(i) for i in range(back.vocab_size)] == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert (back.image_id, back.pad_id, back.bos_id, back.eos_id, back.unk_id) == (32000, 32001, 1, 2, 0)
    for text in CORPUS:
        assert back.encode(text) == tok.encode(text) and back.encode(text, False) == tok.encode(text, False)
    ids = tok.encode("<image> is literal text") + [32000, 0, 1, 2]
    assert back.decode(ids) == tok.decode(ids) == "<image> is literal text ⁇ "


def test_turn_boundary_travels_with_the_tokenizer(tmp_path):
    """A checkpoint's tokenizer_config.json keeps the form its model was trained with; the argument overrides it;
    a tokenizer without the key (Vicuna's, official checkpoints) gets the release form. (The forms themselves
    are tested against transformers in tests/test_official.py.)"""
    tok = train_tokenizer(["USER: what is it? ASSISTANT: a red star"] * 20, 300)
    assert tok.turn_boundary == "release"
    tok.save_sentencepiece(tmp_path / "tokenizer.model")
    assert load_tokenizer(tmp_path / "tokenizer.model").turn_boundary == "release"
    for boundary in ("4.37", "legacy", "release"):
        tok.turn_boundary = boundary
        tok.save(tmp_path / boundary)
        assert json.loads((tmp_path / boundary / "tokenizer_config.json").read_text())["turn_boundary"] == boundary
        assert load_tokenizer(tmp_path / boundary).turn_boundary == boundary
        assert load_tokenizer(tmp_path / boundary / "tokenizer.json", turn_boundary="legacy").turn_boundary == "legacy"
    config = tmp_path / "4.37" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "turn_boundary": "4.31"}))
    with pytest.raises(TokenizerError, match="tokenizer_config.json: turn_boundary '4.31'"):
        load_tokenizer(tmp_path / "4.37")
    with pytest.raises(TokenizerError, match="turn_boundary 'new'"):
        load_tokenizer(tmp_path / "tokenizer.model", turn_boundary="new")


def test_errors_name_the_file(sp_model_path, tmp_path):
    cases = {"missing.model": None, "garbage.model": bytes(range(256)) * 4,
             "truncated.model": sp_model_path.read_bytes()[:100_000], "empty.model": b"",
             "unigram.model": sp_model_path.read_bytes() + b"\x12\x02\x18\x01",  # TrainerSpec.model_type = UNIGRAM
             "tokenizer.json": b"{not json"}
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(TokenizerError, match=name):
            load_tokenizer(tmp_path / name)
    (tmp_path / "tokenizer.json").unlink()
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        load_tokenizer(empty)


def test_train_tokenizer(tmp_path):
    rng = random.Random(0)
    colours, shapes = ["red", "green", "blue", "yellow"], ["cube", "sphere", "cone", "cylinder"]
    texts = [f"The {rng.choice(colours)} {rng.choice(shapes)} is left of the {rng.choice(colours)} "
             f"{rng.choice(shapes)}.\nThere are {rng.randint(0, 99)} objects." for _ in range(2000)]
    tok = train_tokenizer(texts, 350)
    assert tok.vocab_size == 350 and (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
    assert [tok.id_to_piece(i) for i in (0, 1, 2, 3, 258)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert all("▁" not in tok.id_to_piece(i)[1:] for i in range(259, 350))  # "▁" only starts a piece
    # punctuation and newlines stand alone as in Llama: "cone." is "▁cone" "." however often the corpus has it
    assert all(not set(tok.id_to_piece(i)) & {".", "\n"} or len(tok.id_to_piece(i)) == 1 for i in range(259, 350))
    assert [tok.id_to_piece(i) for i in tok.encode("the blue cone.")][-2:] == ["▁cone", "."]
    assert tok.encode("the red cube")[0] == tok.piece_to_id("▁the")
    for text in texts[:50] + CORPUS:
        assert tok.decode(tok.encode(text)) == text.replace("▁", " ")
        assert tok.decode(tok.encode(text, prefix=False)) == text.replace("▁", " ").removeprefix(" ")
    assert len(tok.encode("The red cube is left of the blue cone.")) < 15  # it learned the words
    # Written as a Vicuna-style tokenizer.model, SentencePiece reads it and encodes exactly as we do.
    tok.save_sentencepiece(tmp_path / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.get_piece_size()) == (0, 1, 2, 350)
    back = load_tokenizer(tmp_path)
    for text in texts[:200] + CORPUS + _random_texts(300):
        assert tok.encode(text) == sp.encode(text) == back.encode(text), text
    tok.save(tmp_path)  # tokenizer.json now wins over tokenizer.model in the directory
    again = load_tokenizer(tmp_path)
    assert all(again.encode(t) == tok.encode(t) for t in texts[:50])
