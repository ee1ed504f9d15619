"""
LLaVA-1.5 ("Improved Baselines with Visual Instruction Tuning", Liu et al. 2023): the CLIP tower,
a two-layer MLP projector, and Vicuna, joined where the prompt says <image>.

pixels (N, 3, 336, 336) -> vision_tower -> (N, 576, 1024) -> multi_modal_projector -> (N, 576, 4096)
-> each image placeholder in input_ids is expanded into its 576 rows of the token embeddings
-> language_model -> logits over the expanded sequence.

LLaVA-NeXT / 1.6 (anyres.py) changes only the image side: each image is a base tile plus a grid of tiles,
all through the tower in one batch, merged by anyres.merge_features into a variable number of rows with a
learned `image_newline`; LLaVAConfig.anyres is set for it and None for 1.5.

Checkpoints read: the official LLaVA-1.5 layout (liuhaotian/llava-v1.5-*: Vicuna's keys plus
`model.mm_projector.{0,2}`, the CLIP tower in its own directory), llava-hf's layout
(llava-hf/llava-1.5-*-hf, and what newer transformers write), and nanollava's own, which is the
newer llava-hf layout so that transformers' LlavaForConditionalGeneration loads it.
"""
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollava import anyres
from nanollava.anyres import AnyResConfig
from nanollava.checkpoint import (CheckpointError, load_weights, read_json, save_weights, tensor_names, unrename,
                                  weight_files, write_json)
from nanollava.llama import PRESETS as LLAMA_PRESETS, KVCache, Llama, LlamaConfig, llama_unused
from nanollava.vit import PRESETS as VIT_PRESETS, ViT, ViTConfig, clip_unused

IMAGE_TOKEN_INDEX = -200  # the official code's placeholder id: not in the vocabulary, replaced before embedding

