"""
The language model of LLaVA-1.5: Vicuna v1.5, which is the Llama-2 architecture ("Llama 2: Open
Foundation and Fine-Tuned Chat Models", Touvron et al. 2023), checkpoints lmsys/vicuna-{7b,13b}-v1.5.

Parameter names are the checkpoint's (`model.` prefix dropped: `model.layers.0.self_attn.q_proj`
is `layers.0.self_attn.q_proj` here). Notable:
- RMSNorm statistics in fp32, cast back to the input dtype before the weight multiply.
- RoPE in Hugging Face's layout (rotate_half over the two halves of a head, not interleaved), so
  the checkpoint's q/k weights load unpermuted; inv_freq is computed, never loaded.
- A static KV cache for generation; positions and a padding mask make left-padded batches and
  multi-turn chat on one cache work. attention_plan alone decides positions, mask and causality.
"""
import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels
from nanollava.checkpoint import CheckpointError, config_values, draw_default_init, load_weights, read_json, save_weights, unrename, weight_files, write_json


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = None  # None: as many as query heads (Vicuna has no GQA)
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads

    @classmethod
    def from_json(cls, cfg, where="config.json"):
        """Llama's config.json, every value checked (config_values)."""
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{where} is not a JSON object")
        if cfg.get("hidden_act", "silu") != "silu" or cfg.get("rope_scaling") or cfg.get("tie_word_embeddings"):
            raise CheckpointError(f"{where}: only Llama with SiLU, plain RoPE and untied embeddings (Vicuna's) is supported")
        cfg = dict(cfg)
        rope = cfg.get("rope_parameters")
        cfg["rope_theta"] = cfg.get("rope_theta") or (rope.get("rope_theta") if isinstance(rope, dict) else None)
        return cls(**config_values(cls, cfg, where, {"vocab_size": (1, 2 ** 24),
                                                     "rms_norm_eps": (0, 1)}))


PRESETS = {
    "vicuna-7b": LlamaConfig(),
    "vicuna-13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    # LLaVA-1.6's other two language models (REFERENCE-NEXT A9): the same block, grouped-query attention
    "mistral-7b-instruct-v0.2": LlamaConfig(intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=32768,
                                            rope_theta=1e6),
    "nous-hermes-2-yi-34b": LlamaConfig(vocab_size=64000, hidden_size=7168, intermediate_size=20480, num_hidden_layers=60,
                                        num_attention_heads=56, num_key_value_heads=8, rope_theta=5e6),
    # the offline world's stand-in, as prepare.py's defaults build it (its own 1024-piece tokenizer; 384 = 8/3 x 128
    # rounded up to a multiple of 64)
    "world": LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=8, max_position_embeddings=2048),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return kernels.norm(x, self.weight, self.eps)  # fused Triton kernel on GPU, PyTorch reference elsewhere


@functools.lru_cache(maxsize=8)
def rope_table(head_dim, theta, length, device):
    """cos, sin (length, hs) for positions 0..length-1, fp32 math as in transformers, computed once.
    sin carries rotate_half's sign (minus on its first half), so apply_rope needs no negation."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim)
    freqs = torch.arange(length, device=device).float()[:, None] * inv_freq  # (length, hs/2)
    return torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([-freqs.sin(), freqs.sin()], dim=-1)


def rope(positions, head_dim, theta, length, dtype):
    """cos, sin of shape (B, 1, T, hs) for integer positions (B, T), looked up in rope_table."""
    cos, sin = rope_table(head_dim, theta, length, positions.device)
    return cos[positions][:, None].to(dtype), sin[positions][:, None].to(dtype)


def apply_rope(x, cos, sin):
    """x * cos + rotate_half(x) * sin, Hugging Face's layout: rotate_half(x) = (-x2, x1) for the halves
    x1, x2 of a head; the roll gives (x2, x1) and the sign is in sin."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class KVCache:
    """Static per-layer key/value buffers (B, n_kv, max_len, hs), filled left to right. `mask` records
    which cached positions are real tokens (False for left padding), `len` how many are filled."""

    def __init__(self, cfg, batch, max_len, device, dtype):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.hidden_size // cfg.num_attention_heads)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.max_len, self.len, self.padded = max_len, 0, False  # padded: some mask entry is False


