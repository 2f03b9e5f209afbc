r"""Receptive fields of convolutional units (paper Fig. 4d; Lindsey et al. 2019; Erhan et al. 2009).

The receptive field of output channel ``k`` of a convolution ``layer`` is taken at the
channel's **centre unit**: the unit at the spatial centre ``(H_out // 2, W_out // 2)`` of the
layer's output map (for an even size, the lower / right of the two middle positions). Its
activity ``a_k(x)`` is the layer module's own output (the pre-activation, read with a
forward hook), as a function of the input image ``x`` of shape ``(C, H, W)``.

* ``method="gradient"`` (Lindsey et al.): ``field_k = d a_k / d x`` at the blank image
  ``x = 0``. For a linear network this *is* the unit's linear filter; with ReLUs it is the
  filter of the units active at the blank image (their bias > 0).
* ``method="ascent"`` (Erhan et al. 2009, activation maximisation under a norm bound):
  starting from ``x_0 = 0``, ``steps`` normalised gradient steps, each followed by a
  projection onto the ball ``||x||_2 <= norm``::

      g_t     = d a_k / d x  at x_t
      x_{t+1} = Pi(x_t + lr * norm * g_t / ||g_t||_2),   Pi(x) = x * min(1, norm / ||x||_2)

  so every step moves the image by at most ``lr * norm`` and the result never has a norm
  above ``norm``. For a linear unit ``a = <w, x> + b`` the result is ``norm * w / ||w||``
  (the direction of the gradient field) after ``ceil(1 / lr)`` steps.

Orientation: no flip. For a single ``nn.Conv2d`` (a cross-correlation) with padding ``p``
the gradient field of channel ``k`` is the kernel ``W[k]`` itself, placed so that kernel
entry ``(p_h, p_w)`` sits on the centre pixel: ``field[k, c, i_c - p_h + u, j_c - p_w + v] =
W[k, c, u, v]`` (stride 1, ``i_c, j_c`` the centre; tested).

Input channels: with ``C == 1`` the fields are ``(channels, H, W)``. With ``C > 1`` they are
summed over the input channels, ``field_k(y, x) = sum_c field_k(c, y, x)``, which is the
field seen by an achromatic pattern (the same image on every channel: ``a_k(x + eps s 1_C)
~ a_k(x) + eps <sum_c field_kc, s>``); ``keep_channels=True`` returns ``(channels, C, H, W)``.

The true forward map is differentiated, never a learned feedback path: the fields are
computed on :func:`plain_copy` of the model, in which raftorch layers are plain PyTorch
layers (their backward is exact autograd) and no direct-feedback hooks are attached. The
model passed in is not changed (mode, ``requires_grad``, ``.grad``, hooks, buffers).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from raftorch.convert import plain_copy

METHODS = ("gradient", "ascent")

__all__ = ["receptive_fields", "plain_copy", "conv_layers", "resolve_layer", "METHODS"]


def conv_layers(model: nn.Module) -> list[str]:
    """Names of the ``nn.Conv2d`` modules of ``model`` (raftorch's included), in order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> str:
    """The module name of ``layer`` (a name or a module of ``model``); a ``ValueError`` naming
    the convolutions of ``model`` when it is not one of them."""
    convs = conv_layers(model)
    valid = ", ".join(convs) if convs else "(none: the model has no Conv2d layer)"
    if isinstance(layer, nn.Module):
        name = next((n for n, m in model.named_modules() if m is layer), None)
        if name is None:
            raise ValueError(f"the given {type(layer).__name__} module is not part of the model; "
                             f"its conv layers are: {valid}")
    else:
        name = str(layer)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r}; its conv layers are: {valid}") from None
        if not isinstance(module, nn.Conv2d):
            raise ValueError(f"layer {name!r} is a {type(module).__name__}, not a Conv2d; "
                             f"its conv layers are: {valid}")
    if name not in convs:
        raise ValueError(f"layer {name!r} is not a Conv2d; the model's conv layers are: {valid}")
    return name


