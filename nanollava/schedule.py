"""
The learning-rate schedule of every training loop in nanollava: a linear warmup, then a half cosine
from the peak down to floor x peak.

    train.py (both LLaVA stages): warmup ceil(warmup_ratio x total) steps, floor 0 (transformers' cosine schedule)
    the stand-ins' pretraining:    warmup max(1, int(0.05 x steps)) steps, floor 0.1

Each caller counts its own warmup steps: the two roundings above are kept as they were, so a run gives the
same numbers as before the schedule was shared.
"""
import math


def cosine_lr(step, total, peak, warmup, floor=0.0):
    """The learning rate of step (0-based) of total: (step + 1) / warmup x peak while step < warmup, then
    peak x (floor + (1 - floor) / 2 x (1 + cos(pi x progress))), progress going 0 -> 1 after the warmup."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (floor + (1 - floor) / 2 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
