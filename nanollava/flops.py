"""
Model FLOPs of one LLaVA training step, and the GPUs' dense bf16 peaks, for the MFU train.py reports.

Counted from the configuration (the same numbers on a sharded or a meta model), multiply-adds as 2 FLOPs:
- language model, per real (unpadded) position: 2 x its block parameters forward. The embedding is a lookup
  (no FLOPs); lm_head runs only at supervised positions (LLaVA.forward selects them before it), 2 x V x C each.
- attention scores and values, per row of T positions and per block: 2 matmuls of T x T x C, causal so half of
  them are computed: 2 x T^2 x C forward (PaLM's appendix B counts the full square; FlashAttention's benchmarks
  the causal half, as here).
- backward: stage 2 trains the language model: weight and input gradients, 2x the forward. Stage 1 freezes it but
  back-propagates through it to the projector: input gradients only, 1x the forward for the matmuls with weights,
  2x for attention (dQ, dK, dV and dP all depend on the image features).
- the tower runs forward only (frozen, nothing upstream learns), once per image: the patch embedding (a conv),
  then P + 1 positions per layer run, full (non-causal) attention. The projector (trained in both stages): 6 x its parameters per feature, 4 x for
  linear_1, whose input needs no gradient.
"""


def lm_block_params(t):
    """Weights of one Llama block: q, o (C x C), k, v (C x kv), gate, up, down (C x I); the norms are negligible."""
    kv = (t.num_key_value_heads or t.num_attention_heads) * (t.hidden_size // t.num_attention_heads)
    return 2 * t.hidden_size ** 2 + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size


def vit_layer_params(v):
    """Weights of one CLIP encoder layer: q, k, v, o (Cv x Cv) and fc1, fc2 (Cv x Iv); biases are adds, not counted."""
    return 4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size


def flop_parts(cfg, stage, tokens, sq_tokens, supervised, images):
    """FLOPs of one step over the global batch, by part. tokens: real positions (each image's P features included);
    sq_tokens: the sum over rows of (row length)^2; supervised: positions with a next-token label; images: count."""
    t, v = cfg.text, cfg.vision
    L, C = t.num_hidden_layers, t.hidden_size
    n_run = v.feature_layer if v.feature_layer >= 0 else v.num_hidden_layers + 1 + v.feature_layer
    P = (v.image_size // v.patch_size) ** 2
    lm_forward = 2 * L * lm_block_params(t) * tokens + 2 * t.vocab_size * C * supervised
    return {
        "lm_weights": lm_forward * (3 if stage == 2 else 2),
        "lm_attention": 3 * 2 * L * C * sq_tokens,
        "tower_weights": images * (2 * 3 * v.patch_size ** 2 * v.hidden_size * P + n_run * 2 * vit_layer_params(v) * (P + 1)),
        "tower_attention": images * n_run * 4 * (P + 1) ** 2 * v.hidden_size,
        # linear_2: forward, weight and input gradients; linear_1: no input gradient (the tower's output needs none)
        "projector": images * P * (4 * v.hidden_size * C + 6 * C * C),
    }


def step_flops(cfg, stage, tokens, sq_tokens, supervised, images):
    """Model FLOPs of one training step (the sum of flop_parts), for MFU."""
    return sum(flop_parts(cfg, stage, tokens, sq_tokens, supervised, images).values())


# Dense bf16 tensor-core peaks in FLOP/s, from NVIDIA's datasheets (without sparsity). The first name contained in
# torch.cuda.get_device_name wins, so the H100's PCIe and NVL parts come before the SXM one ("NVIDIA H100 80GB HBM3").
PEAK_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
]


def peak_flops(device_name):
    """The peak for a GPU named like torch.cuda.get_device_name, or None when it is not in the table."""
    return next((peak for name, peak in PEAK_FLOPS if name in device_name), None)
