"""nanollava/serve.py, nanollava/openai_api.py and nanollava/attention_map.py on a tiny random checkpoint: the real
openai client against `sample.py --serve` in a subprocess (streamed and not, equal to `sample.py --temperature 0`),
eight concurrent clients against each answer alone, every bad request, the queue and disconnect limits on an
in-process server, the chat page in headless Chromium, the attention weights against transformers' eager attention,
and `bench.py serve` end to end."""
import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

import sample
from nanollava.attention_map import image_attention, overlay, patch_grid
from nanollava.data import expand2square
from nanollava.templates import IMAGE, SYSTEM, prompt_ids
from nanollava.llama import LlamaConfig
from nanollava.llava import LLaVA, LLaVAConfig
from nanollava.serve import Limits, create_app
from nanollava.tokenizer import train_tokenizer
from nanollava.vit import ViTConfig

ROOT = Path(__file__).resolve().parents[1]
Q1, Q2, Q3 = "What color is the star?", "Describe the image.", "Which shape is at the top left of the picture?"
NAME = "serve/tiny"  # what the server calls the model: the directory's last two path parts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random checkpoint (context 2048, </s> never the greedy choice, so an answer runs to max_tokens and a long
    one takes seconds) in a directory named serve/tiny, its tokenizer, and ten images."""
    d = tmp_path_factory.mktemp("m") / "serve" / "tiny"
    d.mkdir(parents=True)
    tok = train_tokenizer([SYSTEM, "USER: ASSISTANT: " + Q1 + Q2 + Q3, "There is a red circle at the top left."] * 4, 360)
    tok.add_special_tokens(["<image>", "<pad>"])
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=2048)
    vision = ViTConfig(image_size=42, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    model = LLaVA(LLaVAConfig(vision, text, image_token_id=tok.image_id, pad_token_id=tok.pad_id))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)  # larger weights than the init: varied greedy answers
        model.language_model.lm_head.weight[tok.eos_id] = 0
    model.save_pretrained(d)
    tok.save(d)
    Image.new("RGB", (60, 40), (200, 30, 30)).save(d / "red.png")
    g = torch.Generator().manual_seed(1)
    for i in range(9):
        Image.fromarray((torch.rand(30 + 5 * i, 50, 3, generator=g) * 255).byte().numpy()).save(d / f"noise{i}.png")
    return d


@pytest.fixture(scope="module")
def loaded(tiny):
    return sample.load(tiny)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url, proc=None, timeout=180):
    t = time.time()
    while time.time() - t < timeout:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError(f"no server at {url} after {timeout} s")


@pytest.fixture(scope="module")
def server(tiny):
    """`sample.py --serve` in a subprocess on 127.0.0.1, and the CLI answer it must match, run meanwhile."""
    port = free_port()
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.Popen([sys.executable, "sample.py", "--serve", "--model", str(tiny), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    cli = subprocess.run([sys.executable, "sample.py", "--model", str(tiny), "--image", str(tiny / "red.png"), "--prompt", Q1,
                          "--temperature", "0", "--max-new-tokens", "16", "--attention", str(tiny / "attention.png")],
                         cwd=ROOT, capture_output=True, text=True, encoding="utf-8", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url, proc)
        yield url, cli
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def data_url(path):
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def user(image, q):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": q}]}


def alone(loaded, turns, image, n, system=SYSTEM):
    """What the model answers to these turns by itself: one greedy generate call, no server, no batch."""
    model, tok, pre = loaded
    ids = torch.tensor([prompt_ids(turns, tok, model.image_token_id, system)])
    out = model.generate(ids, pre(image)[None], max_new_tokens=n, eos_id=tok.eos_id)[0]
    return tok.decode(sample.until_eos(out, tok.eos_id))


def test_openai_client_gets_what_sample_py_gives(server, tiny, loaded):
    from openai import OpenAI
    url, cli = server
    assert cli.returncode == 0, cli.stderr
    expected = cli.stdout.removesuffix("\n")
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [NAME]
    msgs = [user(tiny / "red.png", Q1)]
    r = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=16)
    assert r.choices[0].message.content == expected, f"API {r.choices[0].message.content!r} vs sample.py {expected!r}"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 16
    model, tok, _ = loaded
    prompt = prompt_ids([(IMAGE + "\n" + Q1, None)], tok, model.image_token_id)
    assert r.usage.prompt_tokens == len(prompt) + model.config.vision.num_patches - 1  # the image counted as features
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "the answer was not streamed"
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    # the conversation goes on (image in the first turn), with a system prompt of the client's
    two = msgs + [{"role": "assistant", "content": expected}, {"role": "user", "content": Q3}]
    r2 = client.chat.completions.create(model=NAME, messages=[{"role": "system", "content": "Be brief."}] + two,
                                        temperature=0, max_tokens=12)
    assert r2.choices[0].message.content == alone(loaded, [(IMAGE + "\n" + Q1, expected), (Q3, None)], tiny / "red.png", 12, "Be brief.")
    # stop strings end the answer before them; seeded sampling repeats itself
    cut = expected[3:5]
    r3 = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=16, stop=[cut])
    assert r3.choices[0].message.content == expected[:expected.index(cut)] and r3.choices[0].finish_reason == "stop"
    s = [client.chat.completions.create(model=NAME, messages=msgs, temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
         .choices[0].message.content for _ in range(2)]
    assert s[0] == s[1]
    # sample.py --attention wrote the picture: the image as a square, its patches dimmed by their share
    png = Image.open(tiny / "attention.png")
    assert png.size == (336, 336) and "written to" in cli.stderr


def test_eight_concurrent_clients_each_get_their_own_answer(server, tiny, loaded):
    from openai import OpenAI
    url, _ = server
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    jobs = [(tiny / f"noise{i}.png", [Q1, Q2, Q3][i % 3], 12 + 4 * i) for i in range(8)]  # different lengths too

    def ask(i):
        image, q, n = jobs[i]
        if i % 2:
            return client.chat.completions.create(model=NAME, messages=[user(image, q)], temperature=0, max_tokens=n).choices[0].message.content
        stream = client.chat.completions.create(model=NAME, messages=[user(image, q)], temperature=0, max_tokens=n, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    before = httpx.get(url + "/health").json()["served"]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    want = [alone(loaded, [(IMAGE + "\n" + q, None)], image, n) for image, q, n in jobs]
    assert got == want
    assert len(set(want)) == 8, "the answers are alike: the test would not see them swapped"
    health = httpx.get(url + "/health").json()
    assert health["served"] - before == 8 and health["running"] == 0
    assert health["largest_batch"] > 1, f"the eight requests never decoded together: {health}"


def png_bytes(w, h, color=(0, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def image_part(raw, kind="png"):
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64," + base64.b64encode(raw).decode()}}


def body(content=None, **kw):
    return {"model": NAME, "messages": [{"role": "user", "content": content or [image_part(png_bytes(20, 20)), {"type": "text", "text": Q1}]}],
            "max_tokens": 4, **kw}


def bad_requests():
    return {  # name: (request body or raw bytes, status, a fragment of the one sentence)
        "malformed JSON": (b'{"model": "serve/tiny", "messages": [', 400, "not valid JSON"),
        "no messages": ({"model": NAME, "messages": []}, 400, "messages must be a non-empty list"),
        "not an image": (body([image_part(b"just some text, not a picture"), {"type": "text", "text": Q1}]), 400, "not a PNG, JPEG or WebP"),
        "corrupt base64": (body([{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR%%w0KGgo=="}}, {"type": "text", "text": Q1}]), 400, "base64"),
        "over the pixel limit": (body([image_part(png_bytes(5000, 4000)), {"type": "text", "text": Q1}]), 400, "5000x4000 pixels"),
        "two images": (body([image_part(png_bytes(20, 20)), image_part(png_bytes(30, 30)), {"type": "text", "text": Q1}]), 400, "one image per conversation"),
        "longer than the context": (body([{"type": "text", "text": "star " * 2500}]), 400, "the context holds 2048"),
        "unknown model": ({**body(), "model": "gpt-4o"}, 404, "'gpt-4o' does not exist"),
        "max_tokens 0": (body(max_tokens=0), 400, "max_tokens must be an integer at least 1"),
        "max_tokens negative": (body(max_tokens=-5), 400, "max_tokens must be"),
        "temperature negative": (body(temperature=-0.5), 400, "temperature must be a number"),
        "http URL": (body([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, {"type": "text", "text": Q1}]), 400, "not fetched"),
        "image in a later turn": ({"model": NAME, "max_tokens": 4, "messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": "red"},
                                  {"role": "user", "content": [image_part(png_bytes(20, 20)), {"type": "text", "text": Q3}]}]}, 400, "first user message"),
        "ends with the assistant": ({"model": NAME, "messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": "red"}]}, 400, "alternate"),
        "a GIF": (body([image_part(b"GIF89a", "gif")]), 400, "data:image/png, jpeg or webp"),
    }


def test_bad_requests_get_a_4xx_sentence_and_the_server_keeps_serving(server):
    url, _ = server
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    cases = {**bad_requests(), "a GIF as PNG": (body([image_part(gif.getvalue()), {"type": "text", "text": Q1}]), 400, "the image is GIF")}
    for name, (req, status, fragment) in cases.items():
        r = httpx.post(url + "/v1/chat/completions", content=req if isinstance(req, bytes) else json.dumps(req),
                       headers={"Content-Type": "application/json"}, timeout=60)
        assert r.status_code == status, f"{name}: HTTP {r.status_code} {r.text[:300]}"
        message = r.json()["error"]["message"]
        assert fragment in message and "\n" not in message and "Traceback" not in message, f"{name}: {message!r}"
    r = httpx.post(url + "/v1/chat/completions", json=body(), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


@pytest.fixture
def small_server(loaded):
    """An in-process server with one row, a queue of one and small byte caps; yields (url, engine)."""
    import uvicorn
    model, tok, pre = loaded
    limits = Limits(max_batch=1, max_queue=1, max_body_bytes=200_000, max_image_bytes=50_000)
    app = create_app(model, tok, pre, NAME, limits)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    wait_up(url)
    yield url, app.state.engine
    srv.should_exit = True
    t.join(30)


def test_queue_full_is_503_and_a_client_that_leaves_frees_its_row(small_server):
    url, engine = small_server
    step = engine._step
    engine._step = lambda: (time.sleep(0.005), step())  # a tiny model decodes 1900 steps in well under a second
    long = {**body(), "max_tokens": 1900, "stream": True}  # about 1900 decoding steps: about 10 s at 5 ms a step
    with httpx.Client(timeout=60) as a:
        with a.stream("POST", url + "/v1/chat/completions", json=long) as first:
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")

            def until(key, n):
                for _ in range(200):
                    if engine.stats()[key] == n:
                        return
                    time.sleep(0.05)
                raise AssertionError(f"{key} never {n}: {engine.stats()}")

            until("running", 1)  # the long answer is decoding
            results = []
            queued = threading.Thread(target=lambda: results.append(httpx.post(url + "/v1/chat/completions", json=body(), timeout=120)))
            queued.start()
            until("waiting", 1)
            r = httpx.post(url + "/v1/chat/completions", json=body(), timeout=60)
            assert r.status_code == 503 and "busy" in r.json()["error"]["message"], r.text
            assert engine.stats()["running"] == 1
        # the stream is closed after one chunk: its row is dropped, the queued request runs and finishes
        t0 = time.time()
        queued.join(120)
    assert results and results[0].status_code == 200, results
    stats = engine.stats()
    assert stats["served"] == 1 and stats["running"] == 0 and stats["waiting"] == 0, stats
    assert time.time() - t0 < 30
    # byte caps: the body, and one image inside a body under the cap
    r = httpx.post(url + "/v1/chat/completions", content=b"x" * 300_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "request body" in r.json()["error"]["message"]
    noisy = io.BytesIO()
    Image.fromarray((torch.rand(160, 160, 3) * 255).byte().numpy()).save(noisy, format="PNG")  # about 77 kB
    r = httpx.post(url + "/v1/chat/completions", json=body([image_part(noisy.getvalue()), {"type": "text", "text": Q1}]))
    assert r.status_code == 413 and "50000 byte limit" in r.json()["error"]["message"], r.text
    assert httpx.post(url + "/v1/chat/completions", json=body()).status_code == 200


def test_attention_weights_equal_transformers_eager_attention(tiny, loaded, tmp_path):
    """image_attention recomputes RoPE and the softmax from hooked q/k projections; transformers' eager attention
    returns the weights it used. Same checkpoint, same prompt + answer: the weights on the image patches agree."""
    from transformers import LlavaForConditionalGeneration
    model, tok, pre = loaded
    ids = torch.tensor(prompt_ids([(IMAGE + "\n" + Q1, None)], tok, model.image_token_id))
    pixels = pre(tiny / "noise3.png")[None]
    answer = model.generate(ids[None], pixels, max_new_tokens=6, eos_id=tok.eos_id)[0].tolist()
    ours = image_attention(model, ids, pixels, answer)  # (L, nh, n, P)
    hf = LlavaForConditionalGeneration.from_pretrained(tiny, attn_implementation="eager").eval()
    P, pos = model.config.vision.num_patches, int((ids == model.image_token_id).nonzero()[0, 0])
    full = torch.cat([ids[:pos], torch.full((P,), model.image_token_id), ids[pos + 1:], torch.tensor(answer[:-1])])[None]
    with torch.no_grad():
        att = hf(input_ids=full, pixel_values=pixels, output_attentions=True).attentions  # L x (1, nh, T, T)
    first = full.shape[1] - len(answer)
    theirs = torch.stack([a[0, :, first:, pos:pos + P] for a in att])
    assert ours.shape == theirs.shape == (2, 4, 6, P)
    diff = (ours - theirs).abs()
    assert torch.allclose(ours, theirs, atol=1e-5), f"max diff {diff.max():.2e}, mean {diff.mean():.2e}"
    grid = patch_grid(ours, model.config.vision)
    assert grid.shape == (3, 3) and float(grid.sum()) == pytest.approx(1.0)
    assert torch.allclose(patch_grid(ours, model.config.vision, 1), theirs[1].mean((0, 1)).view(3, 3) / theirs[1].mean((0, 1)).sum())
    # the picture: the image as the model saw it, the patch looked at most as it is, the others dimmed by their share
    out = Image.open(overlay(tiny / "noise3.png", grid, tmp_path / "a.png")).convert("RGB")
    seen = expand2square(Image.open(tiny / "noise3.png").convert("RGB"), (122, 116, 104)).resize((336, 336), Image.BICUBIC)
    (hr, hc), (cr, cc) = (divmod(int(i), 3) for i in (grid.argmax(), grid.argmin()))
    at = lambda im, r, c: im.getpixel((c * 112 + 56, r * 112 + 56))
    assert out.size == (336, 336) and at(out, hr, hc) == at(seen, hr, hc)
    light = 0.2 + 0.8 * float(grid.min() / grid.max())
    assert all(abs(o - light * s) <= 2 for o, s in zip(at(out, cr, cc), at(seen, cr, cc))), (at(out, cr, cc), at(seen, cr, cc), light)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium from the system packages through its own chromedriver (Selenium never downloads one)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no Chromium and chromedriver installed (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,760"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    yield drv
    drv.quit()


@pytest.mark.slow  # a real Chromium
def test_the_page_in_a_real_browser(server, tiny, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    url, _ = server
    drv, wait = browser, WebDriverWait(browser, 120)
    drv.get(url + "/")
    wait.until(lambda d: d.find_element(By.ID, "model").text == NAME)
    drv.find_element(By.ID, "file").send_keys(str(tiny / "noise2.png"))
    wait.until(lambda d: d.find_element(By.ID, "preview").is_displayed())
    plain = drv.execute_script("return document.getElementById('preview').toDataURL()")
    drv.find_element(By.ID, "max").clear()
    drv.find_element(By.ID, "max").send_keys("24")

    def ask(question, n):
        drv.find_element(By.ID, "question").send_keys(question)
        drv.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-done]")) == n)
        return drv.execute_script("return document.querySelectorAll('.assistant')[arguments[0]].textContent", n - 1)

    first = ask(Q1, 1)
    msgs = [user(tiny / "noise2.png", Q1)]
    api = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": msgs, "temperature": 0, "max_tokens": 24}, timeout=300)
    assert first == api.json()["choices"][0]["message"]["content"] and len(first) > 0
    assert "tokens/s" in drv.find_element(By.ID, "rate").text
    assert drv.execute_script("return document.getElementById('preview').toDataURL()") != plain, "no attention overlay"
    second = ask(Q3, 2)  # the conversation goes on
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": Q3}]
    api = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": msgs, "temperature": 0, "max_tokens": 24}, timeout=300)
    assert second == api.json()["choices"][0]["message"]["content"]
    shot = tmp_path / "page.png"
    drv.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0
    print(f"screenshot: {shot}")
    drv.find_element(By.ID, "reset").click()
    assert drv.find_elements(By.CSS_SELECTOR, ".msg") == [] and not drv.find_element(By.ID, "preview").is_displayed()


def test_bench_py_serve_prints_both_ways_the_ratio_and_equal_answers(tiny, tmp_path):
    """`bench.py serve` end to end on the tiny model (random pictures: no world at --data); no timing is asserted,
    but the greedy answers must be the same batched as alone."""
    p = subprocess.run([sys.executable, "bench.py", "serve", "--model", str(tiny), "--data", str(tmp_path / "none.json"),
                        "--tokens", "4", "--repeats", "1", "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"^one at a time: +[\d.]+ tokens/s; time to first token [\d.]+ ms \(median\)\n"
                     r"8 at once: +[\d.]+ tokens/s; time to first token [\d.]+ ms median, [\d.]+ ms worst\n"
                     r"batched / one at a time: [\d.]+x the tokens/s \(32 answer tokens a round; "
                     r"8 of 8 answers identical both ways\)\n$", p.stdout), p.stdout
