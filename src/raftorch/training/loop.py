"""The training loop: train one model on one dataset with one learning rule.

The whole training path is :func:`train`: load the data into memory, build the model,
``raftorch.convert`` it to the rule, then per epoch: shuffled batches sliced from the tensors,
forward, ``feed_targets``, backward, optimizer step; evaluate; write the checkpoint and the
metrics. Distributed runs (``torchrun --nproc_per_node=N -m raftorch train ...``) use
DistributedDataParallel: each process takes its slice of every global batch, and only
rank 0 writes files.

Run folder (``out``): ``config.yaml`` (every setting), ``metrics.jsonl`` (one line per epoch;
``metrics.csv`` the same as a table),
``checkpoint.pt`` (the last finished epoch), ``final.json`` (the final epoch's numbers, with
``test_accuracy`` as a fraction). All are written atomically.

``track: [subspace]`` (``--track subspace``) adds representation metrics to every epoch's
record, measured after the epoch on a fixed held-out batch (:func:`track_run`).
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import raftorch
from raftorch.models import build_model, zero_output_layer_
from raftorch.replace import WEIGHT_TYPES
from raftorch.rules import DIRECT_RULES
from raftorch.training import checkpoint as ckpt
from raftorch.training import runlock
from raftorch.training.config import TrainConfig, dump_config
from raftorch.training.data import Augmentation, DataSplits, batch_indices, load_dataset, shard
from raftorch.training.threads import auto_threads

FEEDBACK_SUFFIXES = (".B", ".Q", ".P")
TRACK_BATCH = 256  # images in the fixed held-out batch of the tracked metrics (TrainConfig.track)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run folder keeps the last good checkpoint."""


# --------------------------------------------------------------------------- building blocks

