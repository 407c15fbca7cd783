"""``--config FILE`` of every ``rllc`` subcommand: a TOML or YAML file whose keys are the subcommand's long
flags (``step-size`` or ``step_size``), read into its defaults through the flags' own type and choices checks;
flags given on the command line win over the file."""
from __future__ import annotations

import argparse
import os


def _read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"rllc: --config {path} does not exist")
    with open(path, "rb") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(f) or {}
        else:
            import tomllib

            try:
                values = tomllib.load(f)
            except tomllib.TOMLDecodeError as err:
                raise SystemExit(f"rllc: --config {path}: not valid TOML: {err}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"rllc: --config {path}: expected a table of flag = value")
    return values


def _config_path(argv) -> str | None:
    """The value of ``--config`` in ``argv`` (``--config F`` or ``--config=F``), without parsing the rest."""
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def apply_config_file(parser, argv) -> None:
    """Load ``--config`` into the subcommand's defaults (and lift ``required`` for the keys it sets)."""
    path = _config_path(argv)
    sub = parser._subparsers._group_actions[0].choices.get(argv[0]) if argv else None
    if path is None or sub is None:
        return
    dests = {a.dest for a in sub._actions if a.dest not in ("help", "config")}
    values = {k.replace("-", "_"): v for k, v in _read_config_file(path).items()}
    unknown = sorted(set(values) - dests)
    if unknown:
        raise SystemExit(f"rllc {argv[0]}: --config {path}: unknown key(s) {unknown}; valid: {sorted(dests)}")
    for action in sub._actions:
        if action.dest in values:
            action.required = False
            if isinstance(action, argparse._AppendAction) and not isinstance(values[action.dest], list):
                values[action.dest] = [values[action.dest]]
            values[action.dest] = _checked_config_value(action, values[action.dest], f"rllc {argv[0]}: --config {path}")
    sub.set_defaults(**values)


def _checked_config_value(action, value, where: str):
    """A config file's ``value`` for ``action``, through the same type and choices checks as on the command line."""
    items = value if isinstance(value, list) else [value]
    key = action.option_strings[0].lstrip("-") if action.option_strings else action.dest
    try:
        if action.type is not None:
            items = [action.type(str(v)) for v in items]
    except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
        raise SystemExit(f"{where}: {key} = {value!r}: {err or 'not a valid value'}") from None
    if action.choices is not None and any(v not in action.choices for v in items):
        raise SystemExit(f"{where}: {key} = {value!r}: choose from {list(action.choices)}")
    return items if isinstance(value, list) else items[0]
