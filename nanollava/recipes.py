"""
The training recipes: each stage's hyperparameters (StageRecipe), what both stages share (Recipe), and the named
recipes train.py runs (`--recipe`): the offline world, LLaVA-1.5's official 7B and 13B ones
(scripts/v1_5/pretrain.sh and finetune.sh), and its LoRA fine-tunes: `-lora` from Vicuna and the released stage-1
projector (finetune_lora.sh), `-task-lora` from a released LLaVA-1.5 on one's own data (finetune_task_lora.sh).
Every value has a train.py flag that replaces it.
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
    micro_batch: int   # samples per device per forward (at most: fit_micro_batch lowers it to divide the batch)
    save_every: int = 50  # optimizer steps between resumable checkpoints


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
    # stage 2 as a fine-tune (nanollava/finetune.py)
    init: str | None = None           # a released LLaVA stage 2 starts from
    projector: str | None = None      # a released stage-1 projector stage 2 starts from (with CLIP + Vicuna)
    lora_r: int = 0                   # 0: the language model trains in full
    lora_alpha: float | None = None   # None: 2 r
    lora_dropout: float = 0.05
    projector_lr: float | None = None  # None: the stage's lr


def fit_micro_batch(stage, hp, world_size):
    """The recipe's stage with the largest micro-batch <= hp.micro_batch for which micro x world_size divides the
    global batch (accumulation makes up the rest), or one sentence saying why none does. Checked before anything
    is loaded: at 16 ranks LLaVA-1.5's 256 / 128 take micro-batches 16 / 8, not 32 / 16."""
    if hp.batch % world_size:
        return f"stage {stage}: the global batch {hp.batch} is not a multiple of the {world_size} processes (pass --batch{stage})"
    micro = max(m for m in range(1, min(hp.micro_batch, hp.batch // world_size) + 1) if hp.batch % (m * world_size) == 0)
    return replace(hp, micro_batch=micro)


RECIPES = {
    "world": Recipe(StageRecipe(lr=1e-3, batch=32, epochs=1, micro_batch=16), StageRecipe(lr=1e-3, batch=32, epochs=2, micro_batch=16),
                    data="data/world/manifest.json", max_len=512, grad_checkpointing=False, group_by_length=False),
    # stage 1: 2,181 steps, a checkpoint is the projector (~250 MB with AdamW); stage 2: 5,198 steps, a checkpoint
    # is the whole LM in fp32 with two AdamW moments (~81 GB for 7B, ~156 GB for 13B), written synchronously:
    # every 1,000 steps makes five of them (SIGTERM still saves at once), not a hundred as every 50 would
    "llava-1.5-7b": Recipe(StageRecipe(lr=1e-3, batch=256, epochs=1, micro_batch=32, save_every=500),
                           StageRecipe(lr=2e-5, batch=128, epochs=1, micro_batch=16, save_every=1000),
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
# finetune_lora.sh: r 128, alpha 256, dropout 0.05, lr 2e-4, mm_projector_lr 2e-5, global batch 128 (16 x 8 GPUs);
# finetune_task_lora.sh: the same from liuhaotian/llava-v1.5-{7,13}b on one's own data (--data FILE --image-root DIR)
LORA = dict(lora_r=128, lora_alpha=256.0, lora_dropout=0.05, projector_lr=2e-5)
for size in ("7b", "13b"):
    full = RECIPES[f"llava-1.5-{size}"]
    stage2 = replace(full.stage2, lr=2e-4)
    RECIPES[f"llava-1.5-{size}-lora"] = replace(full, stage2=stage2, **LORA,
                                                projector=f"checkpoints/llava-v1.5-mlp2x-336px-pretrain-vicuna-{size}-v1.5/mm_projector.bin")
    RECIPES[f"llava-1.5-{size}-task-lora"] = replace(full, stage2=stage2, **LORA, init=f"checkpoints/llava-v1.5-{size}",
                                                     data="data/custom/train.json")
