"""
Trains LLaVA-1.5's two stages through one FSDP loop.

Stage 1 (feature alignment): tower and language model frozen, the projector learns on captions ("plain").
Stage 2 (visual instruction tuning): the projector and the language model learn on conversations ("vicuna_v1").

  python train.py                                            # both stages on prepare.py's world, one CPU process
  torchrun --standalone --nproc_per_node=2 train.py          # the same on two processes (gloo on CPU, nccl on GPU)
  torchrun --standalone --nproc_per_node=8 --shutdown-timeout 900 train.py --recipe llava-1.5-7b   # one 8-GPU node;
                                                             # SIGTERM's save gets 900 s before torchrun's SIGKILL
  torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      train.py --recipe llava-1.5-13b                        # two nodes (node_rank=1 on the other)

Notable:
- FSDP2 (`fully_shard`) on every language-model block and at the root; the frozen CLIP tower is replicated
  (no gradients, no optimizer state, no collectives) and the small projector is replicated with its
  gradients all-reduced once per step, so a rank whose micro-batch has no image never stalls the others.
- The loss is the mean over the supervised tokens of the whole global batch: micro-batches return summed
  losses and are scaled by the global token count, so accumulation and padding do not change it.
- Checkpoints (torch.distributed.checkpoint) are written to a temporary directory and renamed when
  complete; `latest` names the last good one. kill -9 and rerun resumes step for step; SIGTERM saves and exits.
- What is distributed about the loop (sharding, collectives, checkpoints) is in nanollava/fsdp.py.
- A user's failure (a flag out of range, a bad manifest, base, dataset row or checkpoint, a full disk, a second
  run into the same --out) is one sentence, printed once by rank 0 (nanollava/cli.py; README: Reliability).
"""
import argparse
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import kernels
from nanollava import LLaVA, finetune
from nanollava.checkpoint import CheckpointError, write_safetensors
from nanollava.cli import Parser, UserError, checked, lock_dir, one_sentence
from nanollava.data import LLaVADataset, batch_indices, collate
from nanollava.templates import DataError
from nanollava.flops import peak_flops, step_flops
from nanollava.fsdp import (all_sum, check_shared_out, clip_grad_norm, ignore_sigterm, init_group, load_checkpoint, reduce_sum,
                            save_checkpoint, shard, trim_log)
from nanollava.recipes import RECIPES, Recipe, fit_micro_batch, read_manifest
from nanollava.schedule import cosine_lr
from nanollava.tokenizer import TokenizerError, load_tokenizer

POSITIVE = checked(int, lambda n: n > 0, "1 or more")
parser = Parser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--recipe", default="world", choices=list(RECIPES), help="hyperparameters and data: the offline world or the official LLaVA-1.5 recipe")
# the recipe's values: each flag given replaces one (recipe_from_args)
parser.add_argument("--data", help="manifest.json written by prepare.py (default: the recipe's)")
parser.add_argument("--lr1", type=checked(float, lambda x: x >= 0, "0 or more"), help="stage-1 peak learning rate")
parser.add_argument("--lr2", type=checked(float, lambda x: x >= 0, "0 or more"), help="stage-2 peak learning rate")
parser.add_argument("--batch1", type=POSITIVE, help="stage-1 global batch (kept constant across world sizes by accumulation)")
parser.add_argument("--batch2", type=POSITIVE, help="stage-2 global batch")
parser.add_argument("--epochs1", type=checked(float, lambda x: 0 <= x < math.inf, "0 or more"), help="stage-1 epochs")
parser.add_argument("--epochs2", type=checked(float, lambda x: 0 <= x < math.inf, "0 or more"), help="stage-2 epochs")
parser.add_argument("--micro-batch", type=POSITIVE, help="samples per device per forward, both stages")
parser.add_argument("--max-len", type=POSITIVE, help="maximum sequence length, image features included")
parser.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, help="recompute language-model activations in backward")
parser.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, help="stage 2: batches of one modality (LLaVA's group_by_modality_length)")
parser.add_argument("--warmup-ratio", type=checked(float, lambda x: 0 <= x <= 1, "in [0, 1]"), help="linear warmup over this fraction of the steps, then cosine to 0 (recipe: 0.03)")
parser.add_argument("--weight-decay", type=checked(float, lambda x: x >= 0, "0 or more"), help="AdamW weight decay (recipe: 0)")
parser.add_argument("--grad-clip", type=checked(float, lambda x: x > 0, "more than 0"), help="clip the global gradient norm to this (recipe: 1.0)")
# the run: which stages, where, how often to save, how to compute
parser.add_argument("--stage", default="both", choices=["1", "2", "both"], help="which stage(s) to run; stage 2 starts from stage 1's projector")
parser.add_argument("--out", default="out", help="output directory: OUT/stage1, OUT/stage2/model, OUT/log.jsonl")
parser.add_argument("--max-steps", type=checked(int, lambda n: n == -1 or n > 0, "-1 or 1 or more"), default=-1, help="stop each stage after this many optimizer steps (-1: the recipe's epochs)")
parser.add_argument("--save-every", type=POSITIVE, help="write a resumable checkpoint every N optimizer steps (default: the recipe's, per stage)")
parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True, help="resume from the latest checkpoint in --out if there is one")
parser.add_argument("--seed", type=int, default=1337, help="seeds the projector's init and the data order")
parser.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"], help="attention and RMSNorm: Triton kernels, PyTorch, or Triton on GPU only")
parser.add_argument("--compile", action="store_true", help="torch.compile each language-model block")
parser.add_argument("--workers", type=checked(int, lambda n: n >= 0, "0 or more"), help="data-loading processes per rank (default: 4 on GPU, 0 on CPU)")
parser.add_argument("--accumulate-unsharded", action="store_true", help="reduce-scatter gradients once per step, not per "
                    "micro-batch: less traffic, but a full fp32 gradient per GPU between micro-batches (27 GB for 7B)")
