"""The settings of one training run: a flat dataclass, read from YAML and command-line flags.

Precedence: the defaults below < a YAML file (``--config``) < command-line flags. Every
hyperparameter of the paper's appendix is a field here, never a literal in the training code.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
OUTPUT_INITS = (None, "zero")  # TrainConfig.output_init
TRACKERS = ("subspace", "error_alignment")  # representation metrics train can log per epoch (TrainConfig.track)
FEEDBACK_INITS = ("random", "svd")  # TrainConfig.feedback_init
CLASS_SAMPLES = ("first", "random")  # TrainConfig.class_sample


@dataclass
class TrainConfig:
    """One training run. YAML keys and ``--flag-names`` are these field names."""

    # data
    data: str = "digits"  # digits | fashion-mnist | cifar10 | cifar100 | cifar100:K
    # which K classes a "name:K" dataset keeps: "first" (labels 0..K-1) or "random" (K drawn with
    # the run's seed, relabelled 0..K-1 in label order: the paper's "sampling" of Fig. 3c)
    class_sample: str = "first"
    data_dir: str | None = None  # else $RAFTORCH_DATA, else ~/.cache/raftorch
    download: bool = False  # fetch a missing dataset (needs a network)
    grayscale: bool = False  # one luma channel (paper Fig. 4)
    val_fraction: float = 0.0  # stratified held-out part of the training set
    crop_padding: int = 0  # random crop after zero-padding by this many pixels (0: off)
    flip: bool = False  # random horizontal flip
    cutout: int = 0  # side of the cutout square (0: off)
    train_size: int | None = None  # a stratified random subset of this many training images; None: all
    image_size: int | None = None  # resize images to image_size x image_size (area averaging); None: as stored
    # model
    model: str = "mlp"  # mlp | vgg | vit | retina
    model_options: dict[str, Any] = field(default_factory=dict)  # keyword options of the model
    # None: the model's own initialisation; "zero": the output layer (the model's last Linear /
    # Conv2d) starts at zero weight and bias (raftorch.models.zero_output_layer_), which lets a
    # feedback rule's error align before a net without normalisation layers runs away
    output_init: str | None = None
    # learning rule (raftorch.convert)
    rule: str = "bp"  # bp | fa | kp | fa-lowrank | raf-q | raf | dfa | draf | frozen (the control)
    rank: int | str | None = None  # feedback rank of every converted layer; "full": no limit
    ranks: dict[str, int | str] = field(default_factory=dict)  # per layer: module name / glob -> rank
    rule_options: dict[str, Any] = field(default_factory=dict)  # other convert() options, every layer
    layer_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # name / glob -> options
    # optimisation
    optimizer: str = "adam"  # adam | adamw | sgd | rmsprop
    lr: float = 1e-3
    weight_decay: float = 0.0
    amsgrad: bool = False  # Adam / AdamW only (the paper uses Adam with AMSGrad)
    momentum: float = 0.0  # SGD / RMSProp only
    lr_decay: float = 1.0  # the learning rate is multiplied by this after every epoch
    feedback_lr: float | None = None  # learning rate of feedback parameters (B, Q, P); None: lr
    feedback_weight_decay: float | None = None  # None: weight_decay
    # the feedback weights' start (raftorch.feedback_init): B and Q times feedback_init_scale;
    # feedback_init "svd" sets B = W^T and Q P = the truncated SVD of W^T (weight transport at
    # initialisation, not the paper's random start: an ablation, never a default)
    feedback_init: str = "random"  # random | svd
    feedback_init_scale: float = 1.0
    batch_size: int = 32  # global batch: split over the processes of a distributed run
    # gradient accumulation: one optimizer step per `accumulate` batches of batch_size (the
    # micro-batch), so the effective batch is accumulate x batch_size (train.train_epoch)
    accumulate: int = 1
    # distributed runs: nn.SyncBatchNorm (batch statistics over every process; needs CUDA)
    sync_bn: bool = False
    epochs: int = 20
    seed: int = 0
    # runtime
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    bf16: bool = False  # bfloat16 autocast for the forward pass
    fp16: bool = False  # float16 autocast with torch.amp.GradScaler (P told by raftorch.loss_scale)
    eval_batch_size: int = 1000
    eval_every: int = 1  # evaluate every N epochs and after the last one; 0: after the last only
    threads: int | None = None  # CPU threads (torch.set_num_threads); None: the idle usable cores (train.auto_threads)
    out: str | None = None  # run folder; None: write nothing
    # representation metrics logged per epoch on a fixed held-out batch (train.track_run), e.g.
    # [subspace]; a comma list is split; None (or empty): none. Never changes the training.
    track: list[str] | None = None
    tensorboard: bool = False  # also write every epoch's numbers as TensorBoard scalars into out/tensorboard

    # Fields that may differ when a run is resumed. A resumed run repeats an uninterrupted one
    # exactly when device and threads are also the same (they change the float rounding).
    RESUMABLE_CHANGES = ("epochs", "device", "threads", "data_dir", "download", "out", "eval_every", "track", "tensorboard")

    def __post_init__(self):
        # "subspace" or ["a,b", "c"] -> ["a", "b", "c"] (order kept, duplicates dropped); [] -> None,
        # so a run without tracking writes the same config as before the field existed
        track = self.track
        if isinstance(track, str):
            track = [track]
        if isinstance(track, (list, tuple)) and all(isinstance(t, str) for t in track):
            track = list(dict.fromkeys(p.strip() for t in track for p in t.split(",") if p.strip()))
            self.track = track or None

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build from a mapping; an unknown key raises a ``ValueError`` naming the known ones."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.fields()))
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(map(repr, unknown))}; "
                             f"known settings: {', '.join(cls.fields())}")
        cfg = cls(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()})
        cfg.validate(source)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def completed(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """A saved config (``config.yaml``, a checkpoint's) with every field it lacks set to the
        field's default. A field added in a later version defaults to the earlier behaviour
        (``accumulate: 1``, ``output_init: None``, ...), so an older run folder compares equal
        to the same settings given now instead of looking like another run."""
        defaults = cls().to_dict()
        return {**defaults, **{k: v for k, v in saved.items() if k in defaults}}

    def replace(self, **changes) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def validate(self, source: str = "config") -> None:
        """Raise one clear ``ValueError`` for the first bad setting."""
        from raftorch.data import parse_dataset_name
        from raftorch.models import MODELS, model_options

        def bad(msg: str):
            raise ValueError(f"{source}: {msg}" if source else msg)

        parse_dataset_name(self.data)
        if self.model not in MODELS:
            bad(f"unknown model {self.model!r}; choose one of {', '.join(sorted(MODELS))}")
        if not isinstance(self.model_options, dict):
            bad("model_options must be a mapping, e.g. {hidden: [512, 512]}")
        unknown = sorted(set(self.model_options) - set(model_options(self.model)))
        if unknown:
            known = ", ".join(f"{k}={v!r}" for k, v in model_options(self.model).items())
            bad(f"model {self.model!r} has no option(s) {', '.join(map(repr, unknown))}; its options: {known}")
        if not isinstance(self.tensorboard, bool):
            bad(f"tensorboard must be true or false, got {self.tensorboard!r}")
        if self.output_init not in OUTPUT_INITS:
            bad(f"output_init must be null (the model's own initialisation) or 'zero', got {self.output_init!r}")
        if not isinstance(self.rule, str) or not self.rule:
            bad(f"rule must be a rule name such as 'bp' or 'raf', got {self.rule!r}")
        if self.rank is not None and not _is_rank(self.rank):
            bad(f"rank must be a positive whole number, 'full' or null, got {self.rank!r}")
        if not isinstance(self.ranks, dict) or not all(_is_rank(r) for r in self.ranks.values()):
            bad(f"ranks must map module names (or glob patterns) to positive whole numbers or 'full', "
                f"got {self.ranks!r}")
        if not isinstance(self.rule_options, dict):
            bad("rule_options must be a mapping, e.g. {oja_source: target}")
        if not isinstance(self.layer_options, dict) or any(not isinstance(v, dict) for v in self.layer_options.values()):
            bad("layer_options must map module names (or glob patterns) to mappings of options, "
                "e.g. {out: {oja_source: target}}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.amsgrad and self.optimizer not in ("adam", "adamw"):
            bad(f"amsgrad applies to adam / adamw only, not {self.optimizer!r}")
        if self.momentum and self.optimizer not in ("sgd", "rmsprop"):
            bad(f"momentum applies to sgd / rmsprop only, not {self.optimizer!r}")
        for name in ("lr", "weight_decay", "momentum", "lr_decay", "val_fraction", "feedback_lr",
                     "feedback_weight_decay"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not math.isfinite(value)):
                bad(f"{name} (--{name.replace('_', '-')}) must be a finite number, got {value!r}")
        for name in ("lr", "eval_batch_size", "batch_size", "epochs", "accumulate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                bad(f"{name} must be a positive number, got {value!r}")
        for name in ("batch_size", "accumulate", "epochs", "eval_batch_size", "seed", "crop_padding", "cutout", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                bad(f"{name} must be a non-negative whole number, got {value!r}")
        if self.bf16 and self.fp16:
            bad("bf16 and fp16 are two autocast dtypes; choose one")
        if self.threads is not None and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                         or self.threads < 1):
            bad(f"threads must be a positive whole number or null, got {self.threads!r}")
        for name in ("train_size", "image_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                bad(f"{name} must be a positive whole number or null, got {value!r}")
        if self.feedback_lr is not None and self.feedback_lr <= 0:
            bad(f"feedback_lr must be positive or null, got {self.feedback_lr!r}")
        for name in ("weight_decay", "momentum"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.feedback_weight_decay is not None and self.feedback_weight_decay < 0:
            bad(f"feedback_weight_decay must be >= 0 or null, got {self.feedback_weight_decay!r}")
        if not 0 < self.lr_decay <= 1:
            bad(f"lr_decay is the per-epoch factor on the learning rate and must be in (0, 1], "
                f"got {self.lr_decay!r} (e.g. 0.975)")
        if self.class_sample not in CLASS_SAMPLES:
            bad(f"class_sample must be one of {', '.join(CLASS_SAMPLES)}, got {self.class_sample!r}")
        if self.class_sample != "first" and ":" not in str(self.data):
            bad(f"class_sample={self.class_sample!r} picks the K classes of a 'name:K' dataset, but data is "
                f"{self.data!r}; use e.g. data: cifar100:50, or leave class_sample at 'first'")
        if self.feedback_init not in FEEDBACK_INITS:
            bad(f"feedback_init must be one of {', '.join(FEEDBACK_INITS)}, got {self.feedback_init!r}")
        if (isinstance(self.feedback_init_scale, bool) or not isinstance(self.feedback_init_scale, (int, float))
                or not math.isfinite(self.feedback_init_scale) or self.feedback_init_scale < 0):
            bad(f"feedback_init_scale multiplies the initial B and Q and must be a number >= 0, "
                f"got {self.feedback_init_scale!r}")
        if not 0 <= self.val_fraction < 1:
            bad(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.track is not None:
            if not isinstance(self.track, list) or not all(isinstance(t, str) for t in self.track):
                bad(f"track must be a list of metric names such as [subspace], got {self.track!r}")
            unknown = [t for t in self.track if t not in TRACKERS]
            if unknown:
                bad(f"unknown track metric(s) {', '.join(map(repr, unknown))} (--track); "
                    f"choose from: {', '.join(TRACKERS)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")


def _is_rank(r) -> bool:
    return r == "full" or (isinstance(r, int) and not isinstance(r, bool) and r >= 1)


def load_config_file(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a YAML file of settings (``what`` names it in errors) into a mapping (not yet
    validated)."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{what} {path} is not valid YAML: {exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path} must hold a mapping of settings, got {type(values).__name__}")
    return values


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