class Attention(nn.Module):
    def __init__(self, cfg, idx):
        super().__init__()
        self.idx, self.n_head, self.n_kv = idx, cfg.num_attention_heads, cfg.num_key_value_heads
        C, hs = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(C, self.n_head * hs, bias=False)
        self.k_proj = nn.Linear(C, self.n_kv * hs, bias=False)
        self.v_proj = nn.Linear(C, self.n_kv * hs, bias=False)
        self.o_proj = nn.Linear(self.n_head * hs, C, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        """mask: what each query sees, as attention_plan decided it (kernels.attention's three forms)."""
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, -1).transpose(1, 2)    # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, -1).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write this step's keys/values, attend over everything cached so far
            end = cache.len + T
            cache.k[self.idx][:, :, cache.len:end] = k
            cache.v[self.idx][:, :, cache.len:end] = v
            k, v = cache.k[self.idx][:, :, :end], cache.v[self.idx][:, :, :end]
        if self.n_kv != self.n_head:
            k, v = (t.repeat_interleave(self.n_head // self.n_kv, dim=1) for t in (k, v))
        y = kernels.attention(q, k, v, mask)  # "causal" and None may take the fused kernel, a tensor takes SDPA
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg, idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    KEYS = [("lm_head.", "lm_head."), ("model.", "")]  # checkpoint prefix -> parameter prefix, first match wins

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False  # recompute each block's activations in backward (train.py --grad-checkpointing)
        self.drew_defaults = not self.lm_head.weight.is_meta  # built on a real device: the modules drew their default init
        if self.drew_defaults:  # on the meta device (loading, or from_scratch) nothing is drawn until init_weights
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """All of the model's init, for a model trained from scratch (the world's stand-in); from_pretrained
        overwrites it. After a meta build (checkpoint.from_scratch) it first draws PyTorch's default init
        (checkpoint.draw_default_init), once, so a seed gives the same weights however the model was built.
        Then, from the global RNG in module order: every Linear and Embedding weight normal(0, std), RMSNorms
        one: Llama's init (initializer_range 0.02, meant for width 4096; the world's stand-in uses 0.06)."""
        if not self.drew_defaults:
            draw_default_init(self)
            self.drew_defaults = True
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None, select=None):
        """(B, T) ids or (B, T, C) embeddings -> (B, T, vocab) logits.
        attention_mask (B, T): 1 for real tokens, 0 for padding (left padding in generation).
        cache: a KVCache; the new tokens go after the cache.len tokens it already holds.
        select (B, T) bool: logits only at these positions, (N, vocab) in row-major order; training needs
        them only where a label follows, which saves the head's compute and most of the logits' memory."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        plan = attention_plan(B, T, attention_mask, cache, x.device)
        start = cache.len if cache is not None else 0
        cfg = self.config
        cos, sin = rope(plan.positions, cfg.hidden_size // cfg.num_attention_heads, cfg.rope_theta,
                        max(cfg.max_position_embeddings, start + T), x.dtype)
        for block in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, plan.mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, plan.mask, cache)
        if cache is not None:
            cache.len += T
        x = self.norm(x)
        return self.lm_head(x if select is None else x[select])

    @classmethod
    def from_pretrained(cls, ckpt_dir, dtype=torch.float32):
        """Vicuna / Llama as lmsys ships it: fp16 pickled shards with pytorch_model.bin.index.json, or safetensors."""
        cfg = LlamaConfig.from_json(read_json(Path(ckpt_dir) / "config.json"), Path(ckpt_dir) / "config.json")
        with torch.device("meta"):
            model = cls(cfg)
        return load_weights(model, [(weight_files(ckpt_dir), cls.KEYS, llama_unused)], dtype).eval()

    def config_json(self):
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, "attention_bias": False,
                "mlp_bias": False, "pretraining_tp": 1, "tie_word_embeddings": False, **asdict(self.config)}

    def save_pretrained(self, out_dir, max_shard_bytes=5 * 2**30):
        """Writes a LlamaForCausalLM checkpoint: `model.*` and `lm_head.weight` in safetensors, and config.json."""
        save_weights({unrename(k, self.KEYS): v for k, v in self.state_dict().items()}, out_dir, max_shard_bytes)
        write_json(self.config_json(), Path(out_dir) / "config.json")


def llama_unused(key):
    return key.endswith("rotary_emb.inv_freq")  # old checkpoints saved the RoPE buffer; it is recomputed


class Plan(NamedTuple):
    positions: torch.Tensor  # (B, T) the RoPE position of each new token
    mask: object  # kernels.attention's mask: "causal", None (every key) or bool (B or 1, 1, T, start + T)


def attention_plan(B, T, attention_mask, cache, device):
    """The one place that decides, for a forward call of T new tokens, their positions and what they attend
    to (and records their padding in the cache, if any). attention_mask (B, T): 1 real, 0 padding.
    - From position 0 with no padding, or with padding only on the right and no cache: "causal" (the fused
      kernel's case; causal attention never lets a real token see a padding key on its right, and nothing
      reads the outputs at padding positions, so a right-padded training batch needs no mask).
    - One new token after a cache that holds no padding: None, it sees every key (decoding builds no mask
      at every step).
    - Else a boolean (B or 1, 1, T, start + T) mask: causal over the cached prefix plus the new tokens, no
      padding keys. A query always sees itself, so padding rows never become all-masked (which gives NaN).
    With padding (left padding in generation), a token's position counts the real tokens before it, so the
    padding shifts nothing; a padded cache keeps its mask for every later call (multi-turn chat)."""
    start = cache.len if cache is not None else 0
    real = None if attention_mask is None else attention_mask.bool()
    padded = real is not None and not bool(real.all())
    if cache is not None:
        if start + T > cache.max_len:
            raise ValueError(f"{start + T} tokens exceed the KV cache of {cache.max_len}")
        if real is not None:
            cache.mask[:, start:start + T] = real
        cache.padded = cache.padded or padded
        key_mask = cache.mask[:, :start + T] if cache.padded else None
    else:
        right_only = padded and bool((real[:, 1:] <= real[:, :-1]).all())
        key_mask = real if padded and not right_only else None
    if key_mask is None:
        positions = torch.arange(start, start + T, device=device).expand(B, T)
        return Plan(positions, "causal" if start == 0 else None if T == 1 else causal_mask(T, start, device))
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
    itself = torch.arange(start, start + T, device=device)[:, None] == torch.arange(start + T, device=device)  # (T, start + T)
    return Plan(positions, (causal_mask(T, start, device) & key_mask[:, None, None, :]) | itself)


def causal_mask(T, start, device):
    """(1, 1, T, start + T) bool: new token i (at position start + i) sees keys 0..start + i."""
    q, k = torch.arange(start, start + T, device=device)[:, None], torch.arange(start + T, device=device)[None, :]
    return (k <= q)[None, None]
