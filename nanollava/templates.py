"""The templates and their exact loss masks: plain, vicuna_v1/llava_v1, mistral_instruct, chatml_direct; ids built
segment by segment.

Matches the official haotian-liu/LLaVA training code (`preprocess_plain`, `preprocess_v1`, `tokenizer_image_token`,
conversation.py) with deliberate differences (the README's "Fidelity to the release" lists each, with its test):
- ids and labels are built segment by segment, so the loss covers exactly each answer and its </s> by
  construction. The official code re-tokenizes and counts, and silently masks a whole sample on a count
  mismatch ("WARNING: tokenization mismatch"). Segments are cut only before a "▁" that starts an answer
  (" {answer}") or at a special token, and no Llama piece holds "▁" after another character, so encoding
  segment by segment gives the same ids as encoding the whole prompt (tests/test_official.py checks it
  against the official code's own outputs).
- text is text: "</s>" written in a message is never the end-of-sequence id.

Prompts (REFERENCE.md); in training rows the image placeholder goes at the start of the first question:
  plain:     <s> <image> {caption}\n                      loss on "{caption}\n"
  vicuna_v1: <s> {SYSTEM} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>
                                                          loss on " {a}" and </s> of every turn
After each </s>, "USER:" is tokenized as the release was trained, "US" "ER" ":" (tok.turn_boundary, see
Tokenizer.encode_after_special). Inference prompts (prompt_ids) take every message verbatim, as the official
model_vqa_loader does. mistral_instruct and chatml_direct (LLaVA-1.6): next_segments.
"""
IGNORE_INDEX = -100  # label of a position the loss skips (torch's cross_entropy default ignore_index)
IMAGE = "<image>"  # the placeholder in dataset text; in ids it becomes image_token_id
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SHORT_ANSWER = "Answer the question using a single word or phrase."
# llava_v1: the inference template of the official CLI for Vicuna models (1.5 and 1.6); it says "human" where
# vicuna_v1 (what `--version v1` trains with) says "user", and is otherwise the same
SYSTEM_LLAVA_V1 = SYSTEM.replace("user", "human")
CHATML_SYSTEM = "Answer the questions."  # chatml_direct's (LLaVA-1.6-34B)
TEMPLATES = ("plain", "vicuna_v1", "llava_v1", "mistral_instruct", "chatml_direct")
NEXT_TEMPLATES = ("mistral_instruct", "chatml_direct")  # LLaVA-1.6's own (next_segments)


class DataError(ValueError):
    """A bad row or image. `reason` is the short name it is counted under."""

    def __init__(self, message, reason="malformed row"):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------- templates

