"""Crash safety: `tinylm train` killed with SIGKILL again and again, at random moments and inside every step of a
checkpoint write, resumes from its latest complete checkpoint and ends with the weights of an unbroken run.

The child process is `tinylm.cli.main` itself. To land a kill inside a window a few microseconds wide (between two
files of a checkpoint, inside a directory swap, half-way through a deletion or a metrics line), the child may patch
ONE function with a wrapper that does the real work up to that point, writes a marker file and sleeps; the test
kills it as soon as the marker appears. Nothing else about the run changes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import set_args, tiny_overrides
from tinylm.data.tokenizer import load_tokenizer
from tinylm.models import build_model
from tinylm.storage.atomic import verify_manifest
from tinylm.storage.rundir import RunDir
from tinylm.train.checkpoints import load_state, load_weights

REPO = Path(__file__).resolve().parents[1]
INTERVAL = 4  # checkpoint_interval
MAX_STEPS = 48
OVERRIDES = tiny_overrides(steps=MAX_STEPS, eval_every=INTERVAL, checkpoint_every=INTERVAL, warmup=2) + \
    ["train.keep_last=2"]
RECIPE = "micromixer-100k"  # dropout 0.1: the RNG state must resume too

# Runs in the child: optionally wrap one function so that the process stops (marker + sleep) inside a write.
CHILD = r'''
import os, re, sys, time
from pathlib import Path

point, marker = os.environ.get("CRASH_POINT", ""), Path(os.environ.get("CRASH_MARKER", "/dev/null"))
point, _, at_step = point.partition("@")  # "best@48": only in the write for step 48

def pause(where):
    marker.write_text(where)
    time.sleep(600)  # the test kills us here

import shutil, torch
import tinylm.train.checkpoints as ckpt, tinylm.data.shards as data
import tinylm.storage.atomic as files, tinylm.train.metrics as monitor

def after(module, name, where):
    real = getattr(module, name)
    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        pause(where)
        return result
    setattr(module, name, wrapper)

def before(module, name, where):
    real = getattr(module, name)
    def wrapper(*args, **kwargs):
        if not at_step or any(Path(a).name == f"step-{int(at_step):08d}" for a in args[:2]):
            pause(where)
        return real(*args, **kwargs)
    setattr(module, name, wrapper)

if point == "data":  # shards and meta.json written, manifest not yet
    before(data, "write_manifest", point)
elif point == "weights":  # model.safetensors written, state.pt not yet
    after(ckpt, "save_weights", point)
elif point == "state":  # state.pt written, manifest not yet
    real_save = torch.save
    def save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if str(f).endswith("state.pt"):
            pause(point)
    torch.save = save
elif point == "manifest":  # the temporary directory is complete, not yet renamed into place
    after(ckpt, "write_manifest", point)
elif point == "best":  # a new best: one of checkpoints/best and step-N written, not the other
    before(ckpt, "copy_checkpoint", point)
elif point == "swap":  # checkpoints/best replaced by the exchange, the old version not yet deleted
    real_exchange = files._exchange
    def exchange(a, b):
        done = real_exchange(a, b)
        if Path(b).name == "best":
            pause(point)
        return done
    files._exchange = exchange
elif point == "prune":  # half-way through deleting an old step checkpoint
    real_rmtree = shutil.rmtree
    step = re.compile(r"step-\d{8}$")
    def rmtree(path, *a, **k):
        p = Path(path)
        if step.match(p.name) or (p.is_dir() and any(step.match(c.name) for c in p.iterdir())):
            victim = next(f for f in sorted(p.rglob("*")) if f.name == "model.safetensors")
            victim.unlink()
            pause(point)
        return real_rmtree(path, *a, **k)
    shutil.rmtree = rmtree
elif point == "copy":  # a step directory half-copied from checkpoints/best
    real_copy = shutil.copy2
    def copy2(src, dst, *a, **k):
        done = real_copy(src, dst, *a, **k)
        if Path(dst).parent.name.startswith(".step-"):
            pause(point)
        return done
    shutil.copy2 = copy2
elif point == "metrics":  # half a line of metrics.jsonl on disk
    def append(self, record):
        import json
        line = json.dumps(record, sort_keys=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line[: len(line) // 2])
        pause(point)
    monitor.MetricsFile.append = append

from tinylm.cli import main
sys.exit(main(sys.argv[1:]))
'''


def pinned(cpu: int):
    """One core per child: one thread (the same float summation order in every child) and no fight with the other."""
    cores = sorted(os.sched_getaffinity(0))
    return lambda: os.sched_setaffinity(0, {cores[cpu % len(cores)]})


def child(run: Path, resume: bool, log: Path, point: str = "", marker: Path | None = None,
          cpu: int = 1) -> subprocess.Popen:
    command = [sys.executable, "-c", CHILD, "train", RECIPE, "--out", str(run), "--quiet"]
    command += set_args(OVERRIDES) + (["--resume"] if resume else [])
    env = {**os.environ, "TINYLM_PEAK_FLOPS": "1e11", "PYTHONUNBUFFERED": "1", "CRASH_POINT": point,
           "CRASH_MARKER": str(marker or "/dev/null")}
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=pinned(cpu))


def metric_records(run: Path) -> tuple[list[dict], bool]:
    """(parsed lines, whether only the last line failed to parse). A line before the last must always parse."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return [], False
    lines = path.read_text(encoding="utf-8").split("\n")
    records, last_bad = [], False
    for index, line in enumerate(lines):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            assert index == len(lines) - 1, f"metrics.jsonl line {index + 1} is broken but not the last: {line!r}"
            last_bad = True
    return records, last_bad


