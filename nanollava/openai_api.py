"""
What an OpenAI chat completion request may be, for nanollava/serve.py: the server's Limits, ApiError (an HTTP
status and one sentence, in OpenAI's error shape), decoding a data: URL image through the model's preprocessing,
and parse_chat, which checks a request field by field and turns it into the prompt ids and sampling settings of
one row of the batch; usage_of is the usage object of an answer.

- Text and image_url parts; one image, in the first user turn, as LLaVA-1.5 was trained; data: URLs of base64 PNG,
  JPEG or WebP only (http(s) URLs are refused: nothing is fetched); the image capped in bytes and in pixels.
- system (or developer) first, then user and assistant alternating, ending with a user turn; temperature, top_p,
  max_tokens (or max_completion_tokens), stop (up to 4 strings), seed, n = 1, and `"attention": true` (an extension).
- The prompt with its image features must fit the context; the answer length is cut to what is left of it.
"""
import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

import torch
from PIL import Image

from nanollava.data import IMAGE, SYSTEM, DataError, prompt_ids

DATA_URL = re.compile(r"data:image/(png|jpeg|jpg|webp);base64,(.*)", re.S)
FORMATS = {"PNG", "JPEG", "WEBP"}


@dataclass
class Limits:
    max_batch: int = 8                  # rows decoding together
    max_queue: int = 64                 # requests waiting for a row; one more gets 503
    max_body_bytes: int = 16 * 2**20    # the whole request (base64 makes an image 4/3 bigger)
    max_image_bytes: int = 8 * 2**20    # one decoded image file
    max_image_pixels: int = 4096 * 4096
    max_tokens: int = 512               # the default answer length, as the official CLI


