"""The training tool: settings (:mod:`~raftorch.training.config`), datasets
(:mod:`~raftorch.training.data`), the loop (:mod:`~raftorch.training.loop`), run folders
(:mod:`~raftorch.training.checkpoint`, :mod:`~raftorch.training.runlock`), the ``raftorch
train`` and ``raftorch compare`` commands. It builds on the rules (``import raftorch``) and
never imports the science (:mod:`raftorch.experiments`, :mod:`raftorch.analysis`,
:mod:`raftorch.theory`)."""
from raftorch.training.config import TrainConfig
from raftorch.training.loop import TrainingDiverged, train

__all__ = ["TrainConfig", "TrainingDiverged", "train"]
