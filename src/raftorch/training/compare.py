"""``raftorch compare``: one model, several learning rules and ranks, several seeds, one table.

For each seed, every run starts from the same initial weights and sees the same batches, so
the rows differ only in how the error reaches the hidden layers; the table gives the mean ±
sample std of the final test accuracy over the seeds (default 0, 1, 2).

    raftorch compare                              # Fashion-MNIST (else digits), 4 x 256 MLP, bp/fa-lowrank/raf/frozen, 3 seeds
    raftorch compare --rules bp,raf --ranks 1,10 --epochs 20 --seeds 0,1,2,3,4
    raftorch compare --model retina --data fashion-mnist --model-option channels=8 --rules bp,raf --ranks 4

Without ``--data`` it compares on Fashion-MNIST where it is installed (a stratified 10,000-image
training subset, 10 epochs at batch 64: :data:`PRESETS`) and on scikit-learn's digits otherwise,
saying so in one line; ``--data``, ``--train-size``, ``--epochs`` and ``--batch-size`` override.

The results go to ``OUT.json`` / ``OUT.csv``; without ``--out`` the name says the settings
(``results/compare-DATA-MODEL-HASH``, the hash over every setting that changes the numbers), so
two comparisons never overwrite each other. An explicit ``--out`` whose ``OUT.json`` holds
other settings is refused unless ``--force``, and one that another ``raftorch compare`` is
writing right now is refused with one line naming it (the lock file ``.OUT.lock`` next to the
results, :mod:`raftorch.training.runlock`), so two comparisons started together never lose one.

Exit status: 0 done; 2 a bad argument (one line saying which, the value, and the fix);
1 a failure at run time (no dataset, an output in use or holding other settings).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from raftorch.models import MODELS, build_model
from raftorch.rules import CONTROL_RULES, DIRECT_RULES, get_rule
from raftorch.training import runlock
from raftorch.training.checkpoint import write_json, write_text
from raftorch.training.config import TrainConfig
from raftorch.training.data import DATASETS, DataSplits, load_dataset
from raftorch.training.loop import train
from raftorch.training.summary import mean_std

DEFAULT_RULES = ("bp", "fa-lowrank", "raf", "frozen")
DEFAULT_RANKS = (1, 10)
# per dataset, the defaults of --train-size, --epochs and --batch-size (the quick profile's fig3b
# settings on Fashion-MNIST: its RAF-vs-fixed-feedback contrast in a few minutes on 2 cores)
PRESETS = {"fashion-mnist": {"train_size": 10000, "epochs": 10, "batch_size": 64},
           "digits": {"train_size": None, "epochs": 30, "batch_size": 32}}


@dataclass
class Row:
    rule: str
    rank: int | None
    test_accuracy: float
    train_loss: float
    seconds: float
    source: str | None = None
    seed: int = 0


def _is_low_rank(rule: str) -> bool:
    """Whether ``rule`` runs once per rank; the full-rank rules, ``bp`` and the no-feedback
    control ``frozen`` run once."""
    return (DIRECT_RULES.get(rule) or get_rule(rule)).low_rank


def _no_feedback(rule: str) -> bool:
    """The control ``frozen``: no error reaches the hidden layers, so no rank to show."""
    return rule.lower() in CONTROL_RULES


def plan(rules, ranks) -> list[tuple[str, int | None]]:
    """(rule, rank) pairs: every rank for a low-rank rule, one run for the others."""
    runs = []
    for rule in rules:
        runs += [(rule, r) for r in ranks] if _is_low_rank(rule) else [(rule, None)]
    return runs


def run_compare(*, rules=DEFAULT_RULES, ranks=DEFAULT_RANKS, dataset="digits", hidden=(256,) * 4,
                epochs=30, lr=1e-3, batch_size=32, seed=0, seeds=None, source="output", progress=True,
                data: DataSplits | None = None, data_dir=None, model: str = "mlp",
                model_options: dict | None = None, train_size: int | None = None,
                device: str = "auto") -> list[Row]:
    """Train the same model once per (rule, rank) and seed; one :class:`Row` per run.

    ``seeds`` (default ``[seed]``) are run one after the other; within a seed every rule gets
    the same initial forward weights and the same batches. ``hidden`` is the MLP's widths
    (ignored for other models, which take ``model_options``). The data split is the same for
    every seed (``seed`` chooses it), so the spread is that of training alone.
    """
    if not rules:
        raise ValueError("rules is empty: give at least one rule to compare")
    for rule in rules:
        if rule not in DIRECT_RULES:
            get_rule(rule)  # fail before any training on a bad name
    if not ranks and any(_is_low_rank(r) for r in rules):
        raise ValueError("ranks is empty: the low-rank rules need at least one rank")
    seeds = list(seeds) if seeds is not None else [seed]
    options = dict(model_options or {})
    if model == "mlp":
        options.setdefault("hidden", tuple(hidden))
    data = data or load_dataset(dataset, seed=seed, data_dir=data_dir, train_size=train_size)
    build_model(model, data.input_shape, data.num_classes, **options)  # bad options fail before training
    runs = plan(rules, ranks)
    from raftorch import extension

    extension.warm()  # a first-use build of the C++ fast path is not counted as a run's time
    rows = []
    # disable=None: no bar when stderr is not a terminal (logs, CI, pipes), as in raftorch train
    bar = tqdm(total=len(runs) * len(seeds), desc="compare", unit="run", disable=None if progress else True)
    for s in seeds:
        for rule, rank in runs:
            # raftorch train's own loop (raftorch.training.loop.train) on the data in memory:
            # the same seed gives every rule the same initial weights and the same batches
            cfg = TrainConfig(data=dataset, model=model, model_options=options, rule=rule, rank=rank,
                              rule_options={"source": source} if rule in DIRECT_RULES else {},
                              lr=lr, batch_size=batch_size, epochs=epochs, seed=s, eval_every=0,
                              threads=torch.get_num_threads(), device=device)
            bar.set_postfix_str(f"{rule}" + (f" r={rank}" if rank else "") + f" seed {s}")
            final = train(cfg, progress=False, load=lambda name, **kw: data)
            rows.append(Row(rule, rank, final["test_accuracy"], final["train_loss"], final["seconds_total"],
                            source if rule in DIRECT_RULES else None, s))
            bar.update(1)
    bar.close()
    return rows


def summarize(rows: list[Row]) -> list[dict]:
    """Per (rule, rank, source): mean and sample std over seeds of the test accuracy (percent)
    and of the final training loss, the number of seeds and the mean seconds per run."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.rule, r.rank, r.source), []).append(r)
    out = []
    for (rule, rank, source), members in groups.items():
        acc_mean, acc_std, n = mean_std([100 * m.test_accuracy for m in members])
        out.append({"rule": rule, "rank": rank, "source": source, "n": n,
                    "test_accuracy_mean": acc_mean, "test_accuracy_std": acc_std,
                    "train_loss_mean": mean_std([m.train_loss for m in members])[0],
                    "seconds_mean": mean_std([m.seconds for m in members])[0]})
    return out


