"""
Reading and writing weights in the official layouts: safetensors (single or sharded with
`model.safetensors.index.json`) and pickled `.bin` (single or sharded with
`pytorch_model.bin.index.json`, loaded only with `torch.load(weights_only=True, mmap=True)`).

Models are built on the meta device and each checkpoint tensor is assigned in place, shard by
shard, so loading never holds two copies of the weights. Names are mapped by one explicit table
of (checkpoint prefix, nanollava prefix) pairs per layout; every checkpoint tensor is either used
or dropped by an explicit list, every parameter is filled, every shape is checked, and any
failure is one CheckpointError naming the file and the key.

A model trained from scratch is materialised the other way, from its init (`from_scratch`).
"""
import errno
import json
import math
import os
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(ValueError):
    pass


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def config_values(cls, cfg, where, limits={}):
    """{field: value} for the fields of dataclass cls that config.json dict cfg sets (None: left to the default),
    each checked against the field's type (int, float) and range: limits[name] = (low, high), else ints 1..2^20
    and floats > 0 and finite. A wrong type or range is one CheckpointError naming where and the key."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    out = {}
    for f in fields(cls):
        v = cfg.get(f.name)
        if v is None:
            continue
        kind = int if f.type in (int, "int") else float
        low, high = limits.get(f.name, (1, 2 ** 20) if kind is int else (0, math.inf))
        ok = type(v) is int if kind is int else type(v) in (int, float) and math.isfinite(v)
        if not ok or not low <= v <= high or (kind is float and v == low == 0):
            rule = f"an integer in {low}..{high}" if kind is int else (f"a number in ({low}, {high}]" if math.isfinite(high) else f"a number above {low}")
            raise CheckpointError(f"{where}: {f.name} must be {rule}, not {v!r}")
        out[f.name] = kind(v)
    return out


def write_json(obj, path, indent=2):
    """obj as JSON at path, whole or not at all: written to path.tmp, then renamed over path."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)


def write_safetensors(tensors, path, metadata=None):
    """{key: tensor} as a safetensors file at path, whole or not at all (path.tmp, then renamed), with the mode
    the user's umask gives new files (0644 under umask 022), as the JSON files get: safetensors writes 0600."""
    tmp = Path(f"{path}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_file(tensors, tmp, metadata=metadata)
    except SafetensorError as e:  # its I/O errors (a full disk) are not OSErrors
        raise OSError(errno.EIO, str(e), str(tmp)) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def weight_files(ckpt_dir):
    """The weight files of a checkpoint directory, safetensors preferred, shards in index order."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    for single, index in [("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")]:
        if (d / index).exists():
            weight_map = read_json(d / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{d / index} has no weight_map")
            files = [d / f for f in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{f} is listed in {d / index} but missing")
            return files
        if (d / single).is_file():
            return [d / single]
    raise CheckpointError(f"{d} holds no model.safetensors, pytorch_model.bin or their shard index")


def iter_tensors(files):
    """Yields (file, key, tensor) one tensor at a time; a shard is released before the next opens."""
    for f in files:
        if f.suffix == ".safetensors":
            for key, t in read_safetensors(f):
                yield f, key, t
        else:
            try:  # pickles are untrusted: weights_only refuses anything but tensors and containers
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{f} is truncated, corrupt or not a weights-only pickle ({e})") from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f} does not hold a state dict")
            for key in list(sd):
                yield f, key, sd.pop(key)


ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()}


def check_header(path, header, data_size):
    """A safetensors header {key: {dtype, shape, data_offsets}} checked before anything is allocated, as the
    safetensors library checks it: every entry an object with a known dtype, a shape of non-negative ints, offsets
    inside the data, bytes = numel x itemsize, the tensors contiguous and non-overlapping from byte 0.
    Returns [(key, dtype, shape, begin, end)] in file order; a bad entry is one CheckpointError naming file and key."""
    entries = []
    for key, info in header.items():
        def bad(why):
            return CheckpointError(f"{path} is corrupt at tensor {key}: {why}")
        if not isinstance(info, dict):
            raise bad("its header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            raise bad(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise CheckpointError(f"{path} is truncated or corrupt at tensor {key}: data_offsets {offsets!r} are not within "
                                  f"the file's {data_size} data bytes")
        numel = 1
        for d in shape:
            numel *= d
        if numel * ITEMSIZE[dtype] != offsets[1] - offsets[0]:
            raise bad(f"shape {shape} in {dtype} is {numel * ITEMSIZE[dtype]} bytes, its data_offsets span {offsets[1] - offsets[0]}")
        entries.append((key, DTYPES[dtype], shape, *offsets))
    entries.sort(key=lambda e: (e[3], e[4]))
    end = 0
    for key, _, _, begin, stop in entries:
        if begin != end:
            raise CheckpointError(f"{path} is corrupt at tensor {key}: it starts at data byte {begin}, not {end} "
                                  f"({'it overlaps the tensor before' if begin < end else 'a gap before it'})")
        end = stop
    return entries


def read_safetensors(path):
    """Yields (key, tensor) from a safetensors file, reading each tensor straight into its own memory:
    no mmap, so resident memory while loading is the model plus one tensor, not the model plus the file.
    Layout: 8-byte little-endian header size, a JSON header {key: {dtype, shape, data_offsets}}, the data.
    The whole header is checked (check_header) before the first tensor is allocated."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little")
        try:
            assert 0 < n <= size - 8
            header = json.loads(f.read(n))
            assert isinstance(header, dict)
            header.pop("__metadata__", None)
        except (AssertionError, ValueError):
            raise CheckpointError(f"{path} is not a safetensors file (corrupt or truncated header)") from None
        for key, dtype, shape, begin, end in check_header(path, header, size - 8 - n):
            t = torch.empty(shape, dtype=dtype)
            buf = t.reshape(-1).view(torch.uint8).numpy()
            f.seek(8 + n + begin)
            if f.readinto(buf) != end - begin:
                raise CheckpointError(f"{path} is truncated or corrupt at tensor {key}")
            yield key, t


