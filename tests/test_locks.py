"""One writer per output folder (raftorch.training.runlock), with real second processes.

A holder process takes the lock and sleeps; the second writer is the real command
(``python -m raftorch train|reproduce|compare``) and must be refused with one line naming the
holder, write nothing, and get in once the holder is killed with SIGKILL.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raftorch.training import runlock
from raftorch.training.runlock import FolderInUse, hold, in_use_message

pytestmark = pytest.mark.skipif(runlock.fcntl is None, reason="the tests kill the holder with SIGKILL (POSIX)")

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = ["--data", "digits", "--epochs", "1", "--model-option", "hidden=[8]", "--batch-size", "128",
         "--eval-every", "0", "--threads", "1", "--no-progress"]

HOLDER = """
import sys, time, pathlib, json
from raftorch.training.runlock import hold
folder, ready, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with hold(folder, what="the test's holder", **options):
    pathlib.Path(ready).write_text("held")
    time.sleep(600)
"""


@contextlib.contextmanager
def holder(folder: Path, **options):
    """A real process holding ``folder``'s lock until the block ends (then SIGKILLed if alive)."""
    ready = folder.parent / f".ready-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(ready), json.dumps(options)],
                            env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, "the holder process died before taking the lock"
            assert time.monotonic() < deadline, "the holder process never took the lock"
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        ready.unlink(missing_ok=True)


