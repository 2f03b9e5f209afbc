"""The paper's Figure 2 as data, and one runner for it.

Panels (paper Fig. 2b-e, plus BP): BP; FA with ``r >= d`` (full-rank fixed ``B``); FA with a
fixed rank-``r`` ``B = Q P``, ``r < d``; RAF with ``r < d`` (learns the top ``r`` modes); RAF with
``r >= d`` (learns all ``d``). The table adds ``fa-lowrank`` with ``r = d`` and ``raf-q``
(``Q`` adapted, ``P`` fixed), which stop at the same wrong solution as ``fa-lowrank``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from raftorch.theory.ode import integrate
from raftorch.theory.result import TheoryResult, plateau_distance
from raftorch.theory.simulate import simulate
from raftorch.theory.task import LinearTask

# the reference setting of the linear theory (paper Fig. 2; docs/theory.md)
DEFAULT_TASK = {"n_in": 30, "n_hidden": 60, "n_out": 30, "strengths": [8.0, 6.0, 4.5, 3.0, 2.0],
                "n_samples": 1000, "noise": 0.5}


FIXED_P_RULES = ("fa-lowrank", "raf-q")  # the rules with a closed-form plateau (exact.fixed_feedback_plateau)


@dataclass
class Figure2Config:
    """Everything that defines a Figure-2 run. ``rank_low < d <= rank_high``
    (``rank_high=None``: ``d``)."""

    task: dict = field(default_factory=lambda: dict(DEFAULT_TASK))
    seed: int = 0
    rank_low: int = 3
    rank_high: int | None = None
    methods: tuple[str, ...] = ("ode", "sim")
    t_end: float = 10.0
    lr: float = 0.01
    batch_size: int | None = None
    weight_decay: float = 0.0
    init_scale: float = 1e-3
    n_records: int = 101

    def runs(self) -> list[tuple[str, int | None]]:
        """``(rule, rank)`` of every run, panels first."""
        d = len(self.task["strengths"]) if not isinstance(self.task["strengths"], int) else self.task["strengths"]
        high = d if self.rank_high is None else self.rank_high
        if not self.rank_low < d <= high:
            raise ValueError(
                f"Figure 2 compares r < d with r >= d: need rank_low < d <= rank_high, got "
                f"rank_low={self.rank_low}, d={d}, rank_high={high}; e.g. --rank-low {max(d - 2, 1)} --rank-high {d}"
            )
        return [("bp", None), ("fa", None), ("fa-lowrank", self.rank_low), ("raf", self.rank_low),
                ("raf", high), ("fa-lowrank", high), ("raf-q", self.rank_low)]

    def panels(self) -> list[dict]:
        """The five panels of the figure: title, rule and rank."""
        runs = self.runs()
        titles = ["BP", "FA, full-rank B (r >= d)", f"FA, fixed rank-{runs[2][1]} B (r < d)",
                  f"RAF, r = {runs[3][1]} < d", f"RAF, r = {runs[4][1]} >= d"]
        return [{"title": t, "rule": rule, "rank": rank} for t, (rule, rank) in zip(titles, runs[:5])]


def run_figure2(config: Figure2Config) -> tuple[LinearTask, list[TheoryResult]]:
    """Build the task and run every ``(rule, rank)`` of ``config`` with every method."""
    for m in config.methods:
        if m not in ("ode", "sim"):
            raise ValueError(f"unknown method {m!r}; use 'ode' (solve_ivp on the flow) or 'sim' (SGD on samples)")
    task = LinearTask(**config.task, seed=config.seed)
    steps = max(1, int(round(config.t_end / config.lr)))
    results = []
    for rule, rank in config.runs():
        common = {"seed": config.seed, "weight_decay": config.weight_decay,
                  "init_scale": config.init_scale, "n_records": config.n_records}
        if "ode" in config.methods:
            results.append(integrate(task, rule, rank, t_end=config.t_end, lr=config.lr, **common))
        if "sim" in config.methods:
            results.append(simulate(task, rule, rank, steps=steps, lr=config.lr,
                                    batch_size=config.batch_size, **common))
    for r in results:
        if r.rule in FIXED_P_RULES:
            w = r.weights
            r.plateau_distance = plateau_distance(task, w.W1, w.W2, w.P)
    return task, results


def format_table(results: list[TheoryResult], tol: float = 0.02) -> str:
    """Plain-text table: method, rule, r, d, final relative error, recovered modes, distance to
    the closed-form plateau (fixed-``P`` rules), strengths."""
    header = ["method", "rule", "r", "d", "rel. error", f"recovered (within {tol:.0%})", "to plateau",
              "final mode strengths"]
    rows = []
    for r in results:
        rec = r.recovered(tol)
        d = len(r.strengths)
        rows.append([r.method, r.rule, "full" if r.rank is None else str(r.rank), str(d),
                     f"{r.relative_error:.4f}",
                     f"{len(rec)}/{d}" + (f" ({','.join(str(i + 1) for i in rec)})" if rec else ""),
                     "" if r.plateau_distance is None else f"{r.plateau_distance:.4f}",
                     " ".join(f"{m:.3f}" for m in r.mode_strengths)])
    if results:
        rows.append(["", "target", "", "", "", "", "", " ".join(f"{s:.3f}" for s in results[0].strengths)])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
