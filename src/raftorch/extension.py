"""The optional C++ fast path (``csrc/lowrank_linear.cpp``), compiled on first use.

``raftorch.Linear`` with a low-rank rule on CPU float32/float64 tensors runs its forward and
backward through one C++ ``autograd::Function`` when this extension is available (not under
autocast, with Oja on the targets, ``oja_scale="std"``, ``oja_ddof=1``, ``error_clamp`` or
:func:`raftorch.sync_oja`: ``raftorch.functional._fast_path_fits``). It honours
:func:`raftorch.loss_scale` (the factor is read in the backward) and refuses double
backward, like the Python path; the arithmetic is the same as
the Python path in :mod:`raftorch.functional` (tested equal), but the Python dispatch between the
backward's ~20 small operations is gone and, for float32, all of its thin (rank-r) products,
Oja's statistics and the bias gradient come from one multithreaded pass over the rows of the
error and the layer input, instead of BLAS products with r rows that each read them again.

The first use compiles the extension with PyTorch's JIT builder (``torch.utils.cpp_extension``:
a C++ compiler and ``ninja``, ~30 s on 2 cores) into PyTorch's extension cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), and says so (an INFO message
on the ``raftorch`` logger, which the command line prints); later runs load it silently in well
under a second (:func:`will_compile`). If it cannot be built, raftorch warns once and uses the
Python path.
``RAFTORCH_EXTENSION=0`` turns it off (``=1`` makes a failed build an error instead).
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

_SOURCE = Path(__file__).parent / "csrc" / "lowrank_linear.cpp"
_NAME = "raftorch_lowrank_linear"
_lock = threading.Lock()
log = logging.getLogger("raftorch")
_state: dict = {}


class RaftorchExtensionWarning(UserWarning):
    """The C++ fast path could not be built; raftorch runs its (slower) Python path."""


def setting() -> str:
    """``"0"`` (off), ``"1"`` (required) or ``"auto"`` (the default), from the environment."""
    value = os.environ.get("RAFTORCH_EXTENSION", "auto").strip().lower()
    if value not in ("0", "1", "auto"):
        raise ValueError(f"RAFTORCH_EXTENSION={value!r} is not valid; use 0 (off), 1 (required) or auto")
    return value


def get():
    """The compiled module, or ``None`` where it is turned off or cannot be built."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
    return _state["module"]


def _put_ninja_on_path():
    """PyTorch's builder runs ``ninja`` from PATH; the pip package's binary lives in the
    environment's bin folder, which is not on PATH unless the environment is activated."""
    try:
        import ninja
    except ImportError:
        return
    bindir = getattr(ninja, "BIN_DIR", None)
    path = os.environ.get("PATH", "")
    if bindir and bindir not in path.split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + path


def _flag_sets():
    """Compiler flags to try in order. ``-fopenmp`` makes ``at::parallel_for`` in the extension
    run on PyTorch's own OpenMP threads (the ``GOMP_*`` symbols resolve to the runtime PyTorch
    loaded; without the flag the fused pass runs on one thread). A compiler without OpenMP
    (Apple's clang) gets a second try without it."""
    import torch

    base = ["-O3"]
    if torch.backends.openmp.is_available():
        return [base + ["-fopenmp"], base]
    return [base]


def will_compile() -> bool:
    """Whether loading the extension will compile it: its library is missing from PyTorch's
    extension cache or older than its source. (PyTorch's builder asks ninja, which also
    rebuilds after other changes, such as new PyTorch headers: that build runs unannounced.)
    Only then does raftorch announce the ~30 s wait; an ordinary run loads it silently."""
    try:
        # _get_build_directory is private (no public API gives the folder torch.utils.cpp_extension.load
        # builds into: TORCH_EXTENSIONS_DIR or the default root, plus a Python / accelerator subfolder)
        from torch.utils.cpp_extension import LIB_EXT, _get_build_directory

        library = Path(_get_build_directory(_NAME, verbose=False)) / f"{_NAME}{LIB_EXT}"
        return not library.exists() or library.stat().st_mtime < _SOURCE.stat().st_mtime
    except Exception:  # noqa: BLE001 -- a private helper of PyTorch moved: announce, to be safe
        return True


def _build():
    mode = setting()
    if mode == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()
        if will_compile():
            log.info("compiling raftorch's C++ fast path (first use on this machine or a changed "
                     "source, ~30 s; later runs load it in under a second)")
        else:
            log.debug("loading raftorch's C++ fast path from PyTorch's extension cache")
        flag_sets = _flag_sets()
        for i, flags in enumerate(flag_sets):
            try:
                return load(name=_NAME, sources=[str(_SOURCE)], extra_cflags=flags, verbose=False)
            except Exception:
                if i + 1 == len(flag_sets):
                    raise
                log.info("building the C++ fast path with %s failed; trying %s", flags, flag_sets[i + 1])
    except Exception as exc:  # no compiler, no ninja, no headers, ...
        if mode == "1":
            raise RuntimeError(
                f"RAFTORCH_EXTENSION=1 but the C++ fast path failed to build: {exc}. Install a C++ "
                "compiler and ninja (pip install ninja), or set RAFTORCH_EXTENSION=auto"
            ) from exc
        warnings.warn(
            f"raftorch's C++ fast path could not be built ({type(exc).__name__}: {exc}); using the "
            "Python path (same results, slower on CPU). Install a C++ compiler and ninja "
            "(pip install ninja) to enable it, or set RAFTORCH_EXTENSION=0 to silence this.",
            RaftorchExtensionWarning, stacklevel=3,
        )
        return None


@contextmanager
def disabled():
    """Inside this block the Python path runs even where the fast path is built (for side by
    side benchmarks and tests)."""
    module = get()
    _state["module"] = None
    try:
        yield
    finally:
        _state["module"] = module


def warm() -> None:
    """Build (or load) the fast path now, before any timed work (the experiment runner before it
    starts its workers, ``raftorch compare`` before its first run); a failure is left to the
    first real use, which falls back to the Python path and warns."""
    try:
        if setting() != "0":
            get()
    except Exception:  # noqa: BLE001
        pass
