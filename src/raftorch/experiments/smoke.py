"""``raftorch reproduce PANEL|all --smoke``: one short run of every panel on this machine, the
first command on a new cluster, before any sweep (designed to take under 5 minutes on one GPU)::

    raftorch reproduce all --profile paper --smoke                    # on a GPU node
    raftorch reproduce fig3e --profile paper --smoke --smoke-steps 50
    raftorch reproduce all --profile paper --smoke --device cpu --smoke-scale tiny --smoke-steps 2   # CI

It does three things and prints them:

1. **Device checks**: :func:`raftorch.training.devicecheck.run_checks` on the device (the layers' forward
   and backward against their definitions computed in float64 on the CPU; tiny layers with
   ``--smoke-scale tiny``), one ``PASS`` / ``FAIL`` line each.
2. **One point per panel**: the panel's *first* point in spec order (its first series, RAF in
   every paper panel, at its first grid value, seed 0: the series most of a panel's points
   belong to) is set up exactly as the sweep would (:func:`raftorch.training.loop.setup`: the panel's
   model, rule, optimizer, batch size, augmentation) on the device and trained for
   :data:`WARMUP` + ``--smoke-steps N`` optimizer steps (:func:`raftorch.training.loop.train_epoch`).
   Its data is the panel's dataset where it is found (``--data-dir``, ``$RAFTORCH_DATA``, the
   cache); where it is missing, random data of the same shape, number of classes and number
   of training images (:func:`raftorch.training.data.synthetic_like`; at tiny scale only the images the
   steps use) stands in, and one line per panel says which. On a CPU the point runs with
   ``--threads`` threads, else the idle cores, as a sweep's point would.
   A theory panel (``fig2``: numpy on the CPU) runs its first point whole, about 3 s.
   Nothing is evaluated and **nothing is written**: no run folder, no checkpoint, nothing
   under ``--results``; the terminal output is the whole record.
3. **A table**: per panel the device, the data (real / synthetic), the seconds per optimizer
   step (the median of the ``N`` timed steps after the warm-up; each step is timed from the
   end of the previous optimizer step to the end of its own, the device synchronised), the
   peak device memory of the point (CUDA; its data on the device included), the panel's
   points x optimizer steps per point (from the spec: ``epochs x ceil(ceil(train images /
   batch) / accumulate)``, the train images from each point's data settings,
   :func:`raftorch.training.data.train_images`), the projected
   device-hours of the whole panel on this device (seconds per step x the steps of every
   point), and the spec's own estimate (``cost.seconds_per_point``, as ``--list`` and
   ``--dry-run`` show it); then the total. The projection counts training steps only (the
   evaluation after each epoch adds a few percent) and assumes every point of a panel steps
   as fast as the one timed: BP and the no-feedback control are usually faster than RAF, other
   ranks differ a little. For ``fig2`` a step is one SGD step of its simulation (``t_end /
   lr`` per point), and the seconds per step are the whole point's over those.

``--smoke-scale tiny`` (for CI on a CPU): the models shrunk (MLP hidden layers at most
:data:`TINY_WIDTH` units, VGG widths / 8, ViT dim 12 per head and 2 blocks, retina-VVS 8
channels and FC 64), batches of at most :data:`TINY_BATCH`, images at most :data:`TINY_IMAGE`
px square (whole ViT patches); the output says so, and its step times check that the paths
run, not what the paper costs.

Exit status: 0 when every check passes and every point ran; 1 otherwise, with one ``FAIL``
line per failed check or point and a last line that counts them.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from raftorch.training.config import TrainConfig
from raftorch.training.data import DatasetNotFoundError, data_root, dataset_shape, load_dataset, synthetic_like, train_images
from raftorch.experiments.spec import Panel, Point
from raftorch.experiments.suite import estimate

WARMUP = 3  # untimed optimizer steps first: the first CUDA kernels, cuDNN's choices, the C++ extension's load
DEFAULT_STEPS = 20  # timed optimizer steps per point (--smoke-steps)
SCALES = ("full", "tiny")  # --smoke-scale: the spec's sizes, or shrunk for a CPU
TINY_WIDTH = 64
TINY_BATCH = 8
TINY_IMAGE = 16


@dataclass
class SmokeRow:
    """What the smoke run measured for one panel."""

    panel: Panel
    point: Point
    device: str = ""
    data: str = ""  # real | synthetic | theory
    step_seconds: list[float] = field(default_factory=list)  # the timed steps
    steps_per_point: list[int] = field(default_factory=list)  # every point of the panel, spec order
    peak_bytes: int | None = None  # peak device memory of the point (CUDA)
    error: str | None = None

    @property
    def seconds_per_step(self) -> float | None:
        return statistics.median(self.step_seconds) if self.step_seconds else None

    @property
    def projected_seconds(self) -> float | None:
        """Seconds of the whole panel on this device: seconds per step x every point's steps."""
        s = self.seconds_per_step
        return None if s is None or self.error else s * sum(self.steps_per_point)

    @property
    def spec_seconds(self) -> float | None:
        return estimate(self.panel, self.panel.points())


