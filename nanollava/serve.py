"""
An OpenAI-compatible server for a LLaVA-1.5 model, with a chat page, on FastAPI and uvicorn.

    python sample.py --serve --model out/stage2/model              # http://127.0.0.1:8000: the page, and the API
    python sample.py --serve --bench                               # eight clients at once against one at a time

- POST /v1/chat/completions in OpenAI's chat format: text and image_url parts (data: URLs of base64 PNG, JPEG or
  WebP; http(s) URLs are refused, nothing is fetched), one image, in the first user turn, as LLaVA-1.5 was trained;
  system, temperature, top_p, max_tokens, stop, seed, stream (server-sent events ending with [DONE]), usage with
  the image features counted. `"attention": true` (an extension) adds where the answer looked: a grid of the image
  patches' share of the answer's attention (nanollava.attention_map). GET /v1/models, GET /health, GET / (the page).
- Continuous batching (Engine): one worker thread owns the model; a request that arrives while others decode is
  prefilled on its own and joins the left-padded batch at the next step; a row that ends (eos, stop, max_tokens,
  client gone) leaves it at once. Each row has its own sampler, so a greedy answer equals the answer alone.
- Limits: a bounded queue (503 when full), the request body and the image capped in bytes, the image in pixels.
  Every bad request gets a 4xx JSON error in OpenAI's shape with one sentence; the server keeps serving.
"""
import asyncio
import base64
import binascii
import collections
import io
import json
import re
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from nanollava.attention_map import image_attention, patch_grid
from nanollava.data import IMAGE, SYSTEM, DataError, prompt_ids
from nanollava.llava import sample

PAGE = Path(__file__).with_name("chat.html")
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
    """A chat completion request -> the Job it asks for (not yet submitted), or an ApiError."""
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
    return Job(ids, images[0][None] if images else None, prompt_tokens, temperature, top_p,
               min(max_tokens or limits.max_tokens, ctx - prompt_tokens), stop, gen, bool(body.get("attention")))


# ----------------------------------------------------------------------------- batching

class Job:
    """One request's row: its prompt, sampler, answer so far, and the events it sends to its HTTP handler
    (("delta", text), then ("done", finish_reason)), from the worker thread to the event loop."""

    def __init__(self, ids, pixels, prompt_tokens, temperature, top_p, max_new, stop, generator, attention=False):
        self.ids, self.pixels, self.prompt_tokens = ids, pixels, prompt_tokens
        self.temperature, self.top_p, self.max_new, self.stop, self.generator = temperature, top_p, max_new, stop, generator
        self.want_attention, self.attention = attention, None
        self.out, self.shown, self.finish = [], "", None
        self.cancelled = False  # set by the handler when its client goes away
        self.loop, self.events = None, None
        self.t_submit = self.t_first = self.t_done = None

    def add(self, token, tok):
        """Takes a sampled token; returns the new text to show (held back while it could begin a stop string)."""
        if token == tok.eos_id:
            self.finish = "stop"
        else:
            self.out.append(token)
        text = tok.decode(self.out)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.finish = text[:cut], "stop"
        elif self.finish is None and len(self.out) >= self.max_new:
            self.finish = "length"
        if self.finish is None:  # a trailing U+FFFD may be half a character; a tail may be half a stop string
            text = text.rstrip("\ufffd")
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        if not text.startswith(self.shown) or len(text) == len(self.shown):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new