# checkpoint prefix -> parameter prefix, first match wins (ViT.KEYS and Llama.KEYS inside each model)
HF_HUB_KEYS = [  # llava-hf as on the hub: what nanollava writes (save_pretrained), and the first layout read
    ("image_newline", "image_newline"),  # LLaVA-NeXT only
    ("vision_tower.vision_model.encoder.layers.", "vision_tower.layers."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("language_model.model.", "language_model."),
]
HF_KEYS = HF_HUB_KEYS + [  # then the variants transformers versions write, read only
    ("vision_tower.encoder.layers.", "vision_tower.layers."),
    ("vision_tower.", "vision_tower."),
    ("model.vision_tower.vision_model.encoder.layers.", "vision_tower.layers."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.encoder.layers.", "vision_tower.layers."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    ("lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model."),
]
OFFICIAL_KEYS = [  # liuhaotian/llava-v1.5-*: Vicuna's names plus the projector as an nn.Sequential
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    # liuhaotian/llava-v1.6-*: also the newline and the fine-tuned tower (1.5's copy of CLIP is dropped unread)
    ("model.image_newline", "image_newline"),
    ("model.vision_tower.vision_tower.vision_model.encoder.layers.", "vision_tower.layers."),
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
    ("lm_head.", "language_model.lm_head."),
    ("model.", "language_model."),
]
TOWER_KEYS = [(old, "vision_tower." + new) for old, new in ViT.KEYS]  # a CLIP directory beside an official checkpoint
OFFICIAL_SUPPORTED = [  # (config key, the official code's default when absent, the values LLaVA-1.5 has)
    ("mm_projector_type", "linear", ("mlp2x_gelu",)),  # LLaVA-1.0 has a single linear layer
    ("mm_vision_select_feature", "patch", ("patch",)),
    ("mm_use_im_start_end", False, (False,)),  # LLaVA-1.0 wraps the image in <im_start> ... <im_end> tokens
    ("image_aspect_ratio", "square", ("pad", "square")),  # LLaVA-1.6 says anyres: image tiles
    ("mm_patch_merge_type", "flat", ("flat",)),  # LLaVA-1.6: spatial_unpad, with an image_newline tensor
]
OFFICIAL_SUPPORTED_NEXT = OFFICIAL_SUPPORTED[:3] + [  # LLaVA-1.6 (image_aspect_ratio anyres): AnyRes tiles
    ("mm_patch_merge_type", "flat", ("spatial_unpad",)),
]


def layout_of(path, cfg):
    """'official' (liuhaotian) or 'llava-hf', from what config.json and the weight names hold. Never from model_type
    alone: the released liuhaotian configs say "llava" as llava-hf's do, with the Llama keys at the top level."""
    if "mm_vision_tower" in cfg:
        return "official"
    if "text_config" in cfg and "vision_config" in cfg and not str(cfg.get("model_type", "")).startswith("clip"):
        return "llava-hf"
    names = tensor_names(weight_files(path))  # neither key: the weight names tell
    if any(n.startswith(("multi_modal_projector.", "model.multi_modal_projector.")) for n in names):
        return "llava-hf"
    if any(n.startswith("model.mm_projector.") for n in names):
        raise CheckpointError(f"{path}/config.json names no mm_vision_tower, which an official LLaVA checkpoint needs")
    clip = str(cfg.get("model_type", "")).startswith("clip") or any(n.startswith("vision_model.") for n in names)
    what = "CLIP model" if clip else "Vicuna / Llama language model" if "model.norm.weight" in names else "model"
    raise CheckpointError(f"{path} is a plain {what}, not a LLaVA: config.json has neither mm_vision_tower (official "
                          f"LLaVA-1.5) nor text_config (llava-hf) and no weight is a projector")


@dataclass
class LLaVAConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    text: LlamaConfig = field(default_factory=LlamaConfig)
    image_token_id: int = IMAGE_TOKEN_INDEX
    pad_token_id: int = 0  # the official code pads with <unk>; llava-hf adds <pad> = 32001
    anyres: AnyResConfig = None  # LLaVA-NeXT's tiling and image_newline; None: LLaVA-1.5 (one tile, padded square)


PRESETS = {  # the official checkpoints' shapes (vocabulary 32000, image placeholder -200), and the world's
    "llava-1.5-7b": LLaVAConfig(text=LLAMA_PRESETS["vicuna-7b"]),
    "llava-1.5-13b": LLaVAConfig(text=LLAMA_PRESETS["vicuna-13b"]),
    # LLaVA-1.6 (LLaVA-NeXT) as liuhaotian/llava-v1.6-* ship them: AnyRes over the five released pinpoints
    "llava-1.6-vicuna-7b": LLaVAConfig(text=LLAMA_PRESETS["vicuna-7b"], anyres=AnyResConfig()),
    "llava-1.6-vicuna-13b": LLaVAConfig(text=LLAMA_PRESETS["vicuna-13b"], anyres=AnyResConfig()),
    "llava-1.6-mistral-7b": LLaVAConfig(text=LLAMA_PRESETS["mistral-7b-instruct-v0.2"], anyres=AnyResConfig()),
    "llava-1.6-34b": LLaVAConfig(text=LLAMA_PRESETS["nous-hermes-2-yi-34b"], anyres=AnyResConfig()),
    # what from_base makes of prepare.py's stand-ins: the vocabulary gains <image> 1024 and <pad> 1025, padded to 1088
    "world": LLaVAConfig(VIT_PRESETS["world"], replace(LLAMA_PRESETS["world"], vocab_size=1088), image_token_id=1024,
                         pad_token_id=1025),
}


class Projector(nn.Module):
    """mlp2x_gelu: Linear(1024, 4096) -> GELU (exact erf) -> Linear(4096, 4096)."""

    def __init__(self, vision_dim, text_dim):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim)  # on a real device each nn.Linear draws its init as it is built
        self.linear_2 = nn.Linear(text_dim, text_dim)

    @torch.no_grad()
    def init_weights(self):
        """All of the projector's init: PyTorch's nn.Linear default (kaiming-uniform weights, uniform biases
        within 1/sqrt(fan_in)), linear_1 then linear_2, as the official code leaves it. Building on a real device
        already draws it; after a meta build and to_empty, this draws the same from the same seed."""
        self.linear_1.reset_parameters()
        self.linear_2.reset_parameters()

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))