def kill_holder(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def raftorch(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raftorch", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused_by(result: subprocess.CompletedProcess, proc: subprocess.Popen, label: str, prog: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith(f"{prog}: error: {label} is in use by pid {proc.pid} on host "), lines[0]
    assert "the test's holder" in lines[0] and "; wait for it to finish, or choose another --out" in lines[0]


# --------------------------------------------------------------------------- the message

def test_the_message_names_the_holder_its_command_and_since_when_in_one_line():
    since = time.mktime((2025, 3, 4, 10, 3, 12, 0, 0, -1))
    holder_record = {"pid": 1234, "host": "node7", "command": "raftorch train --data digits --out runs/x",
                     "what": "raftorch train", "since": since}
    assert in_use_message("runs/x", holder_record, now=since + 60) == (
        "runs/x is in use by pid 1234 on host node7 (raftorch train --data digits --out runs/x, since 10:03:12); "
        "wait for it to finish, or choose another --out")
    # another day: the date too; a description the command does not start with is added
    other = dict(holder_record, command="python sweep.py", what="raftorch reproduce, point bp_s0")
    assert in_use_message("runs/x", other, "ADVICE", now=since + 2 * 86400) == (
        "runs/x is in use by pid 1234 on host node7 (raftorch reproduce, point bp_s0: python sweep.py, "
        "since 2025-03-04 10:03:12); ADVICE")


def test_a_long_or_multiline_command_stays_one_short_line_and_an_unreadable_record_says_so():
    record = {"pid": 7, "host": "h", "command": "raftorch train \n" + "--x " * 200, "since": time.time()}
    message = in_use_message("out", record)
    assert "\n" not in message and "..." in message and len(message) < 300
    assert in_use_message("out", {}) == ("out is in use by another process (its lock file names no holder); "
                                         "wait for it to finish, or choose another --out")


# --------------------------------------------------------------------------- the lock itself

def test_a_folder_held_by_another_process_is_refused_and_free_again_once_it_is_killed(tmp_path):
    folder = tmp_path / "run"
    with holder(folder) as proc:
        with pytest.raises(FolderInUse) as caught:
            with hold(folder):
                pytest.fail("entered a folder another process holds")
        assert caught.value.holder["pid"] == proc.pid
        assert f"is in use by pid {proc.pid}" in str(caught.value)
        kill_holder(proc)
        assert str(proc.pid) in (folder / runlock.LOCK_NAME).read_text()  # the dead holder's file is left
        with hold(folder) as lock_file:  # the kernel dropped the dead holder's lock
            record = json.loads(lock_file.read_text())
            assert record["pid"] == os.getpid() and record["command"]
    assert not (folder / runlock.LOCK_NAME).exists()


@pytest.mark.slow
def test_a_nested_hold_in_the_same_process_passes_and_the_outer_one_still_holds(tmp_path):
    folder = tmp_path / "run"
    with hold(folder):
        with hold(folder):
            pass
        code = "from raftorch.training.runlock import hold, FolderInUse\ntry:\n with hold(%r): print('entered')\n" \
               "except FolderInUse as e: print('refused', e.holder['pid'])" % str(folder)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV).stdout
        assert out.split() == ["refused", str(os.getpid())]


def test_a_hold_that_created_the_folder_removes_it_when_nothing_was_written(tmp_path):
    with pytest.raises(KeyError):
        with hold(tmp_path / "new" / "run"):
            raise KeyError("failed before writing")
    assert not (tmp_path / "new" / "run").exists()


# --------------------------------------------------------------------------- raftorch train

@pytest.mark.slow
def test_a_second_train_into_a_held_folder_exits_1_naming_the_holder_and_writes_nothing(tmp_path):
    folder = tmp_path / "run"
    with holder(folder) as proc:
        before = snapshot(folder)
        result = raftorch("train", *TRAIN, "--out", folder)
        assert_refused_by(result, proc, str(folder), "raftorch train")
        assert snapshot(folder) == before  # only the holder's lock file, unchanged
        assert "results in" not in result.stdout
        resumed = raftorch("train", *TRAIN, "--resume", "--out", folder)  # a resume is refused the same way
        assert_refused_by(resumed, proc, str(folder), "raftorch train")
        kill_holder(proc)
        result = raftorch("train", *TRAIN, "--out", folder)
    assert result.returncode == 0, result.stderr
    assert (folder / "final.json").exists() and not (folder / runlock.LOCK_NAME).exists()


SLOW_RUN = """
import sys, time, pathlib
import raftorch.training.loop as T
folder, gate = sys.argv[1], pathlib.Path(sys.argv[2])
real = T.train_epoch
def gated(run, **kw):
    (gate.parent / "started").write_text("training")
    while not gate.exists():
        time.sleep(0.02)
    return real(run, **kw)
T.train_epoch = gated
T.train({"data": "digits", "epochs": 1, "model_options": {"hidden": [8]}, "batch_size": 128,
         "eval_every": 0, "threads": 1, "out": folder}, progress=False)
"""


@pytest.mark.slow
def test_two_trains_into_one_folder_the_running_one_finishes_and_the_second_is_refused(tmp_path):
    """The reported bug: two runs with the same --out a moment apart used to both 'succeed'."""
    folder, gate = tmp_path / "run", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(folder), str(gate)], env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "started").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never started"
            time.sleep(0.02)
        second = raftorch("train", *TRAIN, "--seed", "1", "--out", folder)
        assert second.returncode == 1 and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"is in use by pid {first.pid} on host" in second.stderr and "raftorch train" in second.stderr
        gate.write_text("go")
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert json.loads((folder / "final.json").read_text())["seed"] == 0  # the first run's, whole


@pytest.mark.slow
def test_the_lock_is_released_when_a_run_ends(tmp_path, capsys):
    """In this process: a lock still held here would refuse the next hold (flock is per open file)."""
    from raftorch.cli import main

    folder = tmp_path / "run"
    assert main(["train", *TRAIN, "--out", str(folder)]) == 0
    assert not (folder / runlock.LOCK_NAME).exists()
    capsys.readouterr()
    assert main(["train", *TRAIN, "--out", str(folder)]) != 0  # refused for the finished run, not for a lock
    err = capsys.readouterr().err
    assert "already holds a run" in err and "in use" not in err
    assert main(["train", *TRAIN, "--resume", "--epochs", "2", "--out", str(folder)]) == 0
    assert json.loads((folder / "final.json").read_text())["epochs"] == 2
    code = f"from raftorch.training.runlock import hold\nwith hold({str(folder)!r}): print('entered')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.stdout.strip() == "entered", out.stderr  # and free for any other process


