"""Run a panel's points: every point an ordinary ``raftorch train`` run folder.

``results/<profile>/<panel>/runs/<point>/`` holds the point's ``config.yaml``,
``metrics.jsonl``, ``checkpoint.pt`` and ``final.json`` (see :mod:`raftorch.training.loop`).
A point with ``final.json`` is done and skipped; one with only a checkpoint (killed) is
resumed, ending with the same numbers as an uninterrupted run; one that fails (NaN, a crash,
a bad setting) gets an ``error.json`` and the others go on (``retry_failed`` runs it again).
A folder whose ``config.yaml`` disagrees with the spec is refused before any work: the spec
changed since that run, and mixing the two would be silently wrong.

One writer per point: a point is trained while holding its run folder's lock
(:mod:`raftorch.training.runlock`), so two ``raftorch reproduce`` processes on the same results root (the
same command run twice, shards that overlap, a ``raftorch train`` into a point's folder) never
train one point at once. The second process skips a point held by another, says so in one line
(``toy bp_s0: busy, skipped (... is in use by pid 1234 on host ...)``) and goes on with the
other points; the sweep does not fail for it (exit status 0), and the same command run again
once the holder has finished includes the point. Under the lock the folder's state is read
again, so a point that another process finished (or left resumable, or saw fail) meanwhile is
taken as it is now: reported done, resumed, or reported failed, never trained over.

Parallelism: ``jobs`` points at once, each in its own worker process with ``threads`` threads
(``jobs x threads`` never more than the cores unless asked). By default each panel's points
get the panel's ``threads_per_point`` (default 1) and as many jobs as fit in the idle usable
cores (:func:`raftorch.training.threads.auto_threads`): on small models, one thread per process
and one process per core use a CPU best.
Workers stay alive between points and keep the datasets they loaded, so a point costs its
training time plus well under a second.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raftorch.experiments.aggregate import ERROR, run_dir, run_status
from raftorch.experiments.spec import Panel, Point, SpecError
from raftorch.training import checkpoint as ckpt
from raftorch.training import runlock
from raftorch.training.data import DatasetCache


# settings that say how and where a point ran, not what it computes (numbers may differ in the
# last float digits with the thread count; final.json records it)
RUN_ONLY = ("out", "threads", "device", "data_dir", "download", "eval_every", "track", "tensorboard")


class StaleRun(SpecError):
    """A run folder holds a run with other settings than the spec now gives."""


@dataclass
class Task:
    panel: Panel
    point: Point
    folder: Path
    status: str  # missing | partial | failed | done

    @property
    def action(self) -> str:
        return {"missing": "new", "partial": "resume", "failed": "retry", "done": "skip"}[self.status]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"3/40"`` -> ``(3, 40)``; the I-th of N slices, 1-based."""
    if text is None:
        return None
    i, sep, n = text.partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit() or not 1 <= int(i) <= int(n):
        raise ValueError(f"--shard must be I/N with 1 <= I <= N (e.g. 3/40 for the third of 40 slices), got {text!r}")
    return int(i), int(n)


def select_shard(points: list[Point], shard: tuple[int, int] | None) -> list[Point]:
    """The points of one shard: every N-th point of the spec's order, starting at the I-th.
    Deterministic (same spec, same slices), and the slices' costs stay balanced because
    neighbouring points (the seeds of one point) land on different shards."""
    if shard is None:
        return list(points)
    i, n = shard
    return [p for k, p in enumerate(points) if k % n == i - 1]


def _train_config(panel: Panel, point: Point, folder: Path, threads: int | None, device: str | None,
                  data_dir: str | None = None) -> dict:
    cfg = dict(point.config, out=str(folder))
    if data_dir is not None:
        cfg["data_dir"] = str(data_dir)
    if threads is not None:
        cfg["threads"] = threads
    if device is not None:
        cfg["device"] = device
    return cfg


def _check_stale(task: Task) -> None:
    panel = task.panel
    saved = task.folder / ckpt.CONFIG
    if panel.kind != "train" or task.status == "missing" or not saved.exists():
        return
    from raftorch.training.config import TrainConfig, load_config_file

    have = TrainConfig.completed(load_config_file(saved))
    want = TrainConfig.from_dict(dict(task.point.config)).to_dict()
    changed = [k for k in want if k not in RUN_ONLY and have.get(k) != want[k]]
    if changed:
        diffs = "; ".join(f"{k}: run has {have.get(k)!r}, spec gives {want[k]!r}" for k in changed[:4])
        raise StaleRun(f"{task.folder} was run with other settings than {panel.path} now gives ({diffs}). "
                       f"Remove that folder to run the point again, or use another --results folder.")


