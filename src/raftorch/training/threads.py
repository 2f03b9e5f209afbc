"""How many CPU threads a run uses: the usable cores that other work does not keep busy."""
from __future__ import annotations

import os
import time


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity: ``taskset``, SLURM and container cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def busy_cores(window: float = 0.25) -> float:
    """How many cores other work keeps busy right now: CPU time not idle over ``window``
    seconds (Linux ``/proc/stat``), else the 1-minute load average (which lags: it still
    counts work that ended a minute ago)."""
    def sample():
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(window)
        total1, idle1 = sample()
        if total1 > total0:
            return os.cpu_count() * (1.0 - (idle1 - idle0) / (total1 - total0))
    except (OSError, ValueError, IndexError, TypeError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def auto_threads() -> int:
    """The thread count ``threads: null`` resolves to: the usable cores that other work does not
    keep busy right now (:func:`busy_cores`), at least 1.

    PyTorch's own default, one OpenMP thread per core, makes small models 20-60x slower as
    soon as anything else runs on the machine (threads wait for each other at every operation);
    leaving the busy cores alone avoids that, and on an idle machine every core is used.
    """
    cores = usable_cores()
    busy = int(round(busy_cores()))
    return max(1, min(cores, cores - busy))


