"""
Stage 2 from something other than this run's stage 1, as LLaVA's users fine-tune (train.py's --init, --projector,
--lora-r and a plain LLaVA data file): what the model starts from, which of it learns, and how a LoRA run is
written. train.py's loop, sharding and checkpoints are the same for all of it.

- `--init DIR`: a released LLaVA in any layout LLaVA.from_pretrained reads. An official (liuhaotian) checkpoint
  has no <image> row in its vocabulary; it gains llava-hf's <image> and <pad> (add_image_tokens), so that the
  export is an ordinary llava-hf checkpoint.
- `--projector FILE`: CLIP + Vicuna and a released stage-1 projector, the official mm_projector.bin
  (model.mm_projector.{0,2}.*) or nanollava's projector.safetensors (multi_modal_projector.linear_{1,2}.*).
- `--lora-r R`: adapters on the seven linear layers of every language-model block (nanollava/lora.py), the
  projector in full; the frozen base gets neither gradients nor optimizer state, so checkpoints hold A, B and the
  projector only. The export is the merged model (OUT/stage2/model) and the adapter in PEFT's format
  (OUT/stage2/adapter), written from the weights gathered on rank 0.

Everything a user can get wrong is checked by `preflight` before train.py writes anything: one sentence naming
the file or key (FinetuneError; train.py exits 2).
"""
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


from nanollava import lora
from nanollava.checkpoint import CheckpointError, iter_tensors, read_json, rename
from nanollava.data import DataError, LLaVADataset
from nanollava.llava import HF_KEYS, OFFICIAL_KEYS, LLaVA, add_image_tokens, layout_of


class FinetuneError(ValueError):
    """A bad --init, --projector, --data or flag combination: one sentence naming it."""


@dataclass(frozen=True)
class Finetune:
    """train.py's fine-tuning flags, resolved against the recipe."""
    init: str | None = None            # a released LLaVA directory (stage 2 starts from all of it)
    projector: str | None = None       # a stage-1 projector file (stage 2 from CLIP + Vicuna + it)
    vision_tower: str | None = None    # CLIP: for --projector / a data file, or an official --init's tower
    language_model: str | None = None  # Vicuna, for --projector / a data file
    lora_r: int = 0                    # 0: full fine-tuning of the language model
    lora_alpha: float | None = None    # None: 2 r, as the official scripts (r 128, alpha 256)
    lora_dropout: float = 0.05
    projector_lr: float | None = None  # None: the stage's learning rate

    @property
    def alpha(self):
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_r


def is_manifest(path):
    """prepare.py's manifest (a JSON object) or a LLaVA data file (a JSON list, or JSONL). A file that is neither
    (missing, not JSON) counts as a manifest, so that read_manifest names what is wrong with it."""
    try:
        return not isinstance(json.loads(Path(path).read_text(encoding="utf-8")), list)
    except (OSError, UnicodeDecodeError):
        return True
    except json.JSONDecodeError:  # JSONL is not one JSON value; anything else is a broken manifest
        return Path(path).suffix != ".jsonl"


def data_manifest(data, image_root, vision_tower, language_model, init):
    """The manifest train.py reads for one LLaVA data file: its stage 2 entry, and CLIP and Vicuna from the flags
    (unused with --init, which holds both). Paths are absolute, so the manifest's folder does not matter."""
    if image_root is None:
        raise FinetuneError(f"--data {data} is a LLaVA data file: pass --image-root DIR, the folder its 'image' paths are relative to")
    if init is None and (vision_tower is None or language_model is None):
        raise FinetuneError(f"--data {data} is a LLaVA data file: pass --init DIR (a LLaVA), or --vision-tower DIR and --language-model DIR (CLIP and Vicuna)")
    absolute = lambda p: str(Path(p).resolve()) if p else None
    return {"clip": absolute(vision_tower or init), "vicuna": absolute(language_model or init),
            "stage2": {"data": absolute(data), "image_root": absolute(image_root)}}


def projector_tensors(path, vision_dim, text_dim):
    """{projector parameter name: tensor} from an official mm_projector.bin or nanollava's projector.safetensors,
    checked against the shapes a (vision_dim -> text_dim) projector has."""
    want = {"linear_1.weight": (text_dim, vision_dim), "linear_1.bias": (text_dim,),
            "linear_2.weight": (text_dim, text_dim), "linear_2.bias": (text_dim,)}
    out = {}
    for f, key, t in iter_tensors([Path(path)]):
        name = (rename(key, OFFICIAL_KEYS[:2]) or rename(key, HF_KEYS) or "").removeprefix("multi_modal_projector.")
        if name not in want:
            raise FinetuneError(f"{f}: {key} is not a projector weight (an mm_projector.bin holds model.mm_projector.{{0,2}}."
                                f"{{weight,bias}}, a projector.safetensors multi_modal_projector.linear_{{1,2}}.*)")
        if tuple(t.shape) != want[name]:
            raise FinetuneError(f"{f}: {key} has shape {tuple(t.shape)}, and this CLIP ({vision_dim}) and language model "
                                f"({text_dim}) need {want[name]}")
        out[name] = t
    if set(out) != set(want):
        raise FinetuneError(f"{path}: no {', '.join(sorted(set(want) - set(out)))} (a projector has two linear layers)")
    return out


