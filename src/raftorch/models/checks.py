"""Checks of the models' options, where they enter: each bad option raises one ``ValueError``
that names the model, the option, the value given and what to give instead.

Every model class calls these at the top of its constructor (through its ``check`` static
method), and :func:`raftorch.models.check_model` runs the same ``check`` without building
anything, so a training run refuses a bad option before it loads data or writes a file.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence


def _bad(model: str, name: str, what: str, value: Any, example: str) -> None:
    raise ValueError(f"{model}: model option {name} must be {what}, got {value!r}; "
                     f"e.g. --model-option {name}={example}")


def is_whole(value: Any) -> bool:
    """True for an integer that is not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for a finite real number that is not a ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def whole(model: str, name: str, value: Any, example: Any, *, minimum: int = 1) -> int:
    """A whole number ``>= minimum`` (a size: ``minimum=1``; a count of layers: ``minimum=0``)."""
    if not is_whole(value) or value < minimum:
        what = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
        _bad(model, name, what, value, str(example))
    return int(value)


def widths(model: str, name: str, value: Any, example: str, *, allow_empty: bool) -> tuple[int, ...]:
    """A list of positive whole numbers (one number is a list of one)."""
    if is_whole(value):
        value = [value]
    if (not isinstance(value, (list, tuple)) or not all(is_whole(v) and v >= 1 for v in value)
            or (not value and not allow_empty)):
        what = "a list of positive whole numbers" + ("" if allow_empty else " (at least one)")
        _bad(model, name, what, value, example)
    return tuple(int(v) for v in value)


def positive(model: str, name: str, value: Any, example: str) -> float:
    """A finite number ``> 0``."""
    if not is_number(value) or value <= 0:
        _bad(model, name, "a finite number > 0", value, example)
    return float(value)


def probability(model: str, name: str, value: Any) -> float:
    """A dropout probability in ``[0, 1)``."""
    if not is_number(value) or not 0 <= value < 1:
        _bad(model, name, "a probability in [0, 1)", value, "0.1")
    return float(value)


def flag(model: str, name: str, value: Any) -> bool:
    """A ``true`` / ``false`` option (a ``bool``; a number or text is refused)."""
    if not isinstance(value, bool):
        _bad(model, name, "true or false", value, "true")
    return value


def input_shape(model: str, shape: Sequence[int]) -> tuple[int, ...]:
    """Any input shape of positive sizes (flattened by the model)."""
    shape = tuple(shape)
    if not shape or not all(is_whole(s) and s >= 1 for s in shape):
        raise ValueError(f"{model} needs inputs of a positive size, got input shape {shape}")
    return shape


def image_shape(model: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` of image inputs."""
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(is_whole(s) and s >= 1 for s in shape):
        raise ValueError(f"{model} needs image inputs (C, H, W), got input shape {shape}")
    return shape


def classes(model: str, num_classes: Any) -> int:
    """``num_classes``: a positive whole number."""
    if not is_whole(num_classes) or num_classes < 1:
        raise ValueError(f"{model}: num_classes must be a positive whole number, got {num_classes!r}")
    return int(num_classes)
