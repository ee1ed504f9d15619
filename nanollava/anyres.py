"""
AnyRes, the high-resolution input of LLaVA-NeXT / LLaVA-1.6 ("LLaVA-NeXT: Improved reasoning, OCR, and world
knowledge", Liu et al., January 2024), as the official haotian-liu/LLaVA code computes it
(llava/mm_utils.py `process_anyres_image`, llava/model/llava_arch.py `unpad_image` and the spatial_unpad merge),
for the checkpoints liuhaotian/llava-v1.6-* and llava-hf/llava-v1.6-*-hf.

An image (w, h) -> the best canvas among the pinpoints -> resized keeping its aspect ratio, centred on black
-> cut into rows x cols tiles of the tower's side S, row-major, after a base tile (the whole image squashed to
S x S) -> (1 + rows*cols, 3, S, S). Each tile gives p x p features (p = S / patch, 24 for CLIP-L/14-336);
the grid is merged into one (C, rows*p, cols*p) map, the rows or columns that show only padding are cut
("unpad"), a learned image_newline closes every row, and the base tile's p*p features go first:
p*p + kept_rows * (kept_cols + 1) tokens (576 + ... for the released models, at most 2928).

Sizes are (width, height) throughout, as PIL and the official code have them, and so are the pinpoints.
transformers' LlavaNext reads both as (height, width); `hf=True` follows its conventions where they give a
different result (REFERENCE-NEXT A8):
- the tie-break: the pinpoints are swapped before choosing, so among equally good canvases the first listed
  pair wins as (height, width). Any image no larger than S on both sides ties: the official code takes
  [336, 672] as 336 wide x 672 tall (1 x 2 tiles), transformers as 672 wide x 336 tall (2 x 1).
- the unpad rounding: transformers keeps int(round(x, 7)) rows, the official code int(x); they differ where
  float error puts x just below an integer (352 x 748: 1826 tokens officially, 1876 in transformers).
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from PIL import Image

from nanollava.data import CLIP_MEAN, CLIP_STD, load_image

# the released 1.6 models' image_grid_pinpoints, (width, height) as the official code reads them
PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class AnyResConfig:
    """What LLaVAConfig.anyres holds: the canvases, and whose conventions decide ties and rounding. The tile
    side is the tower's image_size (the official code and transformers both take it from the tower)."""
    pinpoints: tuple = PINPOINTS  # (width, height) pairs, as the official code reads image_grid_pinpoints
    hf: bool = False  # transformers' conventions instead: pinpoints read as (height, width), unpad rounds


