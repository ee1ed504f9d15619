"""How the models are built, without transformers: the random init against a written-out replica of what the
constructors drew before the meta-device build existed, the splice's index arithmetic against a hand-worked
example and plain loops, the attention plans, and the world presets against prepare.py's defaults."""
import math

import pytest
import torch
import torch.nn as nn

from nanollava.checkpoint import from_scratch
from nanollava.llama import PRESETS as LLAMA_PRESETS, KVCache, Llama, attention_plan
from nanollava.llava import PRESETS, LLaVA, Projector, expand_image_tokens, splice_index
from nanollava.vit import PRESETS as VIT_PRESETS, ViT

VIT, LLM = VIT_PRESETS["world"], LLAMA_PRESETS["world"]


# ----------------------------------------------------------------------------- init

def default_linear(fan_in, fan_out, bias=True):
    """nn.Linear's reset_parameters written out: kaiming-uniform(a=sqrt 5) weight, then a uniform bias."""
    w = torch.empty(fan_out, fan_in)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    if not bias:
        return [w]
    bound = 1 / math.sqrt(fan_in)
    return [w, torch.empty(fan_out).uniform_(-bound, bound)]


def replica_vit(c, std=0.02):
    """What ViT(cfg) drew: each module's default init as it is built, then normal(0, std) over the weights in
    module order, zero biases, unit LayerNorms, class_embedding last."""
    C, I, p = c.hidden_size, c.intermediate_size, c.patch_size
    conv = torch.empty(C, c.num_channels, p, p)
    nn.init.kaiming_uniform_(conv, a=math.sqrt(5))  # Conv2d without bias
    pos = torch.empty(c.num_patches + 1, C).normal_()  # nn.Embedding
    shapes = {"self_attn.q_proj": (C, C), "self_attn.k_proj": (C, C), "self_attn.v_proj": (C, C),
              "self_attn.out_proj": (C, C), "mlp.fc1": (C, I), "mlp.fc2": (I, C)}
    lin = {f"layers.{i}.{n}": default_linear(*s) for i in range(c.num_hidden_layers) for n, s in shapes.items()}
    sd = {"embeddings.patch_embedding.weight": conv.normal_(0, std), "embeddings.position_embedding.weight": pos.normal_(0, std)}
    for name, (w, b) in lin.items():
        sd[name + ".weight"], sd[name + ".bias"] = w.normal_(0, std), b.zero_()
    sd["embeddings.class_embedding"] = torch.empty(C).normal_(0, std)
    norms = ["pre_layrnorm", "post_layernorm"] + [f"layers.{i}.layer_norm{k}" for i in range(c.num_hidden_layers) for k in (1, 2)]
    sd.update({f"{n}.{s}": torch.full((C,), float(s == "weight")) for n in norms for s in ("weight", "bias")})
    return sd


def replica_llama(c, stds=(0.02,)):
    """What Llama(cfg) drew, then init_weights(std) for each further std (prepare.py's stand-in: 0.02, 0.06)."""
    C, I, V = c.hidden_size, c.intermediate_size, c.vocab_size
    emb = torch.empty(V, C).normal_()  # nn.Embedding
    shapes = {"self_attn.q_proj": (C, C), "self_attn.k_proj": (C, C), "self_attn.v_proj": (C, C), "self_attn.o_proj": (C, C),
              "mlp.gate_proj": (C, I), "mlp.up_proj": (C, I), "mlp.down_proj": (I, C)}
    ws = {"embed_tokens.weight": emb}
    ws.update({f"layers.{i}.{n}.weight": default_linear(*s, bias=False)[0] for i in range(c.num_hidden_layers) for n, s in shapes.items()})
    ws["lm_head.weight"] = default_linear(C, V, bias=False)[0]
    for std in stds:
        for w in ws.values():
            w.normal_(0, std)
    norms = ["norm"] + [f"layers.{i}.{n}" for i in range(c.num_hidden_layers) for n in ("input_layernorm", "post_attention_layernorm")]
    return {**ws, **{f"{n}.weight": torch.ones(C) for n in norms}}


def replica_projector(vision_dim, text_dim):
    (w1, b1), (w2, b2) = default_linear(vision_dim, text_dim), default_linear(text_dim, text_dim)
    return {"linear_1.weight": w1, "linear_1.bias": b1, "linear_2.weight": w2, "linear_2.bias": b2}


def same_weights(got, want, what):
    assert got.keys() == want.keys(), f"{what}: keys {sorted(got.keys() ^ want.keys())} differ"
    for k in want:
        assert torch.equal(got[k], want[k]), f"{what}: {k} differs, max abs diff {(got[k] - want[k]).abs().max():.3g}"