parser.add_argument("--timeout-min", type=checked(float, lambda m: m > 0, "above 0"), default=60, help="collective timeout in minutes (covers rank 0's export)")
parser.add_argument("--strict", action="store_true", help="stop at the first bad dataset row instead of skipping it")
# fine-tuning (nanollava/finetune.py): stage 2 from a released LLaVA or a released projector, in full or with LoRA
parser.add_argument("--init", help="stage 2 from this released LLaVA (official or llava-hf layout) instead of stage 1's projector")
parser.add_argument("--projector", help="stage 2 from CLIP + Vicuna and this stage-1 projector (official mm_projector.bin or projector.safetensors)")
parser.add_argument("--image-root", help="with --data a LLaVA JSON/JSONL file: the folder its 'image' paths are relative to")
parser.add_argument("--vision-tower", help="CLIP directory: with a data file, or the tower of an official --init whose mm_vision_tower is not local")
parser.add_argument("--language-model", help="Vicuna directory, with a data file and no --init")
parser.add_argument("--lora-r", type=int, help="LoRA rank on the language model's seven linear layers per block (0: full fine-tuning)")
parser.add_argument("--lora-alpha", type=float, help="LoRA alpha; the update is scaled by alpha / r (default: 2 r)")
parser.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input (recipe: 0.05)")
parser.add_argument("--projector-lr", type=float, help="stage 2: the projector's peak learning rate (default: --lr2)")


def recipe_from_args(args):
    """The recipe --recipe names, each value given by a flag replacing the recipe's."""
    def given(**values):
        return {k: v for k, v in values.items() if v is not None}
    recipe = RECIPES[args.recipe]
    stage1 = replace(recipe.stage1, **given(lr=args.lr1, batch=args.batch1, epochs=args.epochs1, micro_batch=args.micro_batch))
    stage2 = replace(recipe.stage2, **given(lr=args.lr2, batch=args.batch2, epochs=args.epochs2, micro_batch=args.micro_batch))
    return replace(recipe, stage1=stage1, stage2=stage2, **given(
        data=args.data, max_len=args.max_len, grad_checkpointing=args.grad_checkpointing, group_by_length=args.group_by_length,
        warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, grad_clip=args.grad_clip, init=args.init,
        projector=args.projector, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        projector_lr=args.projector_lr))


