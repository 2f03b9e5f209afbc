"""The paper's results by name: ``raftorch reproduce``.

Each panel of the paper is data, one YAML spec per panel and profile under
``configs/experiments/<profile>/`` (``quick``: minutes on a CPU; ``paper``: the paper's
settings, for GPUs or a cluster). One runner serves them all:

- :mod:`~raftorch.experiments.spec`: loading and checking a spec, expanding its grid
  (series x grid values x seeds) into points;
- :mod:`~raftorch.experiments.runner`: every point an ordinary ``raftorch train`` run folder;
  finished points skipped, killed ones resumed, failures recorded; jobs, threads, shards;
- :mod:`~raftorch.experiments.aggregate`: ``summary.csv`` (one row per run) and ``points.csv``
  (mean ± std over seeds, gain over the no-feedback control), from the saved run folders only;
- :mod:`~raftorch.experiments.stats`: paired (Student t) and Welch intervals of a difference
  over seeds, and the seeds that would decide a claim;
- :mod:`~raftorch.experiments.claims`: the spec's claims decided on those intervals (holds /
  fails / undecided / not evaluated);
- :mod:`~raftorch.experiments.figures`: the panel's figure from ``summary.csv``;
- :mod:`~raftorch.experiments.suite`: one or all panels end to end (``decide``: seeds added
  until the claims are decided), and ``REPORT.md``;
- :mod:`~raftorch.experiments.cli`: the command line.

From Python::

    from raftorch.experiments import load_panel, reproduce
    results = reproduce([load_panel("fig3b", "quick")], "results")
    results[0].claims   # [{"claim": ..., "verdict": "holds", "estimate": ..., "lo": ..., "hi": ...}, ...]
"""
from raftorch.experiments.claims import evaluate_claims
from raftorch.experiments.spec import Panel, Point, SpecError, available, load_panel, load_spec
from raftorch.experiments.suite import reproduce, write_report

__all__ = ["Panel", "Point", "SpecError", "available", "evaluate_claims", "load_panel", "load_spec",
           "reproduce", "write_report"]
