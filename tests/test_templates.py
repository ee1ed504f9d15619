"""LLaVA-1.6's chat templates (mistral_instruct, chatml_direct, llava_v1) against the strings the official
conversation.py renders (REFERENCE-NEXT A10), their ids against the official tokenizer_image_token on those
strings, and their loss masks (exactly each answer and its stop token)."""
import pytest

from nanollava.templates import (IGNORE_INDEX, IMAGE, SYSTEM, DataError, continuation_ids, conversation_ids,
                                 next_segments, prompt_ids, stop_id, template_for, template_text)
from nanollava.tokenizer import load_tokenizer
from oracles import hf_llama_tokenizer, tokenizer_image_token

TURNS = [(IMAGE + "\nWhat is it?", "A red star."), ("And the colour?", "Red.")]

# the official renderings (conversation.py get_prompt) of TURNS and of the open first turn
OFFICIAL = {
    "mistral_instruct": ("[INST] <image>\nWhat is it? [/INST] A red star. </s>[INST] And the colour? [/INST] Red. </s>",
                         "[INST] <image>\nWhat is it? [/INST]"),
    "chatml_direct": ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is it?<|im_end|>"
                      "<|im_start|>assistant\nA red star.<|im_end|><|im_start|>user\nAnd the colour?<|im_end|>"
                      "<|im_start|>assistant\nRed.<|im_end|>",
                      "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is it?<|im_end|>"
                      "<|im_start|>assistant\n"),
}


@pytest.mark.parametrize("template", list(OFFICIAL))
def test_template_strings(template):
    full, open_first = OFFICIAL[template]
    assert template_text(next_segments(TURNS, True, template)) == full
    assert template_text(next_segments([(TURNS[0][0], None)], True, template)) == open_first


@pytest.fixture
def toks(sp_model_path):
    ours = load_tokenizer(sp_model_path)
    ours.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # Yi's ChatML markers are vocabulary tokens
    hf = hf_llama_tokenizer(sp_model_path)
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return ours, lambda text: [1] + [i for i in hf(text).input_ids if i != 1]  # BOS as add_bos_token=True


def test_mistral_ids_and_mask_equal_the_official_tokenization(toks):
    tok, encode = toks
    full, open_first = OFFICIAL["mistral_instruct"]
    ids, labels = conversation_ids(TURNS, tok, "mistral_instruct", -200)
    assert ids == tokenizer_image_token(full, encode)
    assert prompt_ids([(TURNS[0][0], None)], tok, -200, template="mistral_instruct") == tokenizer_image_token(open_first, encode)
    supervised = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    answers = [tok.encode(" A red star. ", prefix=False) + [tok.eos_id], tok.encode(" Red. ", prefix=False) + [tok.eos_id]]
    assert supervised == answers[0] + answers[1]
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(ids, labels))
    # the chat's next turn after the first answer's </s> continues the same ids
    first = prompt_ids([(TURNS[0][0], None)], tok, -200, template="mistral_instruct") + answers[0]
    assert first + continuation_ids(TURNS[1][0], tok, "mistral_instruct") == \
        prompt_ids([TURNS[0], (TURNS[1][0], None)], tok, -200, template="mistral_instruct")


def test_chatml_ids_mask_and_stop_token(toks):
    tok, _ = toks
    ids, labels = conversation_ids(TURNS, tok, "chatml_direct", -200)
    end = tok.piece_to_id("<|im_end|>")
    assert stop_id(tok, "chatml_direct") == end != tok.unk_id and stop_id(tok, "mistral_instruct") == tok.eos_id
    assert ids[0] == tok.piece_to_id("<|im_start|>")  # no BOS: Yi's tokenizer adds none
    assert ids.count(-200) == 1
    supervised = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert supervised == tok.encode("A red star.", prefix=False) + [end] + tok.encode("Red.", prefix=False) + [end]
    first = prompt_ids([(TURNS[0][0], None)], tok, -200, template="chatml_direct") + tok.encode("A red star.", prefix=False) + [end]
    assert first + continuation_ids(TURNS[1][0], tok, "chatml_direct") == \
        prompt_ids([TURNS[0], (TURNS[1][0], None)], tok, -200, template="chatml_direct")
    with pytest.raises(DataError, match="<|im_end|>"):
        stop_id(load_tokenizer_without_chatml(toks), "chatml_direct")


def load_tokenizer_without_chatml(toks):
    tok, _ = toks
    from nanollava.tokenizer import Tokenizer
    return Tokenizer([tok.id_to_piece(i) for i in range(32000)], tok._merges)


def test_llava_v1_says_human(toks):
    tok, encode = toks
    ids = prompt_ids([(TURNS[0][0], None)], tok, -200, template="llava_v1")
    human = SYSTEM.replace("user", "human")
    assert "human's questions" in human and ids == tokenizer_image_token(f"{human} USER: {TURNS[0][0]} ASSISTANT:", encode)
    assert ids != prompt_ids([(TURNS[0][0], None)], tok, -200, template="vicuna_v1")


def test_template_for_configs():
    assert template_for({"model_type": "llava_mistral", "image_aspect_ratio": "anyres"}) == "mistral_instruct"
    assert template_for({"model_type": "llava_next", "text_config": {"model_type": "mistral"}}) == "mistral_instruct"
    assert template_for({"model_type": "llava_llama", "vocab_size": 64000, "image_aspect_ratio": "anyres"}) == "chatml_direct"
    assert template_for({"model_type": "llava_next", "text_config": {"model_type": "llama", "vocab_size": 64064}}) == "chatml_direct"
    assert template_for({"model_type": "llava_next", "text_config": {"model_type": "llama", "vocab_size": 32064}}) == "llava_v1"
    assert template_for({"model_type": "llava", "text_config": {"vocab_size": 32064}}) == "vicuna_v1"
