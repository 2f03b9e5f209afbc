"""Linear theory of low-dimensional error feedback (paper section 3 and appendix A).

A one-hidden-layer linear network ``y_hat = W2 W1 x`` learns ``y = A x + noise`` with BP, FA,
FA with a fixed low-rank feedback, RAF with only ``Q`` adapted, or RAF. Two independent
paths give the dynamics: :func:`simulate` (SGD on the samples) and :func:`integrate`
(gradient-flow ODEs in the SVD basis, ``scipy.integrate.solve_ivp``). The equations of every
rule are in :mod:`raftorch.theory.rules`.

Example::

    from raftorch.theory import LinearTask, integrate, simulate
    task = LinearTask(30, 60, 30, strengths=[8, 6, 4.5, 3, 2], n_samples=1000, noise=0.5, seed=0)
    res = integrate(task, "raf", rank=3, t_end=10)
    res.mode_strengths, res.relative_error   # (5,), float; trajectories in res.*_trajectory
"""
from raftorch.theory.exact import fixed_feedback_plateau, oja_projector, saxe_mode_strength
from raftorch.theory.experiments import Figure2Config, format_table, run_figure2
from raftorch.theory.figure import draw_figure
from raftorch.theory.ode import integrate, oja_flow
from raftorch.theory.result import TheoryResult, load_results, save_results
from raftorch.theory.rules import RULES, Weights, init_weights
from raftorch.theory.simulate import simulate
from raftorch.theory.task import LinearTask

__all__ = [
    "LinearTask", "simulate", "integrate", "TheoryResult", "Weights", "RULES", "init_weights",
    "oja_flow", "saxe_mode_strength", "oja_projector", "fixed_feedback_plateau", "Figure2Config", "run_figure2",
    "format_table", "save_results", "load_results", "draw_figure",
]
