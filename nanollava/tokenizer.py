"""The Llama-2 / Vicuna tokenizer (SentencePiece BPE with byte fallback) on the `tokenizers` library.

Vicuna v1.5 and the official LLaVA-1.5 ship `tokenizer.model`, a SentencePiece model; llava-hf ships
`tokenizer.json`, the same vocabulary plus the added tokens `<image>` = 32000 and `<pad>` = 32001.
`load_tokenizer` reads either. A `tokenizer.model` is a protobuf: we parse it by hand (no protobuf or
sentencepiece package at run time) and turn its pieces and scores into BPE merges for `tokenizers`.

Notable features:
- `encode(text, prefix=True)` equals `sentencepiece`'s encode (no BOS/EOS); `prefix=False` leaves out the
  dummy-prefix "▁" (a segment cut out of the middle of a text).
- `encode_after_special(text)` encodes text that follows a special token such as `</s>` the way HF's slow
  LlamaTokenizer does, in one of `TURN_BOUNDARIES`: "release" (transformers 4.31, what LLaVA-1.5 was trained
  with: `...</s>USER:` is "US" "ER" ":"), "4.37" ("USER" ":") or "legacy" ("▁US" "ER" ":").
- text is always literal: "</s>" or "<image>" in a string are characters, never special ids. The prompt
  code in data.py places the special ids itself.
- `decode` follows sentencepiece's rules (control tokens vanish, one leading "▁" is dropped, <unk> is " ⁇ ",
  each byte of a broken UTF-8 sequence becomes U+FFFD).
- `train_tokenizer` trains a small tokenizer with the same conventions (ids 0, 1, 2 = <unk>, <s>, </s>;
  byte pieces at 3..258) and `save_sentencepiece` writes it as a Vicuna-style `tokenizer.model`.
"""
import json
import re
import struct
from pathlib import Path

from tokenizers import AddedToken, Tokenizer as _HFTokenizer, decoders, models, pre_tokenizers, trainers

SPACE = "▁"  # U+2581, SentencePiece's visible space
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece piece types
_BYTE_PIECE = re.compile(r"^<0x([0-9A-F]{2})>$")
# How text right after a special token (</s> ending a turn) is tokenized; see Tokenizer.encode_after_special.
TURN_BOUNDARIES = ("release", "4.37", "legacy")


class TokenizerError(ValueError):
    """A tokenizer file that is missing, corrupt or of a kind we cannot reproduce exactly."""


# ----------------------------------------------------------------------------- protobuf, by hand
# Wire format: each field is a varint key (field_number << 3 | wire_type) followed by a varint (type 0),
# 8 bytes (type 1), a varint length + that many bytes (type 2, strings and sub-messages) or 4 bytes (type 5).

