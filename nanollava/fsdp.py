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

from nanollava.checkpoint import CheckpointError


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


def _latest(ckdir):
    """The checkpoint `latest` names (None when there is none yet)."""
    latest = ckdir / "latest"
    return ckdir / latest.read_text().strip() if latest.exists() else None


def save_checkpoint(model, opt, ckdir, step, rank):
    """Trainable weights, optimizer state and RNG states into ckdir/step_N, written under a temporary name and
    renamed when every rank is done; then `latest` is replaced atomically. A kill at any moment leaves `latest`
    naming a complete checkpoint, and a rerun saves over whatever the kill left (tests/test_train.py walks every
    point). A failed write (a full disk) is a CheckpointError naming the file; `latest` still names the last good one."""
    name = f"step_{step:07d}"
    tmp, final = ckdir / f"{name}.tmp", ckdir / name
    good = _latest(ckdir)
    try:
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
            if final.exists():  # a kill after this rename and before `latest` named it: an orphan, not the good one
                assert final != good, f"{final} is already the latest checkpoint"
                shutil.rmtree(final)
            os.replace(tmp, final)
            (ckdir / "latest.tmp").write_text(name)
            os.replace(ckdir / "latest.tmp", ckdir / "latest")
    except (OSError, dcp.api.CheckpointException) as e:
        failed = getattr(e, "filename", None) or tmp
        raise CheckpointError(f"could not write the checkpoint of step {step} ({failed}: {getattr(e, 'strerror', None) or e}); "
                              f"the last good checkpoint, {good or 'none yet'}, is intact") from None
    if rank == 0:
        for old in ckdir.glob("step_*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_checkpoint(model, opt, ckdir, rank):
    """Restores the latest complete checkpoint; returns its step (0 when there is none). A `latest` or a checkpoint
    that cannot be read is a CheckpointError that says --no-resume starts the stage over."""
    try:
        path = _latest(ckdir)
        if path is None:
            return 0
        meta = json.loads((path / "meta.json").read_text())
        msd, osd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))  # frozen weights come from the base
        rng = torch.load(path / f"rng_{rank}.pt", weights_only=True) if meta["world"] == dist.get_world_size() else None
        step = int(meta["step"])
    except (Exception, dcp.api.CheckpointException) as e:  # a truncated meta.json, a `latest` naming garbage, a DCP file cut short, ...
        raise CheckpointError(f"the checkpoint in {ckdir} cannot be resumed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              f"pass --no-resume to start this stage over") from None
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return step


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
