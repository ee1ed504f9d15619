"""Resumable checkpoints (nanollava/fsdp.py) in one process: a kill at every point of the save sequence resumes and
the losses continue as if nothing happened; a corrupt `latest` or checkpoint and a full disk are one CheckpointError."""
import errno
import json
import os
import pathlib
import shutil

import pytest
import torch
import torch.distributed as dist

import nanollava.fsdp as fsdp
from nanollava.checkpoint import CheckpointError


@pytest.fixture(scope="module", autouse=True)
def group():
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Killed(BaseException):
    """What a kill -9 does to the save: nothing after this point runs (BaseException: no except clause sees it)."""


def train(ckdir, total=6, save_every=2, kill_at=None, calls=None):
    """A tiny deterministic run: resume, step, save every save_every steps. kill_at=k stops the process before the
    k-th file operation of the saves; calls collects the operations' names. Returns {step: loss} of the steps run."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    step = fsdp.load_checkpoint(model, opt, ckdir, 0)
    losses = {}
    while step < total:
        i = torch.randint(0, 64, (8,))  # draws from the RNG state the checkpoint restores
        loss = ((model(x[i]) - y[i]) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        step += 1
        losses[step] = loss.item()
        if step % save_every == 0:
            fsdp.save_checkpoint(model, opt, ckdir, step, 0)
    return losses


OPS = [("os", "replace"), ("shutil", "rmtree"), ("torch", "save"), ("dcp", "save")]


@pytest.fixture
def killer(monkeypatch):
    """Counts the save's file operations (mkdir, write_text, os.replace, shutil.rmtree, torch.save, dcp.save) and
    raises Killed before the k-th one."""
    state = {"n": 0, "kill_at": None, "names": []}

    def wrap(name, fn):
        def op(*a, **kw):
            if state.get("in_dcp"):  # DCP's own mkdir: DCP turns any exception into its own, so it is one operation
                return fn(*a, **kw)
            state["n"] += 1
            state["names"].append(name)
            if state["n"] == state["kill_at"]:
                raise Killed(name)
            state["in_dcp"] = name == "dcp.save"
            try:
                return fn(*a, **kw)
            finally:
                state["in_dcp"] = False
        return op
    for mod, attr in OPS:
        owner = getattr(fsdp, mod)
        monkeypatch.setattr(owner, attr, wrap(f"{mod}.{attr}", getattr(owner, attr)))
    for attr in ("mkdir", "write_text"):
        monkeypatch.setattr(pathlib.Path, attr, wrap(attr, getattr(pathlib.Path, attr)))
    return state


def test_a_kill_at_every_point_of_a_save_resumes_and_the_losses_continue(tmp_path, killer):
    ref = train(tmp_path / "ref")
    assert len(ref) == 6
    # the file operations of the save at step 4 (the one the kill interrupts): those of two saves less one
    counts = []
    for total in (2, 4):
        killer["n"] = 0
        train(tmp_path / f"count_{total}", total=total)
        counts.append(killer["n"])
    first, second = counts[0], counts[1] - counts[0]
    assert second >= 7, killer["names"]
    for k in range(1, second + 1):  # before each operation of the second save
        ckdir = tmp_path / f"kill_{k}"
        killer["n"], killer["names"], killer["kill_at"] = 0, [], first + k
        try:
            train(ckdir)
        except Killed:
            pass
        killer["kill_at"] = None
        resumed = train(ckdir)
        start = min(resumed)
        assert start in (3, 5), f"kill before {killer['names'][-1]} (save operation {k}): resumed at {start}"
        for step, loss in resumed.items():
            assert loss == pytest.approx(ref[step], rel=1e-6), f"kill before save operation {k}: step {step} loss {loss}, uninterrupted {ref[step]}"
        assert (ckdir / "latest").read_text() == "step_0000006" and sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_0000006"]


def test_a_corrupt_latest_or_checkpoint_says_no_resume_starts_over(tmp_path):
    train(tmp_path / "a", total=2)
    for damage in (lambda d: (d / "latest").write_text("step_9999999"),          # names nothing
                   lambda d: (d / "step_0000002" / "meta.json").write_text("{"),  # cut short
                   lambda d: [f.write_bytes(f.read_bytes()[:10]) for f in (d / "step_0000002").glob("*.distcp")]):
        d = tmp_path / "b"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(tmp_path / "a", d)
        damage(d)
        with pytest.raises(CheckpointError, match="cannot be resumed.*--no-resume"):
            train(d)


def test_a_full_disk_names_the_file_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    ref = train(d, total=2)
    real = torch.save

    def full(obj, f, *a, **kw):  # the disk fills up at the first file torch.save writes (the RNG states)
        if isinstance(f, (str, os.PathLike)):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *a, **kw)
    monkeypatch.setattr(fsdp.torch, "save", full)
    with pytest.raises(CheckpointError, match=r"rng_0\.pt: No space left on device.*step_0000002, is intact"):
        train(d, total=4)
    monkeypatch.setattr(fsdp.torch, "save", real)
    assert (d / "latest").read_text() == "step_0000002"
    assert json.loads((d / "step_0000002" / "meta.json").read_text())["step"] == 2
    assert set(train(d, total=4)) == {3, 4} and ref
