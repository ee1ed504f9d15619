"""bench.py runs each benchmark end to end on tiny inputs and prints both sides and the ratio (no timing is
asserted: speed is what the benchmark shows, not what a test checks). The four runs start together."""
import re
import subprocess
import sys

from conftest import ROOT


def test_bench_prints_both_sides_and_the_ratio(tiny_world):
    runs = {"train": ["--data", tiny_world, "--steps", 1, "--micro-batch", 4],
            "lora": ["--steps", 1, "--micro-batch", 1],
            "decode": ["--tokens", 16, "--repeats", 3],
            "load": ["--repeats", 1]}
    procs = {what: subprocess.Popen([sys.executable, "bench.py", what, *map(str, args), "--threads", "1"], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for what, args in runs.items()}
    out = {}
    for what, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, f"bench.py {what} exited {p.returncode}\n{stderr[-3000:]}"
        out[what] = stdout
    assert re.search(r"nanollava: +[\d.]+ ms a step\ntransformers: +[\d.]+ ms a step\n"
                     r"nanollava / transformers: [\d.]+x the steps/s\n$", out["train"]), out["train"]
    assert re.search(r"loss without dropout: nanollava [\d.]+, PEFT [\d.]+ .*\nnanollava +step [\d.]+ s +trainable [\d,]+ parameters"
                     r" +AdamW state [\d.]+ MiB\npeft +step .*\nnanollava is [\d.]+x PEFT's speed", out["lora"]), out["lora"]
    assert re.search(r"nanollava: time to first token .* tokens/s\ntransformers: time to first token .* tokens/s\n"
                     r"nanollava / transformers: decode [\d.]+x the tokens/s", out["decode"]), out["decode"]
    assert re.search(r"nanollava: +[\d.]+ ms\ntransformers: +[\d.]+ ms\nnanollava / transformers: [\d.]+x as fast\n$",
                     out["load"]), out["load"]


def test_bench_refuses_a_zero_count_naming_the_flag():
    p = subprocess.run([sys.executable, "bench.py", "decode", "--tokens", "0"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "--tokens must be 1 or more, not 0" in p.stderr, p.stderr
