"""The ``rllc`` command line: ``main`` runs one command, ``build_parser`` is its argument parser. One module per
command (``estimate``, ``sweep``, ``plot``, ``demo``, ``train_toy``, ``analyze``, ``export``, ``upgrade_store``,
``calibrate``, ``info``), each with ``add_parser(sub)`` and ``run(args)``; what they share is in ``common`` (data,
checkpoints, SGLD flags, stores, exit statuses) and ``args`` (value types, the help formatter); ``config_file``
reads ``--config``.

Every subcommand takes ``--config FILE`` (TOML or YAML) whose keys are its long flags (``step-size``
or ``step_size``); flags given on the command line win over the file."""
from __future__ import annotations

import argparse
import sys

from ..progress import close_bars, is_terminal, quiet_libraries
from . import analyze, calibrate, demo, estimate, export, info, plot, sweep, train_toy, upgrade_store
from .args import apply_formatter, join_negative_values
from .common import EXIT_INTERRUPTED
from .config_file import apply_config_file

#: The subcommands' modules, in the order of ``rllc --help``.
COMMANDS = (estimate, sweep, plot, demo, train_toy, analyze, export, upgrade_store, calibrate, info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rllc", description="Refined local learning coefficients, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    for p in sub.choices.values():
        p.add_argument("--config", metavar="FILE", help="TOML or YAML file of flag values (command-line flags win)")
    apply_formatter(parser)
    return parser


def main(argv=None) -> int:
    """Run one ``rllc`` command; return its exit status (130 after Ctrl-C, with one line saying so)."""
    parser = build_parser()
    argv = join_negative_values(parser, list(sys.argv[1:] if argv is None else argv))
    apply_config_file(parser, argv)
    args = parser.parse_args(argv)
    quiet = bool(getattr(args, "quiet", False))
    try:
        # transformers' own bars (loading weights) show only on a terminal and without --quiet
        with quiet_libraries(bars=quiet or not is_terminal(), warnings=quiet):
            return args.func(args)
    except KeyboardInterrupt:
        close_bars()
        print(f"rllc {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED

