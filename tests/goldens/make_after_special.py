"""Makes after_special.json: how HF's slow LlamaTokenizer tokenizes text that follows a special token, on the
real Vicuna / Llama-2 tokenizer.model, in the transformers versions official LLaVA pinned.

Run it in a separate environment per version (nanollava never imports transformers; these are outputs only):
  python3.11 -m venv /tmp/tf431 && /tmp/tf431/bin/pip install transformers==4.31.0 sentencepiece==0.1.99
  python3.11 -m venv /tmp/tf437 && /tmp/tf437/bin/pip install transformers==4.37.2 sentencepiece==0.1.99 protobuf
  /tmp/tf431/bin/python tests/goldens/make_after_special.py   # then the same with /tmp/tf437/bin/python
Each run adds its version's two modes (legacy false, as vicuna-7b-v1.5's tokenizer_config.json sets, and true)
to tests/goldens/after_special.json. The tokenizer is loaded as official LLaVA loads Vicuna's
(AutoTokenizer, use_fast=False: a LlamaTokenizer with <s>, </s>, <unk> as AddedTokens that strip nothing), and
each run first checks itself against a text-only row of ../shared/fixtures/official/goldens.json.
"""
import json
import shutil
import tempfile
from pathlib import Path

import transformers
from transformers import AutoTokenizer

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parents[2] / "shared" / "fixtures"
OUT = HERE / "after_special.json"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")

# Text after </s> (and after <s>): the template's turn boundary, and every branch of the rule around it.
TEXTS = [
    "a</s>USER: Hi ASSISTANT:",              # the turn boundary of vicuna_v1
    "a</s>ASSISTANT:",                      # "▁A" "SS" ... -> "A"
    "a</s>Hello world",                     # "▁Hello" -> "Hello"
    "a</s>hello",                           # "▁hello" -> "hello"
    "a</s>xylophone",                       # a first piece whose cut form may be missing from the vocabulary
    "a</s>Zürich",
    "a</s>\nnext line",                     # "▁" "<0x0A>": a lone "▁" first piece
    "a</s>😀 emoji",                        # "▁" then byte pieces
    "a</s>中文",
    "a</s> USER: leading space",            # starts with a space: pieces kept
    "a</s>  two spaces",
    "a</s>▁escaped",                        # a literal "▁" counts as a space
    "a</s>\tTab",
    "a</s>,comma",
    "a</s>123",
    "a</s>USER: q ASSISTANT: b</s>USER: r ASSISTANT:",
    "<s>USER: after bos",
    "x<s>Hello",
    "a</s>",
]


def tokenizer(legacy, directory):
    """As official LLaVA loads Vicuna's: AutoTokenizer.from_pretrained(use_fast=False) on a directory holding
    tokenizer.model and vicuna-7b-v1.5's tokenizer_config.json (with `legacy` as given)."""
    added = {"__type": "AddedToken", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {"add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "legacy": legacy, "model_max_length": 4096, "pad_token": None, "padding_side": "right",
              "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
              **{name: {**added, "content": t} for name, t in (("bos_token", "<s>"), ("eos_token", "</s>"),
                                                               ("unk_token", "<unk>"))}}
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FIXTURES / "llama2-tokenizer.model", directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(str(directory), use_fast=False)


def check(tok, mode):
    """The official goldens' text-only rows, re-made from conv_vicuna_v1's format ("{system} USER: {q} ASSISTANT:
    {a}</s>" per turn): this tokenizer must give their ids."""
    goldens = json.loads((FIXTURES / "official" / "goldens.json").read_text())
    rows = [r for r in goldens["stage2_rows"] if "image" not in r]
    for row in rows:
        turns = [t["value"] for t in row["conversations"]]
        prompt = SYSTEM + " " + "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in zip(turns[::2], turns[1::2]))
        want = goldens["training"][mode]["stage2"][row["id"]]["ids"]
        assert tok(prompt).input_ids == want, (mode, row["id"])
    return len(rows)


def main():
    version = ".".join(transformers.__version__.split(".")[:2])
    out = json.loads(OUT.read_text()) if OUT.exists() else {}
    for legacy in (False, True):
        mode = f"{version}-{'legacy' if legacy else 'nonlegacy'}"
        tok = tokenizer(legacy, Path(tempfile.mkdtemp()) / mode)
        n = check(tok, mode)
        out[mode] = {"made_by": f"transformers {transformers.__version__}, LlamaTokenizer(legacy={legacy})",
                     "ids": {text: tok(text).input_ids for text in TEXTS}}
        print(f"{mode}: {len(TEXTS)} texts ({n} golden rows reproduced first)")
    out = dict(sorted(out.items()))
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(OUT)


if __name__ == "__main__":
    main()
