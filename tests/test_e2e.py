"""The quick start at a reduced size: prepare.py, both stages under torchrun with two processes, then sample.py
answering about a held-out image and scoring the held-out questions."""
import json
import re
import sys

from conftest import run
import pytest


pytestmark = pytest.mark.slow  # the quick start end to end


def test_quick_start_end_to_end(tiny_world, trained):
    model = trained / "stage2" / "model"
    world = tiny_world.parent
    manifest = json.loads(tiny_world.read_text())
    questions = [json.loads(l) for l in open(world / manifest["eval"]["questions"])]
    image = world / manifest["eval"]["image_root"] / questions[0]["image"]
    p = run([sys.executable, "sample.py", "--model", model, "--image", image, "--prompt", questions[0]["text"],
             "--temperature", "0", "--max-new-tokens", "8"])
    assert p.stdout.endswith("\n") and p.stdout.count("\n") == 1, f"stdout is not one answer line: {p.stdout!r}"
    p = run([sys.executable, "sample.py", "--model", model, "--eval", world / manifest["eval"]["questions"],
             "--image-root", world / manifest["eval"]["image_root"], "--answers", trained / "answers.jsonl",
             "--max-new-tokens", "8"])
    m = re.search(r"^accuracy: ([0-9.]+) \(n=(\d+)\)$", p.stdout, re.M)
    assert m and int(m[2]) == len(questions), p.stdout
    answers = [json.loads(l) for l in open(trained / "answers.jsonl")]
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