def _pairs(conversations, open_end=False):
    """LLaVA turns [{"from": "human"|"gpt", "value": ...}, ...] or (question, answer) pairs -> checked pairs;
    the last answer is None exactly when open_end (a prompt for generation)."""
    if conversations and isinstance(conversations[0], dict):
        if any(not isinstance(t, dict) or not isinstance(t.get("value"), str) for t in conversations):
            raise DataError("a turn that is not {'from': ..., 'value': str}")
        roles = [t.get("from") for t in conversations]
        if roles != ["human", "gpt"] * (len(roles) // 2) + ["human"] * (len(roles) % 2):
            raise DataError(f"turns must alternate human, gpt, ...; got {roles}", "role order")
        values = [t["value"] for t in conversations] + [None] * (len(roles) % 2)
        pairs = list(zip(values[::2], values[1::2]))
    else:
        pairs = [tuple(p) for p in conversations]
        if any(len(p) != 2 or not isinstance(p[0], str) or not isinstance(p[1], (str, type(None))) for p in pairs):
            raise DataError("turns must be (question, answer) pairs of strings")
    if not pairs or any(a is None for _, a in pairs[:-1]) or (pairs[-1][1] is None) != open_end:
        raise DataError("every question needs an answer" if not open_end else "the last turn must be unanswered",
                        "no answer")
    if any(a is not None and IMAGE in a for _, a in pairs):
        raise DataError(f"{IMAGE} inside an answer", "image marker in answer")
    return pairs


def _prepare(conversations, template):
    """A training row -> (pairs, has_image), with the image marker moved to the front of the first question as
    "<image>\n{question}" (the official preprocess_multimodal, except that it keeps the marker's turn)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}, expected one of {TEMPLATES}")
    pairs = _pairs(conversations)
    has_image = any(IMAGE in q for q, _ in pairs)
    if template == "plain":
        if len(pairs) != 1 or not has_image:
            raise DataError("the plain template needs one image and one caption", "plain needs image + caption")
        if not pairs[0][1].strip():
            raise DataError("an empty caption", "empty text")
        return [(IMAGE, pairs[0][1])], True  # official preprocess_plain replaces the question by the image
    # Official preprocess_multimodal: a turn holding the marker loses it and is stripped; the image then
    # goes first as "<image>\n". We put it in the first question even when a row had it in a later one.
    pairs = [(q.replace(IMAGE, "").strip() if IMAGE in q else q, a) for q, a in pairs]
    if has_image:
        pairs[0] = (IMAGE + "\n" + pairs[0][0].strip(), pairs[0][1])
    if any(not q.strip() for q, _ in pairs[1 if has_image else 0:]) or any(not a.strip() for _, a in pairs):
        raise DataError("an empty question or answer", "empty text")
    return pairs, has_image


def _vicuna(pairs, tok, image_token_id, system=SYSTEM):
    """ids and labels of "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>..." (an open
    last turn ends in "ASSISTANT:") as conv_vicuna_v1.get_prompt() + tokenizer_image_token make them. Segments:
    the text before the marker; the text after it (a new tokenizer call, so a new dummy prefix: "\n" becomes
    "▁" (29871) "<0x0A>" (13)); each " {answer}" (cut before its "▁"); after every </s> the next turn, encoded
    as text after a special token (tok.turn_boundary: "US" "ER" ":" as the release trained)."""
    ids, labels = [tok.bos_id], [IGNORE_INDEX]

    def add(new, supervised):
        ids.extend(new)
        labels.extend(new if supervised else [IGNORE_INDEX] * len(new))

    for k, (q, a) in enumerate(pairs):
        head = (system + " USER: " if system else "USER: ") if k == 0 else "USER: "
        encode = tok.encode if k == 0 else tok.encode_after_special
        before, marker, after = (head + q).partition(IMAGE)
        if marker:
            add(encode(before), False)  # ends in a lone "▁" when the marker follows "USER: ", as officially
            add([image_token_id], False)
            add(tok.encode(after + " ASSISTANT:"), False)
        else:
            add(encode(before + " ASSISTANT:"), False)
        if a is None:
            break
        add(tok.encode(" " + a, prefix=False), True)
        add([tok.eos_id], True)
    return ids, labels


def special_id(tok, piece):
    """The id of a special piece the template needs (ChatML's markers are vocabulary tokens of Yi's tokenizer)."""
    i = tok.piece_to_id(piece)
    if i == tok.unk_id:
        raise DataError(f"the tokenizer has no {piece} token, which the chatml_direct template needs")
    return i


def stop_id(tok, template):
    """The token that ends an answer: <|im_end|> for chatml_direct (LLaVA-1.6-34B), </s> otherwise."""
    return special_id(tok, "<|im_end|>") if template == "chatml_direct" else tok.eos_id


def next_segments(pairs, has_image, template, first=True):
    """LLaVA-1.6's other two templates (official conversation.py, REFERENCE-NEXT A10) as segments
    (text | "<image>" | special piece, supervised, dummy prefix):
      mistral_instruct: <s>[INST] <image>\n{q1} [/INST] {a1} </s>[INST] {q2} [/INST]   loss on " {a} " and </s>
      chatml_direct:    <|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n{q1}<|im_end|>
                        <|im_start|>assistant\n{a1}<|im_end|><|im_start|>user\n...      loss on "{a}" and <|im_end|>
    A chunk right after <image> gets a dummy prefix (tokenizer_image_token encodes each chunk alone); text after
    </s> or a ChatML marker gets none. first=False: a later turn, as it follows the previous stop token."""
    segs = []
    for k, (q, a) in enumerate(pairs):
        img = k == 0 and has_image and first
        body = q[len(IMAGE):] if img else q
        if template == "mistral_instruct":
            segs += [("[INST] ", False, k == 0 and first), (IMAGE, False, False), (body + " [/INST]", False, True)] if img \
                else [("[INST] " + body + " [/INST]", False, k == 0 and first)]
            if a is not None:
                segs += [(" " + a + " ", True, False), ("</s>", True, False)]
        else:  # chatml_direct
            if k == 0 and first:
                segs += [("<|im_start|>", False, False), ("system\n" + CHATML_SYSTEM, False, False), ("<|im_end|>", False, False)]
            segs += [("<|im_start|>", False, False), ("user\n", False, False)] + ([(IMAGE, False, False)] if img else []) \
                + [(body, False, img), ("<|im_end|>", False, False), ("<|im_start|>", False, False), ("assistant\n", False, False)]
            if a is not None:
                segs += [(a, True, False), ("<|im_end|>", True, False)]
    return segs


def template_text(segs):
    """The prompt as one string (the form REFERENCE-NEXT A10 quotes)."""
    return "".join(text for text, _, _ in segs)


def _build_next(segs, tok, image_token_id, bos=True):
    ids, labels = ([tok.bos_id], [IGNORE_INDEX]) if bos else ([], [])
    for text, supervised, prefix in segs:
        new = [image_token_id] if text == IMAGE else [tok.eos_id] if text == "</s>" else \
            [special_id(tok, text)] if text.startswith("<|im_") else tok.encode(text, prefix=prefix)
        ids.extend(new)
        labels.extend(new if supervised else [IGNORE_INDEX] * len(new))
    return ids, labels


def _ids(pairs, has_image, tok, template, image_token_id, system):
    """(ids, labels) of checked pairs in any template."""
    if template in NEXT_TEMPLATES:  # BOS: Mistral's tokenizer adds one, Yi's does not
        return _build_next(next_segments(pairs, has_image, template), tok, image_token_id, template == "mistral_instruct")
    if template in ("vicuna_v1", "llava_v1"):
        if template == "llava_v1" and system == SYSTEM:  # the default system sentence, in llava_v1's words
            system = SYSTEM_LLAVA_V1
        return _vicuna(pairs, tok, image_token_id, system)
    # plain: official tokenizer_image_token encodes each chunk around <image> on its own, dummy prefix included.
    caption = tok.encode(pairs[0][1] + "\n")
    return [tok.bos_id, image_token_id] + caption, [IGNORE_INDEX, IGNORE_INDEX] + caption


def conversation_ids(conversations, tok, template, image_token_id, system=SYSTEM):
    """A training row -> (ids, labels): lists of ints, labels IGNORE_INDEX where the loss is masked.
    system="" leaves vicuna_v1's system prompt out (prepare.py pretrains the world's LLM on such chats)."""
    pairs, has_image = _prepare(conversations, template)
    return _ids(pairs, has_image, tok, template, image_token_id, system)


def prompt_ids(turns, tok, image_token_id, system=SYSTEM, template="vicuna_v1"):
    """The prompt for generation, ending where the answer starts ("ASSISTANT:", "[/INST]", "assistant\n"), as the
    official inference code builds it (model_vqa_loader, the CLI): every message verbatim, whitespace kept, so
    "<image>\nWhat does the sign say?  " ends in "say?   ASSISTANT:" and a question that is only "<image>" is
    followed by " ASSISTANT:". turns: [(question, answer), ..., (question, None)] or LLaVA turns ending with a
    human one. "<image>" marks the image: at most once, in the first question, where the caller puts it (the
    official loaders put "<image>\n" in front of the question; mistral_instruct and chatml_direct need it there).
    system="" leaves vicuna_v1's and llava_v1's system prompt out."""
    if template not in TEMPLATES[1:]:
        raise ValueError(f"unknown template {template!r} for a prompt, expected one of {TEMPLATES[1:]}")
    pairs = _pairs(turns, open_end=True)
    if pairs[0][0].count(IMAGE) > 1 or any(IMAGE in q for q, _ in pairs[1:]):
        raise DataError(f"{IMAGE} can only be in the first question, once")
    if any(not q for q, _ in pairs) or any(a == "" for _, a in pairs):
        # The official get_prompt() writes an empty message as "USER:" with no separator: never trained on.
        raise DataError("an empty question or answer", "empty text")
    has_image = IMAGE in pairs[0][0]
    if has_image and template in NEXT_TEMPLATES and not pairs[0][0].startswith(IMAGE):
        raise DataError(f"{template} needs {IMAGE} at the start of the first question")
    return _ids(pairs, has_image, tok, template, image_token_id, system)[0]


def continuation_ids(question, tok, template="vicuna_v1"):
    """The next turn as it follows a generated stop token: feed [stop_id(tok, template)] + these when keeping
    the KV cache."""
    if IMAGE in question:
        raise DataError(f"{IMAGE} can only be in the first question")
    if template in NEXT_TEMPLATES:
        return _build_next(next_segments([(question, None)], False, template, first=False), tok, 0, bos=False)[0]
    return tok.encode_after_special("USER: " + question + " ASSISTANT:")


def template_for(config):
    """The chat template a checkpoint's config.json implies (the official CLI guesses it from the directory's
    name instead): Mistral -> mistral_instruct, Yi's 64000-token vocabulary (34B) -> chatml_direct, another
    LLaVA-1.6 -> llava_v1, LLaVA-1.5 and nanollava's own -> vicuna_v1 (what they were trained with)."""
    text = config.get("text_config", config)
    if "mistral" in str(text.get("model_type", "")) or "mistral" in str(config.get("model_type", "")):
        return "mistral_instruct"
    if text.get("vocab_size") in (64000, 64064):
        return "chatml_direct"
    if config.get("model_type") == "llava_next" or config.get("image_aspect_ratio") == "anyres":
        return "llava_v1"
    return "vicuna_v1"
