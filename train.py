"""
Trains LLaVA-1.5's two stages through one FSDP loop.

Stage 1 (feature alignment): tower and language model frozen, the projector learns on captions ("plain").
Stage 2 (visual instruction tuning): the projector and the language model learn on conversations ("vicuna_v1").

  python train.py                                            # both stages on prepare.py's world, one CPU process
  torchrun --standalone --nproc_per_node=2 train.py          # the same on two processes (gloo on CPU, nccl on GPU)
  torchrun --standalone --nproc_per_node=8 train.py --recipe llava-1.5-7b      # the official recipe, one 8-GPU node
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
"""
import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import kernels
from nanollava import LLaVA
from nanollava.data import LLaVADataset, batch_indices, collate
from nanollava.tokenizer import load_tokenizer

# per stage (1, 2): learning rate, global batch, epochs, micro-batch per device; then what both stages share
RECIPES = {
    "world": dict(lr=(1e-3, 1e-3), batch=(32, 32), epochs=(1, 2), micro_batch=(16, 16), max_len=512,
                  grad_checkpointing=False, group_by_length=False, data="data/world/manifest.json"),
    "llava-1.5-7b": dict(lr=(1e-3, 2e-5), batch=(256, 128), epochs=(1, 1), micro_batch=(32, 16), max_len=2048,
                         grad_checkpointing=True, group_by_length=True, data="data/llava-1.5/manifest-7b.json"),
}
RECIPES["llava-1.5-13b"] = {**RECIPES["llava-1.5-7b"], "data": "data/llava-1.5/manifest-13b.json"}

parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--recipe", default="world", choices=list(RECIPES), help="hyperparameters and data: the offline world or the official LLaVA-1.5 recipe")
parser.add_argument("--data", help="manifest.json written by prepare.py (default: the recipe's)")
parser.add_argument("--stage", default="both", choices=["1", "2", "both"], help="which stage(s) to run; stage 2 starts from stage 1's projector")
parser.add_argument("--out", default="out", help="output directory: OUT/stage1, OUT/stage2/model, OUT/log.jsonl")
parser.add_argument("--max-steps", type=int, default=-1, help="stop each stage after this many optimizer steps (-1: the recipe's epochs)")
parser.add_argument("--save-every", type=int, default=50, help="write a resumable checkpoint every N optimizer steps")
parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True, help="resume from the latest checkpoint in --out if there is one")
parser.add_argument("--seed", type=int, default=1337, help="seeds the projector's init and the data order")
parser.add_argument("--micro-batch", type=int, help="samples per device per forward (default: the recipe's)")
parser.add_argument("--lr1", type=float, help="stage-1 peak learning rate")
parser.add_argument("--lr2", type=float, help="stage-2 peak learning rate")
parser.add_argument("--batch1", type=int, help="stage-1 global batch (kept constant across world sizes by accumulation)")
parser.add_argument("--batch2", type=int, help="stage-2 global batch")
parser.add_argument("--epochs1", type=float, help="stage-1 epochs")
parser.add_argument("--epochs2", type=float, help="stage-2 epochs")
parser.add_argument("--max-len", type=int, help="maximum sequence length, image features included")
parser.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warmup over this fraction of the steps, then cosine to 0")
parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this")
parser.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, help="stage 2: batches of one modality (LLaVA's group_by_modality_length)")
parser.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"], help="attention and RMSNorm: Triton kernels, PyTorch, or Triton on GPU only")
parser.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, help="recompute language-model activations in backward")
parser.add_argument("--compile", action="store_true", help="torch.compile each language-model block")
parser.add_argument("--workers", type=int, help="data-loading processes per rank (default: 4 on GPU, 0 on CPU)")
parser.add_argument("--strict", action="store_true", help="stop at the first bad dataset row instead of skipping it")


