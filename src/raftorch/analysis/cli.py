"""``raftorch analyze RUN_DIR``: receptive fields of a finished run and their scores (paper Fig. 4d).

It reads the run folder written by ``raftorch train`` (``config.yaml``, ``checkpoint.pt``,
``final.json``), rebuilds the **plain** model of the config (``raftorch.models``, no rule
conversion) and loads only its forward weights from the checkpoint (the feedback parameters
``B``, ``Q``, ``P`` and ``direct_feedback.*`` are ignored: the fields are those of the
forward map, whatever rule trained it). Then, for one convolution (``--layer``):

* ``receptive_fields.npz``: ``fields`` ``(channels, H, W)`` float32, ``channels`` (their
  indices), ``orientedness``, ``centre_surround_index``, ``layer``, ``method``,
  ``input_shape``, ``label`` (the run folder's name), and ``init_fields``,
  ``init_orientedness``, ``init_centre_surround_index``: the same at initialisation;
* ``scores.json``: per channel ``orientedness`` and ``centre_surround_index``; their mean
  and std (sample std) over the **live** channels, those whose field is not exactly zero
  (``live_channels`` lists them): with ``method="gradient"`` a channel whose path to the input
  is closed by ReLUs at the blank image (every unit it reads has a bias <= 0) has a zero
  field, a fact about the gates at that image rather than a field, so it is left out of the
  means instead of counting as "neither oriented nor centre-surround" (0); with no live
  channel the means and stds are ``null``; ``field_dimensionality``: the participation ratio
  of the live fields (:func:`raftorch.analysis.scores.field_dimensionality`: 1 = every channel
  the same field, ``n`` = all different; ``null`` with no live field). Also the layer, method and the run's settings, and
  ``init``: the same scores for the same layer of the run's **initial** net (its seed's
  initialisation, :func:`initial_run_model`), the baseline to read a trained score against:
  the fields of an untrained net are not score-free (white noise scores about 0.2
  orientedness, random compositions of 9 x 9 kernels more), so a learned field is "more
  oriented" only where it scores above its own initialisation;
* ``receptive_fields.png`` (unless ``--no-figure``, which removes an older one):
  :func:`raftorch.analysis.figure.draw_fields`.

Each call replaces the files of the previous one (one layer per run folder at a time).

All three are written atomically. Default layer: ``retina.conv2`` for the ``retina`` model
(the retina's output layer, whose fields Lindsey et al. and the paper's Fig. 4d show), else
the model's first ``Conv2d``. Input shape: the dataset's image shape after the run's
``grayscale`` and ``image_size`` settings.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from raftorch.training import checkpoint as ckpt

NPZ = "receptive_fields.npz"
SCORES = "scores.json"
PNG = "receptive_fields.png"

__all__ = ["analyze_run", "load_run_model", "initial_run_model", "input_shape_of", "default_layer", "add_arguments", "run"]


def input_shape_of(cfg) -> tuple[tuple[int, int, int], int]:
    """``((C, H, W), num_classes)`` of the images a run with config ``cfg`` was trained on."""
    from raftorch.training.data import dataset_shape

    return dataset_shape(cfg.data, grayscale=cfg.grayscale, image_size=cfg.image_size)


def load_run_model(run_dir: str | Path) -> tuple[nn.Module, Any, tuple[int, int, int]]:
    """``(model, cfg, input_shape)`` of the finished run in ``run_dir``: the plain model of its
    config with the checkpoint's forward weights, in eval mode, on the CPU.

    Raises a ``ValueError`` with one clear sentence for a missing folder, an unfinished run,
    no or a corrupt checkpoint, or weights that do not fit the config's model.
    """
    from raftorch.training.config import TrainConfig, load_config_file
    from raftorch.models import build_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist")
    path = run_dir / ckpt.CHECKPOINT
    if not path.exists():
        raise ValueError(f"run folder {run_dir} holds no {ckpt.CHECKPOINT}: no training run was written "
                         f"there (train one with raftorch train --out {run_dir})")
    if not (run_dir / ckpt.FINAL).exists():
        raise ValueError(f"run folder {run_dir} holds no finished run (no {ckpt.FINAL}); finish it with "
                         f"raftorch train --resume --out {run_dir}")
    state = ckpt.load_checkpoint(path)
    config_path = run_dir / ckpt.CONFIG
    values = (load_config_file(config_path, "run config") if config_path.exists()
              else dict(state.get("config") or {}))
    cfg = TrainConfig.from_dict(values, source=str(config_path))
    shape, classes = input_shape_of(cfg)
    model = build_model(cfg.model, shape, classes, **cfg.model_options)
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise ValueError(f"checkpoint {path} holds no model weights; it is not a raftorch run checkpoint")
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in weights]
    wrong = [k for k in wanted if k in weights and tuple(weights[k].shape) != tuple(wanted[k].shape)]
    if missing or wrong:
        what = (f"lacks {', '.join(missing[:4])}" if missing else
                f"has other shapes for {', '.join(f'{k} {tuple(weights[k].shape)} vs {tuple(wanted[k].shape)}' for k in wrong[:3])}")
        raise ValueError(f"checkpoint {path} does not fit the {cfg.model!r} model of {config_path.name} "
                         f"(it {what}); the run folder is inconsistent")
    model.load_state_dict({k: weights[k] for k in wanted})
    return model.eval(), cfg, shape


def default_layer(model: nn.Module, model_name: str | None = None) -> str:
    """``retina.conv2`` for the retina model, else the first ``Conv2d`` of ``model``."""
    from raftorch.analysis.fields import conv_layers

    convs = conv_layers(model)
    if model_name == "retina" and "retina.conv2" in convs:
        return "retina.conv2"
    if not convs:
        raise ValueError("the model has no Conv2d layer, so it has no receptive fields to analyse")
    return convs[0]


def _stats(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def initial_run_model(cfg) -> nn.Module:
    """The plain model of the run config ``cfg`` at its initialisation (the weights its training
    started from: :func:`raftorch.training.loop.initial_model`), in eval mode. The global RNG is left as
    it was."""
    from raftorch.training.loop import initial_model

    shape, classes = input_shape_of(cfg)
    with torch.random.fork_rng(devices=[]):
        return initial_model(cfg, shape, classes).eval()


def _scores(fields, chans: Sequence[int]) -> dict[str, Any]:
    """Per-channel orientedness and centre-surround index of ``fields``, their mean and sample
    std over the live channels (nonzero field), and the fields' dimensionality."""
    from raftorch.analysis.scores import centre_surround_index, field_dimensionality, orientedness

    o = orientedness(fields).tolist()
    c = centre_surround_index(fields).tolist()
    live = [i for i in range(len(chans)) if bool(fields[i].abs().max() > 0)]
    om, osd = _stats([o[i] for i in live])
    cm, csd = _stats([c[i] for i in live])
    return {"live_channels": [chans[i] for i in live], "orientedness": o, "centre_surround_index": c,
            "orientedness_mean": om, "orientedness_std": osd,
            "centre_surround_index_mean": cm, "centre_surround_index_std": csd,
            "field_dimensionality": field_dimensionality(fields) if live else None}