class LLaVA(nn.Module):
    def __init__(self, cfg: LLaVAConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = ViT(cfg.vision)
        self.multi_modal_projector = Projector(cfg.vision.hidden_size, cfg.text.hidden_size)
        if cfg.anyres is not None:  # (C,) closes every row of an image's tile grid
            self.image_newline = nn.Parameter(torch.randn(cfg.text.hidden_size) / cfg.text.hidden_size ** 0.5)
        self.language_model = Llama(cfg.text)

    def init_weights(self):
        """From scratch, after a meta build (checkpoint.from_scratch): each part's init_weights, in the order
        the constructor builds them, so the same seed gives the weights of LLaVA(cfg) on a real device."""
        self.vision_tower.init_weights()
        self.multi_modal_projector.init_weights()
        if self.config.anyres is not None:  # normal / sqrt(hidden), as the official code and transformers
            with torch.no_grad():
                self.image_newline.normal_(0, self.config.text.hidden_size ** -0.5)
        self.language_model.init_weights()

    @property
    def image_token_id(self):
        return self.config.image_token_id

    def image_features(self, pixel_values, image_sizes=None):
        """LLaVA-1.5: (N, 3, S, S) -> (N, P, C). AnyRes: every image's tiles, concatenated (sum of 1 + rows*cols,
        3, S, S) or padded as transformers batches them (N, max tiles, 3, S, S), and image_sizes (N, 2) as
        (width, height) -> (sum of the images' token counts, C) and the count of each image (N,)."""
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        if self.config.anyres is None:
            feats = self.multi_modal_projector(self.vision_tower(pixel_values).to(dtype))  # (N, P, C)
            return feats.flatten(0, 1), torch.full((feats.shape[0],), feats.shape[1])
        sizes = [tuple(int(v) for v in s) for s in image_sizes]
        a, tile = self.config.anyres, self.config.vision.image_size
        n = [anyres.num_tiles(s, a.pinpoints, tile, a.hf) for s in sizes]
        if pixel_values.dim() == 5:  # padded per image: keep each image's own tiles
            pixel_values = torch.cat([px[:k] for px, k in zip(pixel_values, n)])
        if pixel_values.shape[0] != sum(n):
            raise ValueError(f"image sizes {sizes} need {sum(n)} tiles ({n}), got {pixel_values.shape[0]}")
        feats = self.multi_modal_projector(self.vision_tower(pixel_values).to(dtype))  # all tiles in one batch
        feats = [anyres.merge_features(f, s, a.pinpoints, tile, self.image_newline, a.hf)
                 for f, s in zip(feats.split(n), sizes)]
        return torch.cat(feats), torch.tensor([len(f) for f in feats])

    def embed(self, input_ids, pixel_values=None, attention_mask=None, labels=None, left=None, image_sizes=None):
        """Token embeddings with each image placeholder expanded into its projected features (P each for
        LLaVA-1.5, each image's own count with AnyRes). (B, T) ids -> (B, T', C) embeddings, and the mask and
        labels over the expanded sequence. The layout (where each token and image row lands, which padding
        side, `left`) is expand_image_tokens'; here only the embedding and the splice, one masked assignment
        of the image rows."""
        is_img = input_ids == self.image_token_id
        if pixel_values is None:
            n_px = 0
        elif self.config.anyres is None:
            n_px = pixel_values.shape[0]
        elif image_sizes is None:
            raise ValueError("an AnyRes model needs image_sizes (width, height) with its pixel_values")
        else:
            n_px = len(image_sizes)
        if int(is_img.sum()) != n_px:
            raise ValueError(f"input_ids hold {int(is_img.sum())} image placeholders but {n_px} images were given")
        if n_px == 0:
            return self.language_model.embed_tokens(input_ids), attention_mask, labels
        feats, lengths = self.image_features(pixel_values, image_sizes)  # (sum of lengths, C)
        P = int(lengths[0]) if self.config.anyres is None else lengths
        ex = expand_image_tokens(input_ids, self.image_token_id, P, attention_mask, labels, left)
        x = self.language_model.embed_tokens(ex.input_ids.masked_fill(ex.image, 0))  # the placeholder may lie outside the vocabulary (-200)
        x = x.masked_scatter(ex.image[..., None], feats.to(x.dtype))  # the splice: image rows fill their slots in order
        return x, (None if bool(ex.attention_mask.all()) else ex.attention_mask), ex.labels

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, reduction="mean", image_sizes=None):
        """input_ids (B, T) with one image_token_id per image, pixel_values (N, 3, S, S) in placeholder order
        (AnyRes: their tiles, and image_sizes (N, 2) as (width, height)). Returns logits (B, T', vocab) over
        the expanded sequence, or with labels (B, T) (-100 = no loss)
        the next-token cross-entropy over supervised tokens ('mean' or 'sum')."""
        x, mask, labels = self.embed(input_ids, pixel_values, attention_mask, labels, image_sizes=image_sizes)  # llama.attention_plan reads mask
        if labels is None:
            return self.language_model(inputs_embeds=x, attention_mask=mask)
        targets = labels[:, 1:]
        select = F.pad(targets != -100, (0, 1))  # positions whose next token is supervised
        logits = self.language_model(inputs_embeds=x, attention_mask=mask, select=select)  # (N, vocab)
        return F.cross_entropy(logits.float(), targets[targets != -100], reduction=reduction)

    def new_cache(self, batch, max_len):
        p = self.language_model.lm_head.weight
        return KVCache(self.config.text, batch, max_len, p.device, p.dtype)

    @torch.inference_mode()  # no_grad, and no version counters or view tracking: less overhead per decoding step
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=64, temperature=0.0,
                 top_p=1.0, eos_id=2, generator=None, cache=None, on_token=None, image_sizes=None):
        """Greedy (temperature 0) or temperature / top-p sampling with a KV cache. Batches are left-padded
        (attention_mask 0 on the left). Passing a cache continues after what it holds (chat); the last
        sampled token is not yet in it. Returns (B, n) new ids; rows that ended are filled with eos_id."""
        x, mask, _ = self.embed(input_ids, pixel_values, attention_mask, left=True, image_sizes=image_sizes)  # every row ends at T
        B, T = x.shape[:2]
        ctx = self.config.text.max_position_embeddings
        if cache is None:
            if T >= ctx:
                raise ValueError(f"the prompt is {T} tokens with its image features; the context holds {ctx}")
            cache = self.new_cache(B, min(ctx, T + max_new_tokens))
        if cache.len + T >= cache.max_len:
            raise ValueError(f"the conversation is {cache.len + T} tokens; the context holds {cache.max_len}")
        max_new_tokens = min(max_new_tokens, cache.max_len - cache.len - T)
        logits = self.language_model(inputs_embeds=x, attention_mask=mask, cache=cache)[:, -1]
        out, done = [], torch.zeros(B, dtype=torch.bool, device=x.device)
        for i in range(max_new_tokens):
            tok = torch.where(done, eos_id, sample(logits, temperature, top_p, generator))
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            done |= tok == eos_id
            if done.all() or i == max_new_tokens - 1:
                break
            logits = self.language_model(tok[:, None], cache=cache)[:, -1]
        return torch.stack(out, 1)

    @classmethod
    def from_pretrained(cls, path, vision_tower=None, dtype=torch.float32, conventions="official"):
        """An official LLaVA-1.5 or 1.6 directory, a llava-hf directory (llava or llava_next) in either
        layout, or nanollava's own output. 1.5's tower comes from `vision_tower=` or a local `mm_vision_tower`;
        1.6's fine-tuned tower is in the checkpoint, and only its shape is read from there (CLIP-L/14-336's is
        known, so a hub id needs no download). conventions="transformers": AnyRes ties and rounding as
        transformers' LlavaNext (anyres.py), for comparing with it; "official" otherwise."""
        path = Path(path)
        if conventions not in ("official", "transformers"):
            raise ValueError(f"conventions must be 'official' or 'transformers', got {conventions!r}")
        cj = read_json(path / "config.json")
        kind, where, hf = cj.get("model_type"), f"{path}/config.json", conventions == "transformers"
        anyres_cfg = None
        if layout_of(path, cj) == "llava-hf":
            if cj.get("vision_feature_select_strategy", "default") != "default" or cj.get("projector_hidden_act", "gelu") != "gelu":
                raise CheckpointError(f"{where}: only LLaVA's patch features and GELU projector are supported")
            text = text_config(cj.get("text_config", {}), f"{where} text_config")
            vision = ViTConfig.from_json({**cj.get("vision_config", {}), "feature_layer": cj.get("vision_feature_layer", -2)},
                                         f"{where} vision_config")
            image_id = cj.get("image_token_index", cj.get("image_token_id", 32000))
            pad_id = cj.get("pad_token_id", cj.get("text_config", {}).get("pad_token_id", 0)) or 0
            if type(image_id) is not int or type(pad_id) is not int:
                raise CheckpointError(f"{where}: image_token_index and pad_token_id must be integers, not {image_id!r}, {pad_id!r}")
            if kind == "llava_next":  # llava-hf lists the official pairs unchanged (transformers reads them as height, width)
                anyres_cfg = AnyResConfig(anyres.parse_pinpoints(cj.get("image_grid_pinpoints", anyres.PINPOINTS),
                                                                 f"{where}: image_grid_pinpoints"), hf)
            sources = [(weight_files(path), HF_KEYS, llama_unused)]
        elif cj.get("image_aspect_ratio") == "anyres":  # official LLaVA-1.6
            for key, default, ok in OFFICIAL_SUPPORTED_NEXT:
                if cj.get(key, default) not in ok:
                    raise CheckpointError(f"{where}: {key} is {cj.get(key, default)!r}, and only the released LLaVA-1.6's "
                                          f"{' or '.join(map(repr, ok))} is supported")
            text, image_id, pad_id = text_config(cj, where), IMAGE_TOKEN_INDEX, 0
            anyres_cfg = AnyResConfig(anyres.parse_pinpoints(cj.get("image_grid_pinpoints"), f"{where}: image_grid_pinpoints"), hf)
            vision = replace(_tower_config(vision_tower or cj["mm_vision_tower"], path),
                             feature_layer=cj.get("mm_vision_select_layer", -2))
            # the tower was fine-tuned and is in the checkpoint: it is the one used
            sources = [(weight_files(path), OFFICIAL_KEYS, lambda k: llama_unused(k) or k.endswith("position_ids"))]
        else:
            for key, default, ok in OFFICIAL_SUPPORTED:
                if cj.get(key, default) not in ok:
                    raise CheckpointError(f"{path}/config.json: {key} is {cj.get(key, default)!r}, and only LLaVA-1.5's "
                                          f"{' or '.join(map(repr, ok))} is supported")
            tower = Path(vision_tower or cj["mm_vision_tower"])
            if not tower.is_dir():
                raise CheckpointError(f"{path} is an official LLaVA-1.5 checkpoint whose vision tower {cj['mm_vision_tower']!r} "
                                      f"is not a local directory: pass vision_tower=DIR (a copy of openai/clip-vit-large-patch14-336)")
            text = LlamaConfig.from_json(cj, f"{path}/config.json")
            vision = replace(ViTConfig.from_json(read_json(tower / "config.json"), tower / "config.json"),
                             feature_layer=cj.get("mm_vision_select_layer", -2))
            image_id, pad_id = IMAGE_TOKEN_INDEX, 0
            # the tower is frozen in LLaVA-1.5, so a copy inside the checkpoint equals CLIP's: dropped, CLIP's is loaded
            drop = lambda k: llama_unused(k) or k.startswith("model.vision_tower.")
            sources = [(weight_files(path), OFFICIAL_KEYS, drop), (weight_files(tower), TOWER_KEYS, clip_unused)]
        with torch.device("meta"):
            model = cls(LLaVAConfig(vision, text, image_id, pad_id, anyres_cfg))
        return load_weights(model, sources, dtype).eval()

    @classmethod
    def from_base(cls, clip_dir, llm_dir, dtype=torch.float32):
        """What stage 1 starts from: a CLIP tower, a Vicuna, and a freshly initialised projector.
        Like llava-hf, the vocabulary gains <image> and <pad> (ids V and V + 1), padded to a multiple of 64."""
        vit, llm = ViT.from_pretrained(clip_dir, dtype), Llama.from_pretrained(llm_dir, dtype)
        V = add_image_tokens(llm)
        with torch.device("meta"):
            model = cls(LLaVAConfig(vit.config, llm.config, image_token_id=V, pad_token_id=V + 1))
        model.vision_tower, model.language_model = vit, llm
        model.multi_modal_projector.to_empty(device=llm.lm_head.weight.device).init_weights()  # PyTorch's default, as official
        model.multi_modal_projector.to(dtype)
        return model

    def save_pretrained(self, out_dir, state_dict=None, max_shard_bytes=5 * 2**30):
        """Safetensors in llava-hf's layout (as llava-hf/llava-1.5-7b-hf or llava-v1.6-*-hf ship), its config.json
        and preprocessor_config.json: transformers' LlavaForConditionalGeneration (LlavaNextForConditionalGeneration
        for an AnyRes model) loads it with from_pretrained(out_dir).
        state_dict: the full weights when this module is sharded (train.py gathers them on rank 0)."""
        if self.image_token_id < 0:
            raise ValueError("the image placeholder is not in the vocabulary (official layout); llava-hf needs an <image> token")
        sd = self.state_dict() if state_dict is None else state_dict
        save_weights({unrename(k, HF_HUB_KEYS): v for k, v in sd.items()}, out_dir, max_shard_bytes)
        pre = self.vision_tower.preprocessor_config()
        kind = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_aspect_ratio": "pad"}
        if self.config.anyres is not None:  # llava-hf's llava_next: the pinpoints' list as the official config has it
            pinpoints = [list(p) for p in self.config.anyres.pinpoints]
            kind = {"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
                    "image_grid_pinpoints": pinpoints, "use_image_newline_parameter": True}
            pre = {**pre, "image_processor_type": "LlavaNextImageProcessor", "image_grid_pinpoints": pinpoints, "do_pad": True}
        write_json(pre, Path(out_dir) / "preprocessor_config.json")
        vision = self.vision_tower.config_json()
        text = {**self.language_model.config_json(), "pad_token_id": self.config.pad_token_id}
        for c in (vision, text):
            c.pop("architectures")
        write_json({**kind, "image_token_index": self.image_token_id, "pad_token_id": self.config.pad_token_id,
                    "image_seq_length": self.config.vision.num_patches, "projector_hidden_act": "gelu",
                    "vision_feature_layer": self.config.vision.feature_layer, "vision_feature_select_strategy": "default",
                    "multimodal_projector_bias": True, "tie_word_embeddings": False,
                    "dtype": str(self.language_model.lm_head.weight.dtype).removeprefix("torch."),
                    "vision_config": vision, "text_config": text}, Path(out_dir) / "config.json")


