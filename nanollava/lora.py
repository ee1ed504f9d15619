"""
LoRA ("LoRA: Low-Rank Adaptation of Large Language Models", Hu et al. 2021) on LLaVA's language model, as the
official LLaVA-1.5 scripts fine-tune it (scripts/v1_5/finetune_lora.sh: r 128, alpha 256, dropout 0.05), with
adapters read and written in PEFT's own on-disk format: what save_adapter writes,
peft.PeftModel.from_pretrained(transformers.LlavaForConditionalGeneration.from_pretrained(BASE), DIR) loads as the
same model (BASE in llava-hf layout), and load_adapter reads what PEFT writes.

    y = x W^T + b + (alpha / r) * B(A(dropout(x)))    A (r, in) Kaiming-uniform (a = sqrt 5), B (out, r) zeros,

so an injected model starts equal to its base; merge folds (alpha / r) B A into W, unmerge takes it out again.

Notable:
- The adapters go on the seven linear layers of every language-model block (q, k, v, o, gate, up, down), found by
  walking language_model.layers, never by name suffix: the official code's suffix matching also puts them on
  CLIP's q/k/v_proj when the tower is already built (haotian-liu/LLaVA issue 1647). The regex PEFT is given in
  adapter_config.json names the language model for the same reason.
- LoRALinear keeps the base layer's own weight (and bias) parameters under the same names, so the base's
  state-dict keys do not change; A and B are submodules of their block, so FSDP2's fully_shard(block) shards them
  with it. The forward is a pure function of its input (torch.utils.checkpoint replays dropout's random state),
  so gradient checkpointing recomputes it exactly.
- Only A, B and the projector train (mark_trainable); frozen base weights get neither gradients nor optimizer state.
- On disk: adapter_config.json and adapter_model.safetensors, keys `base_model.model.` + transformers' module path
  + `.lora_A.weight` / `.lora_B.weight` (no adapter name), the projector as modules_to_save in the same file.
  Reading also takes transformers' older module paths, the official LlavaLlama ones (`base_model.model.model.layers.`),
  adapter_model.bin and the official non_lora_trainables.bin (pickles only with weights_only=True).
"""
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from nanollava.checkpoint import CheckpointError, iter_tensors, read_json, rename, unrename, write_json
from nanollava.llava import HF_KEYS, OFFICIAL_KEYS

TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # inside each language-model block
TARGET_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"  # PEFT full-matches it
PREFIX = "base_model.model."  # PeftModel's wrapper, then the base model's own module path
SAVE_KEYS = [("model.language_model.", "language_model."), ("model.multi_modal_projector.", "multi_modal_projector.")]


class LoRALinear(nn.Module):
    """An nn.Linear plus a low-rank update. weight (out, in) and bias are the base layer's own parameters."""

    def __init__(self, base: nn.Linear, r, alpha, dropout=0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        # PEFT's order: both nn.Linear (each runs its own init), then A again and B to zero; with the same seed the
        # same random numbers are drawn, so a nanollava and a PEFT adapter start identical
        self.lora_A = nn.Linear(self.in_features, r, **kw)   # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, **kw)  # (out, r)
        if not self.weight.is_meta:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # uniform in +-1/sqrt(in), nn.Linear's init
            nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.merged = False

    def forward(self, x):  # (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scale  # PEFT's order of operations

    def delta(self):
        """(alpha / r) B A, (out, in), computed in fp32 (bf16 products lose the low bits merge relies on)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scale).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta()
            self.merged = False

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _replace(model, name, module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def inject(model, r=16, alpha=32, dropout=0.0):
    """LoRA on the seven linear layers of every language-model block of a LLaVA (in place); the vision tower and
    the projector are left alone. Returns the model."""
    for block in model.language_model.layers:
        for name in TARGETS:
            base = block.get_submodule(name)
            if not isinstance(base, LoRALinear):
                _replace(block, name, LoRALinear(base, r, alpha, dropout))
    return model


def lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_trainable(model, projector=True):
    """requires_grad on A, B and (by default) the projector only. Returns the trainable parameters' names."""
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n or (projector and n.startswith("multi_modal_projector.")))
    return [n for n, p in model.named_parameters() if p.requires_grad]


def merge(model):
    for m in lora_layers(model).values():
        m.merge()
    return model


def unmerge(model):
    for m in lora_layers(model).values():
        m.unmerge()
    return model


def unload(model):
    """Merges every adapter and puts plain nn.Linear layers back (PEFT's merge_and_unload): the model has its base
    architecture and state-dict keys again, so save_pretrained writes an ordinary llava-hf checkpoint."""
    for name, m in lora_layers(model).items():
        m.merge()
        with torch.device("meta"):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        lin.weight, lin.bias = m.weight, m.bias
        _replace(model, name, lin)
    return model


def adapter_tensors(model, state_dict=None):
    """{PEFT key: tensor}: every A and B, and the projector's parameters (modules_to_save). state_dict: the full
    weights when the model is sharded (gathered on rank 0)."""
    sd = model.state_dict() if state_dict is None else state_dict
    keep = lambda n: ".lora_A." in n or ".lora_B." in n or n.startswith("multi_modal_projector.")
    return {PREFIX + unrename(n, SAVE_KEYS): t for n, t in sd.items() if keep(n)}