def _varint(buf, pos):
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf):
    """Yield (field_number, value) of one message; value is an int (varint) or bytes (the rest)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("message runs past the end of the file")
        yield field, value


def _read_sentencepiece(path):
    """tokenizer.model -> list of (piece, score, type), after checking it is a model we reproduce exactly."""
    data = Path(path).read_bytes()
    pieces, trainer, normalizer = [], {}, {}
    try:
        for field, value in _fields(data):
            if field == 1:  # ModelProto.pieces: SentencePiece {1: piece, 2: score, 3: type}
                p = {1: b"", 2: b"\0\0\0\0", 3: NORMAL}
                p.update(_fields(value))
                pieces.append((p[1].decode("utf-8"), struct.unpack("<f", p[2])[0], p[3]))
            elif field == 2:  # TrainerSpec: 3 model_type (1 unigram, 2 BPE), 35 byte_fallback
                trainer = dict(_fields(value))
            elif field == 3:  # NormalizerSpec: 1 name, 2 charsmap, 3 add_dummy_prefix, 4 remove_extra_ws
                normalizer = dict(_fields(value))
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
    if not pieces:
        raise TokenizerError(f"{path}: not a SentencePiece model (it holds no pieces)")
    # Fields left out of a protobuf take their defaults: model_type UNIGRAM, the normalizer flags true.
    if trainer.get(3, 1) != 2:
        raise TokenizerError(f"{path}: a SentencePiece model of type {trainer.get(3, 1)}, only BPE (2) is supported")
    if not trainer.get(35, 0):
        raise TokenizerError(f"{path}: a SentencePiece model without byte_fallback is not supported")
    if normalizer.get(2) or normalizer.get(4, 1) or not normalizer.get(3, 1):
        # Llama's is "identity" with add_dummy_prefix and without remove_extra_whitespaces; an NFKC
        # charsmap or whitespace squeezing would change the text before BPE, which we do not replicate.
        raise TokenizerError(f"{path}: a SentencePiece normalizer other than Llama's (identity, dummy prefix)")
    kinds = {t for _, _, t in pieces}
    if kinds - {NORMAL, UNKNOWN, CONTROL, BYTE}:
        raise TokenizerError(f"{path}: user-defined or unused pieces are not supported")
    return pieces


def _write_sentencepiece(path, pieces):
    """The inverse of _read_sentencepiece, with Llama's trainer and normalizer settings."""
    def varint(n):
        n &= (1 << 64) - 1  # negative int32s are written as 10-byte two's complement
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    def field(number, value):
        if isinstance(value, bytes):
            return varint(number << 3 | 2) + varint(len(value)) + value
        if isinstance(value, float):
            return varint(number << 3 | 5) + struct.pack("<f", value)
        return varint(number << 3 | 0) + varint(value)

    out = [field(1, field(1, p.encode()) + field(2, float(s)) + field(3, t)) for p, s, t in pieces]
    out.append(field(2, field(3, 2) + field(4, len(pieces)) + field(35, 1) + field(43, -1)))  # BPE, byte fallback
    out.append(field(3, field(1, b"identity") + field(3, 1) + field(4, 0) + field(5, 1)))
    Path(path).write_bytes(b"".join(out))


# ----------------------------------------------------------------------------- merges from scores

def _merges_from_scores(pieces):
    """SentencePiece BPE merges the adjacent pair whose concatenation is the highest-scoring piece.

    `tokenizers` instead applies merges in list order, so every split (left, right) of every normal piece
    becomes a merge, ranked by the piece's score. Ties (Llama's whitespace runs "▁▁", "▁▁▁", ... all score
    -1e9) put the longer left part first: SentencePiece breaks ties leftmost, which grows a run of "▁"
    from its left end, and longer-left-first reproduces that. Pieces that text cannot produce (control,
    unknown, byte) take part in no merge.
    """
    score = {p: s for p, s, t in pieces if t == NORMAL}
    merges = []
    for piece, s in score.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in score and right in score:
                merges.append((-s, -len(left), -len(right), left, right))
    merges.sort(key=lambda m: m[:3])  # stable: equal keys keep vocabulary order
    return [(left, right) for *_, left, right in merges]


# ----------------------------------------------------------------------------- the tokenizer