@dataclass
class Run:
    """What the stages of one run share: the recipe, this process's place in the group, the files, the tokenizer,
    and the flags that are not hyperparameters."""
    recipe: Recipe
    rank: int
    world_size: int
    device: torch.device
    manifest: dict
    data_dir: Path       # the manifest's folder: the paths in the manifest are relative to it
    out: Path            # OUT/stage1, OUT/stage2
    log_path: Path       # OUT/log.jsonl, one record per step
    tok: object          # Vicuna's tokenizer with <image> and <pad> added
    seed: int
    max_steps: int       # per stage; -1: the recipe's epochs
    save_every: int      # None: the recipe's per stage
    resume: bool
    compile: bool
    workers: int         # data-loading processes per rank
    strict: bool         # a bad dataset row stops the run instead of being skipped
    sigterm: bool = False  # set by the SIGTERM handler; the ranks agree on it once per step
    lock: object = None    # rank 0: the open OUT/.lock, held while the run lives
    accumulate_unsharded: bool = False  # one reduce-scatter per step: full unsharded gradients between micro-batches
    tune: finetune.Finetune = finetune.Finetune()  # --init, --projector, LoRA (nanollava/finetune.py)

    def path(self, name):
        return self.data_dir / name


def main(args):
    recipe = recipe_from_args(args)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    fitted = {k: fit_micro_batch(k, hp, world_size) for k, hp in ((1, recipe.stage1), (2, recipe.stage2))}  # before loading anything
    if bad := [v for v in fitted.values() if isinstance(v, str)]:
        parser.error(bad[0])
    recipe = replace(recipe, stage1=fitted[1], stage2=fitted[2])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 projector's matmuls (the LM computes in bf16)
    else:
        device = torch.device("cpu")
    init_group(device, args.timeout_min)  # one process: a group of one, so the code path is the same
    kernels.use(args.kernels)
    manifest_path = Path(recipe.data)
    tune = finetune.Finetune(recipe.init, recipe.projector, args.vision_tower, args.language_model, recipe.lora_r,
                             recipe.lora_alpha, recipe.lora_dropout, recipe.projector_lr)
    try:  # fine-tuning's inputs are checked before anything is written: one sentence, exit 2
        manifest = (read_manifest(manifest_path) if finetune.is_manifest(manifest_path) else
                    finetune.data_manifest(manifest_path, args.image_root, args.vision_tower, args.language_model, tune.init))
        tok = load_tokenizer(finetune.tokenizer_dir(tune, manifest_path.parent / manifest["vicuna"]))
        tok.add_special_tokens(["<image>", "<pad>"])
        finetune.preflight(tune, args.stage, manifest, manifest_path.parent, tok, recipe.max_len)
    except (ValueError, OSError) as e:  # FinetuneError, TokenizerError, DataError
        parser.exit(2, f"error: {e}\n")
    out = Path(args.out)
    run = Run(recipe, dist.get_rank(), dist.get_world_size(), device, manifest, manifest_path.parent, out, out / "log.jsonl", tok,
              args.seed, args.max_steps, args.save_every, args.resume, args.compile,
              workers=args.workers if args.workers is not None else (4 if device.type == "cuda" else 0), strict=args.strict,
              accumulate_unsharded=args.accumulate_unsharded, tune=tune)
    if run.rank == 0:
        print(f"nanollava train: {json.dumps({**vars(args), 'resolved': asdict(recipe), 'world_size': run.world_size, 'device': str(device)})}", flush=True)
    run.out.mkdir(parents=True, exist_ok=True)
    # one run per --out: rank 0 holds OUT/.lock until it exits; every rank learns whether it got it
    failure = None
    if run.rank == 0:
        try:
            run.lock = lock_dir(out, "train.py run")
        except UserError as e:
            failure = e
    if all_sum(float(failure is not None))[0]:
        raise failure or UserError("rank 0 could not lock --out")  # rank 0 prints it
    check_shared_out(run.out, run.rank)

    def on_sigterm(*_):
        run.sigterm = True
    signal.signal(signal.SIGTERM, on_sigterm)
    stages = {1: recipe.stage1, 2: recipe.stage2}
    for stage in ([1, 2] if args.stage == "both" else [int(args.stage)]):
        if not train_stage(run, stage, stages[stage]):
            break
    dist.destroy_process_group()


