"""LLaVA-NeXT's AnyRes against transformers' LlavaNext (its PIL image processor and LlavaNextForConditionalGeneration,
on tiny random checkpoints in both layouts), and against hand-worked grids and token counts where the official
conventions and transformers' differ (REFERENCE-NEXT A5, A8)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from transformers import (CLIPVisionConfig, LlamaConfig as HFLlamaConfig, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, MistralConfig)

from nanollava import LLaVA
from nanollava import anyres
from nanollava.anyres import PINPOINTS, num_tokens, process_anyres_image, select_best_resolution, unpad
from nanollava.checkpoint import CheckpointError
from nanollava.llava import PRESETS, expand_image_tokens
from oracles import close, released_config

# ----------------------------------------------------------------------------- preprocessing (the released sizes)

# REFERENCE-NEXT A5's worked examples, official semantics: image (w, h) -> canvas (W, H), kept feature grid
# (rows, cols) after unpadding, tokens = 576 + rows * (cols + 1)
A5 = [((336, 336), (336, 672), (24, 24), 1176), ((300, 200), (336, 672), (16, 24), 976),
      ((640, 480), (672, 672), (36, 48), 2340), ((480, 640), (672, 672), (48, 36), 2352),
      ((1024, 899), (672, 672), (42, 48), 2634), ((1920, 1080), (672, 672), (28, 48), 1948),
      ((800, 800), (672, 672), (48, 48), 2928), ((2000, 500), (1008, 336), (18, 72), 1890),
      ((1000, 3000), (336, 1008), (72, 24), 2376), ((3000, 100), (1008, 336), (2, 72), 722)]


@pytest.mark.parametrize("size, canvas, kept, tokens", A5)
def test_official_grids_and_token_counts(size, canvas, kept, tokens):
    assert select_best_resolution(size, PINPOINTS) == canvas
    W, H = canvas
    u = unpad(size, (H // 336 * 24, W // 336 * 24))
    assert (u.bottom - u.top, u.right - u.left) == kept
    assert num_tokens(size, PINPOINTS, 336, 24) == tokens


def test_small_image_tie_break_and_unpad_rounding():
    """Where transformers differs (A8): an image within 336 x 336 ties on every canvas and the first pinpoint
    wins, read as 336 wide x 672 tall officially (1 column, 2 rows) and 672 wide x 336 tall by transformers;
    352 x 748 keeps a truncated row count officially, a rounded one in transformers."""
    assert anyres.grid_shape((300, 200), PINPOINTS, 336) == (2, 1)
    assert anyres.grid_shape((300, 200), PINPOINTS, 336, hf=True) == (1, 2)
    assert [num_tokens(s, PINPOINTS, 336, 24) for s in [(300, 200), (200, 300), (336, 336)]] == [976, 1476, 1176]
    assert [num_tokens(s, PINPOINTS, 336, 24, hf=True) for s in [(300, 200), (200, 300), (336, 336)]] == [1464, 984, 1176]
    # 352 x 748 lands on 336 x 1008 (3 rows of one tile) in both: a (72, 24) feature map, relatively taller than
    # the image, so rows are cut. The kept height 748 * (24 / 352) is 51 exactly, but 50.99999999999999 in floats:
    # int() keeps 50 (slack 22, 11 cut at each end), transformers' int(round(x, 7)) 51 (slack 21, 10 cut: 52 kept)
    for hf in (False, True):
        assert anyres.grid_shape((352, 748), PINPOINTS, 336, hf) == (3, 1)
    assert unpad((352, 748), (72, 24)) == (11, 61, 0, 24)
    assert unpad((352, 748), (72, 24), hf=True) == (10, 62, 0, 24)
    assert num_tokens((352, 748), PINPOINTS, 336, 24) == 1826     # narrower, so columns are cut
    assert num_tokens((352, 748), PINPOINTS, 336, 24, hf=True) == 1876


def _transformers_processor(tile, pinpoints):
    from transformers import LlavaNextImageProcessorPil
    return LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                      image_grid_pinpoints=[list(p) for p in pinpoints])


@pytest.mark.parametrize("size, hf", [((640, 480), False), ((2000, 500), False), ((1000, 3000), False),
                                      ((1024, 899), False), ((352, 748), False), ((300, 200), True),
                                      ((200, 300), True)])
def test_preprocessing_matches_llava_next_image_processor(size, hf):
    """Tiles equal transformers' LlavaNextImageProcessor (PIL) where the conventions agree (every image that does
    not tie); the small images that tie agree only under transformers' conventions (hf=True)."""
    img = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ref = _transformers_processor(336, PINPOINTS)(img, return_tensors="pt")
    assert ref["image_sizes"][0].tolist() == [size[1], size[0]]  # transformers: (height, width)
    ours = process_anyres_image(img, PINPOINTS, 336, hf=hf)
    assert ours.shape == ref["pixel_values"][0].shape
    close(ours, ref["pixel_values"][0], 1e-6, f"AnyRes tiles of a {size} image vs LlavaNextImageProcessor")


