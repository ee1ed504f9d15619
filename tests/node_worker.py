"""Run by tests/test_node.py under torchrun, two processes: the training loop's collectives through a process group
whose accelerator backend refuses host tensors as NCCL does, an all-bad stage-1 micro-batch on one rank, a stage-2
step with accumulation, and the shared --out check. Each rank writes what it saw to OUT/rank_R.json.

  python -m torch.distributed.run --standalone --nproc_per_node=2 tests/node_worker.py MANIFEST OUT
"""
import copy
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
LR = 0.1  # a step moves the weights far above float32's noise


def register_like_nccl():
    """A backend named "likenccl" registered for CUDA tensors only: gloo underneath, so it runs on a CPU, but a group
    made with it alone has no backend for CPU tensors and refuses them with NCCL's own error."""
    if "likenccl" not in dist.Backend.backend_list:
        dist.Backend.register_backend("likenccl", lambda store, rank, size, timeout: dist.ProcessGroupGloo(store, rank, size, timeout),
                                      devices=["cuda"])


def main(manifest_path, out):
    import train
    from nanollava import LLaVA
    from nanollava.data import LLaVADataset, collate
    from nanollava.fsdp import check_shared_out, init_group, shard
    from nanollava.recipes import RECIPES
    from nanollava.tokenizer import load_tokenizer
    register_like_nccl()
    rank = int(os.environ["RANK"])
    init_group(torch.device("cuda", rank), accelerator="likenccl")  # as on a GPU node; the tensors stay on the CPU
    seen = {}
    check_shared_out(out, rank)
    (out / f"own_{rank}").mkdir()
    try:
        check_shared_out(out / f"own_{rank}", rank)  # a directory per rank, as on nodes without a shared filesystem
    except SystemExit as e:
        seen["not_shared"] = str(e)

    world, manifest = manifest_path.parent, json.loads(manifest_path.read_text())
    tok = load_tokenizer(world / manifest["vicuna"])
    tok.add_special_tokens(["<image>", "<pad>"])
    recipe = RECIPES["world"]
    run = SimpleNamespace(device=torch.device("cpu"), world_size=2, tok=tok, recipe=recipe, accumulate_unsharded=False)

    def batches(stage, rows, m):
        files, v = manifest[f"stage{stage}"], m.config.vision
        ds = LLaVADataset(world / files["data"], world / files["image_root"], tok, "plain" if stage == 1 else "vicuna_v1",
                          m.image_token_id, image_size=v.image_size, pad=stage == 2, max_len=256, image_seq_len=v.num_patches)
        return [collate([ds[i] for i in r], tok.pad_id) for r in rows]

    def models(stage):
        torch.manual_seed(0)
        model = LLaVA.from_base(world / manifest["clip"], world / manifest["vicuna"])
        model.requires_grad_(False)
        model.multi_modal_projector.requires_grad_(True)
        if stage == 2:
            model.language_model.requires_grad_(True)
        ref = copy.deepcopy(model)  # unsharded, one process: the reference
        ref.before = {n: p.detach().clone() for n, p in ref.named_parameters() if p.requires_grad}
        shard(model, run.device, compile=False)
        return model, ref

    def sgd(model):
        """SGD over train.optimizer's groups: unlike AdamW's first step (about lr x the gradient's sign), its update is
        the clipped gradient itself, so the comparison sees a gradient's scale."""
        return torch.optim.SGD([{"params": g["params"]} for g in train.optimizer(model, recipe, recipe.stage2).param_groups], lr=LR)

    def reference_step(ref, micro, clip):
        """The same step in plain PyTorch on one process: the summed loss over every rank's micro-batches / the
        supervised tokens, clip_grad_norm_, SGD."""
        n_sup = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        loss = sum(ref(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"], reduction="sum") for b in micro) / n_sup
        loss.backward()
        params = [p for p in ref.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, clip)
        torch.optim.SGD(params, lr=LR).step()
        return float(loss.detach())

    def differences(model, ref):
        seen.setdefault("moved", []).append(max(float((p.detach() - ref.before[n]).abs().max()) for n, p in ref.named_parameters() if n in ref.before))
        full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p
        return {n: float((full(p).detach() - q.detach()).abs().max()) for (n, p), (_, q) in
                zip(model.named_parameters(), ref.named_parameters()) if q.requires_grad}

    # stage 1: rank 1's micro-batch had only bad samples (None); rank 0's is real
    model, ref = models(1)
    b = batches(1, [[0, 1, 2, 3]], ref)[0]
    stats = train.train_step(run, model, sgd(model), [b] if rank == 0 else [None], LR)
    seen["stage1"] = {"loss": stats.loss, "reference": reference_step(ref, [b], recipe.grad_clip), "max_diff": max(differences(model, ref).values())}

    # stage 2: two micro-batches per rank (accumulation), gradients reduce-scattered after each; unclipped, where SGD
    # shows the gradient's scale, and clipped, where it shows the one global norm over plain tensors and DTensors
    for key, clip in (("stage2", 1e9), ("stage2_clipped", 1.0)):
        run.recipe = replace(recipe, grad_clip=clip)
        model, ref = models(2)
        micro = batches(2, [[0, 1], [2, 3], [4, 5], [6, 7]], ref)
        stats = train.train_step(run, model, sgd(model), micro[2 * rank:2 * rank + 2], LR)
        seen[key] = {"loss": stats.loss, "reference": reference_step(ref, micro, clip), "grad_norm": stats.grad_norm}
        diffs = differences(model, ref)
        seen[key].update(max_diff=max(diffs.values()), worst=max(diffs, key=diffs.get), n_params=len(diffs))
    (out / f"rank_{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