def text_config(cfg, where):
    """A language model's config (flat in official checkpoints, text_config in llava-hf's) -> LlamaConfig.
    Vicuna, Mistral and Yi are all the Llama block; their defaults differ where it matters, so a config that
    leaves out rope_theta is refused where the default 10000 would be wrong (Mistral-7B-v0.2 uses 1e6, Yi
    5e6). Mistral's sliding window, when one is set, becomes the context limit: no key falls outside it."""
    kind = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral"}.get(cfg.get("model_type"), cfg.get("model_type", "llama"))
    if kind not in ("llama", "mistral"):
        raise CheckpointError(f"{where}: language model type {kind!r}; only Llama and Mistral are supported")
    has_theta = cfg.get("rope_theta") is not None or (cfg.get("rope_parameters") or {}).get("rope_theta") is not None
    if not has_theta and (kind == "mistral" or cfg.get("vocab_size") in (64000, 64064)):
        raise CheckpointError(f"{where}: no rope_theta for a {'Mistral' if kind == 'mistral' else 'Yi'}-shaped "
                              f"language model, whose default (10000) would be wrong; add it to the config")
    if cfg.get("head_dim") not in (None, cfg.get("hidden_size", 0) // max(cfg.get("num_attention_heads", 1), 1)):
        raise CheckpointError(f"{where}: head_dim {cfg['head_dim']} is not hidden_size / num_attention_heads")
    text = LlamaConfig.from_json(cfg, where)  # every value checked, one error naming the key
    window = cfg.get("sliding_window")
    return replace(text, max_position_embeddings=window) if window and window < text.max_position_embeddings else text


def _tower_config(tower, path):
    """LLaVA-1.6's tower shape: a local CLIP directory's config.json (its weights are not read), or CLIP-L/14-336's
    for its hub id (no download needed)."""
    if Path(tower).is_dir():
        return ViTConfig.from_json(read_json(Path(tower) / "config.json"))
    if str(tower).rstrip("/").endswith("clip-vit-large-patch14-336"):
        return VIT_PRESETS["clip-vit-large-patch14-336"]
    raise CheckpointError(f"{path}/config.json: mm_vision_tower {tower!r} is neither a local directory nor "
                          f"openai/clip-vit-large-patch14-336: pass vision_tower=DIR (a CLIP directory) for its shape")
def add_image_tokens(llm):
    """Gives a Llama llava-hf's <image> and <pad> rows (ids V and V + 1, the vocabulary padded to a multiple of 64),
    in place; the new rows start at the mean of the old ones. Returns V."""
    V = llm.config.vocab_size
    V2 = -(-(V + 2) // 64) * 64
    for m in (llm.embed_tokens, llm.lm_head):
        w = m.weight.detach()
        m.weight = nn.Parameter(torch.cat([w, w.mean(0, keepdim=True).expand(V2 - V, -1)]))
    llm.embed_tokens.num_embeddings = llm.lm_head.out_features = V2
    llm.config = replace(llm.config, vocab_size=V2)
    return V


def splice_index(is_image, P, left):
    """Where the splice puts everything, a pure function of where the placeholders are: is_image (B, T) bool
    and P feature rows per image (an int, or (N,) one count per placeholder in row-major order) -> start (B, T), the expanded position of each input token (of a placeholder:
    its first image row), and image (B, T') bool, the positions image rows fill, row-major (so images fill
    them in placeholder order). A placeholder is P wide, any other token 1; T' is the longest row; left=True
    right-aligns the rows (shorter rows start later: left padding, as generation needs), else left-aligns."""
    B, T = is_image.shape
    dev = is_image.device
    P = torch.as_tensor(P, dtype=torch.long, device=dev).expand(int(is_image.sum()))  # (N,) rows per image
    width = torch.ones(B, T, dtype=torch.long, device=dev)
    width[is_image] = P  # (B, T)
    end = width.cumsum(1)  # one past each token's last position
    length = end[:, -1]  # (B,) each row's expanded length
    Tn = int(length.max())
    start = end - width + ((Tn - length)[:, None] if left else 0)
    image = torch.zeros(B, Tn, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)[:, None].expand(B, T)
    offset = torch.arange(int(P.sum()), device=dev) - (P.cumsum(0) - P).repeat_interleave(P)  # 0..P_i-1 per image
    image[rows[is_image].repeat_interleave(P), start[is_image].repeat_interleave(P) + offset] = True
    return start, image


class Expanded(NamedTuple):
    input_ids: torch.Tensor  # (B, T') each placeholder repeated P times, pad_id in the padding
    attention_mask: torch.Tensor  # (B, T') long: 1 for tokens and image rows, 0 for padding
    labels: torch.Tensor  # (B, T') or None: -100 at the image rows past the first and in the padding
    image: torch.Tensor  # (B, T') bool: the positions the image rows fill


def expand_image_tokens(input_ids, image_token_id, P, attention_mask=None, labels=None, left=None, pad_id=0):
    """The prompt with each image placeholder repeated P times (or P[i] times, one count per image), as llava-hf's processor writes it for
    transformers' LlavaForConditionalGeneration, and the layout LLaVA.embed fills. Rows keep their padding
    side: left-padded rows stay right-aligned, right-padded left-aligned. left=True right-aligns rows even
    when the mask has no padding (generation: rows of equal token length but different image counts still
    must end together); None infers it from the mask."""
    if left is None:
        left = attention_mask is not None and bool((attention_mask[:, 0] == 0).any())
    start, image = splice_index(input_ids == image_token_id, P, left)
    B, T = input_ids.shape
    rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, T)

    def place(values, fill):  # each input token's value at its expanded position, fill elsewhere
        out = torch.full(image.shape, fill, dtype=values.dtype, device=values.device)
        out[rows, start] = values
        return out
    ids = place(input_ids, pad_id).masked_fill(image, image_token_id)
    mask = place(torch.ones_like(input_ids) if attention_mask is None else attention_mask.long(), 0).masked_fill(image, 1)
    return Expanded(ids, mask, None if labels is None else place(labels, -100), image)


def sample(logits, temperature, top_p, generator=None):
    """(B, V) logits -> (B,) ids: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(-1, descending=True)
        p[p.cumsum(-1) - p > top_p] = 0  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx, p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
