"""The ``raftorch`` command line.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# name -> (module, one-line help)
COMMANDS = {
    "compare": ("raftorch.training.compare", "train one MLP with several rules and ranks, print a table"),
    "train": ("raftorch.training.cli", "train one model on one dataset with one rule"),
    "theory": ("raftorch.theory.cli", "linear-network theory: simulations, ODEs, Figure 2"),
    "reproduce": ("raftorch.experiments.cli", "reproduce the paper's panels by name: sweeps, figures, claims"),
    "plot": ("raftorch.analysis.curves", "training curves of run folders: loss, accuracy, alignment, subspace"),
    "analyze": ("raftorch.analysis.cli", "receptive fields of a finished run and their scores (Fig. 4d)"),
}


class Parser(argparse.ArgumentParser):
    """argparse's parser, except that a bad command line gets one line on stderr (what was
    wrong, and where the help is) and exit status 2, not the usage block and then the error;
    the subcommands' parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        self.flags: list[str] = []  # every --flag, for the "did you mean" hint
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.flags += [o for o in action.option_strings if o.startswith("--")]
        return action

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``raftorch`` parser: ``--version`` and a subcommand per :data:`COMMANDS` entry, with the flags its
    module's ``add_arguments`` adds (a command whose module is missing is marked ``command_missing``)."""
    parser = Parser(
        prog="raftorch",
        description="Train neural networks with low-dimensional error feedback (RAF).",
    )
    from raftorch import __version__

    parser.add_argument("--version", action="version", version=f"raftorch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(command_module=module, command_parser=p)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:  # a subcommand whose module is not written yet
            if exc.name is None or not module.startswith(exc.name):
                raise
            p.set_defaults(command_missing=True)
    return parser


def _show_progress_messages() -> None:
    """raftorch's INFO messages (such as the one-time ~30 s compile of the C++ fast path) go to
    stderr, so a command never stalls silently; a program using the library sets up logging
    itself."""
    log = logging.getLogger("raftorch")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("raftorch: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message comes (not when it was made), through
    ``tqdm.write``, so a message that comes while a progress bar is drawn (the one-time build
    of the C++ fast path, on the first training step) gets its own line above the bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _unrecognized(parser: Parser, extra: list[str]) -> None:
    import difflib

    flags = parser.flags
    first = next((e.split("=")[0] for e in extra if e.startswith("-")), None)
    close = difflib.get_close_matches(first, flags, n=1) if first else []
    hint = f" (did you mean {close[0]}?)" if close else ""
    parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def main(argv: list[str] | None = None) -> int:
    """The ``raftorch`` command: parse ``argv`` (default: the process's arguments) and return the exit status
    of the chosen command's ``run`` (2 without a command or on a ``ValueError`` it left uncaught)."""
    _show_progress_messages()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand's parser, with the flag meant when one is close
        _unrecognized(getattr(args, "command_parser", parser), extra)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "command_missing", False):
        parser.error(f"the '{args.command}' command is not available in this version")
    try:
        return int(importlib.import_module(args.command_module).run(args) or 0)
    except ValueError as exc:  # a bad setting a subcommand did not catch itself: one line, no traceback
        print(f"raftorch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `raftorch ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