def format_table(rows: list[Row]) -> str:
    """The Markdown table of :func:`summarize`: per rule, rank (and source) the test accuracy mean ± std,
    the seeds, the final train loss and the seconds per run."""
    lines = ["| rule | rank | test accuracy (%) | seeds | final train loss | time per run (s) |",
             "|---|---|---|---|---|---|"]
    for g in summarize(rows):
        rule = g["rule"] + (f" (source: {g['source']})" if g["source"] else "")
        rank = ("-" if _no_feedback(g["rule"]) else "full") if g["rank"] is None else str(g["rank"])
        lines.append(f"| {rule} | {rank} | {g['test_accuracy_mean']:.2f} ± {g['test_accuracy_std']:.2f} | "
                     f"{g['n']} | {g['train_loss_mean']:.4f} | {g['seconds_mean']:.1f} |")
    return "\n".join(lines)


def save(rows: list[Row], prefix: str, meta: dict) -> list[str]:
    """Write ``PREFIX.json`` (rows + settings) and ``PREFIX.csv``, each atomically."""
    records = [asdict(r) for r in rows]
    write_json(prefix + ".json", {"settings": meta, "summary": summarize(rows), "rows": records})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]) if records else ["rule"])
    writer.writeheader()
    writer.writerows(records)
    write_text(prefix + ".csv", buf.getvalue())
    return [prefix + ".json", prefix + ".csv"]


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``raftorch compare``: the rules and ranks, the data, model and training settings, the
    seeds, ``--out`` / ``--force``, ``--threads`` and ``--no-progress``."""
    p.add_argument("--rules", type=_csv(str), default=DEFAULT_RULES,
                   help="comma-separated rules (bp, fa, kp, fa-lowrank, raf-q, raf, dfa, draf, and frozen: "
                        "the no-feedback control, only the output layer learns); "
                        f"default {','.join(DEFAULT_RULES)}")
    p.add_argument("--ranks", type=_csv(int), default=DEFAULT_RANKS,
                   help=f"ranks for the low-rank rules; default {','.join(map(str, DEFAULT_RANKS))}")
    p.add_argument("--data", default=None, choices=DATASETS,
                   help="dataset (default fashion-mnist where it is installed, else digits)")
    p.add_argument("--train-size", type=int, default=None,
                   help="a stratified subset of this many training images (default: 10000 on fashion-mnist, "
                        "all on digits)")
    p.add_argument("--model", default="mlp", choices=sorted(MODELS), help="model (default mlp)")
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a model option as KEY=VALUE (YAML value), repeatable: --model-option channels=8")
    p.add_argument("--data-dir", default=None, help="folder with the datasets (else $RAFTORCH_DATA, else ~/.cache/raftorch)")
    p.add_argument("--hidden", type=_csv(int), default=(256,) * 4,
                   help="hidden widths of the MLP (default 256,256,256,256)")
    p.add_argument("--epochs", type=int, default=None, help="default 10 on fashion-mnist, 30 on digits")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on fashion-mnist, 32 on digits")
    p.add_argument("--seeds", type=_csv(int), default=(0, 1, 2),
                   help="comma-separated seeds; the table shows mean ± std over them (default 0,1,2)")
    p.add_argument("--source", default="output",
                   help="dfa/draf: the module whose error is sent to earlier layers (default output)")
    p.add_argument("--out", default=None,
                   help="write OUT.json and OUT.csv (default results/compare-DATA-MODEL-HASH, named by the settings)")
    p.add_argument("--force", action="store_true", help="overwrite an --out that holds other settings")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the usable cores not already busy; recorded in OUT.json)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _listed(values) -> str:
    return ",".join(map(str, values))


def check_arguments(args) -> None:
    """Raise one ``ValueError`` for the first bad argument: what, the value given, the fix."""
    if not args.rules:
        raise ValueError(f"--rules is empty (it names no rule); give at least one, "
                         f"e.g. --rules {_listed(DEFAULT_RULES)}")
    for rule in args.rules:
        if rule not in DIRECT_RULES:
            get_rule(rule)  # an unknown name: its message lists the rules
    if not args.ranks:
        raise ValueError(f"--ranks is empty (it names no rank); give at least one, "
                         f"e.g. --ranks {_listed(DEFAULT_RANKS)}")
    if any(r <= 0 for r in args.ranks):
        raise ValueError(f"ranks must be positive integers, got --ranks {_listed(args.ranks)}; "
                         f"e.g. --ranks {_listed(DEFAULT_RANKS)}")
    if args.model == "mlp":
        if not args.hidden:
            raise ValueError("--hidden is empty: an MLP without hidden layers leaves no layer for the rules to "
                             "differ on; give the hidden widths, e.g. --hidden 256,256")
        if any(h <= 0 for h in args.hidden):
            raise ValueError(f"hidden widths must be positive whole numbers, got --hidden {_listed(args.hidden)}; "
                             f"e.g. --hidden 256,256")
    if (args.epochs is not None and args.epochs <= 0) or (args.batch_size is not None and args.batch_size <= 0):
        raise ValueError(f"--epochs and --batch-size must be positive, got --epochs {args.epochs} "
                         f"--batch-size {args.batch_size}")
    if not args.seeds or any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        given = _listed(args.seeds) or "''"
        raise ValueError(f"--seeds must be distinct non-negative whole numbers, got --seeds {given}; "
                         "e.g. --seeds 0,1,2")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be a positive whole number, got {args.threads}")


def run(args) -> int:
    """Run ``raftorch compare`` on ``--threads`` torch threads (default: the idle cores; restored after).
    Exit status 0 done, 1 a failure at run time, 2 a bad argument."""
    try:
        check_arguments(args)
    except ValueError as exc:
        print(f"raftorch compare: error: {exc}", file=sys.stderr)
        return 2
    from raftorch.training.threads import auto_threads

    before = torch.get_num_threads()
    torch.set_num_threads(args.threads or auto_threads())
    try:
        return _run(args)
    finally:
        torch.set_num_threads(before)


# settings that do not change the numbers (the rest names the default output)
_RUN_ONLY = ("out", "force", "threads", "no_progress", "data_dir")


def settings(args) -> dict:
    """The settings that decide the numbers, JSON-ready (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
            if not k.startswith("command") and k not in _RUN_ONLY}


