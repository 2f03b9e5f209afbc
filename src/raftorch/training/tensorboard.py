"""Optional TensorBoard logging of a training run (``raftorch train --tensorboard``).

Every number of an epoch's record in ``metrics.jsonl`` becomes a scalar at step = epoch, under
the same name (nested mappings joined by ``/``: ``alignment/fc1``, ``subspace/fc2``), written
with the ``tensorboard`` package's own writer (through ``torch.utils.tensorboard``) into
``RUN_DIR/tensorboard/``. Install it with ``pip install 'raftorch[tensorboard]'``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

SUBDIR = "tensorboard"


def available() -> bool:
    """Whether the ``tensorboard`` package can be imported."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    """A one-line ``ValueError`` when the package is missing (checked before any training)."""
    if not available():
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'raftorch[tensorboard]' "
                         "(or pip install tensorboard)")


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of ``record``, nested mappings flattened with ``/`` (booleans and text
    left out)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


class Logger:
    """Writes epoch records as TensorBoard scalars into ``out/tensorboard``."""

    def __init__(self, out: str | Path):
        require()
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(out) / SUBDIR
        self.writer = SummaryWriter(log_dir=str(self.folder))

    def log(self, record: dict[str, Any]) -> None:
        """Write the numbers of one epoch's record as scalars at step ``record["epoch"]`` (:func:`scalars`), then
        flush."""
        step = int(record.get("epoch", 0))
        for name, value in scalars({k: v for k, v in record.items() if k != "epoch"}).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        """Close the writer."""
        self.writer.close()
