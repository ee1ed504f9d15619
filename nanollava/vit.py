"""
The CLIP vision tower of LLaVA-1.5: ViT-L/14 at 336 px ("Learning Transferable Visual Models From
Natural Language Supervision", Radford et al. 2021), checkpoint openai/clip-vit-large-patch14-336.

Parameter names are the checkpoint's own, under `vision_model.` (one rename: the checkpoint's
`encoder.layers.N` is `layers.N` here). Notable:
- LLaVA takes hidden_states[-2] (the output of layer 23 of 24) and drops the CLS token, so the
  forward runs only the layers it needs and returns (N, 576, 1024) at 336 px. The last layer and
  post_layernorm are loaded and saved (the checkpoint has them) but never run.
- `pre_layrnorm` is spelled that way in the checkpoint.
- quick_gelu: x * sigmoid(1.702 x), not the erf GELU of the projector.
"""
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

import kernels
from nanollava.checkpoint import CheckpointError, config_values, draw_default_init, load_weights, read_json, save_weights, unrename, weight_files, write_json
from nanollava.data import CLIP_MEAN, CLIP_STD  # preprocessing's, so data.py owns them (it never imports the models)


@dataclass
class ViTConfig:
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-5
    num_channels: int = 3
    feature_layer: int = -2  # LLaVA's mm_vision_select_layer: index into hidden_states (0 = embeddings)

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_json(cls, cfg, where="config.json"):
        """CLIP's config.json (a full CLIPModel's or a vision-only one), every value checked (config_values)."""
        if isinstance(cfg, dict) and cfg.get("model_type") == "clip":  # a full CLIPModel config: the tower's part
            cfg, where = cfg.get("vision_config", {}), f"{where} vision_config"
        values = config_values(cls, cfg, where, {"num_channels": (1, 4), "feature_layer": (-64, 64), "layer_norm_eps": (0, 1),
                                                 "image_size": (1, 2 ** 14)})
        if cfg.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise CheckpointError(f"{where}: vision tower hidden_act {cfg['hidden_act']!r} is not CLIP's quick_gelu")
        return cls(**values)


PRESETS = {
    "clip-vit-large-patch14-336": ViTConfig(),
    # the offline world's stand-in, as prepare.py's defaults build it: 72 px in 3x3 patches, one per named cell
    "world": ViTConfig(image_size=72, patch_size=24, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                       num_attention_heads=4),
}


class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, C, g, g)
        x = x.flatten(2).transpose(1, 2)  # (N, g*g, C), row-major over the patch grid
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (N, 1 + g*g, C)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, self.n_head = cfg.hidden_size, cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(C, C), nn.Linear(C, C)
        self.v_proj, self.out_proj = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = kernels.attention(q, k, v, None)  # mask None: every token sees every token; scale hs^-0.5
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class EncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ViT(nn.Module):
    # checkpoint key prefix -> parameter name prefix, first match wins: openai's `vision_model.*`, then the
    # prefix-less keys newer transformers write for CLIPVisionModel. The text tower and position_ids are dropped.
    KEYS = [("vision_model.encoder.layers.", "layers."), ("vision_model.", ""), ("encoder.layers.", "layers."), ("", "")]

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # in the checkpoint; LLaVA never applies it
        self.drew_defaults = not self.pre_layrnorm.weight.is_meta  # built on a real device: the modules drew their default init
        if self.drew_defaults:  # on the meta device (loading, or from_scratch) nothing is drawn until init_weights
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """All of the tower's init, for a tower trained from scratch (the world's stand-in); from_pretrained
        overwrites it. After a meta build (checkpoint.from_scratch) it first draws PyTorch's default init
        (checkpoint.draw_default_init), once, so a seed gives the same weights however the tower was built.
        Then, from the global RNG in module order: every Linear, Conv2d and Embedding weight normal(0, std),
        biases zero, LayerNorms one and zero, and last class_embedding normal(0, std): CLIP-like."""
        if not self.drew_defaults:
            draw_default_init(self)
            self.drew_defaults = True
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.embeddings.class_embedding, std=std)

    @property
    def n_run(self):
        """Layers to run: hidden_states[k] is the output of layer k (hidden_states[0] the embeddings)."""
        k = self.config.feature_layer
        return k if k >= 0 else self.config.num_hidden_layers + 1 + k

    def forward(self, pixel_values):
        """(N, 3, S, S) -> (N, (S/p)^2, C): hidden_states[feature_layer] without the CLS token."""
        S = self.config.image_size
        if pixel_values.shape[-3:] != (self.config.num_channels, S, S):
            raise ValueError(f"vision tower expects images of shape (3, {S}, {S}), got {tuple(pixel_values.shape[1:])}")
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.layers[:self.n_run]:
            x = layer(x)
        return x[:, 1:]  # drop CLS

    @classmethod
    def from_pretrained(cls, ckpt_dir, dtype=torch.float32):
        """A CLIP checkpoint as openai/clip-vit-large-patch14-336 ships it (full CLIPModel, text tower
        dropped) or a vision-only one (CLIPVisionModel)."""
        cfg = ViTConfig.from_json(read_json(Path(ckpt_dir) / "config.json"), Path(ckpt_dir) / "config.json")
        with torch.device("meta"):
            model = cls(cfg)
        return load_weights(model, [(weight_files(ckpt_dir), cls.KEYS, clip_unused)], dtype).eval()

    def config_json(self):
        cfg = asdict(self.config)
        cfg.pop("feature_layer")
        return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_act": "quick_gelu",
                "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0, "projection_dim": 768,
                **cfg}

    def save_pretrained(self, out_dir, max_shard_bytes=5 * 2**30):
        """Writes a CLIPVisionModel checkpoint (keys `vision_model.*`) and CLIP's preprocessor_config.json."""
        save_weights({unrename(k, self.KEYS): v for k, v in self.state_dict().items()}, out_dir, max_shard_bytes)
        write_json(self.config_json(), Path(out_dir) / "config.json")
        write_json(self.preprocessor_config(), Path(out_dir) / "preprocessor_config.json")

    def preprocessor_config(self):
        """CLIPImageProcessor's settings for this tower's image size."""
        S = self.config.image_size
        return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": S},
                "resample": 3, "do_center_crop": True, "crop_size": {"height": S, "width": S},
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True}


def clip_unused(key):
    """Checkpoint tensors LLaVA does not use: CLIP's text tower, its projections, and old position_ids buffers."""
    return (key.startswith(("text_model.", "visual_projection.", "text_projection.", "logit_scale"))
            or key.endswith("position_ids"))