def seeded(seed, fn):
    torch.manual_seed(seed)
    return fn()


def test_meta_build_draws_what_the_constructors_drew():
    """The same seed gives bit-identical weights built on CPU (as prepare.py builds its stand-ins), built on
    the meta device and materialised, and in the replica: the draws come in the same order and distributions."""
    ref = seeded(1337, lambda: replica_vit(VIT))
    same_weights(seeded(1337, lambda: ViT(VIT).state_dict()), ref, "ViT(cfg) vs the replica")
    same_weights(seeded(1337, lambda: from_scratch(ViT, VIT).state_dict()), ref, "from_scratch(ViT) vs the replica")

    def stand_in(build):  # prepare.py's language model: built, then init_weights(std=0.06)
        llm = build()
        llm.init_weights(std=0.06)
        return llm.state_dict()
    ref = seeded(1337, lambda: replica_llama(LLM, (0.02, 0.06)))
    same_weights(seeded(1337, lambda: stand_in(lambda: Llama(LLM))), ref, "Llama(cfg) + init_weights(0.06) vs the replica")
    same_weights(seeded(1337, lambda: stand_in(lambda: from_scratch(Llama, LLM))), ref, "from_scratch(Llama) + init_weights(0.06)")

    def meta_projector():
        with torch.device("meta"):
            p = Projector(128, 128)
        p.to_empty(device="cpu").init_weights()
        return p.state_dict()
    ref = seeded(3, lambda: replica_projector(128, 128))
    same_weights(seeded(3, lambda: Projector(128, 128).state_dict()), ref, "Projector() vs nn.Linear's default")
    same_weights(seeded(3, meta_projector), ref, "meta Projector + init_weights vs nn.Linear's default")

    cfg = PRESETS["world"]

    def replica_llava():
        parts = [("vision_tower.", replica_vit(cfg.vision)), ("multi_modal_projector.", replica_projector(128, 128)),
                 ("language_model.", replica_llama(cfg.text))]
        return {prefix + k: v for prefix, sd in parts for k, v in sd.items()}
    ref = seeded(0, replica_llava)
    same_weights(seeded(0, lambda: LLaVA(cfg).state_dict()), ref, "LLaVA(cfg) vs the replica")
    same_weights(seeded(0, lambda: from_scratch(LLaVA, cfg).state_dict()), ref, "from_scratch(LLaVA) vs the replica")