def rename(key, table):
    """Maps a checkpoint key through (old prefix, new prefix) pairs, first match wins; None if none."""
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def unrename(name, table):
    for old, new in table:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def from_scratch(cls, cfg, device="cpu"):
    """A model trained from scratch, built as nanochat builds one: its modules on the meta device (no memory,
    no init), storage on `device` by to_empty, then its init_weights. Its init_weights first draws what a
    build on a real device draws (draw_default_init), so under the same seed from_scratch(cls, cfg) holds
    exactly the weights of cls(cfg), and a later init_weights(std=...) draws as it would after cls(cfg)."""
    with torch.device("meta"):
        model = cls(cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model


@torch.no_grad()
def draw_default_init(model):
    """PyTorch's default init of every submodule in module order (nn.Linear and nn.Conv2d kaiming-uniform
    weights and uniform biases, nn.Embedding normal, norms ones and zeros): what building the modules on a
    real device draws. A model's own init overwrites every value, but these draws move the random stream,
    so a model built on the meta device replays them to get, from the same seed, the same weights. Needs
    module order == construction order, which holds for every nanollava model (each builds its children in
    the order it registers them)."""
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def load_weights(model, sources, dtype=None):
    """Fills a meta-device model from [(files, table, drop)], where drop is a predicate on checkpoint
    keys that LLaVA does not use (CLIP's text tower, position_ids buffers, rotary inv_freq)."""
    params = dict(model.named_parameters())
    filled = {}
    for files, table, drop in sources:
        for f, key, t in iter_tensors(files):
            if drop(key):
                continue
            name = rename(key, table)
            if name not in params:
                raise CheckpointError(f"{f}: unexpected tensor {key} (no such parameter in {type(model).__name__})")
            p = params[name]
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"{f}: {key} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            if name in filled:
                raise CheckpointError(f"{f}: {key} appears twice (also in {filled[name]})")
            t = t.to(dtype or (p.dtype if p.dtype.is_floating_point else t.dtype))
            _assign(model, name, torch.nn.Parameter(t, requires_grad=p.requires_grad))
            filled[name] = f
    missing = [n for n in params if n not in filled]
    if missing:
        tables = [s[1] for s in sources]
        where = ", ".join(str(Path(s[0][0]).parent) for s in sources)
        raise CheckpointError(f"{where}: no tensor for {unrename(missing[0], tables[-1])} "
                              f"({len(missing)} parameters missing, first {missing[0]})")
    return model


def _assign(model, name, value):
    *path, leaf = name.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    setattr(mod, leaf, value)


def save_weights(tensors, out_dir, max_shard_bytes=5 * 2**30):
    """Writes {key: tensor} as model.safetensors, or shards plus model.safetensors.index.json past
    max_shard_bytes. Each file is written under a temporary name and renamed when complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, size = [{}], 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
        size += n
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(shard, out / name, metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, out / "model.safetensors.index.json")


def tensor_names(files):
    """The tensor names of weight files, without reading the tensors: safetensors headers, mmap'd pickles."""
    names = set()
    for f in files:
        if f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                try:
                    header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
                except (ValueError, MemoryError, OverflowError):
                    raise CheckpointError(f"{f} is not a safetensors file (corrupt or truncated header)") from None
            names |= set(header) - {"__metadata__"}
        else:
            names |= {key for _, key, _ in iter_tensors([f])}
    return names