def hidden_sizes(clip_dir, llm_dir):
    vision = read_json(Path(clip_dir) / "config.json")
    return vision.get("vision_config", vision)["hidden_size"], read_json(Path(llm_dir) / "config.json")["hidden_size"]


def preflight(ft, stage, manifest, data_dir, tok, max_len):
    """Every check of the fine-tuning inputs that can fail, before anything is written; raises FinetuneError."""
    given = [f for f, v in (("--init", ft.init), ("--projector", ft.projector), ("--lora-r", ft.lora_r)) if v]
    if stage == "1" and given:
        raise FinetuneError(f"{given[0]} fine-tunes stage 2 and --stage is 1: pass --stage 2")
    if stage == "both" and (ft.init or ft.projector):
        raise FinetuneError(f"{given[0]} starts stage 2 from a released model: pass --stage 2")
    if ft.init and ft.projector:
        raise FinetuneError("--init gives the whole model, projector included: pass --init or --projector, not both")
    if ft.lora_r < 0 or (ft.lora_r and ft.alpha <= 0) or not 0 <= ft.lora_dropout < 1:
        raise FinetuneError(f"--lora-r {ft.lora_r}, --lora-alpha {ft.alpha}, --lora-dropout {ft.lora_dropout}: r >= 0, alpha > 0 and dropout in [0, 1)")
    try:
        if ft.init:
            layout_of(Path(ft.init), read_json(Path(ft.init) / "config.json"))  # a plain Vicuna or CLIP is named here
        if ft.projector:
            projector_tensors(ft.projector, *hidden_sizes(data_dir / manifest["clip"], data_dir / manifest["vicuna"]))
    except (CheckpointError, OSError, KeyError) as e:
        raise FinetuneError(str(e)) from None
    files = manifest["stage2"]
    try:
        ds = LLaVADataset(data_dir / files["data"], data_dir / files["image_root"], tok, "vicuna_v1", 0, max_len=max_len)
    except DataError as e:
        raise FinetuneError(str(e)) from None
    if len(ds) == 0:
        raise FinetuneError(f"{ds.summary()}: no row is usable")


def tokenizer_dir(ft, manifest_vicuna):
    """Where the tokenizer is: the --init model's own, else Vicuna's."""
    return Path(ft.init) if ft.init else manifest_vicuna


def build(ft, clip_dir, llm_dir, stage1_projector):
    """Stage 2's model before sharding, requires_grad set: from --init, or CLIP + Vicuna + a projector (--projector,
    else this run's stage 1), LoRA injected when --lora-r is given."""
    if ft.init:
        try:
            model = LLaVA.from_pretrained(ft.init, vision_tower=ft.vision_tower).train()
        except CheckpointError as e:
            raise FinetuneError(str(e)) from None
        if model.image_token_id < 0:  # official layout: no <image> in the vocabulary
            V = add_image_tokens(model.language_model)
            model.config.text, model.config.image_token_id, model.config.pad_token_id = model.language_model.config, V, V + 1
    else:
        model = LLaVA.from_base(clip_dir, llm_dir)
        source = Path(ft.projector or stage1_projector)
        if not source.is_file():
            raise FinetuneError(f"stage 2 starts from stage 1's projector, and {source} does not exist: run --stage 1 first (or pass --projector FILE)")
        model.multi_modal_projector.load_state_dict(projector_tensors(source, model.config.vision.hidden_size, model.config.text.hidden_size))
    model.requires_grad_(False)
    if ft.lora_r:
        lora.inject(model, ft.lora_r, ft.alpha, ft.lora_dropout)
        lora.mark_trainable(model)
    else:
        model.multi_modal_projector.requires_grad_(True)
        model.language_model.requires_grad_(True)
    return model


def export_lora(model, full, final, tok, base_name):
    """Rank 0, from the gathered weights `full`: OUT/stage2/adapter (PEFT's format) and the merged model
    OUT/stage2/model (llava-hf layout). The adapter is renamed into place first: `final` existing means done."""
    adapter, tmp = final.with_name("adapter"), final.with_name("adapter.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lora.save_adapter(model, tmp, state_dict=full, base_model_name_or_path=base_name)
    shutil.rmtree(adapter, ignore_errors=True)
    os.replace(tmp, adapter)
    merged = {}
    for name, m in lora.lora_layers(model).items():  # W + (alpha / r) B A in fp32, as LoRALinear.delta
        A, B = full.pop(f"{name}.lora_A.weight").float(), full.pop(f"{name}.lora_B.weight").float()
        merged[f"{name}.weight"] = full[f"{name}.weight"].float() + B @ A * m.scale
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict={k: merged.get(k, v).float() for k, v in full.items()})
    tok.save(tmp)
    os.replace(tmp, final)