def save_adapter(model, out_dir, state_dict=None, base_model_name_or_path=None):
    """adapter_config.json and adapter_model.safetensors in PEFT's format; each file is written under a temporary
    name and renamed when complete. The config holds the key set of liuhaotian/llava-v1.5-7b-lora's plus
    modules_to_save and a target regex that leaves CLIP alone."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("the model has no LoRA layers to save (inject first)")
    r, alpha, p = layers[0].r, layers[0].alpha, getattr(layers[0].dropout, "p", 0.0)
    if any((m.r, m.alpha) != (r, alpha) for m in layers):
        raise ValueError("save_adapter writes one r and alpha for all layers; these layers differ")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in adapter_tensors(model, state_dict).items()}
    save_file(tensors, out / "adapter_model.safetensors.tmp", metadata={"format": "pt"})
    os.replace(out / "adapter_model.safetensors.tmp", out / "adapter_model.safetensors")
    write_json({"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path,
                "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
                "layers_pattern": None, "layers_to_transform": None, "lora_alpha": alpha, "lora_dropout": p,
                "modules_to_save": ["multi_modal_projector"], "peft_type": "LORA", "r": r, "rank_pattern": {},
                "revision": None, "target_modules": TARGET_REGEX, "task_type": "CAUSAL_LM", "use_dora": False,
                "use_rslora": False}, out / "adapter_config.json")


def load_adapter(model, adapter_dir):
    """Puts an adapter (nanollava's or one PEFT wrote) on a LLaVA in place, unmerged: LoRA layers where the file
    has A and B, the file's other tensors (the projector) replace the base's. Returns the model. An adapter that
    does not fit the base (another target, another shape) is one CheckpointError naming the file and the key."""
    d = Path(adapter_dir)
    cfg = read_json(d / "adapter_config.json")
    for key, want in (("peft_type", "LORA"), ("bias", "none"), ("use_dora", False), ("fan_in_fan_out", False),
                      ("rank_pattern", {}), ("alpha_pattern", {})):
        if (cfg.get(key) or want) != want:
            raise CheckpointError(f"{d}/adapter_config.json: {key} is {cfg[key]!r}; nanollava reads {want!r} only")
    files = [d / f for f in ("adapter_model.safetensors", "adapter_model.bin") if (d / f).is_file()][:1]
    if not files:
        raise CheckpointError(f"{d} holds no adapter_model.safetensors or adapter_model.bin")
    files += [d / "non_lora_trainables.bin"] if (d / "non_lora_trainables.bin").is_file() else []  # official scripts
    found = {}  # nanollava name -> (file, key, tensor)
    for f, key, t in iter_tensors(files):
        k = key.removeprefix(PREFIX)
        name = rename(k, HF_KEYS) or rename(k, OFFICIAL_KEYS) or k
        if name in found:
            raise CheckpointError(f"{f}: {key} appears twice (also in {found[name][0]} as {found[name][1]})")
        found[name] = (f, key, t)
    r_cfg, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    n = len(model.language_model.layers)
    targets = {f"language_model.layers.{i}.{t}" for i in range(n) for t in TARGETS}
    for name in sorted({k.rpartition(".lora_")[0] for k in found if ".lora_A." in k or ".lora_B." in k}):
        f, key, _ = found.get(name + ".lora_A.weight") or found[name + ".lora_B.weight"]
        if name not in targets:  # e.g. CLIP's q_proj (issue 1647), a block this base does not have
            raise CheckpointError(f"{f}: {key} targets {name}, which is not one of the seven linear layers of a "
                                  f"language-model block of this {n}-block base")
        if name + ".lora_A.weight" not in found or name + ".lora_B.weight" not in found:
            raise CheckpointError(f"{f}: {key} has no lora_{'B' if '.lora_A.' in key else 'A'} partner")
        for side, dim in (("A", 0), ("B", 1)):  # A (r, in), B (out, r)
            f, key, t = found[f"{name}.lora_{side}.weight"]
            if t.dim() != 2 or t.shape[dim] != r_cfg:
                raise CheckpointError(f"{f}: {key} has shape {tuple(t.shape)}, not rank r = {r_cfg} as {d}/adapter_config.json says")
        base = model.get_submodule(name)
        if not isinstance(base, LoRALinear):
            a = alpha * math.sqrt(r_cfg) if cfg.get("use_rslora") else alpha  # rsLoRA's scale alpha / sqrt(r) as a / r
            _replace(model, name, LoRALinear(base, r_cfg, a, cfg.get("lora_dropout", 0.0) or 0.0))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (f, key, t) in found.items():
            if name not in params:
                raise CheckpointError(f"{f}: unexpected tensor {key} (no such parameter in this base)")
            if tuple(t.shape) != tuple(params[name].shape):
                raise CheckpointError(f"{f}: {key} has shape {tuple(t.shape)}, this base needs {tuple(params[name].shape)}")
            params[name].copy_(t)
    return model