def test_tie_differs_from_transformers_by_default():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    ref = _transformers_processor(336, PINPOINTS)(img, return_tensors="pt")["pixel_values"][0]
    ours = process_anyres_image(img, PINPOINTS, 336)
    assert ours.shape == ref.shape and (ours[0] - ref[0]).abs().max() < 1e-6  # the same base tile
    assert (ours[1:] - ref[1:]).abs().max() > 0.1  # tall canvas officially, wide in transformers


def test_parse_pinpoints_reads_both_forms():
    assert anyres.parse_pinpoints("[(336, 672), (672, 336)]") == ((336, 672), (672, 336))
    assert anyres.parse_pinpoints([[336, 672]]) == ((336, 672),)
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        anyres.parse_pinpoints("[336, 672")


# ----------------------------------------------------------------------------- the model against LlavaNext

TILE = 42  # the tiny tower's image_size: tiles of 42 px, 3 x 3 features each
TINY_PINPOINTS = tuple((a // 8, b // 8) for a, b in PINPOINTS)  # the released pairs at 42 / 336 the scale
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=TILE,
              patch_size=14, projection_dim=32, hidden_act="quick_gelu")
TEXT = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)
IMAGE_ID = 318
# one image per grid shape (rows x cols of tiles), (width, height)
GRIDS = {(2, 1): (30, 70), (1, 2): (70, 30), (2, 2): (80, 70), (1, 3): (120, 35), (3, 1): (35, 120)}


def hf_llava_next(path, text_config=None):
    text_config = text_config or HFLlamaConfig(**TEXT)
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text_config, image_token_index=IMAGE_ID,
                          image_grid_pinpoints=[list(p) for p in TINY_PINPOINTS], vision_feature_layer=-2)
    hf = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random biases and norms, so a wrong mapping cannot hide behind zeros and ones
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.normal_(0.5 if n.endswith("weight") else 0.0, 0.1)
    hf.save_pretrained(path)
    return hf


def images(sizes, seed=0):
    """Random tiles for images of these (width, height) sizes: ours concatenated, transformers' padded
    (N, max tiles, 3, S, S), and transformers' image_sizes (height, width)."""
    g = torch.Generator().manual_seed(seed)
    n = [anyres.num_tiles(s, TINY_PINPOINTS, TILE) for s in sizes]
    tiles = torch.randn(sum(n), 3, TILE, TILE, generator=g)
    padded = torch.zeros(len(sizes), max(n), 3, TILE, TILE)
    for i, t in enumerate(tiles.split(n)):
        padded[i, :len(t)] = t
    return tiles, padded, torch.tensor([[h, w] for w, h in sizes])


def prompts(sizes, image_id, hf=False):
    """One prompt per image, the image in the middle: ours (one placeholder each) and llava-hf's (the
    placeholder repeated once per feature), each a list of (1, T) rows."""
    g = torch.Generator().manual_seed(len(sizes))
    ours, theirs = [], []
    for s in sizes:
        left, right = torch.randint(3, 300, (5,), generator=g).tolist(), torch.randint(3, 300, (4,), generator=g).tolist()
        n = num_tokens(s, TINY_PINPOINTS, TILE, 3, hf)
        ours.append(torch.tensor([[1] + left + [image_id] + right]))
        theirs.append(expand_image_tokens(torch.tensor([[1] + left + [IMAGE_ID] + right]), IMAGE_ID, n).input_ids)
    return ours, theirs


def hf_logits(hf, ids, padded, hw):
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=padded, image_sizes=hw).logits


@pytest.mark.parametrize("grid", list(GRIDS))
def test_logits_match_llava_next_on_each_grid_shape(tmp_path, grid):
    size = GRIDS[grid]
    assert anyres.grid_shape(size, TINY_PINPOINTS, TILE) == grid
    hf = hf_llava_next(tmp_path / "hf")
    tiles, padded, hw = images([size])
    (ours_ids,), (hf_ids,) = prompts([size], IMAGE_ID)
    ref = hf_logits(hf, hf_ids, padded, hw)
    for conventions in ("official", "transformers"):  # no tie, no rounding case: the two agree here
        model = LLaVA.from_pretrained(tmp_path / "hf", conventions=conventions)
        with torch.no_grad():
            close(model(ours_ids, tiles, image_sizes=[size]), ref, 1e-4, f"{grid} grid, {conventions}")
            close(model(ours_ids, padded, image_sizes=[size]), ref, 1e-4, f"{grid} grid, padded tiles")