def build(run, stage):
    """The model a stage starts from: CLIP + Vicuna + a fresh projector (stage 1) or stage 1's projector (stage 2)."""
    torch.manual_seed(run.seed)
    if stage == 2:  # from stage 1's projector, --projector or --init; full or LoRA (nanollava/finetune.py)
        try:
            model = finetune.build(run.tune, run.path(run.manifest["clip"]), run.path(run.manifest["vicuna"]),
                                   run.out / "stage1" / "projector.safetensors")
        except finetune.FinetuneError as e:
            raise UserError(str(e)) from None
    else:
        model = LLaVA.from_base(run.path(run.manifest["clip"]), run.path(run.manifest["vicuna"]))
        model.requires_grad_(False)
        model.multi_modal_projector.requires_grad_(True)
    assert (run.tok.image_id, run.tok.pad_id) == (model.image_token_id, model.config.pad_token_id), "tokenizer and model disagree on <image>/<pad>"
    model.language_model.grad_checkpointing = run.recipe.grad_checkpointing
    return model.to(run.device)


def count_steps(run, hp, ds):
    """(micro-batches per rank per step, steps per epoch, steps in the stage) for the global batch hp.batch
    (main made hp.micro_batch x world size divide it)."""
    accum, per_epoch = hp.batch // (hp.micro_batch * run.world_size), len(ds) // hp.batch
    if per_epoch == 0:
        raise UserError(f"{ds.path} has {len(ds)} usable rows, fewer than one global batch of {hp.batch}")
    total = math.ceil(per_epoch * hp.epochs)
    return accum, per_epoch, min(total, run.max_steps) if run.max_steps > 0 else total


def optimizer(model, recipe, hp):
    """AdamW over the projector and, in stage 2, the sharded language model (in full, or its LoRA A and B): separate
    groups, because plain tensors and DTensors never share a foreach kernel; the projector's peak learning rate is
    --projector-lr (`scale` times the stage's). clip_grad_norm reads the same groups."""
    projector = list(model.multi_modal_projector.parameters())
    lm = [p for p in model.language_model.parameters() if p.requires_grad]
    scale = recipe.projector_lr / hp.lr if recipe.projector_lr is not None and hp.lr and lm else 1.0
    groups = [{"params": g, "scale": s} for g, s in ((projector, scale), (lm, 1.0)) if g]
    fused = model.multi_modal_projector.linear_1.weight.is_cuda or None  # one kernel for all tensors on GPU
    return torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.999), weight_decay=recipe.weight_decay, fused=fused)


def lr_at(step, total, peak, warmup_ratio):
    """Linear warmup over ceil(warmup_ratio * total) steps, then cosine to zero (transformers' cosine schedule)."""
    return cosine_lr(step, total, peak, warmup=math.ceil(warmup_ratio * total))


def train_stage(run, stage, hp):
    """Runs one stage to its end (True) or until SIGTERM (False): build, shard, resume, then train_step until done."""
    stage_dir = run.out / f"stage{stage}"
    final = stage_dir / ("projector.safetensors" if stage == 1 else "model")
    if final.exists() and run.resume:
        if run.rank == 0:
            print(f"stage {stage}: already finished ({final}); --no-resume retrains it", flush=True)
        return True
    if not run.resume and run.rank == 0 and stage_dir.exists():
        shutil.rmtree(stage_dir)
    dist.barrier()
    model = build(run, stage)
    files = run.manifest[f"stage{stage}"]  # stage 1: captions, "plain"; stage 2: conversations, "vicuna_v1", padded images
    ds = LLaVADataset(run.path(files["data"]), run.path(files["image_root"]), run.tok, "plain" if stage == 1 else "vicuna_v1",
                      model.image_token_id, image_size=model.config.vision.image_size, pad=stage == 2,
                      max_len=run.recipe.max_len, strict=run.strict, image_seq_len=model.config.vision.num_patches)
    accum, per_epoch, total = count_steps(run, hp, ds)
    shard(model, run.device, run.compile)
    opt = optimizer(model, run.recipe, hp)
    ckpt_dir = stage_dir / "ckpt"
    step = load_checkpoint(model, opt, ckpt_dir, run.rank) if run.resume else 0
    trim_log(run.log_path, stage, step, run.rank)
    if run.rank == 0:
        print(f"stage {stage}: {len(ds)} rows, {total} steps of {hp.batch} samples ({hp.micro_batch} x {run.world_size} processes x {accum} accumulation)"
              + (f", resuming after step {step}" if step else ""), flush=True)
    model.train()
    t_start, steps_timed = time.time(), 0
    while step < total:
        epoch = step // per_epoch  # each epoch shuffles anew; a resumed one skips the samples already seen
        batches = batch_indices(len(ds), run.world_size, run.rank, run.seed, epoch, hp.micro_batch, accum,
                                run.recipe.group_by_length and stage == 2, ds.lengths, ds.has_image, start=(step % per_epoch) * hp.batch)
        # its own generator: the loader's seed draw must not move the global RNG that dropout reads (resume restores it)
        loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=run.workers, worker_init_fn=ignore_sigterm,
                                                  generator=torch.Generator(), collate_fn=partial(collate, pad_id=run.tok.pad_id),
                                                  pin_memory=run.device.type == "cuda"))
        while step < min(total, (epoch + 1) * per_epoch):
            t0 = time.time()
            micro = [next(loader) for _ in range(accum)]
            stats = train_step(run, model, opt, micro, lr_at(step, total, hp.lr, run.recipe.warmup_ratio))
            if not math.isfinite(stats.loss):
                latest = ckpt_dir / "latest"
                good = ckpt_dir / latest.read_text().strip() if latest.exists() else "none (no checkpoint was saved yet)"
                raise UserError(f"stage {stage} step {step + 1}: the loss is {stats.loss}; stopped. The last good checkpoint is {good}")
            step += 1
            step_s = time.time() - t0
            steps_timed += 1
            if run.rank == 0:
                report(run, model, stage, step, total, stats, step_s, eta_s=(time.time() - t_start) / steps_timed * (total - step))
            sigterm = all_sum(float(run.sigterm))[0] > 0  # every rank stops at the same step
            if step % (run.save_every or hp.save_every) == 0 or sigterm or step == total:
                save_checkpoint(model, opt, ckpt_dir, step, run.rank)
            if sigterm:
                if run.rank == 0:
                    print(f"stage {stage}: SIGTERM, saved step {step} to {ckpt_dir}; rerun the same command to resume", flush=True)
                return False
        if run.rank == 0:
            print(f"stage {stage} epoch {epoch}: {ds.summary()}", flush=True)
    export(stage, model, run.tok, final, run.rank, run.tune)
    return True