class Tokenizer:
    """Base vocabulary (ids 0..n-1, the BPE model) plus added special tokens (ids n.., e.g. <image>)."""

    def __init__(self, pieces, merges, special=(), added=(), scores=None, source="tokenizer", turn_boundary="release"):
        self._pieces = list(pieces)  # id -> piece, base vocabulary first
        self._n_base = len(self._pieces)
        self._ids = {p: i for i, p in enumerate(self._pieces)}
        self._merges = [tuple(m) for m in merges]
        self._scores = scores  # SentencePiece scores where known (needed only by save_sentencepiece)
        self._special = set(special)  # ids that decode to nothing (<s>, </s>, added tokens)
        self._bytes = {i: int(m.group(1), 16) for i, p in enumerate(self._pieces) if (m := _BYTE_PIECE.match(p))}
        for name in ("<unk>", "<s>", "</s>"):
            if name not in self._ids:
                raise TokenizerError(f"{source}: no {name} piece; a Llama-style tokenizer needs <unk>, <s>, </s>")
        self.unk_id, self.bos_id, self.eos_id = self._ids["<unk>"], self._ids["<s>"], self._ids["</s>"]
        self._special |= {self.bos_id, self.eos_id}
        self._special.discard(self.unk_id)  # sentencepiece shows <unk> as " ⁇ " rather than hiding it
        # The BPE model sees only the base vocabulary and no pre-tokenizer: encode() hands it the whole
        # text with spaces already turned into "▁", so added tokens are never matched inside text.
        bpe = models.BPE(vocab=dict(self._ids), merges=self._merges, unk_token="<unk>", fuse_unk=True,
                         byte_fallback=True)
        self._bpe = _HFTokenizer(bpe)
        self.add_special_tokens(list(added))
        self._source = source
        self.turn_boundary = turn_boundary

    # --- ids of the tokens the rest of nanollava needs
    @property
    def pad_id(self):
        return self._ids.get("<pad>", self.unk_id)  # LLaVA pads with <unk> (0) when there is no <pad>

    @property
    def image_id(self):
        return self._ids.get("<image>")

    @property
    def turn_boundary(self):
        """How text after a special token is tokenized (see encode_after_special): one of TURN_BOUNDARIES."""
        return self._turn_boundary

    @turn_boundary.setter
    def turn_boundary(self, value):
        if value not in TURN_BOUNDARIES:
            raise TokenizerError(f"{self._source}: turn_boundary {value!r}, expected one of {TURN_BOUNDARIES}")
        self._turn_boundary = value

    @property
    def vocab_size(self):
        return len(self._pieces)

    def id_to_piece(self, i):
        return self._pieces[i]

    def piece_to_id(self, piece):
        return self._ids.get(piece, self.unk_id)

    def add_special_tokens(self, tokens):
        """Append tokens (e.g. ["<image>", "<pad>"]) after the vocabulary; known ones keep their id."""
        ids = []
        for t in tokens:
            if t not in self._ids:
                self._ids[t] = len(self._pieces)
                self._pieces.append(t)
                self._special.add(self._ids[t])
            ids.append(self._ids[t])
        return ids

    # --- text <-> ids
    def encode(self, text, prefix=True):
        """SentencePiece's encode: spaces become "▁" and, with prefix, one "▁" goes in front (the dummy prefix)."""
        if not text:
            return []  # sentencepiece encodes "" to [], not to a lone dummy prefix
        text = text.replace(" ", SPACE)
        if prefix:
            text = SPACE + text
        return self._bpe.encode(text, add_special_tokens=False).ids

    def encode_after_special(self, text):
        """Text that follows a special token inside one call of HF's slow LlamaTokenizer: how the official code
        tokenizes the "USER: {question} ..." after each "{answer}</s>" (and any text after <s> or </s>).

        "release": transformers 4.31, legacy=False (as vicuna-7b-v1.5's tokenizer_config.json sets), what
          LLaVA-1.5 was trained with. Its _tokenize encodes the chunk with sentencepiece's dummy prefix, then
          cuts the "▁" off the first piece *as a string* and looks that string up again: "USER:" is "▁US" "ER"
          ":" -> "US" (3308) "ER" (1001) ":". A cut piece that is not in the vocabulary becomes <unk>, a lone
          "▁" vanishes, and a chunk that starts with a space (or "▁") keeps its pieces.
        "4.37": transformers 4.37 (the newest official code), legacy=False: no dummy prefix, "USER" (11889) ":".
        "legacy": legacy=True in either version: an ordinary encode, "▁US" (3148) "ER" ":".
        """
        if self.turn_boundary == "4.37":
            return self.encode(text, prefix=False)
        ids = self.encode(text)
        if self.turn_boundary == "legacy" or not ids or text.startswith((" ", SPACE)):
            return ids
        first = self._pieces[ids[0]]
        if not first.startswith(SPACE):
            return ids  # a vocabulary without "▁" spells the prefix in byte pieces, which are left alone
        if first == SPACE:
            return ids[1:]  # a lone "▁" (before "\n", an emoji's bytes, ...) vanishes
        cut = self._ids.get(first[1:], self.unk_id)  # sentencepiece's piece_to_id: unknown -> <unk>
        return [cut if cut < self._n_base else self.unk_id] + ids[1:]

    def decode(self, ids):
        out, pending = [], bytearray()  # pending: a run of byte pieces, decoded together as UTF-8
        first = True  # sentencepiece drops the "▁" of the first visible piece only (the dummy prefix)

        def flush():
            # Each byte of a broken sequence becomes one U+FFFD, as in sentencepiece (Python's "replace"
            # would give one per maximal broken run): surrogateescape keeps them apart, then we swap them.
            out.append(re.sub("[\udc80-\udcff]", "\ufffd", pending.decode("utf-8", "surrogateescape")))
            pending.clear()

        for i in ids:
            i = int(i)
            if i in self._bytes:
                pending.append(self._bytes[i])
                first = False
                continue
            flush()  # any other piece, even an invisible one, ends a byte run
            if i in self._special:
                continue
            piece = " \u2047 " if i == self.unk_id else self._pieces[i]
            if first and piece.startswith(SPACE):
                piece = piece[1:]
            out.append(piece.replace(SPACE, " "))
            first = False
        flush()
        return "".join(out)

    # --- files
    def save(self, directory):
        """Write tokenizer.json (the llava-hf layout, readable by load_tokenizer and transformers) and a small
        tokenizer_config.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tok = _HFTokenizer.from_str(self._bpe.to_str())
        # The pre-tokenizer and decoder HF's LlamaTokenizer(legacy=False) writes, so transformers reads it too.
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        specials = sorted(i for i in self._special | {self.unk_id})
        tok.add_special_tokens([AddedToken(self._pieces[i], normalized=False, special=True) for i in specials])
        tok.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True,
                  "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                  "pad_token": self._pieces[self.pad_id], "padding_side": "right",
                  "turn_boundary": self.turn_boundary}  # nanollava's own key; transformers ignores it
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def save_sentencepiece(self, path):
        """Write the base vocabulary as a SentencePiece tokenizer.model (the file Vicuna ships)."""
        if self._scores is None:
            raise TokenizerError("save_sentencepiece needs piece scores: load a tokenizer.model or train one")
        if self._n_base != len(self._pieces):
            raise TokenizerError("save_sentencepiece cannot store added tokens; save before adding them")
        kind = {self.unk_id: UNKNOWN, self.bos_id: CONTROL, self.eos_id: CONTROL, **{i: BYTE for i in self._bytes}}
        _write_sentencepiece(path, [(p, s, kind.get(i, NORMAL)) for i, (p, s) in enumerate(zip(self._pieces, self._scores))])


def _from_sentencepiece_pieces(pieces, source, turn_boundary="release"):
    special = [i for i, (_, _, t) in enumerate(pieces) if t == CONTROL]
    return Tokenizer([p for p, _, _ in pieces], _merges_from_scores(pieces), special=special,
                     scores=[s for _, s, _ in pieces], source=source, turn_boundary=turn_boundary)


def _from_tokenizer_json(path, turn_boundary):
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        model = spec["model"]
        vocab, merges = model["vocab"], model["merges"]
        added = spec.get("added_tokens") or []
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"{path}: not a tokenizer.json ({type(e).__name__}: {e})") from None
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise TokenizerError(f"{path}: model {model.get('type')} (byte_fallback {model.get('byte_fallback')}); "
                             "only a Llama-style BPE with byte fallback is supported")
    pieces = sorted(vocab, key=vocab.get)
    if [vocab[p] for p in pieces] != list(range(len(pieces))):
        raise TokenizerError(f"{path}: the vocabulary ids are not 0..{len(pieces) - 1}")
    # Older files write a merge as "left right", newer ones as ["left", "right"].
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    if any(len(m) != 2 for m in merges):
        raise TokenizerError(f"{path}: a merge that is not a pair of pieces")
    base = [t for t in added if t["id"] < len(pieces)]
    extra = sorted((t for t in added if t["id"] >= len(pieces)), key=lambda t: t["id"])
    if [t["id"] for t in extra] != list(range(len(pieces), len(pieces) + len(extra))):
        raise TokenizerError(f"{path}: added tokens do not follow the vocabulary contiguously")
    special = [t["id"] for t in base if t.get("special")]
    return Tokenizer(pieces, merges, special=special, added=[t["content"] for t in extra], source=str(path),
                     turn_boundary=turn_boundary)


def _saved_turn_boundary(directory):
    """The "turn_boundary" a tokenizer_config.json beside the tokenizer names (nanollava writes it), else
    "release": official LLaVA-1.5 checkpoints and Vicuna v1.5 carry no such key and were trained that way."""
    path = Path(directory) / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    value = config.get("turn_boundary", "release") if isinstance(config, dict) else "release"
    if value not in TURN_BOUNDARIES:
        raise TokenizerError(f"{path}: turn_boundary {value!r}, expected one of {TURN_BOUNDARIES}")
    return value


def load_tokenizer(path, turn_boundary=None):
    """A tokenizer.json, a tokenizer.model, or a directory holding one (tokenizer.json preferred).
    turn_boundary (one of TURN_BOUNDARIES) overrides the one its tokenizer_config.json names (default "release")."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name, turn_boundary)
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if not path.is_file():
        raise TokenizerError(f"{path}: no such tokenizer file")
    if turn_boundary is None:
        turn_boundary = _saved_turn_boundary(path.parent)
    if path.suffix == ".json":
        return _from_tokenizer_json(path, turn_boundary)
    return _from_sentencepiece_pieces(_read_sentencepiece(path), str(path), turn_boundary)