class _Stop(Exception):
    """Raised by the hook once the layer has run: the rest of the network is not needed."""


def _centre_units(net: nn.Module, module: nn.Module, x: Tensor, select: Tensor) -> Tensor:
    """``out[n, select[n], centre]`` for every sample ``n`` of ``x``: sample ``n`` is the image of
    channel ``select[n]``."""
    seen: list[Tensor] = []

    def hook(mod, args, output):
        seen.append(output)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        net(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError("the layer did not run in the model's forward pass")
    out = seen[0]
    h, w = out.shape[-2:]
    idx = torch.arange(len(x), device=out.device)
    return out[idx, select.to(out.device), h // 2, w // 2]


def receptive_fields(model: nn.Module, layer: str | nn.Module, input_shape: Sequence[int], *,
                     method: str = "gradient", steps: int = 20, lr: float = 0.1, norm: float = 1.0,
                     channels: Sequence[int] | None = None, keep_channels: bool = False) -> Tensor:
    r"""Receptive field of the centre unit of every output channel of ``layer``.

    Args:
        model: any module containing ``layer`` (raftorch-converted ones included; the fields
            are those of the true forward map, see the module docstring).
        layer: a module name (``"retina.conv2"``) or the module itself; must be a ``Conv2d``.
        input_shape: ``(C, H, W)`` of the model's input images.
        method: ``"gradient"`` (``d a_k / d x`` at the blank image) or ``"ascent"``
            (``steps`` projected, normalised gradient-ascent steps from the blank image).
        steps, lr, norm: ascent only: number of steps, step length as a fraction of the
            bound, and the bound ``||x||_2 <= norm`` on the image.
        channels: output channels to compute (default: all), in this order.
        keep_channels: return ``(channels, C, H, W)`` instead of summing over ``C``.

    Returns:
        a float tensor ``(channels, H, W)`` on the CPU (``(channels, C, H, W)`` with
        ``keep_channels``). Field ``i`` belongs to output channel ``channels[i]``.

    The model runs in eval mode on its own device and dtype, on a :func:`plain_copy`; the
    model itself is left exactly as it was.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "ascent" and (int(steps) < 1 or not lr > 0 or not norm > 0):
        raise ValueError(f"ascent needs steps >= 1, lr > 0 and norm > 0 (got {steps}, {lr}, {norm})")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    name = resolve_layer(model, layer)
    net = plain_copy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    module = net.get_submodule(name)
    n_out = module.out_channels
    chosen = list(range(n_out)) if channels is None else [int(c) for c in channels]
    bad = [c for c in chosen if not 0 <= c < n_out]
    if bad or not chosen:
        raise ValueError(f"channels must be in 0..{n_out - 1} (layer {name!r} has {n_out}), got {chosen}")
    ref = next(iter(net.parameters()), None)
    factory = {"device": ref.device if ref is not None else "cpu",
               "dtype": ref.dtype if ref is not None and ref.is_floating_point() else torch.float32}
    # sample n of the batch is the image for channel chosen[n]; eval mode makes the samples
    # independent, so one backward gives every channel's gradient
    select = torch.tensor(chosen, device=factory["device"])

    def grad(x: Tensor) -> Tensor:
        a = _centre_units(net, module, x, select)
        if not a.requires_grad:  # the layer's output does not depend on the image
            return torch.zeros_like(x)
        return torch.autograd.grad(a.sum(), x)[0]

    with torch.enable_grad():
        x = torch.zeros(len(chosen), *shape, **factory)
        if method == "gradient":
            field = grad(x.requires_grad_(True))
        else:
            for _ in range(int(steps)):
                x = x.detach().requires_grad_(True)
                g = grad(x)
                gn = g.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
                x = x.detach() + lr * norm * g / gn
                xn = x.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                x = x * torch.clamp(norm / xn.clamp_min(1e-30), max=1.0)
            field = x.detach()
    field = field.detach().float().cpu()
    return field if keep_channels else field.sum(1)

