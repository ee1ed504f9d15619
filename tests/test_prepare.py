"""prepare.py: the world's files parse, the base checkpoints load in transformers and in nanollava alike,
evaluation is held out, a seed fixes everything, reruns reuse, and the LLaVA-1.5 path checks a local tree
and fails in one sentence without a network. Never touches the internet: HTTP goes to 127.0.0.1 only."""
import contextlib
import hashlib
import importlib.util
import io
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import prepare
from nanollava import download
from nanollava.data import LLaVADataset
from nanollava.templates import IMAGE, SHORT_ANSWER
from nanollava.llama import Llama
from nanollava.tokenizer import load_tokenizer
from nanollava.vit import ViT

ROOT = Path(__file__).resolve().parents[1]
# a world small enough to build in seconds; every flag that shapes it, so the fixture and the tests agree
SMALL = dict(seed=7, image_size=48, patch_size=16, n_train=48, n_eval=12, eval_questions=2, n_text=8,
             vit_width=32, vit_layers=2, vit_heads=2, vit_steps=3, vit_batch=8, vit_lr=2e-3,
             vocab_size=400, llm_width=64, llm_layers=1, llm_heads=2, llm_steps=3, llm_batch=4, llm_lr=3e-3, n_custom=8)


def small_argv(root, **flags):
    """--root ROOT and every flag of SMALL (overridden by flags; True for a switch such as force)."""
    argv = ["--root", str(root)]
    for k, v in {**SMALL, **flags}.items():
        argv += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    return argv


def run_prepare(root, **flags):
    """`python prepare.py --root ROOT --flag value ...`, in process (no second torch import); returns what it printed."""
    argv = small_argv(root, **flags)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        prepare.prepare_world(prepare.parser.parse_args(argv))
    return out.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    out = run_prepare(root)
    return SimpleNamespace(root=root, dir=root / "world", stdout=out)


def tree_digest(d, names=("images", "stage1.json", "stage2.json", "eval.jsonl", "scenes.json")):
    """sha256 of every file of the world's data, by relative path."""
    files = [f for n in names for f in sorted((d / n).rglob("*") if (d / n).is_dir() else [d / n]) if f.is_file()]
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_layout_and_summary(world):
    d = world.dir
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest == {"clip": "base/clip", "vicuna": "base/vicuna",
                        "stage1": {"data": "stage1.json", "image_root": "images"},
                        "stage2": {"data": "stage2.json", "image_root": "images"},
                        "eval": {"questions": "eval.jsonl", "image_root": "images"}}
    for f in ["base/clip/config.json", "base/clip/model.safetensors", "base/clip/preprocessor_config.json",
              "base/vicuna/config.json", "base/vicuna/model.safetensors", "base/vicuna/tokenizer.json",
              "base/vicuna/tokenizer_config.json"]:
        assert (d / f).is_file(), f"{f} is missing"
    assert len(list((d / "images/train").glob("*.png"))) == SMALL["n_train"]
    for part in ["world", "base/clip", "base/vicuna"]:  # the summary at the end names each part
        assert f"{part}: done" in world.stdout


