"""What every ``rllc`` subcommand's arguments share: value types with errors that say what is accepted, the
help formatter that shows each default, and reading negative numbers as option values."""
from __future__ import annotations

import argparse
from typing import List


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to each option's help unless its help already says its default or it has
    none to show (None, False: flags and "automatic" values are described in their help)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default is None or default is False or default is argparse.SUPPRESS
                or not action.option_strings or default == []):
            return text
        return f"{text} (default: {default})" if text else f"(default: {default})"


def apply_formatter(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and all its subcommands' parsers (nested too) the ``DefaultsHelpFormatter``, and turn
    off abbreviated flags: ``--step-size`` must not silently mean ``calibrate``'s ``--step-sizes``, nor
    ``--step`` ``sweep``'s ``--steps``."""
    parser.formatter_class = DefaultsHelpFormatter
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                apply_formatter(sub)


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (argparse type)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
    return value


def batch_size(text: str):
    """Contexts per SGLD minibatch: an integer >= 1, or ``full`` (None: every context at every step)."""
    if str(text).strip().lower() == "full":
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 1 (contexts per minibatch) or 'full' (every context at every step), got {text!r}")
    return value


def steps(text: str):
    """Checkpoint steps ``0,1000,5000`` or an inclusive range ``1000:5000`` (see ``parse_steps``)."""
    from ..models.checkpoints import parse_steps

    try:
        parse_steps(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def join_negative_values(parser: argparse.ArgumentParser, argv: List[str]) -> List[str]:
    """``--flag -1e-3`` -> ``--flag=-1e-3`` for every option that takes one value, so that a negative number in
    any notation reaches the option's own validation (argparse takes ``-1e-3`` for an option otherwise)."""
    takes_value = set()

    def collect(p) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    collect(sub)
            elif action.nargs is None and action.option_strings and not isinstance(
                    action, (argparse._StoreConstAction, argparse._StoreTrueAction, argparse._StoreFalseAction,
                             argparse._CountAction, argparse._HelpAction, argparse._VersionAction)):
                takes_value.update(s for s in action.option_strings if s.startswith("--"))

    collect(parser)
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-") and _is_number(argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