def default_out(args) -> str:
    """The output prefix when ``--out`` is not given: ``results/compare-DATA-MODEL-HASH``, the hash over
    :func:`settings`."""
    digest = hashlib.sha256(json.dumps(settings(args), sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"results/compare-{args.data.replace(':', '_')}-{args.model}-{digest}"


def default_data(data_dir=None) -> tuple[str, str | None]:
    """``("fashion-mnist", None)`` where Fashion-MNIST is found (``data_dir``, ``$RAFTORCH_DATA``,
    the cache, the Debian package), else ``("digits", a line saying why)``."""
    from raftorch.training.data import find_fashion_mnist

    if find_fashion_mnist(data_dir) is None:
        return "digits", ("Fashion-MNIST is not installed, so this compares on scikit-learn's digits "
                          "(install Debian's dataset-fashion-mnist, or give --data fashion-mnist --download)")
    return "fashion-mnist", None


def _check_out(prefix: str, want: dict, force: bool) -> None:
    path = Path(prefix + ".json")
    if force or not path.exists():
        return
    try:
        have = {k: v for k, v in json.loads(path.read_text()).get("settings", {}).items() if k not in
                ("threads", "torch", *_RUN_ONLY)}
    except (OSError, ValueError, AttributeError):
        have = None
    if have != want:
        raise ValueError(f"{path} holds a comparison with other settings; choose another --out, "
                         f"or --force to overwrite it")


def _run(args) -> int:
    from raftorch.training.data import CorruptDatasetError, DatasetNotFoundError, dataset_shape
    from raftorch.training.cli import parse_pairs
    from raftorch.training.runlock import check_writable

    if args.data is None:
        args.data, note = default_data(args.data_dir)
        if note:
            print(f"raftorch compare: {note}", file=sys.stderr)
    preset = PRESETS.get(args.data.partition(":")[0], PRESETS["digits"])
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        if args.train_size is not None and args.train_size < 1:
            raise ValueError(f"--train-size must be a positive whole number of images, got {args.train_size}")
        if args.model != "mlp" and tuple(args.hidden) != (256,) * 4:
            raise ValueError(f"--hidden sets the MLP's widths; model {args.model!r} takes --model-option instead")
        options = parse_pairs(args.model_option, "--model-option")
        shape, classes = dataset_shape(args.data)
        build_model(args.model, shape, classes,  # bad model options: before any work
                    **({"hidden": tuple(args.hidden), **options} if args.model == "mlp" else options))
    except ValueError as exc:
        print(f"raftorch compare: error: {exc}", file=sys.stderr)
        return 2
    try:
        args.model_option = options
        out = args.out or default_out(args)
        check_writable(Path(out).parent)
        # one writer per OUT.json / OUT.csv, from the settings check to the last file written
        with runlock.hold(Path(out).parent, what="raftorch compare", lock_name=f".{Path(out).name}.lock",
                          label=out):
            _check_out(out, settings(args), args.force)
            rows = run_compare(rules=args.rules, ranks=args.ranks, dataset=args.data, hidden=args.hidden,
                               epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                               seed=args.seeds[0], seeds=args.seeds, source=args.source,
                               progress=not args.no_progress, data_dir=args.data_dir, model=args.model,
                               model_options=options, train_size=args.train_size)
            print(format_table(rows))
            meta = {**settings(args), "out": out, "threads": torch.get_num_threads(), "torch": torch.__version__}
            for path in save(rows, out, meta):
                print(f"wrote {path}")
    except (ValueError, DatasetNotFoundError, CorruptDatasetError, runlock.FolderInUse) as exc:
        print(f"raftorch compare: error: {exc}", file=sys.stderr)
        return 1
    return 0