def test_rows_parse_with_the_dataset_reader(world):
    d, S = world.dir, SMALL["image_size"]
    tok = load_tokenizer(d / "base/vicuna")
    for name, template in [("stage1.json", "plain"), ("stage2.json", "vicuna_v1")]:
        ds = LLaVADataset(d / name, d / "images", tok, template, image_token_id=-200, image_size=S,
                          image_seq_len=(S // SMALL["patch_size"]) ** 2, strict=True)
        samples = [ds[i] for i in range(len(ds))]
        assert ds.skipped() == {} and all(s is not None for s in samples), ds.summary()
        assert len(ds) == ds.n_rows
    rows = json.loads((d / "stage2.json").read_text())
    text_only = [r for r in rows if "image" not in r]
    assert len(text_only) == SMALL["n_text"] and all(IMAGE not in t["value"] for r in text_only for t in r["conversations"])
    multi = [r for r in rows if "image" in r and len(r["conversations"]) > 2]
    assert multi, "no multi-turn rows"
    for r in multi:  # the image marker only at the start of the first question, as the official VQA rows
        assert r["conversations"][0]["value"].startswith(IMAGE + "\n")
        assert all(IMAGE not in t["value"] for t in r["conversations"][1:])
    assert any(t["value"].endswith("\n" + SHORT_ANSWER) for r in multi for t in r["conversations"])


def test_eval_questions_are_held_out(world):
    d = world.dir
    qs = [json.loads(line) for line in (d / "eval.jsonl").read_text().splitlines()]
    assert len(qs) == SMALL["n_eval"] * SMALL["eval_questions"]
    assert len({q["question_id"] for q in qs}) == len(qs)
    for q in qs:
        assert set(q) >= {"question_id", "image", "text", "answer"} and q["text"].endswith("\n" + SHORT_ANSWER)
        assert q["image"].startswith("eval/") and (d / "images" / q["image"]).is_file() and q["answer"].strip()
    digest = tree_digest(d, ["images"])
    train = {h for f, h in digest.items() if f.startswith("images/train/")}
    evals = {h for f, h in digest.items() if f.startswith("images/eval/")}
    assert not train & evals, "an evaluation image is byte-identical to a training image"
    used = {r["image"] for name in ["stage1.json", "stage2.json"] for r in json.loads((d / name).read_text()) if "image" in r}
    assert all(u.startswith("train/") for u in used)
    scenes = json.loads((d / "scenes.json").read_text())
    layout = lambda s: tuple(sorted((x["cell"], x["kind"], x["color"], x["size"]) for x in s["shapes"]))
    assert not {layout(s) for s in scenes["train"].values()} & {layout(s) for s in scenes["eval"].values()}


def test_base_models_load_in_transformers_and_nanollava_alike(world):
    transformers = pytest.importorskip("transformers")
    d, S = world.dir, SMALL["image_size"]
    x = torch.randn(2, 3, S, S)
    hf = transformers.CLIPVisionModel.from_pretrained(d / "base/clip").eval()
    ours = ViT.from_pretrained(d / "base/clip")
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = ours(x)
    diff = (got - ref).abs()
    assert got.shape == ref.shape and diff.max() < 1e-4, f"CLIP features differ: max {diff.max():.2e} mean {diff.mean():.2e}"

    ids = torch.tensor([load_tokenizer(d / "base/vicuna").encode("Is there a red star in the image?")])
    hf = transformers.LlamaForCausalLM.from_pretrained(d / "base/vicuna").eval()
    ours = Llama.from_pretrained(d / "base/vicuna")
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    diff = (got - ref).abs()
    assert got.shape == ref.shape and diff.max() < 1e-4, f"Llama logits differ: max {diff.max():.2e} mean {diff.mean():.2e}"


def test_same_seed_same_world_other_seed_another(world, tmp_path):
    args = SimpleNamespace(**SMALL)
    prepare.build_world(args, tmp_path)  # the world part alone, in process: fast
    assert tree_digest(tmp_path) == tree_digest(world.dir)
    other = tmp_path / "other"
    other.mkdir()
    prepare.build_world(SimpleNamespace(**{**SMALL, "seed": SMALL["seed"] + 1}), other)
    assert json.loads((other / "stage1.json").read_text()) != json.loads((world.dir / "stage1.json").read_text())


def test_rerun_reuses_and_an_unfinished_part_is_rebuilt(world):
    d = world.dir
    weights = {p: (d / p).stat().st_mtime_ns for p in ["base/clip/model.safetensors", "base/vicuna/model.safetensors"]}
    before = tree_digest(d)
    out = run_prepare(world.root)
    assert out.count("reused") == 3, out
    assert tree_digest(d) == before and all((d / p).stat().st_mtime_ns == t for p, t in weights.items())
    (d / "base/vicuna/.done").unlink()  # as if killed before the marker was written
    out = run_prepare(world.root)
    assert "world: complete, reused" in out and "base/clip: complete, reused" in out and "base/vicuna: building" in out
    assert (d / "base/vicuna/.done").is_file() and (d / "manifest.json").is_file()


class Killed(BaseException):
    """What a kill -9 leaves: nothing after the point it strikes runs."""


@pytest.mark.parametrize("how", ["killed under --force", "killed under another --n-eval", "a file removed by hand"])
def test_nothing_half_built_is_taken_as_done(world, tmp_path, monkeypatch, how):
    root = tmp_path / "root"
    shutil.copytree(world.dir, root / "world")
    d = root / "world"
    if how == "a file removed by hand":
        (d / "stage2.json").unlink()
        (d / "base/clip/model.safetensors").unlink()
    else:
        def kill(*a, **k):  # strikes in the world's rebuild, after its old files are gone
            raise Killed()
        monkeypatch.setattr("nanollava.world.eval_rows", kill)
        with pytest.raises(Killed):
            run_prepare(root, **({"force": True} if "force" in how else {"n_eval": SMALL["n_eval"] + 1}))
        monkeypatch.undo()
    out = run_prepare(root)  # the flags of the complete world again
    assert "world: building" in out and "world: complete, reused" not in out, out
    if how == "a file removed by hand":
        assert "base/clip: building" in out and "base/vicuna: complete, reused" in out, out
    manifest = json.loads((d / "manifest.json").read_text())
    for path in [manifest["clip"], manifest["vicuna"], manifest["stage1"]["data"], manifest["eval"]["questions"]]:
        assert (d / path).exists(), f"the manifest names {path}, which is missing"
    assert tree_digest(d) == tree_digest(world.dir)


def run_read_only(ro, argv):
    """prepare.py ARGV with the folder ro read-only: its write bits cleared for a user; for root (whom permissions do
    not stop) a read-only bind mount in a mount namespace of its own, or a skip where that is not allowed."""
    cmd = [sys.executable, str(ROOT / "prepare.py"), *argv]
    if os.geteuid() != 0:
        paths = [ro, *ro.rglob("*")]
        modes = {p: p.stat().st_mode for p in paths}
        try:
            for p in paths:
                p.chmod(modes[p] & ~0o222)
            return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        finally:
            for p in paths:
                p.chmod(modes[p])
    mount = f"mount --bind '{ro}' '{ro}' && mount -o remount,bind,ro '{ro}'"
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True).returncode:
        pytest.skip("running as root without the right to mount: no read-only folder can be made here")
    return subprocess.run(["unshare", "-m", "sh", "-c", mount + ' && exec "$@"', "sh", *cmd],
                          capture_output=True, text=True, timeout=300)


def test_a_read_only_root_fails_in_one_sentence(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    r = run_read_only(ro, small_argv(ro / "data"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert str(ro / "data") in r.stderr and not list(ro.iterdir())


def test_a_complete_world_on_a_read_only_mount_is_used_as_it_is(world, tmp_path):
    shutil.copytree(world.dir, tmp_path / "world")
    before = {str(f): f.stat().st_mtime_ns for f in [tmp_path / "world", *(tmp_path / "world").rglob("*")]}
    r = run_read_only(tmp_path / "world", small_argv(tmp_path))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.count("complete, reused") == 3 and "manifest.json" in r.stdout, r.stdout
    after = {str(f): f.stat().st_mtime_ns for f in [tmp_path / "world", *(tmp_path / "world").rglob("*")]}
    assert after == before, "a complete world was written to"


# ------------------------------------------------------------------------------------------- LLaVA-1.5 path

def test_llava_check_on_a_fake_tree(tmp_path, monkeypatch):
    root = tmp_path / "llava-1.5"
    root.mkdir()
    for d in ["clip-vit-large-patch14-336", "vicuna-7b-v1.5"]:
        (root / d).mkdir()
        (root / d / "config.json").write_text("{}")
    pre = root / "LLaVA-Pretrain"
    (pre / "images/00000").mkdir(parents=True)
    (pre / "images/00000/a.jpg").write_bytes(b"jpg")
    stage1 = [{"id": i, "image": f"00000/{i}.jpg", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                                      {"from": "gpt", "value": "a cat"}]} for i in "ab"]
    (pre / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(stage1))
    (root / "coco/train2017").mkdir(parents=True)
    (root / "coco/train2017/1.jpg").write_bytes(b"jpg")
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "this"}]
    stage2 = [{"id": "1", "image": "coco/train2017/1.jpg", "conversations": conv},
              {"id": "2", "image": "gqa/images/2.jpg", "conversations": conv},
              {"id": "3", "image": "ocr_vqa/images/3.jpg", "conversations": conv},
              {"id": "4", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}]
    (root / "LLaVA-Instruct-150K").mkdir()
    (root / "LLaVA-Instruct-150K/llava_v1_5_mix665k.json").write_text(json.dumps(stage2))

    manifest, missing = download.check_llava(root, "7b")
    assert manifest["clip"] == "clip-vit-large-patch14-336" and manifest["vicuna"] == "vicuna-7b-v1.5"
    assert manifest["counts"]["stage1"] == {"blip_laion_cc_sbu": {"rows": 2, "present": 1}}
    assert manifest["counts"]["stage2"] == {"coco": {"rows": 1, "present": 1}, "gqa": {"rows": 1, "present": 0},
                                            "ocr_vqa": {"rows": 1, "present": 0}, "text": {"rows": 1, "present": 1}}
    kept = json.loads((root / manifest["stage2"]["data"]).read_text())
    assert [r["id"] for r in kept] == ["1", "4"] and manifest["stage2"]["image_root"] == "."
    assert [r["id"] for r in json.loads((root / manifest["stage1"]["data"]).read_text())] == ["a"]
    assert any("gqa" in m and "gqa/images" in m for m in missing) and any("ocr_vqa" in m for m in missing)

    (root / "gqa/images").mkdir(parents=True)
    (root / "gqa/images/2.jpg").write_bytes(b"jpg")
    (root / "ocr_vqa/images").mkdir(parents=True)
    (root / "ocr_vqa/images/3.jpg").write_bytes(b"jpg")
    (pre / "images/00000/b.jpg").write_bytes(b"jpg")
    manifest, missing = download.check_llava(root, "7b")  # all there: the official files are used as they are
    assert missing == [] and manifest["stage2"]["data"] == "LLaVA-Instruct-150K/llava_v1_5_mix665k.json"
    assert manifest["stage1"] == {"data": "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", "image_root": "LLaVA-Pretrain/images"}

    # downloads that finished (their markers) are not fetched again: a complete tree needs no network
    for name in ["clip", "vicuna", "pretrain", "instruct"]:
        folder = download.HUB[name][3].format(size="7b")
        (root / folder / f".{name}.complete").write_text("ok\n")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    prepare.prepare_llava(prepare.parser.parse_args(["--recipe", "llava-1.5", "--root", str(tmp_path), "--image-sets", "none"]))
    written = json.loads((root / "manifest-7b.json").read_text())
    assert written["counts"]["stage2"]["gqa"] == {"rows": 1, "present": 1}
    assert all((root / written[k]).is_dir() for k in ["clip", "vicuna"])


class _RangeServer(http.server.BaseHTTPRequestHandler):
    """Serves DATA with Range support; while server.cut is set, the next response stops after cut bytes."""
    DATA = bytes(range(256)) * 400

    def do_GET(self):
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(self.DATA):
                self.send_response(416)
                self.end_headers()
                return
        body = self.DATA[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(self.DATA) - 1}/{len(self.DATA)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut, self.server.cut = self.server.cut, None
        self.wfile.write(body[:cut] if cut else body)
        self.server.ranges.append(start)
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_download_resumes_and_never_keeps_a_partial_file(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeServer)
    server.cut, server.ranges, server.timeout = 30_000, [], 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url, dest = f"http://127.0.0.1:{server.server_port}/images.zip", tmp_path / "images.zip"
        with pytest.raises(download.DownloadError, match="run again to resume|cannot fetch"):
            download.download(url, dest, chunk=4096, timeout=5)
        assert not dest.exists() and Path(f"{dest}.part").stat().st_size == 30_000
        download.download(url, dest, chunk=4096, timeout=5)  # resumes from byte 30000
        assert dest.read_bytes() == _RangeServer.DATA and not Path(f"{dest}.part").exists()
        assert server.ranges == [0, 30_000]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_no_network_fails_in_one_sentence(tmp_path):
    with pytest.raises(download.DownloadError, match="cannot fetch"):  # port 9 (discard) is closed on loopback
        download.download("http://127.0.0.1:9/train2017.zip", tmp_path / "train2017.zip", timeout=5)
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    r = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--recipe", "llava-1.5", "--size", "7b",
                        "--root", str(tmp_path), "--image-sets", "none"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    expect = "cannot download" if importlib.util.find_spec("huggingface_hub") else "pip install huggingface_hub"
    assert r.stderr.strip().count("\n") == 0 and expect in r.stderr, r.stderr
    assert not list((tmp_path / "llava-1.5").rglob(".*.complete"))


@pytest.mark.parametrize("flags, name", [(["--image-size", "50"], "--image-size"), (["--llm-heads", "3"], "--llm-heads")])
def test_shapes_that_cannot_be_built_fail_in_one_sentence(tmp_path, flags, name):
    r = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--root", str(tmp_path), *flags],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert name in r.stderr and not (tmp_path / "world").exists()


def test_facts_are_true_of_their_scene():
    """Every statement of world.facts, read back word by word, holds in its scene; a key names one shape."""
    import random
    from nanollava import world as W
    attribute = {**{c: "color" for c in W.COLOR_NAMES}, **{k: "kind" for k in W.KINDS}, **{s: "size" for s in W.SIZES},
                 **{p: "where" for p in W.POSITIONS}}
    plural = {W._plural(k, 2): k for k in W.KINDS}
    rng, seen = random.Random(0), set()
    for _ in range(300):
        scene = W.sample_scene(rng)
        shapes = [{"color": s.color, "kind": s.kind, "size": s.size, "where": W.POSITIONS[s.cell]} for s in scene.shapes]
        has = lambda **want: [s for s in shapes if all(s[k] == v for k, v in want.items())]
        for fact in W.facts(scene, rng).split(". "):
            words = fact.rstrip(".").replace("?", "").split()
            if words[:2] == ["how", "many"]:
                seen.add("count")
                n = int(words[-1])
                if words[2] == "shapes":
                    assert n == len(shapes), fact
                elif words[2] in plural:
                    assert n == len(has(kind=plural[words[2]])), fact
                else:
                    assert n == len(has(color=words[2])), fact
            elif words[:2] == ["is", "there"]:
                seen.add("presence")
                thing, answer = words[3:-1], words[-1]
                if thing[:2] == ["shape", "in"]:
                    found = has(where=thing[-1])
                else:
                    found = has(**{attribute[w]: w for w in thing})
                assert answer == ("yes" if found else "no"), fact
            elif words[-1] == "nothing":
                seen.add("empty")
                assert words[0] in W.POSITIONS and not has(where=words[0]), fact
            else:
                seen.add("look-up")
                *key, value = words
                match = has(**{attribute[w]: w for w in key})
                assert len(match) == 1 and match[0][attribute[value]] == value, fact
                assert attribute[value] not in {attribute[w] for w in key}, fact
    assert seen == {"count", "presence", "empty", "look-up"}
