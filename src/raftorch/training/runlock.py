"""One writer per output folder: an OS lock held for a run's whole life.

    from raftorch.training.runlock import hold

    with hold("runs/x", what="raftorch train"):
        ...  # no other process holds runs/x until the block ends

Two runs started with the same ``--out`` would otherwise both train and both report success,
and the folder would keep one of them. :func:`hold` takes an exclusive lock on the lock file
``FOLDER/.lock`` and writes the holder into it (one JSON line: pid, host, command line, start
time), so a second writer is refused at once with one line that names the holder::

    runs/x is in use by pid 1234 on host node7 (raftorch train --data digits --out runs/x,
    since 10:03:12); wait for it to finish, or choose another --out

(one line; broken here), raised as :class:`FolderInUse`. ``raftorch train``, each point of
``raftorch reproduce`` and ``raftorch compare`` hold their output this way.

Dead holders never block: the operating system drops the lock when its process ends, however
it ends (``kill -9``, out of memory), so a lock file left behind is simply taken over by the
next writer, which overwrites the record. A normal exit removes the file.

Mechanism, by platform:

- POSIX: ``fcntl.flock(LOCK_EX | LOCK_NB)``. On Linux NFS mounts the kernel maps ``flock`` to
  NFS byte-range locks, so the lock holds across the hosts of a cluster that share the folder.
- Windows: ``msvcrt.locking`` on one byte far past the record (Windows locks are mandatory,
  so the record itself stays readable); Windows also drops it when the process ends.
- A file system that cannot lock (Lustre mounted without ``-o flock``, some FUSE mounts), or
  a platform with neither module: the run goes on without the lock, with one warning
  (``raftorch: ...`` on stderr) -- refusing to run there would be worse than the race.

The lock is per process and re-entrant: a :func:`hold` nested inside another :func:`hold` of
the same folder in the same process (``raftorch reproduce`` holds a point's folder, and the
:func:`raftorch.training.loop.train` it calls holds it again) passes straight through. Threads of one
process are not kept apart.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import tempfile
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None

LOCK_NAME = ".lock"
ADVICE = "wait for it to finish, or choose another --out"
_WINDOWS_LOCK_OFFSET = 1 << 30  # the byte msvcrt locks: far past the record, which stays readable
_MAX_COMMAND = 160  # characters of the holder's command line shown in the message

log = logging.getLogger("raftorch")
_held: dict[str, int] = {}  # lock file -> nesting depth, in this process
_warned = False


class FolderInUse(RuntimeError):
    """Another process holds the folder (see :func:`hold`); ``str()`` is the one-line message.

    Attributes:
        label: what the message calls the output (the folder, or ``--out`` of compare).
        holder: the holder's record (``pid``, ``host``, ``command``, ``what``, ``since``: seconds
            since the epoch); ``{}`` when it could not be read.
        lock_file: the lock file's path.
    """

    def __init__(self, label: str, holder: dict, advice: str = ADVICE, lock_file: Path | None = None):
        self.label, self.holder, self.advice, self.lock_file = label, holder, advice, lock_file
        super().__init__(in_use_message(label, holder, advice))


def in_use_message(label: str, holder: dict, advice: str = ADVICE, now: float | None = None) -> str:
    """``LABEL is in use by pid P on host H (COMMAND, since HH:MM:SS); ADVICE``: one line.

    ``COMMAND`` is the holder's command line, after its ``what`` when it does not start with
    that (``raftorch train: python my_sweep.py``), cut to 160 characters. The start time gets
    its date when it is not today (``now``: the current time, for tests). A record that could
    not be read gives ``LABEL is in use by another process (its lock file names no holder); ADVICE``.
    """
    try:
        pid, host = int(holder["pid"]), str(holder["host"])
    except (KeyError, TypeError, ValueError):
        return f"{label} is in use by another process (its lock file names no holder); {advice}"
    command = " ".join(str(holder.get("command") or "").split())  # one line, whatever it held
    what = str(holder.get("what") or "")
    if what and not command.startswith(what):  # first: a long command line is cut, never this
        command = f"{what}: {command}" if command else what
    if len(command) > _MAX_COMMAND:
        command = command[:_MAX_COMMAND - 3] + "..."
    details = [command] if command else []
    try:
        since = _dt.datetime.fromtimestamp(float(holder["since"]))
        today = _dt.datetime.fromtimestamp(time.time() if now is None else now).date()
        details.append("since " + since.strftime("%H:%M:%S" if since.date() == today else "%Y-%m-%d %H:%M:%S"))
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        pass
    inner = f" ({', '.join(details)})" if details else ""
    return f"{label} is in use by pid {pid} on host {host}{inner}; {advice}"


def command_line() -> str:
    """This process's command line as a user would type it: ``raftorch train --out ...`` for
    the ``raftorch`` command or ``python -m raftorch``, else ``python ARGS``."""
    argv = list(sys.argv) or [""]
    head = Path(argv[0])
    if head.stem == "raftorch" or (head.name == "__main__.py" and head.parent.name == "raftorch"):
        argv = ["raftorch", *argv[1:]]
    else:
        argv = [Path(sys.executable).name or "python", *argv]
    return shlex.join(argv)


@contextlib.contextmanager
def hold(folder: str | Path, what: str | None = None, *, lock_name: str = LOCK_NAME,
         label: str | None = None, advice: str = ADVICE) -> Iterator[Path]:
    """Hold ``folder`` (created if missing) for the ``with`` block; yields the lock file's path.

    Args:
        folder: the output folder; the lock file is ``folder / lock_name``.
        what: a short description for the record and the message (``"raftorch train"``);
            shown before the command line when that does not start with it.
        lock_name: the lock file's name inside ``folder`` (``raftorch compare`` locks its
            ``OUT.json`` / ``OUT.csv`` with ``.OUT.lock`` next to them).
        label: what the message calls the output (default: ``folder``).
        advice: the message's last part, how to get on.

    Raises:
        FolderInUse: another process holds it; nothing was written.
        ValueError: the lock file cannot be created (the folder is not writable).

    On leaving, the lock file is removed, and so is ``folder`` when this call created it and
    it is empty (a run that failed before writing anything leaves no empty folder behind).
    """
    folder = Path(folder)
    path = folder / lock_name
    key = os.path.realpath(path)
    if _held.get(key):  # nested in this process: already ours
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    created = not folder.exists()
    fd, locked = _acquire(folder, path, label if label is not None else str(folder), advice)
    _held[key] = 1
    try:
        _write_record(fd, what)
        yield path
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.remove(path)  # still locked here: whoever opens it next finds a new file
        if locked:
            _unlock(fd)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty


def _acquire(folder: Path, path: Path, label: str, advice: str) -> tuple[int, bool]:
    """(fd of the locked lock file, whether an OS lock is held); raises :class:`FolderInUse`."""
    for _ in range(100):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed between the two calls: again
            continue
        except OSError as exc:
            raise ValueError(f"{label} is not writable: cannot create its lock file {path} "
                             f"({exc.strerror or exc}); choose a writable folder") from None
        try:
            locked = _try_lock(fd, path)
        except BaseException:
            os.close(fd)
            raise
        if locked is False:
            holder = _read_record(fd)
            os.close(fd)
            raise FolderInUse(label, holder, advice, path)
        if _same_file(fd, path):
            return fd, bool(locked)
        os.close(fd)  # the holder before us removed this file as we opened it: lock the new one
    raise RuntimeError(f"could not lock {path}: it keeps being replaced")


def _try_lock(fd: int, path: Path) -> bool | None:
    """True: locked; False: another process holds it; None: no OS lock here (warned once)."""
    global _warned
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        if msvcrt is not None:
            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        reason = "this platform has neither fcntl nor msvcrt"
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EDEADLK):
            return False
        reason = f"the file system refuses locks ({exc.strerror or exc})"
    if not _warned:
        _warned = True
        log.warning("cannot lock %s: %s; going on without the lock, so nothing stops a second "
                    "process from writing the same output", path, reason)
    return None


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        elif msvcrt is not None:
            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _write_record(fd: int, what: str | None) -> None:
    now = time.time()
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command_line(), "what": what,
              "since": now, "started": _dt.datetime.fromtimestamp(now).isoformat(timespec="seconds")}
    data = (json.dumps(record) + "\n").encode()
    with contextlib.suppress(OSError):  # the record only informs; the lock is what protects
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)


def _read_record(fd: int, wait: float = 1.0) -> dict:
    """The holder's record; it may be a moment late (the holder writes it right after locking)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            record = json.loads(os.read(fd, 65536).decode("utf-8", "replace"))
            if isinstance(record, dict) and "pid" in record:
                return record
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.02)


def check_writable(folder: str | Path, flag: str = "--out") -> None:
    """Raise one clear ``ValueError`` when ``folder`` cannot be created or written, before any work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".raftorch-write-check")
        os.close(fd)
        os.remove(tmp)
    except OSError as exc:
        raise ValueError(f"{flag} {folder} is not a writable folder ({exc.strerror or exc}); "
                         f"choose another with {flag} DIR") from None