@dataclass
class StepStats:
    """One optimizer step, summed over the ranks."""
    loss: float       # mean over the global batch's supervised tokens
    lr: float
    grad_norm: float  # before clipping (nan when the loss was not finite and no step was taken)
    tokens: float     # real positions in the batch, each image's features included
    samples: float
    sq_tokens: float = 0.0   # sum over rows of (row length)^2: attention's FLOPs
    supervised: float = 0.0  # positions with a label
    images: float = 0.0


def train_step(run, model, opt, micro, lr):
    """One optimizer step on one global batch; micro holds this rank's micro-batches of it (None: every sample bad).
    Forward and backward per micro-batch, gradients reduce-scattered after each (or on the last only with
    --accumulate-unsharded); the projector's all-reduced; the loss checked; the global norm clipped; AdamW. A
    non-finite loss returns before the weights change. The counts come from the host-side batch and the loss stays
    on the device until one read per step, so the GPU never waits for the host mid-step."""
    P, img = model.config.vision.num_patches, model.image_token_id
    real = [b for b in micro if b is not None]
    lengths = [b["attention_mask"].sum(1) + (P - 1) * (b["input_ids"] == img).sum(1) for b in real]  # <image>: P features
    n_sup, n_tok, n_sq, n_samples, n_img = all_sum(sum(int((b["labels"][:, 1:] != -100).sum()) for b in real),
                                                   sum(int(n.sum()) for n in lengths), sum(int((n ** 2).sum()) for n in lengths),
                                                   sum(len(b["ids"]) for b in real), sum(int((b["input_ids"] == img).sum()) for b in real))
    # an all-bad micro-batch still runs forward and backward, so that this rank joins the others' collectives (FSDP
    # all-gathers each block again in backward); stage 1 gives it a blank image, as with the LM frozen only the
    # projector's path has a gradient (a text-only loss would have no grad_fn, and backward() would raise)
    stage1 = not model.language_model.embed_tokens.weight.requires_grad
    micro = [b if b is not None else empty_batch(run.tok, model.config.vision.image_size if stage1 else None) for b in micro]
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    to = lambda t: t.to(run.device, non_blocking=True) if t is not None else None  # pinned by the DataLoader on GPU
    for j, b in enumerate(micro):
        model.set_requires_gradient_sync(j == len(micro) - 1 or not run.accumulate_unsharded)
        loss = model(to(b["input_ids"]), to(b["pixel_values"]), to(b["attention_mask"]), to(b["labels"]), reduction="sum")
        (loss * run.world_size / max(n_sup, 1)).backward()  # FSDP averages gradients over ranks: * world_size makes it a sum
        loss_sum += loss.detach().double()
    for p in model.multi_modal_projector.parameters():  # replicated: average its gradient once per step, zeros where unused
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        reduce_sum(p.grad).div_(run.world_size)
    loss = float(reduce_sum(loss_sum)) / max(n_sup, 1)  # the one read of the device per step
    if not math.isfinite(loss):
        return StepStats(loss, lr, math.nan, n_tok, n_samples, n_sq, n_sup, n_img)
    norm = clip_grad_norm([g["params"] for g in opt.param_groups], run.recipe.grad_clip)
    for g in opt.param_groups:
        g["lr"] = lr * g.get("scale", 1.0)  # the projector's group may run at --projector-lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    return StepStats(loss, lr, float(norm), n_tok, n_samples, n_sq, n_sup, n_img)