class Engine:
    """The worker thread that owns the model. Each turn of its loop: run queued calls (attention maps), admit
    waiting jobs while rows are free (prefilled together, then merged into the running batch's KV cache), take
    one decoding step for every row, and drop the rows that ended. Rows are left-padded: in the merged cache a
    shorter row has padding keys on its left, which the mask hides and the positions (counting real tokens only)
    skip, so each row computes what it would alone."""

    def __init__(self, model, tok, limits):
        self.model, self.tok, self.limits = model, tok, limits
        self.waiting, self.calls, self.rows = collections.deque(), collections.deque(), []
        self.cache = self.logits = None
        self.cv = threading.Condition()
        self.served = self.largest_batch = 0
        threading.Thread(target=self._loop, name="nanollava-engine", daemon=True).start()

    def submit(self, job, loop):
        job.loop, job.events, job.t_submit = loop, asyncio.Queue(), time.perf_counter()
        with self.cv:
            self.waiting = collections.deque(j for j in self.waiting if not j.cancelled)
            if len(self.waiting) >= self.limits.max_queue:
                raise ApiError(503, f"the server is busy: {len(self.waiting)} requests are waiting; try again later")
            self.waiting.append(job)
            self.cv.notify()

    def stats(self):
        with self.cv:
            return {"running": len(self.rows), "waiting": sum(not j.cancelled for j in self.waiting),
                    "served": self.served, "largest_batch": self.largest_batch}

    def _loop(self):
        while True:
            with self.cv:
                while not (self.waiting or self.rows or self.calls):
                    self.cv.wait()
                calls, self.calls = list(self.calls), collections.deque()
                self.waiting = collections.deque(j for j in self.waiting if not j.cancelled)
                new = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.limits.max_batch - len(self.rows)))]
            for fn, done in calls:
                done(fn)
            try:
                if new:
                    self._admit(new)
                if self.rows:
                    self._step()
            except Exception as e:  # a failure inside the model: answer 500 to the rows it hit, keep serving
                print(f"nanollava.serve: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                self._send([(j, ("error", f"{type(e).__name__}: {e}")) for j in self.rows + new if j.finish is None])
                self.rows, self.cache, self.logits = [], None, None

    @torch.inference_mode()
    def _admit(self, jobs):
        model, tok = self.model, self.tok
        dev = model.language_model.lm_head.weight.device
        T = max(len(j.ids) for j in jobs)
        ids = torch.full((len(jobs), T), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), T), dtype=torch.long)
        for b, j in enumerate(jobs):
            ids[b, T - len(j.ids):], mask[b, T - len(j.ids):] = torch.tensor(j.ids), 1
        pixels = [j.pixels for j in jobs if j.pixels is not None]
        x, mask, _ = model.embed(ids.to(dev), torch.cat(pixels).to(dev) if pixels else None, mask.to(dev), left=True)
        cache = model.new_cache(len(jobs), x.shape[1] + max(j.max_new for j in jobs))
        logits = model.language_model(inputs_embeds=x, attention_mask=mask, cache=cache)[:, -1]
        if self.rows:
            cache, logits = self._merge(cache, jobs), torch.cat([self.logits, logits])
        self.rows, self.cache, self.logits = self.rows + jobs, cache, logits
        self.largest_batch = max(self.largest_batch, len(self.rows))

    def _merge(self, new, jobs):
        """The running batch's cache and a new one -> one cache, each right-aligned at the longer length."""
        old, rows = self.cache, self.rows + jobs
        L = max(old.len, new.len)
        c = self.model.new_cache(len(rows), L + max(j.max_new - len(j.out) for j in rows))
        c.mask[:, :L] = False
        for part, sl in ((old, slice(0, len(self.rows))), (new, slice(len(self.rows), len(rows)))):
            for i in range(len(c.k)):
                c.k[i][sl, :, L - part.len:L] = part.k[i][:, :, :part.len]
                c.v[i][sl, :, L - part.len:L] = part.v[i][:, :, :part.len]
            c.mask[sl, L - part.len:L] = part.mask[:, :part.len]
        c.len, c.padded = L, not bool(c.mask[:, :L].all())
        return c

    def _shrink(self, keep):
        """Only the rows in keep stay in the cache; padding columns that every remaining row has are cut off."""
        c = self.cache
        mask = c.mask[keep]
        first = int((~mask[:, :c.len]).all(0).long().cumprod(0).sum())  # leading columns all padding
        c.k = [k[keep][:, :, first:] for k in c.k]
        c.v = [v[keep][:, :, first:] for v in c.v]
        c.mask, c.len, c.max_len = mask[:, first:], c.len - first, c.max_len - first
        c.padded = not bool(c.mask[:, :c.len].all())

    @torch.inference_mode()
    def _step(self):
        rows, tok = self.rows, self.tok
        if all(j.temperature == 0 for j in rows):
            toks = self.logits.argmax(-1)
        else:
            toks = torch.stack([sample(self.logits[b:b + 1], j.temperature, j.top_p, j.generator)[0]
                                for b, j in enumerate(rows)])
        events, keep, now = [], [], time.perf_counter()
        for b, (j, t) in enumerate(zip(rows, toks.tolist())):
            if j.cancelled:
                j.finish = "cancelled"
                continue
            j.t_first = j.t_first or now
            delta = j.add(t, tok)
            if delta:
                events.append((j, ("delta", delta)))
            if j.finish is None:
                keep.append(b)
                continue
            j.t_done = now
            if j.want_attention:
                j.attention = self._attention(j)
            events.append((j, ("done", j.finish)))
        if len(keep) < len(rows):
            with self.cv:  # before the answers go out, so that /health counts a request once its client has it
                self.served += sum(j.finish != "cancelled" for j in rows) - len(keep)
                self.rows = [rows[b] for b in keep]
        self._send(events)
        if len(keep) < len(rows):
            if not keep:
                self.cache = self.logits = None
                return
            self._shrink(torch.tensor(keep, device=toks.device))
            toks = toks[keep]
        self.logits = self.model.language_model(toks[:, None], cache=self.cache)[:, -1]

    def _attention(self, job):
        if job.pixels is None or not job.out:
            return None
        dev = self.model.language_model.lm_head.weight.device
        w = image_attention(self.model, torch.tensor(job.ids, device=dev), job.pixels.to(dev), job.out)
        return patch_grid(w, self.model.config.vision).tolist()

    def call(self, fn, loop):
        """Runs fn() on the worker thread between two steps; a future of its result for the event loop."""
        fut = loop.create_future()

        def done(f):
            try:
                r = f()
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(r))
            except Exception as e:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_exception(e))

        with self.cv:
            self.calls.append((fn, done))
            self.cv.notify()
        return fut

    @staticmethod
    def _send(events):
        """Delivers (job, event) pairs to their event loops: one wake-up per loop per step."""
        by_loop = collections.defaultdict(list)
        for j, ev in events:
            by_loop[j.loop].append((j, ev))
        for loop, evs in by_loop.items():
            loop.call_soon_threadsafe(lambda evs=evs: [j.events.put_nowait(ev) for j, ev in evs])