def smoke_point(panel: Panel) -> Point:
    """The point the smoke run trains: the panel's first (first series, first grid value, seed 0)."""
    return panel.points()[0]


def steps_per_point(config: dict) -> int:
    """Optimizer steps of one training point: ``epochs x ceil(ceil(n / batch) / accumulate)``,
    ``n`` the training images its data settings keep (:func:`raftorch.training.data.train_images`)."""
    cfg = TrainConfig.from_dict(dict(config))
    n = train_images(cfg.data, val_fraction=cfg.val_fraction, train_size=cfg.train_size)
    return cfg.epochs * math.ceil(math.ceil(n / cfg.batch_size) / cfg.accumulate)


def tiny_config(config: dict) -> dict:
    """``config`` shrunk for a CPU (module docstring: ``--smoke-scale tiny``)."""
    from raftorch.models import model_options

    c = copy.deepcopy(config)
    model = c.get("model", TrainConfig.model)
    opts = {**model_options(model), **(c.get("model_options") or {})}
    if model == "mlp":
        opts["hidden"] = [min(int(h), TINY_WIDTH) for h in opts["hidden"]]
    elif model == "vgg":
        opts["widths"] = [max(1, int(w) // 8) for w in opts["widths"]]
        opts["fc"] = max(1, int(opts["fc"]) // 8)
    elif model == "vit":
        opts["dim"], opts["depth"] = 12 * int(opts["heads"]), min(int(opts["depth"]), 2)
    elif model == "retina":
        opts["channels"] = min(int(opts["channels"]), 8)
        opts["bottleneck"] = min(int(opts["bottleneck"]), opts["channels"])
        opts["fc"] = min(int(opts["fc"]), TINY_WIDTH)
    c["model_options"] = opts
    c["batch_size"] = min(int(c.get("batch_size", TrainConfig.batch_size)), TINY_BATCH)
    (_, height, _), _ = dataset_shape(c.get("data", TrainConfig.data), grayscale=bool(c.get("grayscale")),
                                      image_size=c.get("image_size"))
    size = TINY_IMAGE
    if model == "vit":  # whole patches: 16 px for patch 4, 14 for patch 7
        size = max(int(opts["patch"]), size // int(opts["patch"]) * int(opts["patch"]))
    if height > size:
        c["image_size"] = size
    return c


# --------------------------------------------------------------------------- one panel

def _data(cfg: TrainConfig, n_train: int, cache: dict):
    """(splits, "real" | "synthetic", one line saying which) for ``cfg``'s dataset; ``n_train``:
    the synthetic stand-in's training images (its test set: a fifth of that, as CIFAR's)."""
    key = (cfg.data, cfg.class_sample, cfg.data_dir, cfg.grayscale, cfg.val_fraction, cfg.seed, cfg.train_size,
           cfg.image_size, n_train)
    if key in cache:
        return cache[key]
    where = data_root(cfg.data_dir)
    try:
        data = load_dataset(cfg.data, data_dir=cfg.data_dir, grayscale=cfg.grayscale, val_fraction=cfg.val_fraction,
                            seed=cfg.seed, train_size=cfg.train_size, image_size=cfg.image_size,
                            class_sample=cfg.class_sample)
        cache[key] = data, "real", f"{cfg.data} found under {where}: real data"
    except DatasetNotFoundError:
        shape, classes = dataset_shape(cfg.data, grayscale=cfg.grayscale, image_size=cfg.image_size)
        data = synthetic_like(cfg.data, n_train=n_train, n_test=max(1, n_train // 5), grayscale=cfg.grayscale,
                              image_size=cfg.image_size, seed=cfg.seed)
        cache[key] = data, "synthetic", (f"{cfg.data} not found under {where}: SYNTHETIC data of its shape "
                                         f"({'x'.join(map(str, shape))}, {classes} classes) stands in (--smoke only)")
    return cache[key]


def time_steps(cfg: TrainConfig, data, steps: int, warmup: int = WARMUP) -> tuple[list[float], int | None]:
    """Set up ``cfg`` on ``data`` and train ``warmup + steps`` optimizer steps; returns the
    seconds of the last ``steps`` (each from the end of the previous optimizer step to the end
    of its own, the device synchronised) and the peak device memory in bytes (CUDA, else None)."""
    from raftorch.training.loop import setup, train_epoch

    run = setup(cfg, data=data)
    cuda = run.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    stamps: list[float] = []

    def stamp(*_):
        if cuda:
            torch.cuda.synchronize(run.device)
        stamps.append(time.perf_counter())

    hook = run.optimizer.register_step_post_hook(stamp)
    try:
        total = warmup + steps
        while len(stamps) < total:  # more than one epoch where the training set is small
            train_epoch(run, progress=False, max_steps=(total - len(stamps)) * cfg.accumulate)
            run.epoch += 1
    finally:
        hook.remove()
    peak = torch.cuda.max_memory_allocated(run.device) if cuda else None
    return [b - a for a, b in zip(stamps[warmup - 1:total - 1], stamps[warmup:total])], peak


def smoke_training(panel: Panel, *, device: str, steps: int, scale: str, data_dir: str | None,
                   threads: int | None, cache: dict, echo=print) -> SmokeRow:
    """Train the panel's first point (:func:`smoke_point`) on ``device`` for the warm-up and ``steps`` timed
    optimizer steps, on its data or synthetic data of its shape; its :class:`SmokeRow` (``error`` if it failed)."""
    point = smoke_point(panel)
    row = SmokeRow(panel, point, steps_per_point=[steps_per_point(p.config) for p in panel.points()])
    row.device = device
    try:
        config = dict(point.config, device=device, out=None, download=False, threads=threads)
        if data_dir is not None:
            config["data_dir"] = str(data_dir)
        if scale == "tiny":
            config = tiny_config(config)
        cfg = TrainConfig.from_dict(config, source=f"{panel.id} {point.id}")
        # synthetic data: as many images as the real training set (the same memory on the device and
        # the same indexing), or at tiny scale only the images the steps use
        n_train = ((WARMUP + steps) * cfg.batch_size * cfg.accumulate if scale == "tiny" else
                   train_images(cfg.data, val_fraction=cfg.val_fraction, train_size=cfg.train_size))
        data, row.data, line = _data(cfg, n_train, cache)
        echo(f"{panel.id}: {line}")
        row.step_seconds, row.peak_bytes = time_steps(cfg, data, steps)
    except Exception as exc:  # noqa: BLE001 - a corrupt dataset, a crash, NaN, out of memory: a FAIL line
        row.error = _one_line(exc)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def smoke_theory(panel: Panel, echo=print) -> SmokeRow:
    """A theory panel's first point, run whole (numpy, on the CPU)."""
    from raftorch.experiments.runner import figure2_config
    from raftorch.theory.experiments import run_figure2

    point = smoke_point(panel)
    row = SmokeRow(panel, point, device="cpu", data="theory")
    try:
        cfg = figure2_config(panel.theory, point.config)
        steps = max(1, int(round(cfg.t_end / cfg.lr)))
        row.steps_per_point = [steps] * len(panel.points())
        echo(f"{panel.id}: the linear-network theory (numpy on the CPU), its first point run whole "
             f"({steps} SGD steps per run, and the ODEs)")
        start = time.perf_counter()
        _, results = run_figure2(cfg)
        seconds = time.perf_counter() - start
        bad = [f"{r.method} {r.rule}" for r in results if not math.isfinite(r.relative_error)]
        if bad:
            raise FloatingPointError(f"relative error not finite in {', '.join(bad)}")
        row.step_seconds = [seconds / steps]
    except Exception as exc:  # noqa: BLE001 - a failed point is a FAIL line, not a traceback
        row.error = _one_line(exc)
    return row


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# --------------------------------------------------------------------------- the command

def resolve_device(device: str | None) -> str:
    """``None`` / ``auto``: ``cuda:N`` (the current device) where torch sees a GPU, else
    ``cpu``. A CUDA device that torch cannot see, or a malformed name, is a ``ValueError``."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device here (torch {torch.__version__}, "
                         f"torch.cuda.is_available() is False); check the node's driver and the torch build")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def smoke(panels: list[Panel], *, device: str | None = None, steps: int = DEFAULT_STEPS, scale: str = "full",
          data_dir: str | None = None, threads: int | None = None, echo=print) -> int:
    """The smoke run of ``panels`` (module docstring); returns the exit status (0: all passed)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--smoke-steps must be a positive whole number of optimizer steps, got {steps!r}")
    if scale not in SCALES:
        raise ValueError(f"--smoke-scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"--threads must be a positive whole number, got {threads!r}")
    from raftorch import __version__
    from raftorch.training.devicecheck import run_checks

    from raftorch.training.threads import auto_threads

    device = resolve_device(device)
    dev = torch.device(device)
    saved_threads = torch.get_num_threads()
    if dev.type == "cpu":
        threads = threads or auto_threads()  # as a sweep's point would: the idle cores
        torch.set_num_threads(threads)
    what = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"{torch.get_num_threads()} CPU thread(s)" + ("" if torch.cuda.is_available() else
                                                             ", no GPU visible to torch"))
    profile = panels[0].profile if panels else "?"
    echo(f"raftorch reproduce --smoke: profile {profile}, {len(panels)} panel(s), device {device} ({what}), "
         f"raftorch {__version__}, torch {torch.__version__}; per point {WARMUP} warm-up + {steps} timed "
         f"optimizer steps; writes no files")
    if scale == "tiny":
        echo(f"--smoke-scale tiny: models shrunk (MLP hidden <= {TINY_WIDTH}, VGG widths / 8, ViT dim 12 per "
             f"head and 2 blocks, retina-VVS 8 channels), batches <= {TINY_BATCH}, images <= "
             f"{TINY_IMAGE}x{TINY_IMAGE}: the paths run, but the times are not the paper's")
    try:
        echo(f"\n## device checks on {device} (TF32 off) against float64 definitions on the CPU")
        checks = run_checks(dev, quick=scale == "tiny")
        echo(f"checks: {checks.summary()}\n")
        rows, cache = [], {}
        for panel in panels:
            if panel.kind == "theory":
                row = smoke_theory(panel, echo)
            else:
                row = smoke_training(panel, device=device, steps=steps, scale=scale, data_dir=data_dir,
                                     threads=threads, cache=cache, echo=echo)
            if row.error:
                echo(f"FAIL  {panel.id} {row.point.id}: {row.error}")
            rows.append(row)
    finally:
        torch.set_num_threads(saved_threads)
    echo("")
    echo(smoke_table(rows, tiny=scale == "tiny"))
    failed = [r for r in rows if r.error]
    if checks.failed or failed:
        echo(f"\nsmoke: FAILED: {len(checks.failed)} check(s) and {len(failed)} of {len(rows)} point(s) "
             f"(the FAIL lines above)")
        return 1
    echo(f"\nsmoke: OK: {checks.summary()}, {len(rows)} of {len(rows)} panel(s) ran; no files written")
    return 0


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    h = seconds / 3600
    return f"{h:,.0f}" if h >= 100 else f"{h:.3g}"


def _steps(steps: list[int]) -> str:
    if not steps:
        return "-"
    lo, hi = min(steps), max(steps)
    return f"{len(steps)} x {lo:,}" + (f"-{hi:,}" if hi != lo else "")


def smoke_table(rows: list[SmokeRow], tiny: bool = False) -> str:
    """The table of the smoke run, one row per panel and a total."""
    head = ("panel", "device", "data", "point", "s/step", "peak MiB", "points x steps",
            "projected device-h" + (" (tiny)" if tiny else ""), "spec estimate h")
    body = []
    for r in rows:
        s = r.seconds_per_step
        body.append((r.panel.id, r.device, r.data or "-", r.point.id,
                     "FAILED" if r.error else ("-" if s is None else f"{s:.4g}"),
                     "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}",
                     _steps(r.steps_per_point), _hours(r.projected_seconds), _hours(r.spec_seconds)))
    projected = [r.projected_seconds for r in rows]
    spec = [r.spec_seconds for r in rows]
    body.append(("total", "", "", "", "", "", f"{sum(len(r.steps_per_point) for r in rows)} points",
                 _hours(sum(projected)) if all(p is not None for p in projected) else
                 f"{_hours(sum(p for p in projected if p is not None))} + failed",
                 _hours(sum(spec)) if all(s is not None for s in spec) else "?"))
    widths = [max(len(str(x[i])) for x in body + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])