def empty_batch(tok, image_size=None):
    """A stand-in for a micro-batch whose samples were all bad: no label, so no loss; with a blank image if image_size."""
    ids = torch.tensor([[tok.bos_id] + ([tok.image_id] if image_size else [])])
    px = torch.zeros(1, 3, image_size, image_size) if image_size else None
    return {"input_ids": ids, "labels": torch.full_like(ids, -100), "attention_mask": torch.ones_like(ids), "pixel_values": px, "ids": []}


def report(run, model, stage, step, total, stats, step_s, eta_s):
    """Rank 0: one line on stdout and one record in OUT/log.jsonl; MFU on GPUs whose peak is known."""
    tok_s, samples_s = stats.tokens / step_s, stats.samples / step_s
    line = (f"stage {stage} step {step}/{total} | loss {stats.loss:.4f} | lr {stats.lr:.2e} | grad norm {stats.grad_norm:.3f} | "
            f"{tok_s:,.0f} tok/s | {samples_s:.1f} samples/s")
    rec = {"stage": stage, "step": step, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm, "tokens_per_s": tok_s,
           "samples_per_s": samples_s, "step_s": step_s}
    if run.device.type == "cuda":
        peak = peak_flops(torch.cuda.get_device_name(run.device))
        if peak:  # model FLOPs (nanollava/flops.py) over the node's dense bf16 peak
            flops = step_flops(model.config, stage, stats.tokens, stats.sq_tokens, stats.supervised, stats.images)
            rec["mfu"] = flops / step_s / (peak * run.world_size)
            line += f" | mfu {100 * rec['mfu']:.1f}%"
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    else:
        import resource
        rec["peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    line += f" | mem {rec['peak_mem_gib']:.1f} GiB | eta {eta_s / 60:.1f} min"
    print(line, flush=True)
    with open(run.log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def export(stage, model, tok, final, rank, tune):
    """Stage 1: the projector's weights (replicated: read on rank 0, nothing gathered). Stage 2: the whole model in
    llava-hf's layout with the tokenizer; after LoRA the merged model and OUT/stage2/adapter."""
    if stage == 1:
        full = {"multi_modal_projector." + k: v.cpu() for k, v in model.multi_modal_projector.state_dict().items()}
    else:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0 and stage == 2 and tune.lora_r:
        finetune.export_lora(model, full, final, tok, tune.init)
        print(f"stage 2: wrote {final} and {final.with_name('adapter')}", flush=True)
    elif rank == 0:
        tmp = final.with_name(final.name + ".tmp")
        try:
            if stage == 1:
                write_safetensors({k: v.contiguous() for k, v in full.items() if k.startswith("multi_modal_projector.")}, final)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                model.save_pretrained(tmp, state_dict={k: v.float() for k, v in full.items()})
                tok.save(tmp)
                os.replace(tmp, final)
        except OSError as e:
            raise CheckpointError(f"could not write {e.filename or tmp} ({e.strerror}); the last checkpoint, in "
                                  f"{final.parent / 'ckpt'}, is intact: rerun to export again") from None
        print(f"stage {stage}: wrote {final}", flush=True)
    dist.barrier()


if __name__ == "__main__":
    args = parser.parse_args()
    one_sentence(main, args, errors=(CheckpointError, DataError, TokenizerError), peer_errors=(dist.DistError,))
