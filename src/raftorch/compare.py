"""``raftorch compare``: one MLP, several learning rules and ranks, one table.

Every run starts from the same initial weights (same seed) and sees the same batches, so the
rows differ only in how the error reaches the hidden layers.

    raftorch compare                              # digits, 4 x 256 MLP, bp/fa/fa-lowrank/raf
    raftorch compare --rules bp,raf --ranks 1,10 --epochs 20 --out results/compare
"""
from __future__ import annotations

import argparse
import csv
import io
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import raftorch
from raftorch.checkpoint import write_json, write_text
from raftorch.data import DATASETS, DataSplits, load_dataset
from raftorch.models.mlp import MLP
from raftorch.rules import DIRECT_RULES, get_rule
from raftorch.train import evaluate

DEFAULT_RULES = ("bp", "fa", "fa-lowrank", "raf")
DEFAULT_RANKS = (1, 2, 5, 10)


@dataclass
class Row:
    rule: str
    rank: int | None
    test_accuracy: float
    train_loss: float
    seconds: float
    source: str | None = None


def _is_low_rank(rule: str) -> bool:
    return (DIRECT_RULES.get(rule) or get_rule(rule)).low_rank


def plan(rules, ranks) -> list[tuple[str, int | None]]:
    """(rule, rank) pairs: every rank for a low-rank rule, one run for the others."""
    runs = []
    for rule in rules:
        runs += [(rule, r) for r in ranks] if _is_low_rank(rule) else [(rule, None)]
    return runs


def fit(model, data: DataSplits, *, epochs: int, lr: float, batch_size: int, seed: int,
        progress=None) -> float:
    """Adam on cross-entropy; returns the last epoch's mean training loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    model.train()
    loss_sum = 0.0
    for _ in range(epochs):
        loss_sum, order = 0.0, torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            x, y = data.x_train[idx], data.y_train[idx]
            loss = F.cross_entropy(model(x), y)
            raftorch.feed_targets(model, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
        if progress is not None:
            progress.update(1)
    return loss_sum / n


def run_compare(*, rules=DEFAULT_RULES, ranks=DEFAULT_RANKS, dataset="digits", hidden=(256,) * 4,
                epochs=30, lr=1e-3, batch_size=32, seed=0, source="output", progress=True,
                data: DataSplits | None = None, data_dir=None) -> list[Row]:
    """Train the same MLP once per (rule, rank) and return one :class:`Row` per run."""
    for rule in rules:
        if rule not in DIRECT_RULES:
            get_rule(rule)  # fail before any training on a bad name
    data = data or load_dataset(dataset, seed=seed, data_dir=data_dir)
    runs = plan(rules, ranks)
    rows = []
    bar = tqdm(total=len(runs) * epochs, desc="compare", unit="epoch", disable=not progress)
    for rule, rank in runs:
        torch.manual_seed(seed)
        model = MLP(data.input_shape, data.num_classes, hidden=hidden)
        torch.manual_seed(seed + 1)  # feedback weights drawn after the same forward weights
        extra = {"source": source} if rule in DIRECT_RULES else {}
        model = raftorch.convert(model, rule, rank, **extra)
        bar.set_postfix_str(f"{rule}" + (f" r={rank}" if rank else ""))
        start = time.perf_counter()
        loss = fit(model, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=bar)
        seconds = time.perf_counter() - start
        _, acc = evaluate(model, data.x_test, data.y_test, batch_size=1024)
        rows.append(Row(rule, rank, acc, loss, seconds, source if rule in DIRECT_RULES else None))
    bar.close()
    return rows


def format_table(rows: list[Row]) -> str:
    lines = ["| rule | rank | test accuracy | final train loss | time (s) |",
             "|---|---|---|---|---|"]
    for r in rows:
        rule = r.rule + (f" (source: {r.source})" if r.source else "")
        rank = "full" if r.rank is None else str(r.rank)
        lines.append(f"| {rule} | {rank} | {100 * r.test_accuracy:.2f}% | {r.train_loss:.4f} | {r.seconds:.1f} |")
    return "\n".join(lines)


def save(rows: list[Row], prefix: str, meta: dict) -> list[str]:
    """Write ``PREFIX.json`` (rows + settings) and ``PREFIX.csv``, each atomically."""
    records = [asdict(r) for r in rows]
    write_json(prefix + ".json", {"settings": meta, "rows": records})
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
    p.add_argument("--rules", type=_csv(str), default=DEFAULT_RULES,
                   help="comma-separated rules (bp, fa, kp, fa-lowrank, raf-q, raf, dfa, draf); "
                        f"default {','.join(DEFAULT_RULES)}")
    p.add_argument("--ranks", type=_csv(int), default=DEFAULT_RANKS,
                   help=f"ranks for the low-rank rules; default {','.join(map(str, DEFAULT_RANKS))}")
    p.add_argument("--data", default="digits", choices=DATASETS, help="dataset (default digits)")
    p.add_argument("--data-dir", default=None, help="folder with the datasets (else $RAFTORCH_DATA, else ~/.cache/raftorch)")
    p.add_argument("--hidden", type=_csv(int), default=(256,) * 4, help="hidden widths (default 256,256,256,256)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default="output",
                   help="dfa/draf: the module whose error is sent to earlier layers (default output)")
    p.add_argument("--out", default="results/compare",
                   help="write OUT.json and OUT.csv (default results/compare)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the usable cores not already busy; recorded in OUT.json)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    if args.epochs <= 0 or args.batch_size <= 0:
        raise SystemExit("raftorch compare: --epochs and --batch-size must be positive")
    if any(r <= 0 for r in args.ranks):
        raise SystemExit(f"raftorch compare: ranks must be positive integers, got {args.ranks}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"raftorch compare: --threads must be a positive whole number, got {args.threads}")
    from raftorch.train import auto_threads

    before = torch.get_num_threads()
    torch.set_num_threads(args.threads or auto_threads())
    try:
        return _run(args)
    finally:
        torch.set_num_threads(before)


def _run(args) -> int:
    from pathlib import Path

    from raftorch.data import CorruptDatasetError, DatasetNotFoundError
    from raftorch.train import check_writable

    try:
        check_writable(Path(args.out).parent)
        rows = run_compare(rules=args.rules, ranks=args.ranks, dataset=args.data, hidden=args.hidden,
                           epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                           seed=args.seed, source=args.source, progress=not args.no_progress,
                           data_dir=args.data_dir)
    except (ValueError, DatasetNotFoundError, CorruptDatasetError) as exc:
        raise SystemExit(f"raftorch compare: {exc}")
    print(format_table(rows))
    meta = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    meta.update(threads=torch.get_num_threads(), torch=torch.__version__)
    for path in save(rows, args.out, meta):
        print(f"wrote {path}")
    return 0