def test_batch_of_two_tile_counts_and_save_roundtrip(tmp_path):
    """Images with 3 and 5 tiles in one batch (right padding, as in training), each row as transformers
    gives it alone; then nanollava's save loads in transformers with the same logits."""
    sizes = [GRIDS[(2, 1)], GRIDS[(2, 2)]]
    hf = hf_llava_next(tmp_path / "hf")
    model = LLaVA.from_pretrained(tmp_path / "hf")
    tiles, padded, hw = images(sizes)
    ours, theirs = prompts(sizes, IMAGE_ID)
    T = max(x.shape[1] for x in ours)
    ids = torch.cat([torch.nn.functional.pad(x, (0, T - x.shape[1])) for x in ours])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(x), (0, T - x.shape[1])) for x in ours])
    with torch.no_grad():
        out = model(ids, tiles, attention_mask=mask, image_sizes=sizes)
        for i in range(2):
            ref = hf_logits(hf, theirs[i], padded[i:i + 1, :anyres.num_tiles(sizes[i], TINY_PINPOINTS, TILE)], hw[i:i + 1])
            close(out[i:i + 1, :ref.shape[1]], ref, 1e-4, f"row {i} of a batch with 3 and 5 tiles")
    model.save_pretrained(tmp_path / "ours", max_shard_bytes=200_000)
    back = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    again = LLaVA.from_pretrained(tmp_path / "ours")
    assert again.config.anyres == model.config.anyres
    with torch.no_grad():
        close(hf_logits(back, theirs[1], padded[1:], hw[1:]), hf_logits(hf, theirs[1], padded[1:], hw[1:]), 1e-4,
              "transformers loading nanollava's llava_next save")
        close(again(ours[1], padded[1:], image_sizes=sizes[1:]), hf_logits(hf, theirs[1], padded[1:], hw[1:]), 1e-4,
              "nanollava reloading its own save")


def test_tie_break_follows_transformers_by_option(tmp_path):
    """A small image ties: transformers' features equal nanollava's only with conventions='transformers'."""
    size = (30, 20)
    hf = hf_llava_next(tmp_path / "hf")
    model = LLaVA.from_pretrained(tmp_path / "hf", conventions="transformers")
    tiles, padded, hw = images([size])
    (ours_ids,), (hf_ids,) = prompts([size], IMAGE_ID, hf=True)
    with torch.no_grad():
        close(model(ours_ids, tiles, image_sizes=[size]), hf_logits(hf, hf_ids, padded, hw), 1e-4, "tie, transformers")
    official = LLaVA.from_pretrained(tmp_path / "hf")
    assert anyres.grid_shape(size, TINY_PINPOINTS, TILE) != anyres.grid_shape(size, TINY_PINPOINTS, TILE, hf=True)
    with torch.no_grad():
        assert official(ours_ids, tiles, image_sizes=[size]).shape[1] != model(ours_ids, tiles, image_sizes=[size]).shape[1]


def official_layout(hf, path, model_type="llava_llama", tower=None):
    """The liuhaotian/llava-v1.6-* layout of the same weights: a flat config, Vicuna's names, the projector as
    model.mm_projector.{0,2}, model.image_newline and the tuned tower under model.vision_tower.vision_tower."""
    path.mkdir()
    lm = hf.model.language_model
    sd = {"model." + k: v for k, v in lm.state_dict().items()}
    sd["lm_head.weight"] = hf.lm_head.weight
    for i, lin in ((0, hf.model.multi_modal_projector.linear_1), (2, hf.model.multi_modal_projector.linear_2)):
        sd[f"model.mm_projector.{i}.weight"], sd[f"model.mm_projector.{i}.bias"] = lin.weight, lin.bias
    sd["model.image_newline"] = hf.model.image_newline
    for k, v in hf.model.vision_tower.state_dict().items():
        sd["model.vision_tower.vision_tower." + ("" if k.startswith("vision_model.") else "vision_model.") + k] = v
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, path / "model.safetensors")
    # the key set liuhaotian/llava-v1.6-vicuna-7b ships, at the tiny sizes, pinpoints in their string form (both occur)
    cfg = {**released_config("1.6", TEXT, VISION["hidden_size"]), "model_type": model_type,
           "mm_vision_tower": str(tower or "openai/clip-vit-large-patch14-336"),
           "image_grid_pinpoints": str([list(p) for p in TINY_PINPOINTS]), "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_official_layout_uses_the_checkpoint_tower(tmp_path):
    hf = hf_llava_next(tmp_path / "hf")
    clip = tmp_path / "clip"  # only its config is read: the weights come from the checkpoint
    clip.mkdir()
    hf.model.vision_tower.config.save_pretrained(clip)
    d = official_layout(hf, tmp_path / "official", tower=clip)
    model = LLaVA.from_pretrained(d)
    assert model.image_token_id == -200 and model.config.anyres.pinpoints == TINY_PINPOINTS
    sizes = [GRIDS[(1, 3)]]
    tiles, padded, hw = images(sizes)
    (ours_ids,), (hf_ids,) = prompts(sizes, -200)
    with torch.no_grad():
        close(model(ours_ids, tiles, image_sizes=sizes), hf_logits(hf, hf_ids, padded, hw), 1e-4, "official 1.6 layout")
    with pytest.raises(CheckpointError, match="mm_vision_tower"):  # a hub id other than CLIP-L/14-336: no shape known
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "mm_vision_tower": "someone/other-clip"}))
        LLaVA.from_pretrained(d)