def plan(panel: Panel, root: str | Path, points: list[Point]) -> list[Task]:
    """The state of every point's run folder; raises :class:`StaleRun` before any work."""
    tasks = [Task(panel, p, run_dir(root, panel, p), run_status(run_dir(root, panel, p))) for p in points]
    for t in tasks:
        _check_stale(t)
    return tasks


def _fingerprint(config: dict) -> str:
    from raftorch.training.config import TrainConfig

    full = TrainConfig.from_dict({k: v for k, v in config.items() if k != "out"}).to_dict()
    return json.dumps({k: v for k, v in full.items() if k not in RUN_ONLY}, sort_keys=True, default=str)


def reuse_finished(root: str | Path, tasks: list[Task]) -> list[Task]:
    """Points that another point of the same profile has already run with exactly the same
    settings (the BP reference shared by several panels, say) are filled from that run folder
    (``final.json``, ``metrics.jsonl``, ``config.yaml``, ``checkpoint.pt`` (a hard link where
    the file system allows, else a copy), and ``reused.json`` naming the source)
    instead of being trained again. Returns the tasks filled this way."""
    missing = [t for t in tasks if t.status == "missing" and t.panel.kind == "train"]
    if not missing:
        return []
    index: dict[str, Path] = {}
    for profile in sorted({t.panel.profile for t in missing}):
        _index_finished(Path(root) / profile, index)
    filled = []
    for t in missing:
        source = index.get(_fingerprint(t.point.config))
        if source is None or source == t.folder:
            continue
        try:
            with runlock.hold(t.folder, what=f"raftorch reproduce, point {t.point.id}"):
                if run_status(t.folder) != "missing":  # another process got to it first
                    t.status = run_status(t.folder)
                    continue
                _fill_from(source, t.folder)
        except runlock.FolderInUse:  # another process is training it: left to that one
            continue
        t.status = "done"
        filled.append(t)
    return filled


