"""argparse + a YAML file with the same names: one set of flags for recipes and the `dpdiff` command.

A recipe's YAML (`--config run.yaml`) holds the same keys as its flags (`num_per_class: 100` for
`--num_per_class 100`). Precedence: flags given on the command line > the YAML > the parser's
defaults. A YAML key that is not a flag is an error (a typo must not silently fall back to a
default, e.g. a misspelt `noise_multiplier`), and YAML values are checked with the flag's own
`type` and `choices`.

To tell "given on the command line" from "left at its default" even when the two are equal, every
action records its `dest` on the namespace when argparse invokes it.

    parser = argparse.ArgumentParser(); parser.add_argument("--seed", type=int, default=0)
    args = parse_with_config(parser, ["--config", "run.yaml", "--seed", "3"])

For a subcommand whose namespace is parsed elsewhere (`dpdiff sample ...`): call
`add_config_argument(parser)` after adding the flags, then `apply_config(parser, args)` in `run`.
"""

from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from dpdiff.errors import ConfigError

CONFIG_DEST = "config"
EXPLICIT_ATTR = "_dpdiff_explicit_flags"
_RECORDING_CLASSES: dict[type, type] = {}


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """Add `--config PATH` and start recording which flags the command line sets.

    Call it after the parser's other arguments are added (it tracks the actions present now)."""
    if not any(a.dest == CONFIG_DEST for a in parser._actions):
        parser.add_argument(
            "--config",
            default=None,
            metavar="PATH",
            help="YAML file whose keys are this command's flag names; flags on the command line win",
        )
    track_explicit_flags(parser)


def track_explicit_flags(parser: argparse.ArgumentParser) -> None:
    """Make every action of `parser` note its dest on the namespace when the command line uses it."""
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        action.__class__ = _recording_class(type(action))


