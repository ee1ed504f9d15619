"""
The training recipes: each stage's hyperparameters (StageRecipe), what both stages share (Recipe), and the named
recipes train.py runs (`--recipe`): the offline world, LLaVA-1.5's official 7B and 13B ones
(scripts/v1_5/pretrain.sh and finetune.sh), and its LoRA fine-tunes: `-lora` from Vicuna and the released stage-1
projector (finetune_lora.sh), `-task-lora` from a released LLaVA-1.5 on one's own data (finetune_task_lora.sh).
Every value has a train.py flag that replaces it.
"""
from dataclasses import dataclass, replace


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
    # stage 2 as a fine-tune (nanollava/finetune.py)
    init: str | None = None           # a released LLaVA stage 2 starts from
    projector: str | None = None      # a released stage-1 projector stage 2 starts from (with CLIP + Vicuna)
    lora_r: int = 0                   # 0: the language model trains in full
    lora_alpha: float | None = None   # None: 2 r
    lora_dropout: float = 0.05
    projector_lr: float | None = None  # None: the stage's lr


RECIPES = {
    "world": Recipe(StageRecipe(lr=1e-3, batch=32, epochs=1, micro_batch=16), StageRecipe(lr=1e-3, batch=32, epochs=2, micro_batch=16),
                    data="data/world/manifest.json", max_len=512, grad_checkpointing=False, group_by_length=False),
    "llava-1.5-7b": Recipe(StageRecipe(lr=1e-3, batch=256, epochs=1, micro_batch=32), StageRecipe(lr=2e-5, batch=128, epochs=1, micro_batch=16),
                           data="data/llava-1.5/manifest-7b.json", max_len=2048, grad_checkpointing=True, group_by_length=True),
}
RECIPES["llava-1.5-13b"] = replace(RECIPES["llava-1.5-7b"], data="data/llava-1.5/manifest-13b.json")
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
