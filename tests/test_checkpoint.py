"""nanollava/checkpoint.py and the config readers against malformed input: every safetensors header entry is checked
before anything is allocated (as the safetensors library checks it), and config.json values of the wrong type or
range are refused when read; each failure one CheckpointError naming the file and the key."""
import json
import os
import resource
import struct

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanollava.checkpoint import CheckpointError, read_safetensors, write_safetensors


def raw(path, header, data):
    """A safetensors file from a header dict and data bytes, as the format lays it out."""
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]}}
BAD = [  # (what is wrong, header changes, the message's words)
    ("huge shape", {"a": {"dtype": "F32", "shape": [2 ** 20, 2 ** 20], "data_offsets": [0, 8]}}, "tensor a: shape [1048576, 1048576] in F32 is 4398046511104 bytes"),
    ("negative dim", {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "tensor a: shape [-2] is not a list of non-negative"),
    ("float dim", {"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, "tensor a: shape [2.0]"),
    ("no dtype", {"a": {"shape": [2], "data_offsets": [0, 8]}}, "tensor a: dtype None"),
    ("unknown dtype", {"a": {"dtype": "F8", "shape": [2], "data_offsets": [0, 8]}}, "tensor a: dtype 'F8'"),
    ("no offsets", {"b": {"dtype": "F16", "shape": [2, 2]}}, "tensor b: data_offsets None"),
    ("not an object", {"b": [1, 2]}, "tensor b: its header entry is not an object"),
    ("past the end", {"b": {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 24]}}, "truncated or corrupt at tensor b"),
    ("overlap", {"b": {"dtype": "F16", "shape": [2, 2], "data_offsets": [4, 12]}}, "tensor b: it starts at data byte 4, not 8"),
    ("gap", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "tensor b: it starts at data byte 8, not 4"),
]


def test_a_good_header_reads_as_safetensors_reads_it(tmp_path):
    ref = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.zeros(0, 4), "d": torch.tensor(2.5)}
    save_file(ref, tmp_path / "x.safetensors")
    got = dict(read_safetensors(tmp_path / "x.safetensors"))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("what,change,words", BAD, ids=[b[0] for b in BAD])
def test_every_header_entry_is_checked_before_allocating(tmp_path, what, change, words):
    path = raw(tmp_path / "m.safetensors", {**GOOD, **change}, bytes(16))
    with pytest.raises(SafetensorError):  # the reference refuses it too
        load_file(path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError) as e:
        list(read_safetensors(path))
    assert str(path) in str(e.value) and words in str(e.value), str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2 ** 20  # KiB: under 1 GiB grown


def test_written_safetensors_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_safetensors({"a": torch.ones(2)}, tmp_path / "p.safetensors")
        assert oct(os.stat(tmp_path / "p.safetensors").st_mode & 0o777) == oct(0o644)
        os.umask(0o077)
        write_safetensors({"a": torch.ones(2)}, tmp_path / "q.safetensors")
        assert oct(os.stat(tmp_path / "q.safetensors").st_mode & 0o777) == oct(0o600)
    finally:
        os.umask(old)


CONFIGS = [  # (which reader, key, bad value)
    ("vit", "hidden_size", "1024"), ("vit", "hidden_size", -4), ("vit", "image_size", 1e12), ("vit", "layer_norm_eps", -1.0),
    ("vit", "num_hidden_layers", True), ("llama", "max_position_embeddings", 1e12), ("llama", "max_position_embeddings", 10 ** 12),
    ("llama", "hidden_size", "4096"), ("llama", "num_attention_heads", 0), ("llama", "rope_theta", "big"), ("llama", "rms_norm_eps", 0),
    ("llava", "text_config.hidden_size", -1), ("llava", "vision_config.patch_size", [14]), ("llava", "image_token_index", "32000"),
]


@pytest.mark.parametrize("reader,key,value", CONFIGS, ids=[f"{c[0]}-{c[1]}-{c[2]!r}" for c in CONFIGS])
def test_config_values_of_the_wrong_type_or_range_are_refused_when_read(tmp_path, reader, key, value):
    from nanollava import LLaVA, Llama, ViT
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 42,
              "patch_size": 14}
    text = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 256}
    cfg = {"vit": vision, "llama": text, "llava": {"model_type": "llava", "vision_config": vision, "text_config": text,
                                                    "image_token_index": 318}}[reader]
    *outer, leaf = key.split(".")
    (cfg[outer[0]] if outer else cfg)[leaf] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    load = {"vit": ViT, "llama": Llama, "llava": LLaVA}[reader].from_pretrained
    with pytest.raises(CheckpointError) as e:  # before any weight file is looked for (there is none)
        load(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and leaf in str(e.value) and repr(value) in str(e.value), str(e.value)
