"""The settings of one training run: a flat dataclass, read from YAML and command-line flags.

Precedence: the defaults below < a YAML file (``--config``) < command-line flags. Every
hyperparameter of the paper's appendix is a field here, never a literal in the training code.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
OUTPUT_INITS = (None, "zero")  # TrainConfig.output_init
TRACKERS = ("subspace", "error_alignment")  # representation metrics train can log per epoch (TrainConfig.track)
FEEDBACK_INITS = ("random", "svd")  # TrainConfig.feedback_init
CLASS_SAMPLES = ("first", "random")  # TrainConfig.class_sample


def setting(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None):
    """A :class:`TrainConfig` field: its default (a type such as ``dict`` for a fresh empty one
    per config), its help text, the values it may take (``choices``) and, where it is not
    ``--field-name``, its command-line flag."""
    meta = {"help": help, "choices": choices, "flag": flag}
    if isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """One training run. YAML keys and ``--flag-names`` are these field names; each field's
    type, default and help text are declared here once (:func:`setting`), and the command
    line's flags (:func:`raftorch.training.cli.add_arguments`) and the checks of
    :meth:`validate` are derived from them."""

    # data
    data: str = setting("digits", "dataset: digits, fashion-mnist, cifar10, cifar100, cifar100:K (K classes, "
                        "see --class-sample)")
    # "random": K classes drawn with the run's seed, relabelled 0..K-1 in label order (the
    # paper's "sampling" of Fig. 3c)
    class_sample: str = setting("first", "which K classes a name:K dataset keeps: first (labels 0..K-1) or random "
                                "(drawn with the seed)", choices=CLASS_SAMPLES)
    data_dir: str | None = setting(None, "folder with the datasets (else $RAFTORCH_DATA, else ~/.cache/raftorch)")
    download: bool = setting(False, "download a missing dataset (needs a network)")
    grayscale: bool = setting(False, "convert images to one grayscale (luma) channel (paper Fig. 4)")
    val_fraction: float = setting(0.0, "hold out this stratified fraction of the training set for validation")
    crop_padding: int = setting(0, "random-crop augmentation: pad by this many pixels (0: off)")
    flip: bool = setting(False, "random horizontal flip augmentation")
    cutout: int = setting(0, "cutout augmentation: side of the square (0: off)")
    train_size: int | None = setting(None, "train on a stratified random subset of this many images (default: all)")
    image_size: int | None = setting(None, "resize images to N x N pixels by area averaging (default: as stored)")
    # model
    model: str = setting("mlp", "model: mlp, vgg, vit, retina")
    model_options: dict[str, Any] = setting(dict, "a model option as KEY=VALUE (YAML value), repeatable: "
                                            "--model-option hidden=[64,64]", flag="--model-option")
    # "zero" (raftorch.models.zero_output_layer_): the model's last Linear / Conv2d starts at zero
    # weight and bias, which lets a feedback rule's error align before a net without
    # normalisation layers runs away
    output_init: str | None = setting(None, "initialisation of the output layer: 'zero' (weight and bias 0; helps "
                                      "feedback rules in nets without normalisation layers) or none (the model's "
                                      "own)", choices=OUTPUT_INITS)
    # learning rule (raftorch.convert)
    rule: str = setting("bp", "learning rule: bp, fa, kp, fa-lowrank, raf-q, raf, dfa, draf; or frozen (the "
                        "no-feedback control: hidden layers frozen at initialisation, only the output layer learns)")
    rank: int | str | None = setting(None, "feedback rank of every converted layer: a number, 'full', or 'none' "
                                     "(full-rank rules)")
    ranks: dict[str, int | str] = setting(dict, "rank of one layer as NAME=R (glob patterns allowed), repeatable: "
                                          "--layer-rank fc2=10", flag="--layer-rank")
    rule_options: dict[str, Any] = setting(dict, "a raftorch.convert option as KEY=VALUE (YAML value), repeatable",
                                           flag="--rule-option")
    layer_options: dict[str, dict[str, Any]] = setting(dict, "options of some layers as NAME={KEY: VALUE} (YAML), "
                                                       "repeatable: --layer-option 'out={oja_source: target}'",
                                                       flag="--layer-option")
    # optimisation
    optimizer: str = setting("adam", "adam, adamw, sgd, rmsprop")
    lr: float = setting(1e-3, "learning rate")
    weight_decay: float = setting(0.0, "weight decay (L2, added to the gradient; decoupled for adamw)")
    amsgrad: bool = setting(False, "AMSGrad variant of Adam / AdamW (the paper's optimizer)")
    momentum: float = setting(0.0, "momentum of sgd / rmsprop")
    lr_decay: float = setting(1.0, "multiply the learning rate by this after every epoch (paper: 0.975)")
    feedback_lr: float | None = setting(None, "learning rate of the feedback parameters B, Q, P (default: --lr)")
    feedback_weight_decay: float | None = setting(None, "weight decay of the feedback parameters (default: "
                                                  "--weight-decay)")
    # raftorch.feedback_init: "svd" is weight transport at initialisation, not the paper's random start
    feedback_init: str = setting("random", "start of the feedback weights: random (the paper's) or svd (B = W^T "
                                 "and Q P the truncated SVD of W^T: weight transport at initialisation, for "
                                 "ablations)", choices=FEEDBACK_INITS)
    feedback_init_scale: float = setting(1.0, "multiply the initial B and Q by this")
    batch_size: int = setting(32, "global batch size of one forward/backward (split over the processes of a "
                              "distributed run); with --accumulate K, the micro-batch")
    # one optimizer step per `accumulate` batches (raftorch.training.loop.train_epoch)
    accumulate: int = setting(1, "gradient accumulation: one optimizer step per K batches, effective batch K x "
                              "--batch-size; P's Oja update is corrected by raftorch.loss_scale")
    sync_bn: bool = setting(False, "distributed runs: BatchNorm statistics over the global batch "
                            "(nn.SyncBatchNorm; GPUs only); one process: no effect")
    epochs: int = setting(20, "number of epochs")
    seed: int = setting(0, "random seed (same seed, same numbers on CPU)")
    # runtime
    device: str = setting("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    bf16: bool = setting(False, "bfloat16 autocast for the forward pass")
    fp16: bool = setting(False, "float16 autocast with a GradScaler (raftorch.loss_scale keeps P's step right)")
    eval_batch_size: int = setting(1000, "batch size of evaluation")
    eval_every: int = setting(1, "evaluate (val, test, alignment) every N epochs and after the last; 0: after "
                              "the last only")
    # None is resolved by raftorch.training.threads.auto_threads when the run starts
    threads: int | None = setting(None, "CPU threads (torch.set_num_threads); default: the usable cores not "
                                  "already busy")
    # the Python API's None writes nothing; the command line's default is runs/MODEL-DATA-RULE[-rRANK]-sSEED
    out: str | None = setting(None, "run folder (default: runs/MODEL-DATA-RULE[-rRANK]-sSEED)")
    # raftorch.training.loop.track_run; a comma list is split; never changes the training
    track: list[str] | None = setting(None, "log representation metrics every epoch on a fixed held-out batch, "
                                      "repeatable or a comma list: subspace (P's overlap with the error's "
                                      "principal subspace, the error's effective dimensionality), error_alignment "
                                      "(angle between the error each layer receives and backprop's); default: "
                                      "none", choices=TRACKERS)
    tensorboard: bool = setting(False, "also write every epoch's numbers as TensorBoard scalars into "
                                "OUT/tensorboard (needs the tensorboard package: pip install "
                                "'raftorch[tensorboard]')")

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
        """The settings by name (``dataclasses.Field``: ``.type``, ``.default``, ``.metadata["help"]``)."""
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def flag(cls, name: str) -> str:
        """The command-line flag of setting ``name``: ``--field-name`` unless declared otherwise."""
        return cls.fields()[name].metadata["flag"] or "--" + name.replace("_", "-")

    @classmethod
    def names_of(cls, *types: str) -> list[str]:
        """The settings declared with one of these types (as written), e.g. ``"float"``, ``"int | None"``."""
        return [name for name, f in cls.fields().items() if f.type in types]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build from a mapping; an unknown key raises a :class:`ConfigError` naming the known ones."""
        where = f"{source}: " if source else ""
        if not isinstance(values, dict):
            raise ConfigError(f"{where}expected a mapping of settings, got {type(values).__name__}")
        check_keys(values, source)
        cfg = cls(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()})
        cfg.validate(source)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain dict (``dataclasses.asdict``)."""
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
        """A new config with ``changes`` applied, built and checked by :meth:`from_dict`."""
        return self.from_dict({**self.to_dict(), **changes})

    def validate(self, source: str = "config") -> None:
        """Raise one clear :class:`ConfigError` for the first bad setting: it names the setting
        (and its flag), the value and what to give instead; ``source`` (a file) prefixes it."""
        from raftorch.training.data import dataset_shape, parse_dataset_name
        from raftorch.models import MODELS, check_model, model_options

        def bad(setting: str, msg: str):
            raise ConfigError(f"{source}: {msg}" if source else msg, setting)

        for name in self.names_of("bool"):  # true / false settings
            if not isinstance(getattr(self, name), bool):
                bad(name, f"{name} ({self.flag(name)}) must be true or false, got {getattr(self, name)!r}")
        for name, example in (("out", "runs/NAME"), ("data_dir", "~/data")):  # folders: null or a name
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                bad(name, f"{name} ({self.flag(name)}) must name a folder, got {value!r}; e.g. {self.flag(name)} "
                          f"{example}, or leave it out")
        if not isinstance(self.data, str):
            bad("data", f"data (--data) must be a dataset name such as 'digits' or 'cifar100:50', got {self.data!r}")
        try:
            parse_dataset_name(self.data)
        except ValueError as exc:
            bad("data", str(exc))
        if not isinstance(self.model, str) or self.model not in MODELS:
            bad("model", f"unknown model {self.model!r} (--model); choose one of {', '.join(sorted(MODELS))}")
        if not isinstance(self.model_options, dict):
            bad("model_options", "model_options must be a mapping, e.g. {hidden: [512, 512]}")
        unknown = sorted(set(self.model_options) - set(model_options(self.model)))
        if unknown:
            known = ", ".join(f"{k}={v!r}" for k, v in model_options(self.model).items())
            bad("model_options", f"model {self.model!r} has no option(s) {', '.join(map(repr, unknown))} "
                                 f"(--model-option); its options: {known}")
        if self.output_init not in OUTPUT_INITS:
            bad("output_init", f"output_init must be null (the model's own initialisation) or 'zero', "
                               f"got {self.output_init!r}")
        if not isinstance(self.rule, str) or not self.rule:
            bad("rule", f"rule must be a rule name such as 'bp' or 'raf', got {self.rule!r}")
        if self.rank is not None and not _is_rank(self.rank):
            bad("rank", f"rank must be a positive whole number, 'full' or null, got {self.rank!r}")
        if not isinstance(self.ranks, dict) or not all(_is_rank(r) for r in self.ranks.values()):
            bad("ranks", f"ranks (--layer-rank) must map module names (or glob patterns) to positive whole "
                         f"numbers or 'full', got {self.ranks!r}")
        if not isinstance(self.rule_options, dict):
            bad("rule_options", "rule_options must be a mapping, e.g. {oja_source: target}")
        if not isinstance(self.layer_options, dict) or any(not isinstance(v, dict) for v in self.layer_options.values()):
            bad("layer_options", "layer_options (--layer-option) must map module names (or glob patterns) to "
                                 "mappings of options, e.g. {out: {oja_source: target}}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.amsgrad and self.optimizer not in ("adam", "adamw"):
            bad("amsgrad", f"amsgrad applies to adam / adamw only, not {self.optimizer!r}")
        for name in self.names_of("float", "float | None"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not math.isfinite(value)):
                bad(name, f"{name} ({self.flag(name)}) must be a finite number, got {value!r}")
        if self.momentum and self.optimizer not in ("sgd", "rmsprop"):
            bad("momentum", f"momentum applies to sgd / rmsprop only, not {self.optimizer!r}")
        for name in self.names_of("int"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                bad(name, f"{name} ({self.flag(name)}) must be a non-negative whole number, got {value!r}")
        for name in ("lr", "eval_batch_size", "batch_size", "epochs", "accumulate"):
            if getattr(self, name) <= 0:
                bad(name, f"{name} must be a positive number, got {getattr(self, name)!r} ({self.flag(name)})")
        if self.bf16 and self.fp16:
            bad("fp16", "bf16 and fp16 are two autocast dtypes; choose one")
        for name in self.names_of("int | None"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                bad(name, f"{name} ({self.flag(name)}) must be a positive whole number or null, got {value!r}")
        if self.feedback_lr is not None and self.feedback_lr <= 0:
            bad("feedback_lr", f"feedback_lr must be positive or null, got {self.feedback_lr!r}")
        for name in ("weight_decay", "momentum"):
            if getattr(self, name) < 0:
                bad(name, f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.feedback_weight_decay is not None and self.feedback_weight_decay < 0:
            bad("feedback_weight_decay",
                f"feedback_weight_decay must be >= 0 or null, got {self.feedback_weight_decay!r}")
        if not 0 < self.lr_decay <= 1:
            bad("lr_decay", f"lr_decay is the per-epoch factor on the learning rate and must be in (0, 1], "
                            f"got {self.lr_decay!r} (e.g. 0.975)")
        if self.class_sample not in CLASS_SAMPLES:
            bad("class_sample", f"class_sample must be one of {', '.join(CLASS_SAMPLES)}, got {self.class_sample!r}")
        if self.class_sample != "first" and ":" not in str(self.data):
            bad("class_sample", f"class_sample={self.class_sample!r} picks the K classes of a 'name:K' dataset, "
                                f"but data is {self.data!r}; use e.g. data: cifar100:50, or leave class_sample at "
                                f"'first'")
        if self.feedback_init not in FEEDBACK_INITS:
            bad("feedback_init",
                f"feedback_init must be one of {', '.join(FEEDBACK_INITS)}, got {self.feedback_init!r}")
        if self.feedback_init_scale < 0:
            bad("feedback_init_scale", f"feedback_init_scale multiplies the initial B and Q and must be a number "
                                       f">= 0, got {self.feedback_init_scale!r}")
        if not 0 <= self.val_fraction < 1:
            bad("val_fraction", f"val_fraction (--val-fraction) must be in [0, 1), got {self.val_fraction!r}")
        if self.track is not None:
            if not isinstance(self.track, list) or not all(isinstance(t, str) for t in self.track):
                bad("track", f"track must be a list of metric names such as [subspace], got {self.track!r}")
            unknown = [t for t in self.track if t not in TRACKERS]
            if unknown:
                bad("track", f"unknown track metric(s) {', '.join(map(repr, unknown))} (--track); "
                             f"choose from: {', '.join(TRACKERS)}")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda")
                                                    or self.device.startswith("cuda:")):
            bad("device", f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        # the model's own options, for the images the data settings give (nothing is loaded)
        shape, num_classes = dataset_shape(self.data, grayscale=self.grayscale, image_size=self.image_size)
        try:
            check_model(self.model, shape, num_classes, **self.model_options)
        except ValueError as exc:
            bad("model_options", str(exc))


class ConfigError(ValueError):
    """A bad setting; ``setting`` names it (a field of :class:`TrainConfig`), when one is to blame."""

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


def check_keys(values: dict[str, Any], source: str = "config") -> None:
    """A :class:`ConfigError` for the first key of ``values`` that is not a setting, with the
    closest setting's name when one is close (a misspelling)."""
    known = list(TrainConfig.fields())
    unknown = [k for k in values if k not in known]
    if not unknown:
        return
    key = unknown[0]
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f"{source}: " if source else ""
    raise ConfigError(f"{where}unknown setting {key!r}{hint}; the settings are: {', '.join(known)}", str(key))