def test_world_presets_are_what_prepare_builds():
    prepare = pytest.importorskip("prepare")
    a = prepare.parser.parse_args([])
    w = a.llm_width
    assert (VIT.image_size, VIT.patch_size, VIT.hidden_size, VIT.intermediate_size, VIT.num_hidden_layers,
            VIT.num_attention_heads) == (a.image_size, a.patch_size, a.vit_width, 4 * a.vit_width, a.vit_layers, a.vit_heads)
    assert (LLM.vocab_size, LLM.hidden_size, LLM.intermediate_size, LLM.num_hidden_layers, LLM.num_attention_heads,
            LLM.max_position_embeddings) == (a.vocab_size, w, (8 * w // 3 + 63) // 64 * 64, a.llm_layers, a.llm_heads, 2048)
    cfg = PRESETS["world"]  # from_base's vocabulary: + <image>, <pad>, padded to a multiple of 64
    assert cfg.vision == VIT and (cfg.text.vocab_size, cfg.image_token_id, cfg.pad_token_id) == (1088, 1024, 1025)
    assert cfg.text.hidden_size == LLM.hidden_size and cfg.text.num_hidden_layers == LLM.num_hidden_layers


# ----------------------------------------------------------------------------- the splice

def test_splice_index_hand_worked():
    """Two rows, P = 3: [a, IMG, b] widens to 5 positions, [c, d, e] stays 3 (hand-computed)."""
    is_img = torch.tensor([[False, True, False], [False, False, False]])
    start, image = splice_index(is_img, 3, left=False)
    assert start.tolist() == [[0, 1, 4], [0, 1, 2]]
    assert image.tolist() == [[False, True, True, True, False], [False] * 5]
    start, image = splice_index(is_img, 3, left=True)  # the short row starts 2 later
    assert start.tolist() == [[0, 1, 4], [2, 3, 4]]
    start, image = splice_index(torch.tensor([[True, False, True]]), 2, left=False)  # two images in one row
    assert start.tolist() == [[0, 2, 3]] and image.tolist() == [[True, True, False, True, True]]


def expand_by_loops(ids, img, P, mask, labels, left, pad):
    """The same layout built token by token: each placeholder P times, rows padded to the longest."""
    rows = []
    for r_ids, r_mask, r_lab in zip(ids.tolist(), mask.tolist(), labels.tolist()):
        row = []
        for t, m, l in zip(r_ids, r_mask, r_lab):
            row += [(img, 1, l, True)] + [(img, 1, -100, True)] * (P - 1) if t == img else [(t, m, l, False)]
        rows.append(row)
    T = max(map(len, rows))
    fill = [(pad, 0, -100, False)]
    rows = [fill * (T - len(r)) + r if left else r + fill * (T - len(r)) for r in rows]
    return [torch.tensor([[x[k] for x in r] for r in rows]) for k in range(4)]


@pytest.mark.parametrize("left", [False, True])
def test_expand_image_tokens_equals_loops(left):
    g = torch.Generator().manual_seed(0)
    IMG, P = 99, 4
    for trial in range(20):
        B, T = 3, int(torch.randint(2, 9, (1,), generator=g))
        ids = torch.randint(3, 90, (B, T), generator=g)
        ids[torch.rand(B, T, generator=g) < 0.2] = IMG
        mask = torch.ones(B, T, dtype=torch.long)
        n = int(torch.randint(0, T, (1,), generator=g))  # padding of row 1, on the side being tested
        mask[1, :n] = 0 if left else 1
        mask[1, T - n:] = 1 if left else 0
        labels = torch.randint(3, 90, (B, T), generator=g)
        got = expand_image_tokens(ids, IMG, P, mask, labels, left=left, pad_id=7)
        want = expand_by_loops(ids, IMG, P, mask, labels, left, 7)
        for name, a, b in zip(("input_ids", "attention_mask", "labels", "image"), got, want):
            assert torch.equal(a, b), f"trial {trial} {name}: {a.tolist()} vs loops {b.tolist()}"


def test_embed_puts_image_rows_where_the_layout_says():
    """The splice as one masked assignment: image rows at the layout's image positions in placeholder order,
    every other position the token's embedding (compared row by row)."""
    torch.manual_seed(0)
    cfg = PRESETS["world"]
    model = LLaVA(cfg).eval()
    ids = torch.tensor([[1, 1024, 5, 6, 1024], [1025, 1, 7, 1024, 8]])
    mask = torch.tensor([[1] * 5, [0, 1, 1, 1, 1]])
    px = torch.randn(3, 3, 72, 72)
    with torch.no_grad():
        x, m, _ = model.embed(ids, px, mask)
        feats = model.multi_modal_projector(model.vision_tower(px))  # (3, 9, C)
        ex = expand_image_tokens(ids, 1024, 9, mask)
        k = 0
        for b in range(2):
            for t in range(x.shape[1]):
                if ex.image[b, t]:
                    want = feats.flatten(0, 1)[k]
                    k += 1
                else:
                    want = model.language_model.embed_tokens.weight[ex.input_ids[b, t]]
                assert torch.equal(x[b, t], want), f"row {b} position {t}"
    assert k == 27 and torch.equal(m, ex.attention_mask)


# ----------------------------------------------------------------------------- attention plans

def test_attention_plans():
    B, T = 2, 4
    p = attention_plan(B, T, None, None, "cpu")
    assert p.mask == "causal" and p.positions.tolist() == [[0, 1, 2, 3]] * 2
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert attention_plan(B, T, right, None, "cpu").mask == "causal"  # right padding needs no mask
    left = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    p = attention_plan(B, T, left, None, "cpu")
    assert p.positions.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    want = torch.stack([causal, causal & torch.tensor([False, False, True, True]) | torch.eye(T, dtype=torch.bool)])
    assert torch.equal(p.mask, want[:, None])
    cache = KVCache(LLM, B, 8, "cpu", torch.float32)
    assert attention_plan(B, T, None, cache, "cpu").mask == "causal"
    cache.len = T
    p = attention_plan(B, 1, None, cache, "cpu")  # one new token after an unpadded cache sees every key
    assert p.mask is None and p.positions.tolist() == [[4], [4]]
    p = attention_plan(B, 2, None, cache, "cpu")  # two: causal over the prefix and themselves
    assert torch.equal(p.mask, torch.ones(2, 6, dtype=torch.bool).tril(4)[None, None])
    with pytest.raises(ValueError, match="exceed the KV cache of 8"):
        attention_plan(B, 5, None, cache, "cpu")
