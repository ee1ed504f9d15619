"""The independent references several test files compare nanollava against, defined once: transformers' models
and tokenizer built from tiny random configs or the real tokenizer.model, the official LLaVA code's
tokenizer_image_token, the pickled .bin checkpoints lmsys and openai ship, and the comparison that names the
difference."""
import json

import pytest
import torch


def close(a, b, tol, what):
    d = (a.float() - b.float()).abs()
    assert d.max() <= tol, f"{what}: max abs diff {d.max():.3g}, mean {d.mean():.3g} (tolerance {tol})"


def hf_llava(tmp_path, vision, text, image_id):
    """transformers' LlavaForConditionalGeneration from CLIPVisionConfig(**vision) and LlamaConfig(**text),
    saved under tmp_path/hf: (model, its directory)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                      image_token_index=image_id, image_seq_length=9, vision_feature_layer=-2)
    hf = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random biases and norms, so a wrong mapping cannot hide behind zeros and ones
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.normal_(0.5 if n.endswith("weight") else 0.0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def save_bin(model, d, shards=1, half=False):
    """Pickled .bin weights as lmsys and openai ship them (transformers no longer writes these): one file, or
    shards with pytorch_model.bin.index.json."""
    d.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(d)
    sd = {k: (v.half() if half else v).contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        return torch.save(sd, d / "pytorch_model.bin")
    keys, weight_map = list(sd), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: sd[k] for k in part}, d / name)
        weight_map.update({k: name for k in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def hf_llama_tokenizer(sp_model_path, **kw):
    """transformers' LlamaTokenizer(legacy=False) for a tokenizer.model (transformers 5: the fast one; its own
    conversion needs protobuf, so vocabulary and merges are handed over from sentencepiece, as its
    SentencePieceExtractor does)."""
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    from transformers.tokenization_utils_base import generate_merges
    sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    return transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores), legacy=False, **kw)


def tokenizer_image_token(prompt, encode, image_token_index=-200, bos_id=1):
    """LLaVA's llava/mm_utils.py tokenizer_image_token, `encode(text) -> ids` standing for
    `tokenizer(text).input_ids`: each chunk around <image> encoded with its BOS, the BOS kept once."""
    chunks = [encode(chunk) for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == bos_id:
        offset = 1
        ids.append(chunks[0][0])
    separated = [x for chunk in chunks for x in (chunk, [image_token_index] * (offset + 1))][:-1]
    for x in separated:
        ids.extend(x[offset:])
    return ids


def released_config(version, text, mm_hidden_size):
    """config.json of an official liuhaotian LLaVA checkpoint with the key set as released (REFERENCE.md and
    REFERENCE-NEXT.md D, A2): model_type "llava" as llava-hf's, the Llama keys at the top level, no text_config.
    text: the tiny Llama's sizes, which replace the 7B ones."""
    llama = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "bos_token_id": 1, "eos_token_id": 2,
             "hidden_act": "silu", "initializer_range": 0.02, "pad_token_id": 0, "pretraining_tp": 1, "rope_scaling": None,
             "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True, "num_key_value_heads": text["num_attention_heads"]}
    mm = {"mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": mm_hidden_size, "mm_vision_select_layer": -2,
          "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": False,
          "freeze_mm_mlp_adapter": False, "use_mm_proj": True}
    if version == "1.0":  # LLaVA-Lightning-7B-delta-v1-1: linear projector, <im_start>/<im_end>, 224 px tower
        mm.update(mm_vision_tower="openai/clip-vit-large-patch14", mm_use_im_start_end=True, transformers_version="4.28.0.dev0")
        del mm["mm_use_im_patch_token"]
        llama.update(max_sequence_length=2048, rms_norm_eps=1e-6)
    elif version == "1.5":  # liuhaotian/llava-v1.5-7b
        mm.update(mm_projector_type="mlp2x_gelu", mm_vision_select_feature="patch", image_aspect_ratio="pad",
                  tokenizer_model_max_length=2048, tokenizer_padding_side="right", transformers_version="4.31.0")
    elif version == "1.6":  # liuhaotian/llava-v1.6-vicuna-7b
        mm.update(mm_projector_type="mlp2x_gelu", mm_vision_select_feature="patch", image_aspect_ratio="anyres",
                  mm_patch_merge_type="spatial_unpad", unfreeze_mm_vision_tower=True, mm_vision_tower_lr=2e-6,
                  mm_projector_lr=None, image_crop_resolution=224, image_split_resolution=224,
                  image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                  tokenizer_model_max_length=4096, tokenizer_padding_side="right", transformers_version="4.36.2")
    return {**llama, **text, **mm}
