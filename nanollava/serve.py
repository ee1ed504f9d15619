"""
An OpenAI-compatible server for a LLaVA-1.5 model, with a chat page, on FastAPI and uvicorn.

    python sample.py --serve --model out/stage2/model              # http://127.0.0.1:8000: the page, and the API
    python bench.py serve --model out/stage2/model --threads 1     # eight clients at once against one at a time

- POST /v1/chat/completions in OpenAI's chat format: text and image_url parts (data: URLs of base64 PNG, JPEG or
  WebP; http(s) URLs are refused, nothing is fetched), one image, in the first user turn, as LLaVA-1.5 was trained;
  system, temperature, top_p, max_tokens, stop, seed, stream (server-sent events ending with [DONE]), usage with
  the image features counted. `"attention": true` (an extension) adds where the answer looked: a grid of the image
  patches' share of the answer's attention (nanollava.attention_map). GET /v1/models, GET /health, GET / (the page).
- Continuous batching (Engine): one worker thread owns the model; a request that arrives while others decode is
  prefilled on its own and joins the left-padded batch at the next step; a row that ends (eos, stop, max_tokens,
  client gone) leaves it at once. Each row has its own sampler, so a greedy answer equals the answer alone.
- Limits: a bounded queue (503 when full), the request body and the image capped in bytes, the image in pixels.
  Every bad request gets a 4xx JSON error in OpenAI's shape with one sentence; the server keeps serving. What a
  request may be, and those errors, are nanollava/openai_api.py.
"""
import asyncio
import collections
import json
import sys
import threading
import time
import uuid
from pathlib import Path

import torch

from nanollava.attention_map import image_attention, patch_grid
from nanollava.llava import sample
from nanollava.openai_api import ApiError, Limits, parse_chat, usage_of

PAGE = Path(__file__).with_name("chat.html")


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
    """The worker thread that owns the model. Each turn of its loop: admit waiting
    jobs while rows are free (prefilled together, then merged into the running batch's KV cache), take
    one decoding step for every row, and drop the rows that ended. Rows are left-padded: in the merged cache a
    shorter row has padding keys on its left, which the mask hides and the positions (counting real tokens only)
    skip, so each row computes what it would alone."""

    def __init__(self, model, tok, limits):
        self.model, self.tok, self.limits = model, tok, limits
        self.waiting, self.rows = collections.deque(), []
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
                while not (self.waiting or self.rows):
                    self.cv.wait()
                self.waiting = collections.deque(j for j in self.waiting if not j.cancelled)
                new = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.limits.max_batch - len(self.rows)))]
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
        job = Job(**await asyncio.to_thread(parse_chat, body, name, model, tok, pre, limits))  # image decoding off the loop
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


def serve(model, tok, pre, name, host="127.0.0.1", port=8000, limits=None):
    import uvicorn
    print(f"nanollava.serve: {name} on http://{host}:{port} (the chat page at /, the API at /v1)", file=sys.stderr, flush=True)
    uvicorn.run(create_app(model, tok, pre, name, limits), host=host, port=port, log_level="warning")