def train_tokenizer(texts, vocab_size):
    """Train a SentencePiece-style BPE tokenizer (the Llama conventions) on an iterable of strings.

    Layout as in Llama's tokenizer.model: <unk>, <s>, </s>; <0x00>..<0xFF>; merged pieces in the order they
    were learned (score = -rank); then the single characters. Training splits words at spaces ("▁" starts a
    piece, never sits inside one); digits, punctuation and newlines stand alone, so "circle?" is "▁circle" "?"
    as Llama has it (on a small corpus BPE would otherwise learn "circle?" as a piece of its own). The result
    goes through the same scores -> merges path as a loaded tokenizer.model, so save_sentencepiece +
    load_tokenizer gives it back.
    vocab_size is an upper bound: a small corpus can run out of pairs to merge first.
    """
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    if vocab_size <= len(specials):
        raise ValueError(f"vocab_size {vocab_size} leaves no room beyond the {len(specials)} special/byte pieces")
    tok = _HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True),
        pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Punctuation("isolated"),
        pre_tokenizers.Digits(individual_digits=True)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  max_token_length=16)  # SentencePiece's default max_sentencepiece_length
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    merged = ["".join(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]]
    chars = [p for p in sorted(model["vocab"], key=model["vocab"].get) if p not in specials and p not in merged]
    pieces = [(p, 0.0, UNKNOWN if p == "<unk>" else CONTROL) for p in specials[:3]]
    pieces += [(p, 0.0, BYTE) for p in specials[3:]]
    pieces += [(p, -float(rank), NORMAL) for rank, p in enumerate(merged + chars)]
    return _from_sentencepiece_pieces(pieces, "train_tokenizer")
