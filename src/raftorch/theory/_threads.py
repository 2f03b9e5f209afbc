"""Run the theory's small matrix products on one BLAS thread.

The matrices here are tiny (tens by a thousand); a multi-threaded BLAS spends more time
waking its threads than multiplying, several times longer than one thread on a busy machine. ``threadpoolctl`` comes with scikit-learn (a raftorch dependency);
without it this is a no-op.
"""
from __future__ import annotations

import contextlib


def single_threaded_blas():
    """Context manager limiting BLAS to one thread (no-op if threadpoolctl is missing)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