def parse_pinpoints(value, where="image_grid_pinpoints"):
    """A config's image_grid_pinpoints, a list of pairs or its string form "[(336, 672), ...]" (both occur in
    official configs) -> a tuple of (int, int) pairs; anything else is one error naming the key."""
    if isinstance(value, str):
        import ast
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{where}: {value!r} is not a list of pairs") from None
    try:
        pairs = tuple((int(a), int(b)) for a, b in value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a list of pairs") from None
    if not pairs or any(a <= 0 or b <= 0 for a, b in pairs):
        raise ValueError(f"{where}: {value!r} needs at least one pair of positive sizes")
    return pairs


def select_best_resolution(size, pinpoints, hf=False):
    """(w, h) -> the (W, H) canvas with the most effective pixels (the image's pixels once it is downscaled
    to fit: upscaling earns nothing), then the least waste; on a full tie the first wins (strict compares).
    hf=True reads each pinpoint as (height, width), as transformers does."""
    w, h = size
    best, best_eff, best_waste = None, 0, float("inf")
    for W, H in ((b, a) for a, b in pinpoints) if hf else pinpoints:
        scale = min(W / w, H / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = W * H - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (W, H), eff, waste
    return best


def grid_shape(size, pinpoints, tile, hf=False):
    """(rows, cols) of tiles an image of size (w, h) is cut into (official get_anyres_image_grid_shape
    returns them as (cols, rows))."""
    W, H = select_best_resolution(size, pinpoints, hf)
    return H // tile, W // tile


def resize_and_pad(img, canvas):
    """Official resize_and_pad_image: the limiting side gets the canvas size, the other ceil(side * scale)
    (at most the canvas), PIL's default filter (bicubic for RGB); pasted at floor(slack / 2) on black."""
    (w, h), (W, H) = img.size, canvas
    scale_w, scale_h = W / w, H / h  # the scale first, then the product, as the official code: 200 x 300 into
    if scale_w < scale_h:            # 672 x 336 gives ceil(200 * 1.12) = ceil(224.00000000000003) = 225, not 224
        nw, nh = W, min(math.ceil(h * scale_w), H)
    else:
        nw, nh = min(math.ceil(w * scale_h), W), H
    out = Image.new("RGB", (W, H), (0, 0, 0))
    out.paste(img.resize((nw, nh)), ((W - nw) // 2, (H - nh) // 2))
    return out


def process_anyres_image(img, pinpoints=PINPOINTS, tile=336, hf=False, mean=CLIP_MEAN, std=CLIP_STD):
    """A PIL image -> (1 + rows*cols, 3, tile, tile): the base tile (the whole image resized to tile x tile,
    aspect ratio ignored), then the canvas' tiles row-major (top row left to right first), each rescaled to
    [0, 1] and normalised with CLIP's mean and std (CLIPImageProcessor's resize and crop are no-ops on
    tile x tile inputs). Pass the image's size, img.size, to the model with it."""
    img = img.convert("RGB")
    canvas = resize_and_pad(img, select_best_resolution(img.size, pinpoints, hf))
    W, H = canvas.size
    tiles = [img.resize((tile, tile))] + [canvas.crop((x, y, x + tile, y + tile))
                                          for y in range(0, H, tile) for x in range(0, W, tile)]
    return torch.stack([load_image(t, tile, pad=False, mean=mean, std=std) for t in tiles])


class Unpad(NamedTuple):
    top: int  # rows [top, bottom) and columns [left, right) of the merged feature map are kept
    bottom: int
    left: int
    right: int


def unpad(size, map_hw, hf=False):
    """Official unpad_image's arithmetic: which part of a (rows*p, cols*p) feature map shows the image of
    size (w, h) rather than the black padding. The relatively wider side is full; the other keeps
    int(side * scale) (transformers: int(round(x, 7))), with floor(slack / 2) cut at each end, so the kept
    count is one more than that when the slack is odd."""
    (w, h), (mh, mw) = size, map_hw
    if w / h > mw / mh:
        x = h * (mw / w)
        pad = (mh - int(round(x, 7) if hf else x)) // 2
        return Unpad(pad, mh - pad, 0, mw)
    x = w * (mh / h)
    pad = (mw - int(round(x, 7) if hf else x)) // 2
    return Unpad(0, mh, pad, mw - pad)


def num_tiles(size, pinpoints, tile, hf=False):
    rows, cols = grid_shape(size, pinpoints, tile, hf)
    return 1 + rows * cols


def num_tokens(size, pinpoints, tile, patches, hf=False):
    """Features an image of size (w, h) becomes: patches^2 (the base tile) + kept_rows * (kept_cols + 1).
    patches: features per tile side (tile / patch size; 24 for CLIP-L/14-336)."""
    rows, cols = grid_shape(size, pinpoints, tile, hf)
    u = unpad(size, (rows * patches, cols * patches), hf)
    return patches * patches + (u.bottom - u.top) * (u.right - u.left + 1)


def merge_features(feats, size, pinpoints, tile, newline, hf=False):
    """One image's projected tile features (1 + rows*cols, p*p, C), base tile first -> (num_tokens, C):
    the base tile's p*p, then the grid merged into one map, unpadded, with `newline` (C,) after every row
    (official spatial_unpad)."""
    n, P, C = feats.shape
    p = math.isqrt(P)
    rows, cols = grid_shape(size, pinpoints, tile, hf)
    if n != 1 + rows * cols:
        raise ValueError(f"an image of size {tuple(size)} has {1 + rows * cols} tiles with these pinpoints, got {n}")
    grid = feats[1:].view(rows, cols, p, p, C).permute(4, 0, 2, 1, 3).reshape(C, rows * p, cols * p)  # (C, H', W')
    u = unpad(size, grid.shape[1:], hf)
    grid = grid[:, u.top:u.bottom, u.left:u.right]
    grid = torch.cat([grid, newline.to(grid.dtype)[:, None, None].expand(C, grid.shape[1], 1)], dim=2)
    return torch.cat([feats[0], grid.flatten(1).T])  # (p*p + kept_rows * (kept_cols + 1), C)