class ApiError(Exception):
    """A bad request: its HTTP status and one sentence, answered as {"error": {"message", "type", "param"}}."""

    def __init__(self, status, message, param=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self):
        kind = {404: "not_found_error", 413: "request_too_large", 503: "server_busy"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": None}}


# ----------------------------------------------------------------------------- requests

class NamedBytes(io.BytesIO):
    """Image bytes that name their place in the request, so that load_image's errors say where the image was."""

    def __init__(self, data, name):
        super().__init__(data)
        self.name = name

    def __str__(self):
        return self.name


def decode_image(url, where, pre, limits):
    """A data: URL -> (3, S, S) pixels via the model's preprocessing, or an ApiError naming the part."""
    if not isinstance(url, str):
        raise ApiError(400, f"{where}: image_url.url must be a string", where)
    if re.match(r"https?://", url, re.I):
        raise ApiError(400, f"{where}: http(s) image URLs are not fetched; send the image inline as a data: URL "
                            f"(base64 PNG, JPEG or WebP)", where)
    m = DATA_URL.match(url)
    if not m:
        raise ApiError(400, f"{where}: not a data:image/png, jpeg or webp;base64 URL", where)
    if len(m[2]) > limits.max_image_bytes * 4 // 3 + 4:
        raise ApiError(413, f"{where}: the image is over the {limits.max_image_bytes} byte limit", where)
    try:
        raw = base64.b64decode(re.sub(r"\s+", "", m[2]), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the base64 data is corrupt", where) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))  # reads the header only
            fmt, (w, h) = img.format, img.size
    except Exception:
        raise ApiError(400, f"{where}: the data is not a PNG, JPEG or WebP image", where) from None
    if fmt not in FORMATS:
        raise ApiError(400, f"{where}: the image is {fmt}; PNG, JPEG and WebP are supported", where)
    if w * h > limits.max_image_pixels:
        raise ApiError(400, f"{where}: the image is {w}x{h} pixels, over the limit of {limits.max_image_pixels}", where)
    try:
        return pre(NamedBytes(raw, where))
    except DataError as e:
        raise ApiError(400, str(e), where) from None


def text_of(content, where, images, pre, limits, may_hold_image):
    """A message's content (a string or a list of parts) -> its text; images found are decoded into `images`."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts", where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            if images:
                raise ApiError(400, f"{at}: a second image; one image per conversation is supported, as LLaVA-1.5 "
                                    f"was trained", at)
            if not may_hold_image:
                raise ApiError(400, f"{at}: the image must be in the first user message, as LLaVA-1.5 was trained", at)
            url = part.get("image_url")
            images.append(decode_image(url.get("url") if isinstance(url, dict) else url, at, pre, limits))
        else:
            raise ApiError(400, f"{at}: a part must be {{'type': 'text', 'text': ...}} or {{'type': 'image_url', ...}}", at)
    return "\n".join(texts)


def number(body, key, default, lo, hi, integer=False, lo_open=False):
    v = body.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or v < lo or v > hi or (lo_open and v == lo):
        span = f"{'above' if lo_open else 'at least'} {lo}" + ("" if hi == float("inf") else f" and at most {hi}")
        raise ApiError(400, f"{key} must be {'an integer' if integer else 'a number'} {span}; got {v!r}", key)
    return v


def parse_chat(body, name, model, tok, pre, limits):
    """A chat completion request -> the keyword arguments of the serve.Job it asks for (its prompt ids, pixels
    (1, 3, S, S) or None, sampling settings, answer length and generator), or an ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("model") is None:
        raise ApiError(400, f"model is required; this server serves {name!r}", "model")
    if body["model"] != name:
        raise ApiError(404, f"the model {body['model']!r} does not exist; this server serves {name!r}", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of chat messages", "messages")
    if body.get("n", 1) not in (1, None):
        raise ApiError(400, "n must be 1: one answer per request", "n")
    temperature = number(body, "temperature", 1.0, 0, 2)
    top_p = number(body, "top_p", 1.0, 0, 1, lo_open=True)
    max_tokens = number(body, "max_completion_tokens", None, 1, float("inf"), integer=True)
    max_tokens = number(body, "max_tokens", max_tokens, 1, float("inf"), integer=True)
    seed = number(body, "seed", None, -2**63, 2**64 - 1, integer=True)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a string or a list of at most 4 non-empty strings", "stop")
    images, system, turns = [], SYSTEM, []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"{where}.role must be system, user or assistant; got {role!r}", where)
        if role in ("system", "developer") and i > 0:
            raise ApiError(400, f"{where}: a system message may only come first", where)
        text = text_of(m.get("content"), where, images, pre, limits, role == "user" and not turns)
        if role in ("system", "developer"):
            system = text
        else:
            turns.append((role, text))
    roles = [r for r, _ in turns]
    if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        raise ApiError(400, "messages must alternate user and assistant (after an optional system message) and end "
                            "with a user message", "messages")
    pairs = [(q, a) for (_, q), (_, a) in zip(turns[::2], turns[1::2] + [(None, None)])]
    if images:
        pairs[0] = (IMAGE + "\n" + pairs[0][0], pairs[0][1])
    try:
        ids = prompt_ids(pairs, tok, model.image_token_id, system)
    except DataError as e:
        raise ApiError(400, f"messages: {e}", "messages") from None
    ctx = model.config.text.max_position_embeddings
    prompt_tokens = len(ids) + (model.config.vision.num_patches - 1) * len(images)
    if prompt_tokens >= ctx:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens with its image features; the context holds {ctx}",
                       "messages")
    gen = torch.Generator(model.language_model.lm_head.weight.device)
    gen.manual_seed(seed % 2**64) if seed is not None else gen.seed()
    return dict(ids=ids, pixels=images[0][None] if images else None, prompt_tokens=prompt_tokens,
                temperature=temperature, top_p=top_p, max_new=min(max_tokens or limits.max_tokens, ctx - prompt_tokens),
                stop=stop, generator=gen, attention=bool(body.get("attention")))


def usage_of(job):
    """The usage object of an answer (a serve.Job): prompt tokens count the image features."""
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": len(job.out),
            "total_tokens": job.prompt_tokens + len(job.out)}
