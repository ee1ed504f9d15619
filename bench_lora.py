"""
A LoRA stage-2 training step of nanollava against PEFT on transformers' Llava: the same weights (one random
LLaVA-shaped checkpoint, the same adapter loaded into both), the same batch and rank. Prints both step times
(medians, the two sides alternating), their ratio, the trainable parameters and the AdamW state bytes of each.

    python bench_lora.py                                   # CPU: a small LLaVA-shaped model, r 16
    python bench_lora.py --rank 128 --alpha 256 --hidden 1024 --layers 8 --device cuda --dtype bfloat16

A step is forward, backward and AdamW on A, B and the projector, as the official finetune_lora.sh trains
(dropout 0.05); the loss covers the answer tokens only (the question and the image are -100). Before timing,
both losses on the batch without dropout are printed: they agree when the two sides compute the same model.
On a CPU a step's time is the process's CPU time (time.process_time), which other work on a shared machine does
not inflate as it inflates wall time; run with --threads 1 for a clean figure. On CUDA it is wall time.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanollava import lora
from nanollava.llama import LlamaConfig
from nanollava.llava import LLaVA, LLaVAConfig
from nanollava.vit import ViTConfig

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--rank", type=int, default=16, help="LoRA rank r")
parser.add_argument("--alpha", type=float, default=32, help="LoRA alpha (scale alpha / r)")
parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout on the input (official 0.05)")
parser.add_argument("--batch", type=int, default=4, help="sequences per step")
parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per sequence, the second half supervised")
parser.add_argument("--hidden", type=int, default=512, help="language model width (Vicuna-7B: 4096)")
parser.add_argument("--layers", type=int, default=4, help="language model blocks (Vicuna-7B: 32)")
parser.add_argument("--vocab", type=int, default=32064, help="vocabulary (llava-hf's 32064)")
parser.add_argument("--image-size", type=int, default=112, help="image side; patches of 14, so 112 gives 64 image tokens")
parser.add_argument("--steps", type=int, default=5, help="timed steps per side after 2 warm-up steps")
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute")
parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def tiny_base(out_dir, hidden, layers, vocab, image_size):
    """A random LLaVA-shaped checkpoint in llava-hf layout (both sides load this one directory)."""
    torch.manual_seed(0)
    vision = ViTConfig(image_size=image_size, patch_size=14, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                       num_attention_heads=4)
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                       num_attention_heads=max(1, hidden // 64), max_position_embeddings=1024)
    LLaVA(LLaVAConfig(vision, text, image_token_id=vocab - 64, pad_token_id=vocab - 63)).save_pretrained(out_dir)
    return out_dir


def batch_for(model, batch, text_tokens, device):
    """input_ids with one image placeholder after <s>, labels on the second half of the text; and the same batch as
    transformers' Llava takes it (one placeholder per patch, labels -100 over the image)."""
    g = torch.Generator().manual_seed(1)
    P, img = model.config.vision.num_patches, model.image_token_id
    text = torch.randint(3, img, (batch, text_tokens), generator=g)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, 1), img), text], 1)
    labels = ids.clone()
    labels[:, :2 + text_tokens // 2] = -100
    hf_ids = torch.cat([ids[:, :1], torch.full((batch, P), img), text], 1)
    hf_labels = torch.cat([labels[:, :1], torch.full((batch, P), -100), labels[:, 2:]], 1)
    px = torch.randn(batch, 3, model.config.vision.image_size, model.config.vision.image_size, generator=g)
    return [t.to(device) for t in (ids, labels, px, hf_ids, hf_labels)]


def state_bytes(opt):
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def lora_step(model_dir, rank=16, alpha=32, dropout=0.05, batch=4, text_tokens=64, steps=5, device="cpu",
              dtype=torch.float32, out=sys.stdout):
    """Times one LoRA stage-2 step of nanollava and of PEFT on transformers' Llava on model_dir (llava-hf layout).
    Returns {"nanollava": seconds, "peft": seconds, "ratio": peft / nanollava}."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration
    ours = lora.inject(LLaVA.from_pretrained(model_dir, dtype=dtype), rank, alpha, dropout).to(device)
    lora.mark_trainable(ours)
    with torch.no_grad():  # B starts at zero; a nonzero B makes the comparison of the losses below mean something
        for m in lora.lora_layers(ours).values():
            m.lora_B.weight.normal_(0, 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        lora.save_adapter(ours, tmp)
        hf = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
        theirs = PeftModel.from_pretrained(hf, tmp, is_trainable=True).to(device)
    ids, labels, px, hf_ids, hf_labels = batch_for(ours, batch, text_tokens, device)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        l_ours, l_theirs = float(ours(ids, px, labels=labels)), float(theirs(input_ids=hf_ids, pixel_values=px, labels=hf_labels).loss)
    print(f"loss without dropout: nanollava {l_ours:.6f}, PEFT {l_theirs:.6f} (difference {abs(l_ours - l_theirs):.2g})", file=out)
    ours.train(), theirs.train()
    sides = {"nanollava": (ours, lambda: ours(ids, px, labels=labels)),
             "peft": (theirs, lambda: theirs(input_ids=hf_ids, pixel_values=px, labels=hf_labels).loss)}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, (m, _) in sides.items()}
    times = {k: [] for k in sides}
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    for i in range(2 + steps):  # the two sides alternate, so a slower minute of a shared machine hits both
        for k, (m, loss_fn) in sides.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = clock()
            loss_fn().backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= 2:
                times[k].append(clock() - t0)
    result = {k: statistics.median(v) for k, v in times.items()}
    result["ratio"] = result["peft"] / result["nanollava"]
    for k, (m, _) in sides.items():
        n = sum(p.numel() for p in m.parameters() if p.requires_grad)
        print(f"{k:9s}  step {result[k]:.3f} s  trainable {n:,} parameters  AdamW state {state_bytes(opts[k]) / 2**20:.2f} MiB", file=out)
    what = "wall" if device.startswith("cuda") else "CPU"
    print(f"nanollava is {result['ratio']:.2f}x PEFT's speed ({what} time, median of {steps} steps, r {rank}, batch {batch})", file=out)
    return result


def main(argv=None):
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        d = tiny_base(Path(tmp), args.hidden, args.layers, args.vocab, args.image_size)
        print(f"bench_lora.py: {args.layers} blocks of width {args.hidden}, vocab {args.vocab}, {(args.image_size // 14) ** 2} "
              f"image + {args.text_tokens} text tokens x batch {args.batch}, r {args.rank}, alpha {args.alpha}, "
              f"dropout {args.dropout}, {args.device} {args.dtype}, {torch.get_num_threads()} threads")
        lora_step(d, args.rank, args.alpha, args.dropout, args.batch, args.text_tokens, args.steps, args.device, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
