"""
FSDP2 for nanollava's training loop: how LLaVA is sharded, the collectives the loop needs, and resumable
checkpoints (torch.distributed.checkpoint). train.py runs the loop; this file holds what is distributed about it,
so that the loop reads as a story and the sharding can be studied (and changed) in one place.

- `shard`: `fully_shard` on every language-model block, the embedding and the roots; the frozen tower and the
  small projector stay replicated (no collectives for the tower; the projector's gradients are all-reduced).
- `all_sum`: sums a few Python numbers over the ranks.
- `clip_grad_norm`: one global norm over plain tensors (the projector) and DTensors (the sharded LM).
- `save_checkpoint` / `load_checkpoint` / `trim_log`: a checkpoint is written under a temporary name and renamed
  when complete, then `latest` is replaced atomically; resume restores weights, optimizer and RNG states and
  forgets log lines written after the checkpoint.
"""
import json
import os
import random
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def shard(model, device, compile):
    """FSDP2 over the language model: each block, the embedding (called outside the LM's forward) and the LM's root.
    The frozen tower and the projector stay replicated; on GPU the tower runs in bf16 and the LM computes in bf16
    with fp32 master weights and fp32 gradient reduction."""
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    if device.type == "cuda":
        model.vision_tower.to(torch.bfloat16)
    lm = model.language_model
    for block in lm.layers:
        if compile:
            block.compile()
        fully_shard(block, mp_policy=precision)
    fully_shard(lm.embed_tokens, mp_policy=precision)
    fully_shard(lm, mp_policy=precision)
    fully_shard(model, mp_policy=precision, ignored_params=set(model.vision_tower.parameters()) | set(model.multi_modal_projector.parameters()))


def all_sum(*xs):
    t = torch.tensor(xs, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def clip_grad_norm(groups, max_norm):
    """Global gradient norm over the projector (plain tensors) and the sharded LM (DTensors), then clip both."""
    norms = [torch.nn.utils.get_total_norm([p.grad for p in g]) for g in groups]
    total = torch.stack([(n.full_tensor() if isinstance(n, DTensor) else n).float().cpu() for n in norms]).norm()
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    for g in groups:
        for p in g:
            p.grad.mul_(coef)
    return float(total)


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
