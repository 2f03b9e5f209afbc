"""``raftorch train``'s command line: a flag for every :class:`~raftorch.training.config.TrainConfig`
field, ``--config``, ``--resume``, ``--no-progress``; exit statuses 0 (done), 1 (the run failed),
2 (a bad setting), 130 (interrupted)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from raftorch.training import checkpoint as ckpt
from raftorch.training import runlock
from raftorch.training.config import TrainConfig, load_config_file, load_yaml, settings, yaml_problem
from raftorch.training.data import CorruptDatasetError, DatasetNotFoundError
from raftorch.training.loop import TrainingDiverged, train
from raftorch.training.runlock import check_writable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every :class:`TrainConfig` field, plus ``--config``, ``--resume``, ``--no-progress``.

    Flags left out keep the value of the config file, or the default.
    """
    parser.add_argument("--config", metavar="YAML", help="YAML file of settings (flags override it)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint (its config.yaml is used)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or epoch lines")
    defaults = TrainConfig()
    for name, f in TrainConfig.fields().items():  # the flags follow the fields' declarations
        meta = f.metadata
        default = getattr(defaults, name)
        help_text = meta["help"]
        if "default" not in help_text and not isinstance(default, (bool, dict)):
            help_text += f" (default: {default})"
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        flag = TrainConfig.flag(name)
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.type.startswith("list["):  # repeatable, or a comma list
            parser.add_argument(flag, action="append", metavar="METRIC", **kw)
        elif f.type.startswith("dict["):  # repeatable KEY=VALUE (parse_pairs)
            parser.add_argument(flag, action="append", metavar="KEY=VALUE", **kw)
        elif name == "rank":
            parser.add_argument(flag, type=_rank, **kw)
        elif meta["choices"] and None in meta["choices"]:  # a choice or none
            names = [c for c in meta["choices"] if c is not None]
            parser.add_argument(flag, type=lambda t: None if t.lower() in ("none", "null") else t,
                                choices=meta["choices"], metavar="{" + ",".join(names + ["none"]) + "}", **kw)
        elif meta["choices"]:
            parser.add_argument(flag, choices=meta["choices"], **kw)
        elif f.type in ("float", "float | None", "int", "int | None"):
            parser.add_argument(flag, type=float if f.type.startswith("float") else int, **kw)
        else:
            parser.add_argument(flag, **kw)


def _rank(text: str) -> int | str | None:
    if text == "full":
        return text
    if text.lower() in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a rank is a positive whole number or 'full', not {text!r}") from None


def parse_pairs(items: list[str], flag: str) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` of a repeatable flag (``flag`` names it in errors) -> ``{KEY: YAML value}``."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        example = {"--model-option": "hidden=[64,64]", "--layer-rank": "fc2=10",
                   "--layer-option": "'out={oja_source: target}'"}.get(flag, "oja_source=target")
        if not sep or not key.strip():
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}; e.g. {flag} {example}")
        try:
            out[key.strip()] = load_yaml(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"{flag} {item!r}: the value is not valid YAML ({yaml_problem(exc)}); close every "
                             f"bracket and quote the whole KEY=VALUE for the shell, e.g. {flag} {example}") from None
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < the run folder's config.yaml (with --resume) or --config < flags."""
    values: dict[str, Any] = {}
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.fields()}
    for name, f in TrainConfig.fields().items():
        if name in given and f.type.startswith("dict["):
            given[name] = parse_pairs(given[name], f.metadata["flag"])
    saved = Path(given["out"]) / ckpt.CONFIG if given.get("out") else None
    file = None
    if getattr(args, "config", None):
        file = args.config
    elif getattr(args, "resume", False) and saved is not None and saved.exists():
        file = saved
    if file is not None:
        values.update(load_config_file(file))
    cfg = settings(values, file, given)  # run() prefixes "raftorch train: error:"; names the file
    if cfg.out is None:
        rank = f"-r{cfg.rank}" if cfg.rank is not None else ""
        cfg.out = f"runs/{cfg.model}-{cfg.data.replace(':', '_')}-{cfg.rule}{rank}-s{cfg.seed}"
    return cfg


def run(args: argparse.Namespace) -> int:
    """Run ``raftorch train``: build the config from the flags and train it (or ``--resume`` it). Exit status
    0 done, 1 the run failed, 2 a bad setting or a missing dataset, 130 interrupted."""
    cfg = None
    try:
        cfg = config_from_args(args)
        if int(os.environ.get("RANK", "0")) == 0 and not args.resume:
            check_writable(cfg.out)
        final = train(cfg, resume=args.resume, progress=not args.no_progress)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every process done (rank 0 writing files) before gloo is torn down
    except (CorruptDatasetError, ckpt.CorruptCheckpointError, TrainingDiverged, runlock.FolderInUse) as exc:
        print(f"raftorch train: error: {exc}", file=sys.stderr)  # the run failed: exit status 1
        return 1
    except (ValueError, DatasetNotFoundError) as exc:
        print(f"raftorch train: error: {exc}", file=sys.stderr)  # a bad setting: exit status 2
        return 2
    except KeyboardInterrupt:
        where = Path(cfg.out) if cfg is not None and cfg.out else None
        kept = where is not None and (where / ckpt.CHECKPOINT).exists()
        print("\nraftorch train: interrupted; " + (
            f"the last finished epoch is kept: continue with raftorch train --resume --out {where}" if kept
            else "no epoch had finished, so there is nothing to resume"), file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0 and not args.no_progress:
        print(f"test accuracy {final['test_accuracy']:.4f} after {final['epochs']} epochs "
              f"({final['seconds_per_epoch']:.1f} s/epoch); results in {cfg.out}")
    return 0