# ----------------------------------------------------------------------------- the app

def create_app(model, tok, pre, name, limits=None):
    """The FastAPI app serving one model under `name`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    limits = limits or Limits()
    engine = Engine(model, tok, limits)
    app = FastAPI(title="nanollava", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request, e):
        return JSONResponse(e.body(), status_code=e.status)

    async def read_json(request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            raise ApiError(413, f"the request body is {size} bytes, over the limit of {limits.max_body_bytes}")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limits.max_body_bytes:
                raise ApiError(413, f"the request body is over the limit of {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "nanollava"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        job = await asyncio.to_thread(parse_chat, body, name, model, tok, pre, limits)  # image decoding off the loop
        engine.submit(job, asyncio.get_running_loop())
        cid, now = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        if body.get("stream"):
            usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")
            return StreamingResponse(stream(job, cid, now, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, finish = [], None
        try:
            while finish is None:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "error":
                    return JSONResponse({"error": {"message": value, "type": "server_error", "param": None, "code": None}}, 500)
                if kind == "delta":
                    text.append(value)
                else:
                    finish = value
        finally:
            job.cancelled = job.finish is None
        out = {"id": cid, "object": "chat.completion", "created": now, "model": name,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                            "finish_reason": finish, "logprobs": None}], "usage": usage_of(job)}
        if job.want_attention:
            out["attention"] = job.attention
        return out

    async def stream(job, cid, now, include_usage):
        def chunk(delta, finish=None, **extra):
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": now, "model": name,
                                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                                          **extra}) + "\n\n"
        # a content chunk is the same JSON with only the text changing: built from two strings, not a dict per token
        head, tail = chunk({"content": "\0"}).split('"\\u0000"')
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await job.events.get()
                if kind == "delta":
                    yield head + json.dumps(value) + tail
                    continue
                if kind == "error":  # the status line is sent already: an error object in the stream, as OpenAI's
                    yield "data: " + json.dumps({"error": {"message": value, "type": "server_error"}}) + "\n\n"
                    break
                yield chunk({}, value, **({"attention": job.attention} if job.want_attention else {}))
                if include_usage:
                    yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": now,
                                                 "model": name, "choices": [], "usage": usage_of(job)}) + "\n\n"
                break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the generator is closed) or the answer is complete
            job.cancelled = job.finish is None

    return app


def usage_of(job):
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": len(job.out),
            "total_tokens": job.prompt_tokens + len(job.out)}


def serve(model, tok, pre, name, host="127.0.0.1", port=8000, limits=None):
    import uvicorn
    print(f"nanollava.serve: {name} on http://{host}:{port} (the chat page at /, the API at /v1)", file=sys.stderr, flush=True)
    uvicorn.run(create_app(model, tok, pre, name, limits), host=host, port=port, log_level="warning")


# ----------------------------------------------------------------------------- benchmark

def _ask(port, body):
    """One streamed request with the standard library: (start, first content, end, text, completion tokens)."""
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0, first, text, usage = time.perf_counter(), None, [], None
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    for line in r:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        ev = json.loads(line[6:])
        usage = ev.get("usage") or usage
        if ev["choices"] and ev["choices"][0]["delta"].get("content"):
            first = first or time.perf_counter()
            text.append(ev["choices"][0]["delta"]["content"])
    c.close()
    return t0, first, time.perf_counter(), "".join(text), usage["completion_tokens"]


def _clients(port, bodies, repeats, conn):
    """The benchmark's clients, in their own process: each repeat serves the requests one at a time, then all at
    once from one thread each."""
    from concurrent.futures import ThreadPoolExecutor
    rounds = []
    for _ in range(repeats):
        alone = [_ask(port, b) for b in bodies]
        with ThreadPoolExecutor(len(bodies)) as pool:
            together = list(pool.map(lambda b: _ask(port, b), bodies))
        rounds.append((alone, together))
    conn.send(rounds)


def bench(model, tok, pre, name, world_manifest, n_new=64, repeats=3, clients=8):
    """Eight clients at once against the same requests one at a time, on a server in this process (clients in
    another): total answer tokens/s (all completion tokens over the wall time from the first request to the last
    answer), the ratio, and time to first token alone and under load; medians over repeats."""
    import multiprocessing
    import socket
    import statistics
    import uvicorn
    manifest = Path(world_manifest)
    if manifest.is_file():
        root = manifest.parent / json.loads(manifest.read_text())["eval"]["image_root"]
        files = sorted((root / "eval").glob("*.png"))[:clients] or sorted(root.rglob("*.png"))[:clients]
        images = [f.read_bytes() for f in files]
    else:
        images = []
    if len(images) < clients:  # no world: random pictures
        g = torch.Generator().manual_seed(0)
        for _ in range(clients - len(images)):
            buf = io.BytesIO()
            Image.fromarray((torch.rand(72, 72, 3, generator=g) * 255).byte().numpy()).save(buf, format="PNG")
            images.append(buf.getvalue())
    bodies = [{"model": name, "temperature": 0, "max_tokens": n_new, "stream": True,
               "stream_options": {"include_usage": True},
               "messages": [{"role": "user", "content": [
                   {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(im).decode()}},
                   {"type": "text", "text": "Describe the image in detail."}]}]} for im in images]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model, tok, pre, name, Limits(max_batch=clients)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    print(f"serve bench: {name}, {clients} requests (world images, 'Describe the image in detail.', greedy, at most "
          f"{n_new} tokens), {repeats} repeats after a warm-up, {torch.get_num_threads()} threads", file=sys.stderr, flush=True)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_clients, args=(port, bodies, repeats + 1, child))
    p.start()
    rounds = parent.recv()[1:]  # the first round warms up
    p.join()
    server.should_exit = True

    def rate(results):  # all answer tokens over the wall time of the whole set
        return sum(r[4] for r in results) / (max(r[2] for r in results) - min(r[0] for r in results))

    seq = statistics.median(rate(a) for a, _ in rounds)
    par = statistics.median(rate(t) for _, t in rounds)
    ttft_alone = statistics.median((r[1] - r[0]) * 1000 for a, _ in rounds for r in a)
    ttft_load = [(r[1] - r[0]) * 1000 for _, t in rounds for r in t]
    same = sum(x[3] == y[3] for a, t in rounds for x, y in zip(a, t))
    tokens = statistics.median(sum(r[4] for r in a) for a, _ in rounds)
    print(f"one at a time: {seq:8.1f} tokens/s; time to first token {ttft_alone:.1f} ms (median)", flush=True)
    print(f"{clients} at once:    {par:8.1f} tokens/s; time to first token {statistics.median(ttft_load):.1f} ms "
          f"median, {max(ttft_load):.1f} ms worst", flush=True)
    print(f"batched / one at a time: {par / seq:.2f}x the tokens/s ({tokens:.0f} answer tokens a round; "
          f"{same} of {len(rounds) * clients} answers identical both ways)", flush=True)
    return seq, par