def analyze_run(run_dir: str | Path, layer: str | None = None, method: str = "gradient", *,
                steps: int = 20, lr: float = 0.1, channels: Sequence[int] | None = None,
                figure: bool = True) -> dict[str, Any]:
    """Receptive fields of ``layer`` in the finished run ``run_dir``, their scores, and the
    files ``receptive_fields.npz``, ``scores.json``, ``receptive_fields.png`` in that folder.

    Args:
        run_dir: a run folder written by ``raftorch train`` (finished: ``final.json``).
        layer: a Conv2d module name; default :func:`default_layer`.
        method, steps, lr: see :func:`raftorch.analysis.receptive_fields`.
        channels: output channels to analyse (default: all).
        figure: also draw ``receptive_fields.png`` (without it, an older
            ``receptive_fields.png`` is removed: it shows the fields just replaced).

    Returns:
        the contents of ``scores.json`` (with ``files``: the paths written).

    Raises:
        ValueError: one clear sentence (bad folder, unknown or non-conv layer naming the
        valid ones, bad method).
    """
    from raftorch.analysis.fields import receptive_fields, resolve_layer

    run_dir = Path(run_dir)
    with torch.random.fork_rng(devices=[]):  # building the models draws from the global RNG
        model, cfg, shape = load_run_model(run_dir)
        name = default_layer(model, cfg.model) if layer is None else resolve_layer(model, layer)
        chans = (list(range(model.get_submodule(name).out_channels)) if channels is None
                 else [int(c) for c in channels])
        kw = dict(method=method, steps=steps, lr=lr, channels=channels)
        fields = receptive_fields(model, name, shape, **kw)
        init_fields = receptive_fields(initial_run_model(cfg), name, shape, **kw)
    trained, init = _scores(fields, chans), _scores(init_fields, chans)
    result: dict[str, Any] = {
        "run": str(run_dir), "layer": name, "method": method,
        **({"steps": int(steps), "lr": float(lr)} if method == "ascent" else {}),
        "input_shape": list(shape), "channels": chans, **trained, "init": init,
        "model": cfg.model, "rule": cfg.rule, "rank": cfg.rank, "ranks": dict(cfg.ranks),
        "model_options": dict(cfg.model_options), "seed": cfg.seed, "data": cfg.data,
    }
    arrays = {"fields": fields.numpy().astype(np.float32), "channels": np.asarray(chans, dtype=np.int64),
              "orientedness": np.asarray(trained["orientedness"]),
              "centre_surround_index": np.asarray(trained["centre_surround_index"]),
              "init_fields": init_fields.numpy().astype(np.float32),
              "init_orientedness": np.asarray(init["orientedness"]),
              "init_centre_surround_index": np.asarray(init["centre_surround_index"]),
              "layer": np.asarray(name), "method": np.asarray(method),
              "input_shape": np.asarray(shape, dtype=np.int64), "label": np.asarray(run_dir.resolve().name)}
    ckpt.atomic_write(run_dir / NPZ, lambda f: np.savez(f, **arrays), "wb")
    files = [str(run_dir / NPZ), str(run_dir / SCORES)]
    if figure:
        from raftorch.analysis.figure import draw_fields

        draw_fields(run_dir / NPZ, run_dir / PNG)
        files.append(str(run_dir / PNG))
    elif (run_dir / PNG).exists():  # drawn from the fields just replaced: it would mislead
        (run_dir / PNG).unlink()
    ckpt.write_json(run_dir / SCORES, result)
    return {**result, "files": files}


