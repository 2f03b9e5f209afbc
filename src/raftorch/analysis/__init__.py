"""Analyses of trained networks.

Receptive fields of convolutional units and their scores (paper Fig. 4d):
:func:`receptive_fields` (:mod:`raftorch.analysis.fields`), :func:`orientedness` and
:func:`centre_surround_index` per field, :func:`field_dimensionality` per layer
(:mod:`raftorch.analysis.scores`), the figures
(:mod:`raftorch.analysis.figure`) and :func:`analyze_run`, the ``raftorch analyze`` command
on a finished run folder (:mod:`raftorch.analysis.cli`).

Error signals during training (``raftorch train --track subspace``): :func:`subspace_overlap`,
:func:`participation_ratio` and :func:`track_subspace` (:mod:`raftorch.subspace`);
training curves of run folders, the ``raftorch plot`` command: :func:`plot_curves`
(:mod:`raftorch.analysis.curves`).
"""
from raftorch.analysis.cli import analyze_run, load_run_model
from raftorch.analysis.fields import conv_layers, plain_copy, receptive_fields
from raftorch.analysis.scores import centre_surround_index, field_dimensionality, orientedness, radial_fraction
from raftorch.subspace import participation_ratio, subspace_overlap, track_subspace
from raftorch.analysis.curves import plot_curves

__all__ = ["receptive_fields", "plain_copy", "conv_layers", "orientedness", "centre_surround_index",
           "radial_fraction", "field_dimensionality", "analyze_run", "load_run_model",
           "subspace_overlap", "participation_ratio", "track_subspace", "plot_curves"]