def test_a_run_holds_the_lock_from_before_its_first_write_and_releases_it_when_it_fails(tmp_path):
    import raftorch.training.loop as T

    folder = tmp_path / "run"
    seen = {}

    def failing_load(*args, **kwargs):  # called inside setup: after the folder check, before config.yaml
        seen["record"] = json.loads((folder / runlock.LOCK_NAME).read_text())
        raise RuntimeError("the data went away")

    with pytest.raises(RuntimeError, match="went away"):
        T.train({"data": "digits", "model_options": {"hidden": [8]}, "epochs": 1, "threads": 1,
                 "out": str(folder)}, progress=False, load=failing_load)
    assert seen["record"]["pid"] == os.getpid() and seen["record"]["what"] == "raftorch train"
    assert not folder.exists()  # created by the lock, left empty by the failure: removed
    with hold(folder):
        pass


# --------------------------------------------------------------------------- raftorch reproduce

def tiny_spec(tmp_path: Path) -> Path:
    spec = {"panel": "tiny", "title": "tiny", "seeds": [0, 1],
            "base": {"data": "digits", "model": "mlp", "model_options": {"hidden": [8]}, "epochs": 1,
                     "batch_size": 128, "eval_every": 0},
            "series": [{"name": "BP", "set": {"rule": "bp"}}]}
    path = tmp_path / "specs" / "quick" / "tiny.yaml"  # the folder name is the profile
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_reproduce_skips_a_point_another_process_holds_and_runs_it_once_the_holder_is_killed(tmp_path):
    spec, results = tiny_spec(tmp_path), tmp_path / "results"
    runs = results / "quick" / "tiny" / "runs"
    command = ["reproduce", "--spec", spec, "--results", results, "--jobs", "1", "--threads", "1", "--no-progress"]
    with holder(runs / "bp_s0") as proc:
        before = snapshot(runs / "bp_s0")
        result = raftorch(*command)
        assert result.returncode == 0, result.stderr  # the sweep goes on
        busy = [line for line in result.stdout.splitlines() if "bp_s0" in line]
        assert len(busy) == 1 and "busy, skipped" in busy[0] and f"in use by pid {proc.pid} on host" in busy[0]
        assert "Traceback" not in result.stdout + result.stderr
        assert snapshot(runs / "bp_s0") == before  # no error.json, nothing trained
        assert (runs / "bp_s1" / "final.json").exists()  # the other point ran
        kill_holder(proc)
        result = raftorch(*command)
    assert result.returncode == 0, result.stderr
    assert "tiny bp_s0: test" in result.stdout
    assert (runs / "bp_s0" / "final.json").exists() and not (runs / "bp_s0" / runlock.LOCK_NAME).exists()


def test_a_point_finished_by_another_process_after_planning_is_reported_not_run_again(tmp_path):
    from raftorch.experiments import runner

    folder = tmp_path / "bp_s0"
    folder.mkdir()
    (folder / "final.json").write_text(json.dumps({"test_accuracy": 0.5}))
    res = runner.execute("train", {"data": "nope"}, {}, str(folder), False, planned="missing")
    assert res["status"] == "done" and res["test_accuracy"] == 0.5 and "another process" in res["note"]
    assert sorted(p.name for p in folder.iterdir()) == ["final.json"]


# --------------------------------------------------------------------------- raftorch compare

@pytest.mark.slow
def test_compare_into_an_output_another_compare_writes_is_refused_then_runs_once_it_is_killed(tmp_path):
    out = tmp_path / "cmp"
    command = ["compare", "--data", "digits", "--rules", "bp", "--epochs", "1", "--seeds", "0", "--hidden", "8", "--threads", "1",
               "--no-progress", "--out", out]
    with holder(tmp_path, lock_name=".cmp.lock", label=str(out)) as proc:
        before = snapshot(tmp_path)
        result = raftorch(*command)
        assert_refused_by(result, proc, str(out), "raftorch compare")
        assert snapshot(tmp_path) == before and not (tmp_path / "cmp.json").exists()
        kill_holder(proc)
        result = raftorch(*command)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cmp.json").exists() and not (tmp_path / ".cmp.lock").exists()