# --------------------------------------------------------------------------- command line

def _channels(text: str) -> list[int] | None:
    """``all``, ``N`` (the first N channels) or a comma list of indices ``0,3,5``."""
    if text.strip().lower() == "all":
        return None
    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return list(range(n))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--channels takes 'all', a count N (the first N) or indices like 0,3,5; got {text!r}") from None


def _positive(kind):
    """An argparse type: a finite number of ``kind`` (int or float) ``> 0``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value <= 0:
            what = "a whole number" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {what} > 0, got {text!r}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``raftorch analyze``: ``RUN_DIR``, ``--layer``, ``--method``, ``--steps``, ``--lr``,
    ``--channels`` and ``--no-figure``."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder of raftorch train")
    parser.add_argument("--layer", default=None,
                        help="Conv2d module name (default: retina.conv2 for the retina model, else the first Conv2d)")
    parser.add_argument("--method", choices=("gradient", "ascent"), default="gradient",
                        help="gradient of the centre unit at a blank image, or norm-bounded gradient ascent "
                             "from it (default: gradient)")
    parser.add_argument("--steps", type=_positive(int), default=20, help="gradient-ascent steps (default: 20)")
    parser.add_argument("--lr", type=_positive(float), default=0.1,
                        help="gradient-ascent step as a fraction of the image norm bound (default: 0.1)")
    parser.add_argument("--channels", type=_channels, default=None, metavar="all|N|i,j,...",
                        help="channels to analyse: all (default), the first N, or a comma list")
    parser.add_argument("--no-figure", action="store_true", help="do not draw receptive_fields.png")


def _summary(scores: dict[str, Any]) -> str:
    live = len(scores["live_channels"])
    if not live:
        return "every field is zero (no unit of the path is active at the blank image): no scores"
    return (f"orientedness {scores['orientedness_mean']:.3f} ± {scores['orientedness_std']:.3f}, "
            f"centre-surround index {scores['centre_surround_index_mean']:.3f} ± "
            f"{scores['centre_surround_index_std']:.3f} over the {live} with a nonzero field, "
            f"dimensionality {scores['field_dimensionality']:.2f}")


def run(args: argparse.Namespace) -> int:
    """Run ``raftorch analyze``: :func:`analyze_run` on ``RUN_DIR``, then one line with the scores and the
    files written. Exit status 0 done, 1 a corrupt checkpoint, 2 any other ``ValueError`` (a bad flag or
    run folder)."""
    try:
        result = analyze_run(args.run_dir, args.layer, args.method, steps=args.steps, lr=args.lr,
                             channels=args.channels, figure=not args.no_figure)
    except ckpt.CorruptCheckpointError as exc:  # the run's file is damaged: a failure, not a bad argument
        print(f"raftorch analyze: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"raftorch analyze: error: {exc}", file=sys.stderr)
        return 2
    scores = _summary(result)
    init = _summary(result["init"])
    print(f"{result['layer']} ({result['method']}), {len(result['channels'])} channels: {scores} "
          f"(at initialisation: {init}); "
          f"wrote {', '.join(Path(f).name for f in result['files'])} in {args.run_dir}")
    return 0