def _fill_from(source: Path, folder: Path) -> None:
    for name in (ckpt.CONFIG, ckpt.METRICS, ckpt.METRICS_CSV):
        if (source / name).exists():
            ckpt.write_text(folder / name, (source / name).read_text())
    if (source / ckpt.CHECKPOINT).exists():  # the trained weights: analyses (fields) read them
        _link_or_copy(source / ckpt.CHECKPOINT, folder / ckpt.CHECKPOINT)
    ckpt.write_json(folder / "reused.json", {"from": str(source)})
    ckpt.write_text(folder / ckpt.FINAL, (source / ckpt.FINAL).read_text())  # last: marks it done


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes a hard link to ``source`` (checkpoints are replaced by rename, never
    written in place, so the two stay independent), else an atomic copy."""
    import shutil

    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _index_finished(profile_dir: Path, index: dict[str, Path]) -> None:
    from raftorch.training.config import load_config_file

    for final in sorted(profile_dir.glob(f"*/runs/*/{ckpt.FINAL}")):
        folder = final.parent
        if (folder / "reused.json").exists():
            continue
        try:
            index.setdefault(_fingerprint(load_config_file(folder / ckpt.CONFIG)), folder)
        except (ValueError, OSError):
            continue


# --------------------------------------------------------------------------- one point (in a worker)

# The datasets of the points run in this process, loaded once (raftorch.training.data.DatasetCache):
# a worker's for its life (it lives only as long as the sweep); the command's own for one sweep.
_DATASETS: DatasetCache | None = None


@contextlib.contextmanager
def _dataset_cache():
    """Datasets loaded once for the points run in this process, dropped afterwards (so the
    command's process never keeps a dataset, nor a stale copy of one, beyond the sweep)."""
    global _DATASETS
    if _DATASETS is not None:
        yield
        return
    _DATASETS = DatasetCache()
    try:
        yield
    finally:
        _DATASETS.clear()
        _DATASETS = None


def _init_worker(threads: int) -> None:
    """A worker process: its thread count, and a dataset cache (a worker lives only as long as
    the sweep, so the cache never outlives it)."""
    import signal

    import torch

    global _DATASETS
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the command's to handle: it stops the workers
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if _DATASETS is None:
        _DATASETS = DatasetCache()


BUSY_ADVICE = "this process leaves the point to it; run the same command again once it has finished"


def execute(kind: str, config: dict, theory: dict, folder: str, resume: bool,
            planned: str | None = None) -> dict[str, Any]:
    """Run one point, holding its run folder's lock; never raises for a failed run (it is
    recorded in ``error.json``). Returns ``{"status": "done" | "failed" | "busy", ...}``: busy
    when another process holds the folder (nothing written). ``planned``: the folder's state
    when the sweep was planned; when the state under the lock differs, another process has
    worked on the point since, and the state now decides (done: reported, not run again;
    resumable: resumed; failed: reported, not retried)."""
    folder = Path(folder)
    start = time.perf_counter()
    try:
        with runlock.hold(folder, what=f"raftorch reproduce, point {folder.name}", advice=BUSY_ADVICE):
            now = run_status(folder)
            if planned is not None and now != planned:
                if now == "done":
                    final = _read_json(folder / ckpt.FINAL)
                    return {"status": "done", "test_accuracy": final.get("test_accuracy"), "seconds": 0.0,
                            "note": "finished by another process"}
                if now == "failed":
                    return {"status": "failed", "seconds": 0.0,
                            "error": f"failed in another process: {_read_json(folder / ERROR).get('error', '?')}"}
                resume = now == "partial"
            return _execute_held(kind, config, theory, folder, resume, start)
    except runlock.FolderInUse as exc:
        return {"status": "busy", "error": str(exc), "seconds": time.perf_counter() - start}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _execute_held(kind: str, config: dict, theory: dict, folder: Path, resume: bool, start: float) -> dict:
    try:
        if (folder / ERROR).exists():
            (folder / ERROR).unlink()
        if kind == "theory":
            final = _run_theory(theory, config, folder)
        else:
            from raftorch.training.data import load_dataset
            from raftorch.training.loop import train

            final = train(config, resume=resume, progress=False, load=load_dataset if _DATASETS is None else _DATASETS)
        return {"status": "done", "test_accuracy": final.get("test_accuracy"),
                "seconds": time.perf_counter() - start}
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # NaN, crash, bad setting: record it, let the sweep go on
        message = f"{type(exc).__name__}: {exc}"
        ckpt.write_json(folder / ERROR, {"error": message, "traceback": traceback.format_exc()})
        return {"status": "failed", "error": message, "seconds": time.perf_counter() - start}


def figure2_config(theory: dict, config: dict):
    """The :class:`~raftorch.theory.experiments.Figure2Config` of a theory point: the spec's
    ``theory`` settings updated by the point's (its seed)."""
    from raftorch.theory.experiments import Figure2Config

    settings = {k: v for k, v in {**theory, **config}.items() if k not in ("tol",)}
    if "methods" in settings:
        settings["methods"] = tuple(settings["methods"])
    return Figure2Config(**settings)


def _run_theory(theory: dict, config: dict, folder: Path) -> dict:
    from raftorch.theory.experiments import run_figure2
    from raftorch.theory.result import save_results

    start = time.perf_counter()
    fig_cfg = figure2_config(theory, config)
    task, results = run_figure2(fig_cfg)
    ckpt.write_text(folder / ckpt.CONFIG, json.dumps(config, indent=2) + "\n")
    meta = {"task": task.config(), "panels": fig_cfg.panels(),
            "config": {k: v for k, v in vars(fig_cfg).items() if k != "task"}}
    save_results(folder / "theory.json", results, meta)
    final = {"seconds_total": time.perf_counter() - start, "seed": fig_cfg.seed}
    ckpt.write_json(folder / ckpt.FINAL, final)
    return final


# --------------------------------------------------------------------------- the sweep

def parallelism(jobs: int | None, threads: int | None, n_tasks: int, device: str | None = None,
                preferred_threads: int = 1) -> tuple[int, int]:
    """(jobs, threads per job). By default ``preferred_threads`` per job (a panel's measured
    ``threads_per_point``) and as many jobs as fit in the idle usable cores
    (:func:`raftorch.training.threads.auto_threads`), never more jobs than points; one job on a GPU.
    ``jobs x threads`` above the usable cores is allowed when both are given explicitly, with a
    warning: oversubscribed OpenMP threads make a CPU run many times slower."""
    from raftorch.training.threads import auto_threads, usable_cores

    for name, v in (("--jobs", jobs), ("--threads", threads)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive whole number, got {v!r}")
    gpu = device is not None and device.startswith("cuda")
    budget = auto_threads()
    if jobs is None:
        per_job = threads or min(preferred_threads, budget)
        jobs = 1 if gpu else max(1, min(budget // per_job, n_tasks or 1))
    if threads is None:
        threads = max(1, budget // jobs)
    if jobs * threads > usable_cores() and not gpu:
        print(f"raftorch reproduce: warning: {jobs} jobs x {threads} threads is more than the "
              f"{usable_cores()} usable cores; CPU runs will be much slower than with fewer", file=sys.stderr)
    return jobs, threads


def unique_todo(tasks: list[Task], retry_failed: bool = False) -> list[Task]:
    """The tasks to run: not done (nor failed, unless ``retry_failed``), and of several with the
    same settings only the first (the others are filled from it by :func:`reuse_finished`)."""
    todo, seen = [], set()
    for t in tasks:
        if not (t.status in ("missing", "partial") or (retry_failed and t.status == "failed")):
            continue
        key = _fingerprint(t.point.config) if t.panel.kind == "train" else None
        if key is not None and t.status == "missing":
            if key in seen:
                continue
            seen.add(key)
        todo.append(t)
    return todo


def run_tasks(todo: list[Task], *, jobs: int, threads: int, device: str | None = None,
              data_dir: str | None = None, progress: bool = True) -> list[tuple[Task, dict]]:
    """Run ``todo`` (see :func:`unique_todo`), ``jobs`` at a time, one line per finished point."""
    from tqdm.auto import tqdm

    if not todo:
        return []
    started = time.perf_counter()  # the clock of the progress lines includes the extension's build
    if any(t.panel.kind == "train" for t in todo):
        _warm_extension()
    bar = tqdm(total=len(todo), desc="points", unit="run", dynamic_ncols=True,
               disable=True if not progress else None)
    results: list[tuple[Task, dict]] = []

    def args(t: Task):
        config = (_train_config(t.panel, t.point, t.folder, threads, device, data_dir) if t.panel.kind == "train"
                  else dict(t.point.config))
        return t.panel.kind, config, t.panel.theory, str(t.folder), t.status == "partial", t.status

    def finished(t: Task, res: dict):
        results.append((t, res))
        if res["status"] == "done":
            acc = res.get("test_accuracy")
            what = f"test {100 * acc:.2f}%" if acc is not None else "done"
            if res.get("note"):
                what += f", {res['note']}"
        elif res["status"] == "busy":
            what = f"busy, skipped ({res['error']})"
        else:
            what = f"FAILED ({res['error'][:200]})"
        minutes, seconds = divmod(int(time.perf_counter() - started), 60)
        line = (f"[{len(results)}/{len(todo)} {minutes}:{seconds:02d}] {t.panel.id} {t.point.id}: {what} "
                f"({res['seconds']:.1f} s)")
        bar.write(line) if progress else print(line, flush=True)
        bar.update(1)

    try:
        if jobs == 1:  # in this process: each point sets its own thread count (config "threads")
            with _dataset_cache():
                for t in todo:
                    t.folder.mkdir(parents=True, exist_ok=True)
                    finished(t, execute(*args(t)))
        else:
            _run_pool(todo, args, finished, jobs, threads)
    finally:
        bar.close()
    return results


def _run_pool(todo: list[Task], args, finished, jobs: int, threads: int) -> None:
    """``jobs`` worker processes. When a worker dies (killed, out of memory, a crash) the pool
    breaks: the point seen failing first is recorded as failed, the unfinished others are
    started again in a new pool."""
    pending = list(todo)
    while pending:
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=min(jobs, len(pending)), mp_context=ctx,
                                    initializer=_init_worker, initargs=(threads,)) as pool:
            futures = {}
            for t in pending:
                t.folder.mkdir(parents=True, exist_ok=True)
                futures[pool.submit(execute, *args(t))] = t
            pending, broken = [], False
            try:
                for fut in cf.as_completed(futures):
                    t = futures[fut]
                    try:
                        res = fut.result()
                    except cf.process.BrokenProcessPool:
                        if broken:
                            pending.append(t)
                            continue
                        broken = True
                        msg = "the worker process died (killed, out of memory or a crash)"
                        ckpt.write_json(t.folder / ERROR, {"error": msg})
                        res = {"status": "failed", "error": msg, "seconds": 0.0}
                    finished(t, res)
            except KeyboardInterrupt:  # stop now: the workers' points resume from their last checkpoint
                for proc in mp.active_children():  # the pool's workers (no public API of the pool)
                    proc.terminate()
                pool.shutdown(wait=False, cancel_futures=True)
                raise


def _warm_extension() -> None:
    """Build (or load) the C++ fast path once here, not in every worker at the same time."""
    from raftorch import extension

    extension.warm()