@pytest.mark.parametrize("shape", ["mistral", "yi"])
def test_mistral_and_yi_shaped_language_models(tmp_path, shape):
    """GQA (2 key/value heads for 4 query heads) and large rope_theta, read from the checkpoint."""
    gqa = {**TEXT, "num_key_value_heads": 2}
    if shape == "mistral":
        text = MistralConfig(**gqa, rope_theta=1e6, sliding_window=None)
    else:
        text = HFLlamaConfig(**{**gqa, "vocab_size": 384}, rope_theta=5e6)
    hf = hf_llava_next(tmp_path / "hf", text)
    model = LLaVA.from_pretrained(tmp_path / "hf")
    assert model.config.text.rope_theta == (1e6 if shape == "mistral" else 5e6)
    assert model.config.text.num_key_value_heads == 2
    sizes = [GRIDS[(2, 2)]]
    tiles, padded, hw = images(sizes)
    (ours_ids,), (hf_ids,) = prompts(sizes, IMAGE_ID)
    with torch.no_grad():
        close(model(ours_ids, tiles, image_sizes=sizes), hf_logits(hf, hf_ids, padded, hw), 1e-4, f"{shape}-shaped LM")
    if shape == "mistral":  # a Mistral text_config without rope_theta would mean 10000, not Mistral's 1e6
        cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
        for key in ("rope_theta", "rope_parameters"):
            cfg["text_config"].pop(key, None)
        (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match="rope_theta"):
            LLaVA.from_pretrained(tmp_path / "hf")


def test_cached_greedy_generation_equals_full_forward(tmp_path):
    hf_llava_next(tmp_path / "hf")
    model = LLaVA.from_pretrained(tmp_path / "hf")
    sizes = [GRIDS[(1, 3)]]
    tiles, _, _ = images(sizes)
    (ids,), _ = prompts(sizes, IMAGE_ID)
    out = model.generate(ids, tiles, max_new_tokens=20, eos_id=-1, image_sizes=sizes)[0]
    seq = ids
    with torch.no_grad():
        for _ in range(20):
            nxt = model(seq, tiles, image_sizes=sizes)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert out.tolist() == seq[0, ids.shape[1]:].tolist()


def test_presets_match_transformers_parameter_counts():
    """The four 1.6 presets, built on the meta device, hold as many parameters as transformers' LlavaNext
    built from the same shapes (the vision tower's unused last layer and post-LayerNorm included)."""
    for name, kind in [("llava-1.6-vicuna-7b", HFLlamaConfig), ("llava-1.6-vicuna-13b", HFLlamaConfig),
                       ("llava-1.6-mistral-7b", MistralConfig), ("llava-1.6-34b", HFLlamaConfig)]:
        cfg = PRESETS[name]
        t = cfg.text
        text = kind(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                    num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                    num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
                    rope_theta=t.rope_theta, tie_word_embeddings=False)
        v = cfg.vision
        vision = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, image_size=v.image_size,
                                  patch_size=v.patch_size, num_hidden_layers=v.num_hidden_layers,
                                  num_attention_heads=v.num_attention_heads, projection_dim=768)
        with torch.device("meta"):
            ours = LLaVA(cfg)
            theirs = LlavaNextForConditionalGeneration(LlavaNextConfig(vision_config=vision, text_config=text))
        n = sum(p.numel() for p in ours.parameters())
        assert n == sum(p.numel() for p in theirs.parameters()), name
        assert ours.config.anyres.pinpoints == PINPOINTS