def _is_rank(r) -> bool:
    return r == "full" or (isinstance(r, int) and not isinstance(r, bool) and r >= 1)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that ``1e-3`` and ``5E4`` are numbers, as in YAML 1.2 and
    JSON (YAML 1.1, which PyYAML follows, wants ``1.0e-3`` and reads ``1e-3`` as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """One YAML document of settings (``1e-3`` is a number); a ``yaml.YAMLError`` if it is not YAML."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's own message spans lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def load_config_file(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a YAML file of settings (``what`` names it in errors) into a mapping (not yet
    validated). A path that is not a readable text file of YAML raises one ``ValueError``."""
    path = Path(path)
    try:
        values = load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist; give the path of a YAML file") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a folder, not a YAML file; give the path of a YAML file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not a text file (it is binary, not UTF-8 text); give the "
                         f"path of a YAML file") from None
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{what} {path} is not valid YAML: {yaml_problem(exc)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path} must hold a mapping of settings (key: value lines), "
                         f"got {type(values).__name__}")
    return values


def settings(file_values: dict[str, Any], file: str | Path | None, flags: dict[str, Any]) -> TrainConfig:
    """The config of a command: the defaults < ``file_values`` (read from ``file``) < ``flags``.

    The mappings (``model_options``, ``rule_options``, ``layer_options``, ``ranks``) of the
    flags add to the file's. An error in a setting the file gave (an unknown key, a bad value
    no flag replaced) names the file."""
    label = f"config file {file}" if file is not None else ""
    check_keys(file_values, label)
    values = dict(file_values)
    for name in ("model_options", "rule_options", "layer_options", "ranks"):
        if name in flags and isinstance(values.get(name), dict):
            flags = {**flags, name: {**values[name], **flags[name]}}
    values.update(flags)
    try:
        return TrainConfig.from_dict(values, source="")
    except ConfigError as exc:
        if file is not None and exc.setting in file_values and exc.setting not in flags:
            raise ConfigError(f"{label}: {exc}", exc.setting) from None
        raise


def dump_config(cfg: TrainConfig) -> str:
    """``cfg`` as YAML text, the fields in their declared order."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