def _distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if world > 1:
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def initial_model(cfg: TrainConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The plain model of ``cfg`` (``raftorch.models``, no rule yet) as a run of ``cfg`` starts:
    built right after ``torch.manual_seed(cfg.seed)``, with ``output_init`` applied. Its forward
    weights are the run's at step 0 (the rule's conversion keeps them), so analyses can compare
    a trained net with its own initialisation (``raftorch analyze``: the fields at init)."""
    torch.manual_seed(cfg.seed)
    plain = build_model(cfg.model, input_shape, num_classes, **cfg.model_options)
    if cfg.output_init == "zero":
        zero_output_layer_(plain)
    return plain


def convert_model(model: nn.Module, cfg: TrainConfig, example_input: torch.Tensor | None = None) -> nn.Module:
    """Swap the model's layers for the rule's (``bp`` keeps the plain PyTorch model).

    ``rule_options`` go to every layer; ``layer_options`` (module name or glob -> options) are
    added for the matching layers only, e.g. ``{"out": {"oja_source": "target"}}`` (the paper
    learns the output layer's ``P`` on the targets). The direct rules (``dfa``, ``draf``) get
    ``example_input`` (a few training images) to size paths into convolutions, unless
    ``rule_options`` gives one. The control ``frozen`` (only the output layer learns) is
    converted too, and takes no ``rank``, ``ranks``, ``rule_options`` or ``layer_options``.
    """
    if cfg.rule.lower() == "frozen":
        for setting in ("rank", "ranks", "rule_options", "layer_options"):
            flag = cfg.flag(setting)
            value = getattr(cfg, setting)
            if value is not None and value != {}:
                raise ValueError(f"rule 'frozen' has no feedback path (only the output layer learns), so "
                                 f"{setting} ({flag}) does not apply; got {setting}={value!r}")
        converted = raftorch.convert(model, "frozen")
        init_feedback(converted, cfg)
        return converted
    if (cfg.rule == "bp" and not cfg.ranks and cfg.rank is None and not cfg.rule_options
            and not cfg.layer_options):
        init_feedback(model, cfg)
        return model
    _check_layer_names(model, cfg)
    special = list(cfg.layer_options)
    ranks = cfg.ranks or None
    options = dict(cfg.rule_options)
    if cfg.rule in DIRECT_RULES and example_input is not None:
        options.setdefault("example_input", example_input)
    converted = raftorch.convert(model, cfg.rule, cfg.rank, ranks=ranks, exclude=special, **options)
    for pattern, options in cfg.layer_options.items():
        raftorch.convert(converted, cfg.rule, cfg.rank, ranks=ranks, include=[pattern], inplace=True,
                         **{**cfg.rule_options, **options})
    init_feedback(converted, cfg)
    return converted


def _check_layer_names(model: nn.Module, cfg: TrainConfig) -> None:
    """Each name or glob pattern of ``layer_options`` and ``ranks`` must match a layer of the
    model; else one ``ValueError`` that names the flag and the layers there are."""
    import fnmatch

    layers = [n for n, m in model.named_modules()
              if isinstance(m, WEIGHT_TYPES) and n]
    for setting in ("layer_options", "ranks"):
        flag = cfg.flag(setting)
        for pattern in getattr(cfg, setting):
            if not any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in layers):
                shown = ", ".join(layers[:16]) + (f", ... ({len(layers)} in all)" if len(layers) > 16 else "")
                raise ValueError(f"{setting} ({flag}) names {pattern!r}, which is no layer of model {cfg.model!r}; "
                                 f"give one of its layers, or a glob pattern that matches some: {shown}")


def init_feedback(model: nn.Module, cfg: TrainConfig) -> None:
    """Apply ``feedback_init`` and ``feedback_init_scale`` (:mod:`raftorch.feedback_init`) to
    the converted ``model``; a setting that has no layer-wise feedback path to act on is an error."""
    from raftorch.feedback_init import feedback_paths, scale_feedback_, svd_feedback_

    if cfg.feedback_init == "random" and cfg.feedback_init_scale == 1:
        return
    if cfg.rule in DIRECT_RULES or not feedback_paths(model):
        raise ValueError(f"feedback_init={cfg.feedback_init!r} / feedback_init_scale={cfg.feedback_init_scale!r} "
                         f"set the layer-wise feedback weights, which rule {cfg.rule!r} does not have; "
                         "use fa, kp, fa-lowrank, raf-q or raf, or drop the setting")
    if cfg.feedback_init == "svd":
        svd_feedback_(model)
    if cfg.feedback_init_scale != 1:
        scale_feedback_(model, cfg.feedback_init_scale)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of ``cfg``; feedback parameters (names ending in ``.B``, ``.Q``, ``.P``)
    form their own group when ``feedback_lr`` or ``feedback_weight_decay`` is set."""
    forward, feedback = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (feedback if name.endswith(FEEDBACK_SUFFIXES) else forward).append(p)
    groups = [{"params": forward}]
    if feedback:
        groups.append({"params": feedback,
                       "lr": cfg.lr if cfg.feedback_lr is None else cfg.feedback_lr,
                       "weight_decay": (cfg.weight_decay if cfg.feedback_weight_decay is None
                                        else cfg.feedback_weight_decay)})
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad, **fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, **fused)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, *,
             rank: int = 0, world: int = 1, autocast=nullcontext) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``(x, y)``, shared out over the processes."""
    was_training = model.training
    model.eval()
    mine = shard(torch.arange(len(x)), rank, world)
    totals = torch.zeros(2, dtype=torch.float64, device=x.device)  # loss sum, correct
    for idx in torch.split(mine.to(x.device), batch_size):
        with autocast():
            logits = model(x[idx])
        totals[0] += F.cross_entropy(logits.float(), y[idx], reduction="sum").double()
        totals[1] += (logits.argmax(1) == y[idx]).sum()
    if world > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    return totals[0].item() / len(x), totals[1].item() / len(x)


def _alignment(model: nn.Module) -> dict[str, float]:
    return {k: float(v) for k, v in raftorch.metrics.alignment_angles(model).items()}


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Data order and augmentation of one epoch depend on (seed, epoch) only: resumable."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _check_run_folder(out: Path, cfg: TrainConfig, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from (or None); refuses to overwrite a finished or running run."""
    path = out / ckpt.CHECKPOINT
    if not resume:
        if path.exists() or (out / ckpt.FINAL).exists():
            raise ValueError(f"run folder {out} already holds a run; pass --resume to continue it, "
                             f"or choose another --out")
        return None
    if not path.exists():
        what = "does not exist" if not out.exists() else "holds no checkpoint.pt"
        raise ValueError(f"nothing to resume: run folder {out} {what}; check --out, or drop --resume "
                         f"to start a new run there")
    state = ckpt.load_checkpoint(path)
    saved, now = TrainConfig.completed(dict(state["config"])), cfg.to_dict()
    changed = [k for k in now if k not in TrainConfig.RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if changed:
        diffs = "; ".join(f"{k}: run has {saved.get(k)!r}, given {now[k]!r}" for k in changed)
        raise ValueError(f"cannot resume {out} with different settings ({diffs}); only "
                         f"{', '.join(TrainConfig.RESUMABLE_CHANGES)} may change. Start a new run instead.")
    return state


# --------------------------------------------------------------------------- the training function

@dataclass
class Run:
    """Everything one training run holds between its steps (see :func:`train`)."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path | None
    data: Any
    augment: Augmentation
    model: nn.Module  # the (converted) model; ``net`` wraps it in DDP when distributed
    net: nn.Module
    converted: bool
    optimizer: torch.optim.Optimizer
    scheduler: Any
    autocast: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0  # finished epochs
    track_batch: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, y) for track_run
    elapsed: float = 0.0  # training seconds of the finished epochs
    tensorboard: Any = None  # raftorch.training.tensorboard.Logger when cfg.tensorboard (rank 0, with out)
    scaler: Any = None  # torch.amp.GradScaler under fp16

    @property
    def lead(self) -> bool:
        return self.rank == 0


def train(config: TrainConfig | dict[str, Any], *, resume: bool = False, progress: bool = True,
          stop_after: int | None = None, load: Callable[..., DataSplits] = load_dataset) -> dict[str, Any]:
    """Train one run and return its final numbers (also written to ``out/final.json``).

    The whole path, one step a function: :func:`setup` (data, model, rule, optimizer, and the
    checkpoint when resuming), then per epoch :func:`train_epoch`, :func:`evaluate_run`,
    :func:`track_run` (when ``track`` asks) and :func:`end_epoch` (history, checkpoint, one
    line), and :func:`finish` (``final.json``).

    Args:
        config: a :class:`TrainConfig` or a mapping of its fields.
        resume: continue from ``out/checkpoint.pt``; the result equals that of an
            uninterrupted run with the same seed. A folder with no checkpoint is an error.
        progress: show a progress bar per epoch and a summary line per epoch.
        stop_after: stop after this many finished epochs (as if the job were killed then),
            leaving a resumable run folder; for time-limited job slots and tests.
        load: the dataset loader, :func:`raftorch.training.data.load_dataset` or one with its
            signature (a :class:`raftorch.training.data.DatasetCache` in a sweep).

    Raises:
        TrainingDiverged: the loss became NaN/inf (the last good checkpoint is kept).
        ValueError: a bad setting. :class:`raftorch.training.data.DatasetNotFoundError`: no data.
        raftorch.training.runlock.FolderInUse: another process is writing ``out`` (:func:`hold_run_folder`).
    """
    cfg = TrainConfig.from_dict(config.to_dict() if isinstance(config, TrainConfig) else config)
    threads = torch.get_num_threads()
    try:
        with hold_run_folder(cfg, resume):
            run = setup(cfg, resume=resume, load=load)
            last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
            while run.epoch < last_epoch:
                record = train_epoch(run, progress=progress)
                if run.epoch + 1 == cfg.epochs or (cfg.eval_every and (run.epoch + 1) % cfg.eval_every == 0):
                    record.update(evaluate_run(run))
                if cfg.track:
                    record.update(track_run(run))
                end_epoch(run, record, progress=progress)
            if run.epoch < cfg.epochs:  # stopped early on purpose: the run folder is resumable
                return {"stopped_after_epoch": run.epoch, "history": run.history}
            return finish(run)
    finally:
        torch.set_num_threads(threads)


def hold_run_folder(cfg: TrainConfig, resume: bool = False):
    """The run folder's lock (:func:`raftorch.training.runlock.hold`), held by :func:`train` from before
    the folder is checked to after ``final.json``: a second run into the same ``out`` (a typo in
    a job array, a second ``--resume``) is refused with :class:`raftorch.training.runlock.FolderInUse`
    naming the holder, and writes nothing. Taken by the process that writes (rank 0); none
    without ``out``, nor for a ``resume`` of a folder that does not exist (that is an error)."""
    if not cfg.out or int(os.environ.get("RANK", "0")) != 0 or (resume and not Path(cfg.out).is_dir()):
        return nullcontext()
    return runlock.hold(cfg.out, what="raftorch train")


def setup(cfg: TrainConfig, *, resume: bool = False, data: DataSplits | None = None,
          load: Callable[..., DataSplits] = load_dataset) -> Run:
    """Data in memory, the model built and converted to the rule, optimizer and schedule;
    the run folder checked (and the checkpoint loaded when resuming); ``config.yaml`` written.

    ``data``: the splits already in memory (``raftorch reproduce --smoke`` passes its
    synthetic stand-in where a dataset is missing); ``None``: ``load`` (by default
    :func:`~raftorch.training.data.load_dataset`) of ``cfg``'s data settings.

    ``cfg.threads`` set to ``None`` is resolved here (:func:`auto_threads`, CPU runs) and
    written back into ``cfg``, so ``config.yaml`` and ``final.json`` say what was used.
    """
    rank, world, local_rank = _distributed()
    device = _device(cfg.device, local_rank)
    if cfg.threads is None and device.type == "cpu":
        cfg.threads = auto_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    lead = rank == 0
    out = Path(cfg.out) if cfg.out else None
    if resume and out is None:
        raise ValueError("resume needs the run folder: set out / --out")
    if cfg.tensorboard:
        from raftorch.training import tensorboard as tb

        if out is None:
            raise ValueError("tensorboard writes into the run folder: set out / --out")
        tb.require()
    if cfg.batch_size < world:
        raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {world} processes; "
                         f"it is the global batch, split over the processes")
    state = _check_run_folder(out, cfg, resume) if out else None

    # data: in memory, on the device
    if world > 1 and not lead:
        dist.barrier()  # rank 0 downloads, if it has to, before the others look
    if data is None:
        data = load(cfg.data, data_dir=cfg.data_dir, download=cfg.download and lead,
                    grayscale=cfg.grayscale, val_fraction=cfg.val_fraction, seed=cfg.seed,
                    train_size=cfg.train_size, image_size=cfg.image_size, class_sample=cfg.class_sample)
    data = data.to(device)
    if world > 1 and lead:
        dist.barrier()

    # model, rule, optimizer
    plain = initial_model(cfg, data.input_shape, data.num_classes)
    model = convert_model(plain, cfg, data.x_train[:2].cpu()).to(device)
    if world > 1:
        if cfg.sync_bn:
            if device.type == "cpu":
                raise ValueError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm has no CPU kernel")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # raf / draf: Oja's mean and scale over the global batch (own group: never interleaved
        # with DDP's gradient all-reduces)
        raftorch.sync_oja(model, group=dist.new_group())
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_decay)
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout: its own stream per process
    net = (nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
           if world > 1 else model)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.bf16 else nullcontext
    if cfg.fp16:
        autocast = lambda: torch.autocast(device.type, dtype=torch.float16)  # noqa: E731
    run = Run(cfg, rank, world, device, out, data, Augmentation(cfg.crop_padding, cfg.flip, cfg.cutout),
              model, net, model is not plain, optimizer, scheduler, autocast)
    if cfg.fp16:
        run.scaler = torch.amp.GradScaler(device.type)
    if cfg.track and lead:
        run.track_batch = held_out_batch(data)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        if len(state["rng"]) == world:
            _set_rng_state(state["rng"][rank], device)
        run.history, run.epoch, run.elapsed = list(state["history"]), int(state["epoch"]), float(state["elapsed"])
    if out and lead and cfg.tensorboard:
        from raftorch.training import tensorboard as tb

        earlier = (out / tb.SUBDIR).exists()
        run.tensorboard = tb.Logger(out)
        if not earlier:  # resumed with --tensorboard for the first time: the finished epochs too
            for record in run.history:
                run.tensorboard.log(record)
    if out and lead:
        ckpt.write_text(out / ckpt.CONFIG, dump_config(cfg))
        ckpt.write_jsonl(out / ckpt.METRICS, run.history)
    if world > 1 and lead and any(n.endswith(".P") and p.requires_grad for n, p in model.named_parameters()):
        print("note: Oja's update of P uses each process's own batch (centring, scale) and is then "
              "averaged, so this run differs slightly from one process with the same global batch",
              file=sys.stderr)
    return run


def train_epoch(run: Run, *, progress: bool = True, max_steps: int | None = None) -> dict[str, Any]:
    """One pass over the shuffled training set (or its first ``max_steps`` batches): forward,
    ``feed_targets``, backward, optimizer step; then the learning-rate schedule's step.

    With ``cfg.accumulate = K`` the batches are micro-batches: each group of ``K`` consecutive
    batches (the last group of an epoch may have fewer) makes one optimizer step from the sum
    of the micro-batch gradients of ``loss_i = sum_i / N_group`` (``sum_i`` the micro-batch's
    summed loss, ``N_group`` the group's rows): the mean over the group, exactly the gradient
    one batch of ``N_group`` rows would give ``W``. Each backward runs inside
    ``raftorch.loss_scale(model, c_i)``, ``c_i = N_i / N_group`` (the factor between
    ``loss_i`` and the micro-batch's own mean loss), so that ``P`` gets the row-weighted mean
    ``sum_i c_i G_i`` of the micro-batch Oja updates (:mod:`raftorch.scaling`). DDP
    all-reduces only the last backward of a group (``no_sync``). ``K = 1`` is the plain loop.
    ``max_steps`` counts micro-batches.

    Under ``fp16`` the loss goes through ``torch.amp.GradScaler`` (scale ``s``): each backward
    of ``s loss_i`` runs inside ``raftorch.loss_scale(model, s c_i)``, and ``scaler.step``
    unscales every gradient, ``P``'s included, before the step (and skips a step whose
    gradients overflowed).

    Returns the epoch's record so far: epoch, lr, train loss / accuracy, seconds.
    """
    cfg, data, device, world, rank = run.cfg, run.data, run.device, run.world, run.rank
    run.net.train()
    gen = _epoch_generator(cfg.seed, run.epoch)
    batches = batch_indices(len(data.x_train), cfg.batch_size, shuffle=True, generator=gen)
    if max_steps is not None:
        batches = batches[:max_steps]
    lr = run.optimizer.param_groups[0]["lr"]
    loss_sum, correct, seen = 0.0, torch.zeros((), device=device), 0
    bar = tqdm(batches, desc=f"epoch {run.epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
               disable=True if not (progress and run.lead) else None)  # None: off when not a terminal
    t0 = time.perf_counter()
    K = cfg.accumulate
    group_rows = [sum(len(b) for b in batches[i:i + K]) for i in range(0, len(batches), K)]
    for step, batch in enumerate(bar):
        n_group = group_rows[step // K]
        first, last = step % K == 0, step == len(batches) - 1 or step % K == K - 1
        params = run.augment.sample(len(batch), *data.input_shape[1:], gen) if run.augment else None
        mine = shard(torch.arange(len(batch)), rank, world)
        idx = batch[mine].to(device)
        x, y = data.x_train[idx], data.y_train[idx]
        if params is not None:
            x = run.augment.apply(x, {k: v[mine] for k, v in params.items()})
        with run.autocast():
            logits = run.net(x)
        # sum over my samples / my share of the global batch: DDP's average over the
        # processes then gives the mean over the global batch, even for uneven shares
        local_sum = F.cross_entropy(logits.float(), y, reduction="sum")
        if first:
            run.optimizer.zero_grad(set_to_none=True)
        raftorch.feed_targets(run.model, y)  # for layers whose P learns on the targets
        s = 1.0 if run.scaler is None else run.scaler.get_scale()
        if n_group == len(batch) and s == 1.0:  # a whole step, unscaled
            loss = local_sum / (len(batch) / world)
            loss.backward()
        else:  # a micro-batch of a group of n_group rows and / or a GradScaler: P's Oja update told so
            loss = local_sum / (n_group / world)
            if run.scaler is not None:
                loss = run.scaler.scale(loss)
            sync = nullcontext() if last or not hasattr(run.net, "no_sync") else run.net.no_sync()
            with sync, raftorch.loss_scale(run.model, s * len(batch) / n_group):
                loss.backward()
        step_loss = local_sum.detach().double()
        if world > 1:
            dist.all_reduce(step_loss)
        step_loss = step_loss.item()
        if not math.isfinite(step_loss):
            bar.close()
            where = (f"the last good checkpoint ({run.out / ckpt.CHECKPOINT}, epoch {run.epoch}) is kept"
                     if run.out and run.epoch else "no checkpoint was written")
            raise TrainingDiverged(
                f"loss is {step_loss} at epoch {run.epoch + 1}, step {step + 1}: training diverged and "
                f"stopped; {where}. Start a new run with a lower learning rate (now {lr:g}).")
        if last and run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        elif last:
            run.optimizer.step()
        loss_sum += step_loss
        seen += len(batch)
        correct += (logits.argmax(1) == y).sum()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    bar.close()
    seconds = time.perf_counter() - t0
    run.scheduler.step()
    if world > 1:
        dist.all_reduce(correct)
    if world > 1:  # BatchNorm statistics: everyone uses rank 0's
        for b in run.model.buffers():
            dist.broadcast(b, 0)
    return {"epoch": run.epoch + 1, "lr": lr, "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct.item() / max(seen, 1), "seconds": seconds}


def evaluate_run(run: Run) -> dict[str, Any]:
    """Validation (if held out) and test loss / accuracy, and the alignment angles."""
    t1 = time.perf_counter()
    record: dict[str, Any] = {}
    data, kw = run.data, {"rank": run.rank, "world": run.world, "autocast": run.autocast}
    if data.x_val is not None:
        record["val_loss"], record["val_accuracy"] = evaluate(run.model, data.x_val, data.y_val,
                                                              run.cfg.eval_batch_size, **kw)
    record["test_loss"], record["test_accuracy"] = evaluate(run.model, data.x_test, data.y_test,
                                                            run.cfg.eval_batch_size, **kw)
    record["alignment"] = _alignment(run.model) if run.lead and run.converted else {}
    record["eval_seconds"] = time.perf_counter() - t1
    return record


def held_out_batch(data, size: int = TRACK_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed batch the tracked metrics are measured on: ``size`` images drawn at random
    (generator seed 0, so the same images for every seed and rule when the split is the
    same) from the validation split when one is held out, else from the test set; in their
    stored order. No global random state is used."""
    x, y = (data.x_val, data.y_val) if data.x_val is not None else (data.x_test, data.y_test)
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:size]
    idx = torch.sort(pick).values.to(x.device)
    return x[idx], y[idx]


def track_run(run: Run) -> dict[str, Any]:
    """The representation metrics ``run.cfg.track`` asks for, on :func:`held_out_batch`
    (rank 0 only; ``{}`` elsewhere). ``"subspace"``: the mappings ``subspace``, ``error_dim``
    and ``error_dim_received`` (layer name -> float) of
    :func:`raftorch.subspace.track_subspace`; ``"error_alignment"``: the mapping
    ``error_alignment`` (layer name -> degrees) of :func:`raftorch.metrics.error_alignment`,
    the angle between the error each layer receives and backprop's; and ``track_seconds``.
    Measured in eval mode in float32 (no autocast); the training is unchanged, bit for bit
    (tested)."""
    if not run.lead or not run.cfg.track:
        return {}
    from raftorch.subspace import track_subspace

    t0 = time.perf_counter()
    record: dict[str, Any] = {}
    x, y = run.track_batch
    if "subspace" in run.cfg.track:
        record.update(track_subspace(run.model, x, y))
    if "error_alignment" in run.cfg.track:
        record["error_alignment"] = raftorch.metrics.error_alignment(run.model, x, y)
    record["track_seconds"] = time.perf_counter() - t0
    return record


def end_epoch(run: Run, record: dict[str, Any], *, progress: bool = True) -> None:
    """Add the epoch's record to the history; write the checkpoint and ``metrics.jsonl``."""
    run.history.append(record)
    run.elapsed += record["seconds"]
    run.epoch = record["epoch"]
    rng = [_rng_state(run.device)]
    if run.world > 1:
        rng = [None] * run.world
        dist.all_gather_object(rng, _rng_state(run.device))
    if run.out and run.lead:
        ckpt.save_checkpoint(run.out / ckpt.CHECKPOINT, {
            "epoch": run.epoch, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "rng": rng, "history": run.history,
            "elapsed": run.elapsed, "config": run.cfg.to_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None})
        ckpt.write_jsonl(run.out / ckpt.METRICS, run.history)
        ckpt.write_metrics_csv(run.out / ckpt.METRICS_CSV, run.history)
        if run.tensorboard is not None:
            run.tensorboard.log(record)
    if progress and run.lead:
        val = f" val {record['val_accuracy']:.4f}" if "val_accuracy" in record else ""
        test = f" test {record['test_accuracy']:.4f}" if "test_accuracy" in record else ""
        tqdm.write(f"epoch {run.epoch}/{run.cfg.epochs}: loss {record['train_loss']:.4f} "
                   f"train {record['train_accuracy']:.4f}{val}{test} ({record['seconds']:.1f} s)")


def finish(run: Run) -> dict[str, Any]:
    """The final (last) epoch's numbers, written to ``final.json``; never the best epoch."""
    cfg, model, last = run.cfg, run.model, run.history[-1]
    final = {
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        **({"val_accuracy": last["val_accuracy"], "val_loss": last["val_loss"]} if "val_accuracy" in last else {}),
        "train_loss": last["train_loss"],
        "train_accuracy": last["train_accuracy"],
        "epochs": cfg.epochs,
        "seconds_per_epoch": run.elapsed / cfg.epochs,
        "seconds_total": run.elapsed,
        "parameters": sum(p.numel() for n, p in model.named_parameters() if not n.endswith(FEEDBACK_SUFFIXES)),
        "feedback_parameters": sum(p.numel() for n, p in model.named_parameters() if n.endswith(FEEDBACK_SUFFIXES)),
        "alignment": last["alignment"],
        "world_size": run.world,
        "device": str(run.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "raftorch": raftorch.__version__,
        "data": cfg.data, "model": cfg.model, "rule": cfg.rule, "rank": cfg.rank, "seed": cfg.seed,
    }
    if run.out and run.lead:
        ckpt.write_json(run.out / ckpt.FINAL, final)
    if run.tensorboard is not None:
        run.tensorboard.close()
    return final