def steps_done(run: Path) -> int:
    records, _ = metric_records(run)
    return max((r["step"] for r in records if "loss" in r), default=0)


def latest_step(run: Path) -> int:
    found = RunDir(run).step_checkpoints()
    return int(found[-1].name.split("-")[1]) if found else 0


def check_nothing_partial(run: Path) -> None:
    """Whatever a reader would take for complete is complete."""
    checkpoints = run / "checkpoints"
    if checkpoints.is_dir():
        for entry in checkpoints.iterdir():
            if not entry.name.startswith("."):
                manifest = verify_manifest(entry)
                assert manifest["format"] == "tinylm-checkpoint-1"
    if (run / "data").exists():
        verify_manifest(run / "data")
    if (run / "run.json").exists():
        json.loads((run / "run.json").read_text())
    if (run / "tokenizer.json").exists():
        load_tokenizer(run / "tokenizer.json")
    recipe = RunDir(run).read_recipe() if (run / "recipe.toml").exists() else None
    found = RunDir(run).step_checkpoints()
    if found:  # the checkpoint a resume would take loads: weights fit, state unpickles safely
        load_weights(build_model(recipe.model), found[-1] / "model.safetensors")
        assert load_state(found[-1])["step"] == latest_step(run)
    metric_records(run)


def wait_for(proc: subprocess.Popen, ready, log: Path, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the child ended (rc {proc.returncode}) before the kill:\n{log.read_text()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for the kill point:\n{log.read_text()[-3000:]}")
        time.sleep(0.004)


def test_sigkill_anywhere_resumes_to_the_same_weights(tmp_path):
    rng = random.Random(int(os.environ.get("CRASH_SEED", "2024")))
    reference, run = tmp_path / "reference", tmp_path / "crashed"
    ref_log = tmp_path / "reference.log"
    ref = child(reference, False, ref_log, cpu=0)  # runs beside the crashing one

    # The kills: (where, what). A "random" kill waits until a random step is logged, then a random few ms more.
    plan = [("data", "pause"), ("before-first-checkpoint", "random"), ("weights", "pause"), ("mid-run", "random"),
            ("state", "pause"), ("prune", "pause"), ("metrics", "pause"), ("best", "pause"), ("mid-run", "random"),
            ("manifest", "pause"), ("swap", "pause"), ("copy", "pause"), ("mid-run", "random"),
            (f"best@{MAX_STEPS}", "pause")]  # the last step: nothing after it would repair a stale best
    kills = []
    for number, (point, how) in enumerate(plan):
        before = latest_step(run)
        resume = before > 0  # with no checkpoint yet there is nothing to resume: start again
        log, marker = tmp_path / f"kill{number}.log", tmp_path / f"marker{number}"
        proc = child(run, resume, log, point if how == "pause" else "", marker)
        if how == "pause":
            wait_for(proc, marker.exists, log)
        else:
            target = rng.randint(1, INTERVAL - 1) if point == "before-first-checkpoint" else \
                before + rng.randint(1, 2 * INTERVAL)
            assert target < MAX_STEPS
            wait_for(proc, lambda target=target: steps_done(run) >= target, log)
            time.sleep(rng.uniform(0, 0.02))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        text = log.read_text()
        if resume:
            assert f"resuming from step-{before:08d} (step {before})" in text, text[-2000:]
        check_nothing_partial(run)
        done, kept = steps_done(run), latest_step(run)
        assert done - kept <= INTERVAL, f"kill {number} ({point}): {done} steps logged, checkpoint at {kept}"
        kills.append((point, how, before, done, kept))

    final_log = tmp_path / "final.log"
    last = child(run, True, final_log)
    assert last.wait(timeout=120) == 0, final_log.read_text()[-3000:]
    assert ref.wait(timeout=120) == 0, ref_log.read_text()[-3000:]
    check_nothing_partial(run)
    assert len(kills) == len(plan) >= 5 and any(k[0] == "weights" for k in kills)

    # The same final weights, optimizer moments and best checkpoint as the unbroken run, bit for bit.
    ours, theirs = RunDir(run).step_checkpoints(), RunDir(reference).step_checkpoints()
    assert ours[-1].name == theirs[-1].name == f"step-{MAX_STEPS:08d}"
    for name in (ours[-1].name, "best"):
        a = load_file(str(run / "checkpoints" / name / "model.safetensors"))
        b = load_file(str(reference / "checkpoints" / name / "model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert verify_manifest(run / "checkpoints" / "best")["step"] == verify_manifest(reference / "checkpoints" /
                                                                                   "best")["step"]
    sa, sb = load_state(ours[-1])["optimizer"]["state"], load_state(theirs[-1])["optimizer"]["state"]
    for index in sb:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[index][key], sb[index][key])
    # metrics.jsonl: every step once, with the unbroken run's losses
    def strip(records):
        return [{k: v for k, v in r.items() if k in ("step", "loss", "val_loss", "train_loss")} for r in records]

    assert strip(metric_records(run)[0]) == strip(metric_records(reference)[0])
    # no leftovers of the crashes beside the checkpoints that a later write of the same name would not clear
    print("kills (point, how, resumed from, steps logged, checkpoint kept):", *kills, sep="\n")
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_one(tmp_path, monkeypatch, capsys):
    """ENOSPC half-way through the second checkpoint: exit 2, the first checkpoint intact, nothing partial."""
    import errno

    import tinylm.train.checkpoints as ckpt
    from tinylm import cli

    real, calls = ckpt.save_weights, {"n": 0}

    def full_disk(model, path):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(model, path)

    monkeypatch.setattr(ckpt, "save_weights", full_disk)
    monkeypatch.setenv("TINYLM_PEAK_FLOPS", "1e11")
    run = tmp_path / "run"
    args = ["train", RECIPE, "--out", str(run), "--quiet"] + set_args(OVERRIDES + ["train.max_steps=12",
                                                                                  "train.eval_interval=100"])
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "step-00000008" in err[0], err
    check_nothing_partial(run)
    assert [p.name for p in RunDir(run).step_checkpoints()] == ["step-00000004"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000004"]  # the partial one is gone
    monkeypatch.setattr(ckpt, "save_weights", real)
    assert cli.main(args + ["--resume"]) == 0  # and the run goes on from it
    assert latest_step(run) == 12
