"""Atomic result files and checkpoints of a run folder.

Every file is written to a temporary file in the same folder and renamed over the target,
so a run killed at any moment leaves either the old or the new file, never a torn one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
FINAL = "final.json"


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the same folder (opened
    with ``mode``, "w" or "wb"), which is then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(Path(path), lambda f: f.write(text), "w")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` atomically as indented JSON."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Rewrite a JSON-lines file with ``records`` (the whole history: small, and never torn)."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def write_metrics_csv(path: str | Path, records: list[dict]) -> None:
    """``records`` as one CSV row each; nested mappings become columns ``key.sub``
    (``alignment.fc1``); a value an epoch lacks (test accuracy on a skipped evaluation) is empty."""
    import csv
    import io

    flat = [{(f"{k}.{sub}" if isinstance(v, dict) else k): x
             for k, v in r.items() for sub, x in (v.items() if isinstance(v, dict) else [(None, v)])}
            for r in records]
    columns = list(dict.fromkeys(c for r in flat for c in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    write_text(path, buf.getvalue())


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically with ``torch.save`` (read back by :func:`load_checkpoint`)."""
    atomic_write(Path(path), lambda f: torch.save(state, f), "wb")


class CorruptCheckpointError(ValueError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, or not a checkpoint)."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors, numbers, strings only).

    Raises :class:`CorruptCheckpointError` (one line: the file, the kind of failure, what to do)
    for a file that cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file, some with pages of advice
        raise CorruptCheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}): it is corrupt, truncated or not a "
            f"raftorch checkpoint; delete it (or the whole run folder) and start the run again") from None
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a raftorch "
                                     f"checkpoint; delete it (or the whole run folder) and start the run again")
    return state
