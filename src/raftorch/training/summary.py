"""Several runs' numbers in one: the mean and sample standard deviation over seeds."""
from __future__ import annotations

import statistics


def mean_std(values: list[float]) -> tuple[float, float, int] | None:
    """(mean, sample std over seeds (0 for one value), n); ``None`` for no values."""
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)