def main(args):
    R = RECIPES[args.recipe]
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    else:  # one process: a group of one, so the code path is the same
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    kernels.use(args.kernels)
    manifest_path = Path(args.data or R["data"])
    if not manifest_path.is_file():
        sys.exit(f"error: {manifest_path} does not exist: run `python prepare.py` first (or pass --data)")
    manifest = json.loads(manifest_path.read_text())
    where = lambda p: manifest_path.parent / p
    cfg = {s: dict(lr=getattr(args, f"lr{s}") or R["lr"][s - 1], batch=getattr(args, f"batch{s}") or R["batch"][s - 1],
                   epochs=getattr(args, f"epochs{s}") or R["epochs"][s - 1], micro_batch=args.micro_batch or R["micro_batch"][s - 1])
           for s in (1, 2)}
    common = dict(max_len=args.max_len or R["max_len"], device=str(device), world=world,
                  grad_checkpointing=R["grad_checkpointing"] if args.grad_checkpointing is None else args.grad_checkpointing,
                  group_by_length=R["group_by_length"] if args.group_by_length is None else args.group_by_length)
    if rank == 0:
        print(f"nanollava train: {json.dumps({**vars(args), **common, 'stages': cfg, 'manifest': str(manifest_path)})}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stop = {"sigterm": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    for stage in ([1, 2] if args.stage == "both" else [int(args.stage)]):
        if not train_stage(stage, args, cfg[stage], common, manifest, where, out, rank, world, device, stop):
            break
    dist.destroy_process_group()


def build(stage, args, common, manifest, where, out, device):
    """The model a stage starts from: CLIP + Vicuna + a fresh projector (stage 1) or stage 1's projector (stage 2)."""
    torch.manual_seed(args.seed)
    model = LLaVA.from_base(where(manifest["clip"]), where(manifest["vicuna"]))
    if stage == 2:
        proj = out / "stage1" / "projector.safetensors"
        if not proj.is_file():
            sys.exit(f"error: stage 2 starts from stage 1's projector, and {proj} does not exist: run --stage 1 first")
        model.multi_modal_projector.load_state_dict({k.removeprefix("multi_modal_projector."): v for k, v in load_file(proj).items()})
    tok = load_tokenizer(where(manifest["vicuna"]))
    image_id, pad_id = tok.add_special_tokens(["<image>", "<pad>"])
    assert (image_id, pad_id) == (model.image_token_id, model.config.pad_token_id), "tokenizer and model disagree on <image>/<pad>"
    model.requires_grad_(False)
    trainable = [model.multi_modal_projector] + ([model.language_model] if stage == 2 else [])
    for m in trainable:
        m.requires_grad_(True)
    model.language_model.grad_checkpointing = common["grad_checkpointing"]
    return model.to(device), tok


def shard(model, device, compile):
    """FSDP2 over the language model: each block, the embedding (called outside the LM's forward) and the LM's root.
    The frozen tower and the projector stay replicated; on GPU the tower runs in bf16 and the LM computes in bf16
    with fp32 master weights and fp32 gradient reduction."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    if device.type == "cuda":
        model.vision_tower.to(torch.bfloat16)
    lm = model.language_model
    for block in lm.layers:
        if compile:
            block.compile()
        fully_shard(block, mp_policy=mp)
    fully_shard(lm.embed_tokens, mp_policy=mp)
    fully_shard(lm, mp_policy=mp)
    fully_shard(model, mp_policy=mp, ignored_params=set(model.vision_tower.parameters()) | set(model.multi_modal_projector.parameters()))


def lr_at(step, total, peak, warmup_ratio):
    """Linear warmup over ceil(warmup_ratio * total) steps, then cosine to zero (transformers' cosine schedule)."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def all_sum(*xs):
    t = torch.tensor(xs, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def train_stage(stage, args, c, common, manifest, where, out, rank, world, device, stop):
    """Runs one stage to its end (True) or until SIGTERM (False)."""
    sdir = out / f"stage{stage}"
    final = sdir / ("projector.safetensors" if stage == 1 else "model")
    if final.exists() and args.resume:
        if rank == 0:
            print(f"stage {stage}: already finished ({final}); --no-resume retrains it", flush=True)
        return True
    if not args.resume and rank == 0 and sdir.exists():
        shutil.rmtree(sdir)
    dist.barrier()
    model, tok = build(stage, args, common, manifest, where, out, device)
    S, P = model.config.vision.image_size, model.config.vision.num_patches
    data = manifest[f"stage{stage}"]
    ds = LLaVADataset(where(data["data"]), where(data["image_root"]), tok, "plain" if stage == 1 else "vicuna_v1",
                      model.image_token_id, image_size=S, pad=stage == 2, max_len=common["max_len"], strict=args.strict,
                      image_seq_len=P)
    G, m = c["batch"], c["micro_batch"]
    if G % (m * world):
        sys.exit(f"error: global batch {G} is not a multiple of micro-batch {m} x {world} processes")
    accum, per_epoch = G // (m * world), len(ds) // G
    if per_epoch == 0:
        sys.exit(f"error: {ds.path} has {len(ds)} usable rows, fewer than one global batch of {G}")
    total = math.ceil(per_epoch * c["epochs"])
    total = min(total, args.max_steps) if args.max_steps > 0 else total
    shard(model, device, args.compile)
    proj = list(model.multi_modal_projector.parameters())
    lm = [p for p in model.language_model.parameters() if p.requires_grad]
    groups = [g for g in (proj, lm) if g]  # separate groups: plain tensors and DTensors never share a foreach kernel
    opt = torch.optim.AdamW([{"params": g} for g in groups], lr=c["lr"], betas=(0.9, 0.999), weight_decay=args.weight_decay)
    ckdir = sdir / "ckpt"
    step = load_checkpoint(model, opt, ckdir, rank) if args.resume else 0
    trim_log(out / "log.jsonl", stage, step, rank)
    if rank == 0:
        print(f"stage {stage}: {len(ds)} rows, {total} steps of {G} samples ({m} x {world} processes x {accum} accumulation)"
              + (f", resuming after step {step}" if step else ""), flush=True)
    n_lm = sum(p.numel() for p in model.language_model.parameters())
    n_vit = sum(p.numel() for layer in model.vision_tower.layers[:model.vision_tower.n_run] for p in layer.parameters())
    model.train()
    t_start, steps_timed = time.time(), 0
    while step < total:
        epoch = step // per_epoch
        batches = batch_indices(len(ds), world, rank, args.seed, epoch, m, accum, common["group_by_length"] and stage == 2,
                                ds.lengths, ds.has_image, start=(step % per_epoch) * G)
        workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
        loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers,
                                                  collate_fn=partial(collate, pad_id=tok.pad_id)))
        while step < min(total, (epoch + 1) * per_epoch):
            t0 = time.time()
            micro = [next(loader) for _ in range(accum)]
            micro = [b if b is not None else empty_batch(tok) for b in micro]  # every sample bad: still run, no loss
            n_sup, n_tok, n_samples = all_sum(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro),
                                              sum(int(b["attention_mask"].sum()) + (P - 1) * len(b["pixel_values"] if b["pixel_values"] is not None else [])
                                                  for b in micro),
                                              sum(len(b["ids"]) for b in micro))
            loss_sum = torch.zeros((), dtype=torch.float64)
            for j, b in enumerate(micro):
                model.set_requires_gradient_sync(j == accum - 1)
                px = b["pixel_values"].to(device) if b["pixel_values"] is not None else None
                loss = model(b["input_ids"].to(device), px, b["attention_mask"].to(device), b["labels"].to(device), reduction="sum")
                (loss * world / max(n_sup, 1)).backward()  # FSDP averages gradients over ranks: * world makes it a sum
                loss_sum += loss.detach().double().cpu()
            for p in proj:  # the replicated projector: average its gradient once per step, zeros where unused
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= world
            loss = all_sum(float(loss_sum))[0] / max(n_sup, 1)
            if not math.isfinite(loss):
                latest = ckdir / "latest"
                good = ckdir / latest.read_text().strip() if latest.exists() else "none (no checkpoint was saved yet)"
                sys.exit(f"error: stage {stage} step {step + 1}: the loss is {loss}; stopped. The last good checkpoint is {good}")
            norm = clip_grad_norm(groups, args.grad_clip)
            lr = lr_at(step, total, c["lr"], args.warmup_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.time() - t0
            steps_timed += 1
            if rank == 0:
                report(stage, step, total, loss, lr, norm, n_tok / dt, n_samples / dt, dt, device, n_lm, n_vit, P,
                       n_tok, n_samples, (time.time() - t_start) / steps_timed * (total - step), out / "log.jsonl")
            sigterm = all_sum(float(stop["sigterm"]))[0] > 0
            if step % args.save_every == 0 or sigterm or step == total:
                save_checkpoint(model, opt, ckdir, step, rank)
            if sigterm:
                if rank == 0:
                    print(f"stage {stage}: SIGTERM, saved step {step} to {ckdir}; rerun the same command to resume", flush=True)
                return False
        if rank == 0:
            print(f"stage {stage} epoch {epoch}: {ds.summary()}", flush=True)
    export(stage, model, tok, final, rank)
    return True


def empty_batch(tok):
    ids = torch.tensor([[tok.bos_id]])
    return {"input_ids": ids, "labels": torch.full_like(ids, -100), "attention_mask": torch.ones_like(ids),
            "pixel_values": None, "ids": []}


def clip_grad_norm(groups, max_norm):
    """Global gradient norm over the projector (plain tensors) and the sharded LM (DTensors), then clip both."""
    norms = [torch.nn.utils.get_total_norm([p.grad for p in g]) for g in groups]
    total = torch.stack([(n.full_tensor() if isinstance(n, DTensor) else n).float().cpu() for n in norms]).norm()
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    for g in groups:
        for p in g:
            p.grad.mul_(coef)
    return float(total)


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16


def report(stage, step, total, loss, lr, norm, tok_s, samp_s, dt, device, n_lm, n_vit, P, n_tok, n_samples, eta, log_path):
    line = f"stage {stage} step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} | grad norm {norm:.3f} | {tok_s:,.0f} tok/s | {samp_s:.1f} samples/s"
    rec = {"stage": stage, "step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tok_s, "samples_per_s": samp_s, "step_s": dt}
    if device.type == "cuda":
        # model FLOPs: LM forward 2N + backward 4N per token in stage 2 (2N in stage 1: input gradients only), tower forward 2N
        flops = n_tok * n_lm * (6 if stage == 2 else 4) + n_samples * (P + 1) * 2 * n_vit
        peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name(device)), None)
        if peak:
            rec["mfu"] = flops / dt / (peak * dist.get_world_size())
            line += f" | mfu {100 * rec['mfu']:.1f}%"
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource
        rec["peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    line += f" | mem {rec['peak_mem_gib']:.1f} GiB | eta {eta / 60:.1f} min"
    print(line, flush=True)
    with open(log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def trim_log(path, stage, step, rank):
    """On resume, forget log lines written after the checkpoint (and a line cut short by a kill)."""
    if rank != 0 or not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec["stage"] < stage or (rec["stage"] == stage and rec["step"] <= step):
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


def save_checkpoint(model, opt, ckdir, step, rank):
    """Trainable weights, optimizer state and RNG states into ckdir/step_N, written under a temporary name and
    renamed when every rank is done; then `latest` is replaced atomically. A kill at any moment leaves `latest`
    naming a complete checkpoint."""
    name = f"step_{step:07d}"
    tmp = ckdir / f"{name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world": dist.get_world_size()}))
        os.replace(tmp, ckdir / name)
        (ckdir / "latest.tmp").write_text(name)
        os.replace(ckdir / "latest.tmp", ckdir / "latest")
        for old in ckdir.glob("step_*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_checkpoint(model, opt, ckdir, rank):
    """Restores the latest complete checkpoint; returns its step (0 when there is none)."""
    latest = ckdir / "latest"
    if not latest.exists():
        return 0
    path = ckdir / latest.read_text().strip()
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # frozen weights come from the base
    meta = json.loads((path / "meta.json").read_text())
    if (path / f"rng_{rank}.pt").exists() and meta["world"] == dist.get_world_size():
        rng = torch.load(path / f"rng_{rank}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return meta["step"]


def export(stage, model, tok, final, rank):
    """Stage 1: the projector's weights. Stage 2: the whole model in llava-hf's layout with the tokenizer."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if stage == 1:
            save_file({k: v.contiguous() for k, v in full.items() if k.startswith("multi_modal_projector.")}, tmp)
        else:
            model.save_pretrained(tmp, state_dict={k: v.float() for k, v in full.items()})
            tok.save(tmp)
        os.replace(tmp, final)
        print(f"stage {stage}: wrote {final}", flush=True)
    dist.barrier()


if __name__ == "__main__":
    args = parser.parse_args()
    main(args)
