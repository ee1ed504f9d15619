"""
The training recipes: each stage's hyperparameters (StageRecipe), what both stages share (Recipe), and the named
recipes train.py runs (`--recipe`): the offline world and LLaVA-1.5's official 7B and 13B ones
(scripts/v1_5/pretrain.sh and finetune.sh). Every value has a train.py flag that replaces it.
"""
import json
from dataclasses import dataclass, replace
from pathlib import Path

from nanollava.cli import UserError


@dataclass(frozen=True)
class StageRecipe:
    """The hyperparameters that differ between stage 1 and stage 2."""
    lr: float          # peak learning rate
    batch: int         # global batch in samples, kept constant across world sizes by gradient accumulation
    epochs: float
    micro_batch: int   # samples per device per forward


@dataclass(frozen=True)
class Recipe:
    """Both stages' hyperparameters, what they share and the data they read."""
    stage1: StageRecipe
    stage2: StageRecipe
    data: str                   # manifest.json written by prepare.py
    max_len: int                # tokens per sample, image features included
    grad_checkpointing: bool
    group_by_length: bool       # stage 2: batches of one modality (LLaVA's group_by_modality_length)
    warmup_ratio: float = 0.03  # linear warmup over this fraction of a stage's steps, then cosine to 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0      # global gradient norm


RECIPES = {
    "world": Recipe(StageRecipe(lr=1e-3, batch=32, epochs=1, micro_batch=16), StageRecipe(lr=1e-3, batch=32, epochs=2, micro_batch=16),
                    data="data/world/manifest.json", max_len=512, grad_checkpointing=False, group_by_length=False),
    "llava-1.5-7b": Recipe(StageRecipe(lr=1e-3, batch=256, epochs=1, micro_batch=32), StageRecipe(lr=2e-5, batch=128, epochs=1, micro_batch=16),
                           data="data/llava-1.5/manifest-7b.json", max_len=2048, grad_checkpointing=True, group_by_length=True),
}
RECIPES["llava-1.5-13b"] = replace(RECIPES["llava-1.5-7b"], data="data/llava-1.5/manifest-13b.json")


def read_manifest(path):
    """prepare.py's manifest.json, checked before any work: the base models' folders (clip, vicuna) and each
    stage's data and image_root, as strings (paths relative to the manifest's folder)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: run `python prepare.py` first (or pass --data)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not JSON ({e}): rerun `python prepare.py` or pass another --data") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} is not a manifest (a JSON object with clip, vicuna, stage1 and stage2)")
    for key in ("clip", "vicuna", "stage1", "stage2"):
        value = manifest.get(key)
        if key.startswith("stage"):
            bad = [k for k in ("data", "image_root") if not isinstance(value, dict) or not isinstance(value.get(k), str)]
            key = f"{key}.{bad[0]}" if bad and isinstance(value, dict) else key
        else:
            bad = not isinstance(value, str)
        if bad:
            raise UserError(f"{path} has no {key} path (a manifest names clip, vicuna and each stage's data and image_root)")
    return manifest