def _recording_class(cls: type) -> type:
    if getattr(cls, "_dpdiff_records", False):
        return cls
    if cls not in _RECORDING_CLASSES:

        def __call__(self, parser, namespace, values, option_string=None):
            cls.__call__(self, parser, namespace, values, option_string)
            explicit = set(getattr(namespace, EXPLICIT_ATTR, ()))
            explicit.add(self.dest)
            setattr(namespace, EXPLICIT_ATTR, explicit)

        _RECORDING_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_dpdiff_records": True})
    return _RECORDING_CLASSES[cls]


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv` (default: sys.argv[1:]); values from `--config` fill every flag not given on the CLI.

    A flag marked `required=True` may come from the YAML instead of the command line."""
    add_config_argument(parser)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    from_yaml = load_config(known.config) if known.config else {}
    # argparse checks `required` before we can merge the YAML: relax it for keys the YAML sets
    relaxed = [a for a in parser._actions if a.required and a.dest in _normalised_keys(from_yaml)]
    for action in relaxed:
        action.required = False
    try:
        args = parser.parse_args(argv)
    finally:
        for action in relaxed:
            action.required = True
    return apply_config(parser, args)


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Merge `args.config` (if any) into `args` under the precedence CLI > YAML > defaults.

    Idempotent: the record of explicit flags is consumed by the first merge (a namespace parsed
    with `--config` always has one, since `--config` itself was given), so a second call is a no-op."""
    path = getattr(args, CONFIG_DEST, None)
    if not hasattr(args, EXPLICIT_ATTR):
        if path and not _is_tracked(parser):
            raise ConfigError("internal: call add_config_argument(parser) after adding the flags, before parsing")
        return args
    explicit = set(getattr(args, EXPLICIT_ATTR))
    delattr(args, EXPLICIT_ATTR)
    if not path:
        return args
    values = validate_config(parser, load_config(path), source=str(path))
    for dest, value in values.items():
        if dest not in explicit:
            setattr(args, dest, value)
    return args


def _is_tracked(parser: argparse.ArgumentParser) -> bool:
    return any(a.dest == CONFIG_DEST and getattr(type(a), "_dpdiff_records", False) for a in parser._actions)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file with --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of flag names to values, got a {type(data).__name__}")
    return data


def config_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The flags a YAML may set, by dest (help, --config and subcommands excluded)."""
    out = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in (CONFIG_DEST, argparse.SUPPRESS):
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        out[action.dest] = action
    return out


def validate_config(parser: argparse.ArgumentParser, data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Map YAML keys to dests and convert each value like argparse would; unknown keys are errors."""
    actions = config_actions(parser)
    values = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            message = unknown_flag_message(dest, actions, getattr(parser, "refused_flags", None), what="key")
            raise ConfigError(f"{source}: {message}")
        values[dest] = _convert(actions[dest], value, f"{source}: {key}")
    return values


def args_from_dict(parser: argparse.ArgumentParser, values: dict[str, Any], source: str = "arguments") -> argparse.Namespace:
    """The namespace the command line would give for these flag values, for calling a recipe from
    Python: names are the flag names, values are checked and converted as a YAML config's are
    (paths may be `Path`s), unset flags keep their defaults."""
    values = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in values.items()}
    actions = config_actions(parser)
    args = argparse.Namespace(**{dest: action.default for dest, action in actions.items()})
    for dest, value in validate_config(parser, values, source).items():
        setattr(args, dest, value)
    missing = [a.option_strings[0] for a in actions.values() if a.required and getattr(args, a.dest) is None]
    if missing:
        raise ConfigError(f"{source}: {', '.join(missing)} must be set")
    return args


def _normalised_keys(data: dict[str, Any]) -> set[str]:
    return {str(k).replace("-", "_") for k in data}


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(action, (argparse._StoreConstAction, argparse._AppendConstAction, argparse._CountAction)):
        raise ConfigError(f"{where}: flag {action.option_strings[0]} takes no value and cannot be set from a YAML file")
    many = isinstance(action, (argparse._AppendAction, argparse._ExtendAction)) or action.nargs not in (None, "?")
    if many:
        items = value if isinstance(value, list) else [value]
        return [_convert_one(action, v, where) for v in items]
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{where} takes a single value, got {value!r}")
    return _convert_one(action, value, where)


def _convert_one(action: argparse.Action, value: Any, where: str) -> Any:
    kind = action.type
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and _is_int(value))):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        value = int(value)
    elif kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    elif kind is not None and isinstance(value, str):
        try:
            value = kind(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"{where}: invalid value {value!r} ({e})") from None
    elif kind is None and not isinstance(value, str):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where} must be one of {list(action.choices)}, got {value!r}")
    return value


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def run_command(name: str, args: argparse.Namespace, parser: argparse.ArgumentParser | None, add_arguments, body) -> int:
    """The shared shell of every `dpdiff <name>` subcommand and recipe: apply `--config`, run `body(args)`,
    and turn a user error into one line on stderr and exit code 2.

    `parser` is None when the `dpdiff` dispatcher parsed `args`; the flag table is then rebuilt with
    `add_arguments` so the YAML can be checked against it."""
    import sys

    from dpdiff.errors import DPDiffError

    if parser is None:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
    try:
        return body(apply_config(parser, args))
    except DPDiffError as err:
        print(f"dpdiff {name}: error: {err}", file=sys.stderr)
        return 2


def closest_flag(name: str, known) -> str | None:
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_flag_message(name: str, known, refused: dict | None = None, what: str = "flag") -> str:
    """One line: why a refused flag (a diffusers name dpdiff does not take) is refused, or the closest known
    name to an unknown one. `what`: "flag" (command line, --name) or "key" (YAML, 'name')."""
    name = name.split("=", 1)[0].lstrip("-").replace("-", "_")
    if refused and name in refused:
        return f"--{name} is not supported: {refused[name]}"
    close = closest_flag(name, known)
    shown, suggestion = (f"--{name}", f"--{close}") if what == "flag" else (repr(name), repr(close))
    hint = f"did you mean {suggestion}?" if close else f"--help lists the {what}s"
    return f"unknown {what} {shown}; {hint} (diffusers' names: docs/recipes.md)"


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    return {s.lstrip("-").replace("-", "_") for a in parser._actions for s in a.option_strings if s.startswith("--")}


class FlagParser(argparse.ArgumentParser):
    """argparse with one-line errors: an unknown flag names the closest known one of the (sub)command that
    was given (or why a diffusers flag is refused) instead of a usage dump."""

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            active = self._active(parsed)
            flag = next((e for e in extra if e.startswith("-")), None)
            if flag is None:
                active.error(f"unexpected argument {extra[0]!r} (flags are written --name value)")
            active.error(unknown_flag_message(flag, option_names(active), getattr(active, "refused_flags", None)))
        return parsed

    def _active(self, namespace) -> argparse.ArgumentParser:
        """The parser of the subcommand that was chosen (itself when there is none)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(namespace, action.dest, None) or "")
                if chosen is not None:
                    return chosen._active(namespace) if isinstance(chosen, FlagParser) else chosen
        return self

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
