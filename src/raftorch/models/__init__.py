"""The paper's models, written once and rule-agnostic.

Every model here is a plain PyTorch module built from ``nn.Linear`` / ``nn.Conv2d``;
:func:`raftorch.convert` decides how it learns (BP, FA, RAF, ...). No model has a copy per rule.

``build_model(name, input_shape, num_classes, **options)`` builds one by name:

========  ==========================================================  =====================
name      model                                                       paper
========  ==========================================================  =====================
``mlp``   fully connected, ReLU, optional BatchNorm1d                 Fig. 3a-d (4 x 512)
``vgg``   four 3x3 conv blocks with BatchNorm, FC 256, dropout        Fig. 3e, 4a-b, Tab. C1
``vit``   vision transformer, pre-norm, class token, learned pos.     Fig. 3f
``retina`` Lindsey et al.'s retina-VVS net with a retina bottleneck   Fig. 4c-d, Tab. C2
========  ==========================================================  =====================
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from raftorch.models.mlp import MLP
from raftorch.models.retina import RetinaVVS
from raftorch.models.vgg import VGG
from raftorch.models.vit import ViT

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "vgg": VGG,
    "vit": ViT,
    "retina": RetinaVVS,
}


def model_options(name: str) -> dict[str, object]:
    """The keyword options of model ``name`` and their defaults."""
    cls = _lookup(name)
    params = list(inspect.signature(cls).parameters.values())[2:]  # skip input_shape, num_classes
    return {p.name: p.default for p in params}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **options) -> nn.Module:
    """Build model ``name`` for inputs of shape ``input_shape`` (without the batch dimension).

    ``options`` are the model's keyword arguments (see :func:`model_options`); an unknown
    option raises a ``ValueError`` that lists the accepted ones, and a bad value one that names
    the option and what to give (:func:`check_model`).
    """
    _known_options(name, options)
    return _lookup(name)(tuple(input_shape), num_classes, **options)


def check_model(name: str, input_shape: tuple[int, ...], num_classes: int, **options) -> None:
    """Raise the ``ValueError`` :func:`build_model` would for these arguments (an unknown
    model or option, a bad option value, images too small for the model), without building
    anything: each model's ``check`` static method, which its constructor also calls."""
    known = _known_options(name, options)
    _lookup(name).check(tuple(input_shape), num_classes, **{**known, **options})


def _known_options(name: str, options: dict) -> dict[str, object]:
    known = model_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"model {name!r} has no option(s) {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(f'{k}={v!r}' for k, v in known.items())}"
        )
    return known


@torch.no_grad()
def zero_output_layer_(model: nn.Module) -> str:
    """Set the weight and bias of ``model``'s output layer (its last ``nn.Linear`` / ``nn.Conv2d``
    in module order) to zero, in place; returns the layer's name.

    Why (``TrainConfig.output_init="zero"``): with a feedback rule the error a hidden
    layer receives is ``B e``, and it helps the loss only once the output weight ``W`` has come
    to align with ``B^T``. From a random ``W`` that alignment is slow (``W`` must move as far
    as its initial size), while every layer below follows ``B e`` at once. In a net with no
    normalisation layer nothing bounds the activity the layers below build up meanwhile: on
    the retina-VVS net (8 channels, Fashion-MNIST 16 x 16, RMSProp lr 1e-4) FA, KP, RAF and
    even RAF on the output layer alone with exact backprop below it push the training loss
    to 1e4-1e7 within the first epoch. From ``W = 0`` the output weight is built from its own
    updates ``-sum e h^T``, in which ``h`` moved along ``-B e``, so it is aligned with ``B^T``
    from the first steps (Lillicrap et al. 2016's mechanism without the random part to undo).
    Nets with BatchNorm / LayerNorm (the MLP, VGG and ViT here) do not need it.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not names:
        raise ValueError("the model has no Linear / Conv2d layer whose weights could start at zero")
    layer = model.get_submodule(names[-1])
    layer.weight.zero_()
    if layer.bias is not None:
        layer.bias.zero_()
    return names[-1]


def _lookup(name: str):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name]


__all__ = ["MLP", "VGG", "ViT", "RetinaVVS", "MODELS", "build_model", "check_model", "model_options",
           "zero_output_layer_"]
