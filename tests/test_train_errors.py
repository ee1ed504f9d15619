"""train.py and its users: out-of-range flags refused at parse time naming the flag, 0 kept where 0 is legal, one run
per --out, and every failure a user can cause (bad manifest, base, data, checkpoint, a full disk, --strict's first
bad row) one sentence on stderr with a non-zero exit, once under torchrun."""
import json
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SMALL, run


pytestmark = pytest.mark.slow  # training runs that fail on purpose


def train(*args, check=True):
    cmd = [sys.executable, "train.py", *map(str, args)]
    return run(cmd) if check else subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def one_sentence(p, *words):
    """A failure reported as one 'error: ...' line naming what is wrong, no traceback, non-zero exit."""
    assert p.returncode != 0, p.stdout[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("error: ", "train.py: error: ")) and "Traceback" not in p.stderr, p.stderr[-3000:]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


BAD_FLAGS = [("--micro-batch", "-4"), ("--micro-batch", "0"), ("--batch1", "0"), ("--batch2", "-1"), ("--max-len", "0"),
             ("--save-every", "0"), ("--lr1", "-1e-3"), ("--epochs2", "-1"), ("--epochs1", "nan"), ("--max-steps", "0"),
             ("--warmup-ratio", "2"), ("--grad-clip", "0"), ("--workers", "-1")]


def test_out_of_range_flags_are_refused_at_parse_time(capsys, tmp_path):
    sys.path.insert(0, str(ROOT))
    import train as script  # the parser only: nothing runs on import
    for flag, value in BAD_FLAGS:
        with pytest.raises(SystemExit) as e:
            script.parser.parse_args([f"{flag}={value}"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and f"argument {flag}: must be" in err and value in err, err
    # end to end: exit 2 before any work (the manifest is not even looked for)
    p = train("--data", tmp_path / "none.json", "--out", tmp_path / "out", "--micro-batch", "-4", check=False)
    assert p.returncode == 2
    one_sentence(p, "argument --micro-batch", "-4")
    assert not (tmp_path / "out").exists()


def test_zero_learning_rate_and_zero_epochs_mean_zero(tiny_world, tmp_path):
    train("--data", tiny_world, "--out", tmp_path / "a", *SMALL, "--stage", "1", "--lr1", "0", "--max-steps", "2")
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert [r["lr"] for r in log] == [0.0, 0.0], log  # not the recipe's 1e-3
    p = train("--data", tiny_world, "--out", tmp_path / "b", *SMALL, "--stage", "1", "--epochs1", "0")
    assert " 0 steps " in p.stdout and not (tmp_path / "b" / "log.jsonl").exists(), p.stdout[-2000:]


def test_a_second_run_into_the_same_out_is_refused_naming_the_holder(tiny_world, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "train.py", "--data", tiny_world, "--out", out, *SMALL, "--stage", "1",
                              "--max-steps", "1000", "--epochs1", "1000", "--save-every", "1000"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "log.jsonl").exists():
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended early"
        p = train("--data", tiny_world, "--out", out, *SMALL, "--stage", "1", "--max-steps", "2", check=False)
        one_sentence(p, str(out), f"pid {first.pid}", "--out")
        assert first.poll() is None, "the refused run disturbed the first"
    finally:
        first.kill()
        first.wait()
    train("--data", tiny_world, "--out", out, *SMALL, "--stage", "1", "--max-steps", "2", "--no-resume")  # the kill freed it


def manifest_with(tiny_world, tmp_path, **changes):
    """A copy of the tiny world's manifest with absolute paths, some of them replaced (None: removed)."""
    world, m = tiny_world.parent, json.loads(tiny_world.read_text())
    m = {"clip": str(world / m["clip"]), "vicuna": str(world / m["vicuna"]),
         **{s: {k: str(world / v) for k, v in m[s].items()} for s in ("stage1", "stage2")}}
    for k, v in changes.items():
        m.pop(k) if v is None else m.__setitem__(k, v)
    path = tmp_path / f"manifest_{len(list(tmp_path.glob('manifest_*')))}.json"
    path.write_text(json.dumps(m))
    return path


def test_user_caused_failures_are_one_sentence(tiny_world, tmp_path):
    stage1 = ["--out", tmp_path / "out", *SMALL, "--stage", "1", "--max-steps", "2"]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    one_sentence(train("--data", bad, *stage1, check=False), str(bad), "not JSON")
    one_sentence(train("--data", manifest_with(tiny_world, tmp_path, stage1=None), *stage1, check=False), "no stage1")
    one_sentence(train("--data", manifest_with(tiny_world, tmp_path, clip=str(tmp_path / "nope")), *stage1, check=False), "nope")
    data = manifest_with(tiny_world, tmp_path, stage1={"data": str(tmp_path / "rows.json"), "image_root": str(tmp_path)})
    one_sentence(train("--data", data, *stage1, check=False), "rows.json")
    rows = json.loads((tiny_world.parent / json.loads(tiny_world.read_text())["stage1"]["data"]).read_text())
    (tmp_path / "rows.json").write_text(json.dumps(rows[:5] + [{"id": "broken", "conversations": "no"}] + rows[5:]))
    img_root = str(tiny_world.parent / json.loads(tiny_world.read_text())["stage1"]["image_root"])
    strict = manifest_with(tiny_world, tmp_path, stage1={"data": str(tmp_path / "rows.json"), "image_root": img_root})
    one_sentence(train("--data", strict, *stage1, "--strict", check=False), "rows.json row 5", "broken")
    # a corrupt `latest`: the sentence says how to start over, and that way works
    train("--data", tiny_world, *stage1)
    ck = tmp_path / "out" / "stage1" / "ckpt"
    (tmp_path / "out" / "stage1" / "projector.safetensors").unlink()
    (ck / "latest").write_text("step_garbage")
    one_sentence(train("--data", tiny_world, *stage1, check=False), str(ck), "--no-resume")
    train("--data", tiny_world, *stage1, "--no-resume")


def test_a_full_disk_names_the_file_and_the_intact_checkpoint(tiny_world, tmp_path):
    """The disk fills up at the second checkpoint: one sentence naming the file, `latest` still the first one."""
    out = tmp_path / "out"
    fake = ("import errno, runpy, sys, torch\n"
            "real, n = torch.save, [0]\n"
            "def save(obj, f, *a, **kw):\n"
            "    if isinstance(f, str) or hasattr(f, '__fspath__'):\n"
            "        n[0] += 1\n"
            "        if n[0] > 1: raise OSError(errno.ENOSPC, 'No space left on device', str(f))\n"
            "    return real(obj, f, *a, **kw)\n"
            "torch.save = save\n"
            "sys.argv = ['train.py'] + sys.argv[1:]\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    p = subprocess.run([sys.executable, "-c", fake, "--data", str(tiny_world), "--out", str(out), *SMALL, "--stage", "1",
                        "--max-steps", "4", "--save-every", "2"], cwd=ROOT, capture_output=True, text=True)
    one_sentence(p, "rng_0.pt", "No space left on device", "step_0000002, is intact")
    assert (out / "stage1" / "ckpt" / "latest").read_text() == "step_0000002"


def test_under_torchrun_rank_0_prints_the_sentence_once(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        "--data", bad, "--out", tmp_path / "out"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0
    both = p.stdout + p.stderr
    assert both.count(f"error: {bad} is not JSON") == 1, both[-3000:]
    # no rank's traceback (torchrun's launcher still prints its own ChildFailedError summary after the sentence)
    assert "[rank0]" not in both and "[rank1]" not in both and 'train.py", line' not in both, both[-3000:]
