"""Options of a stage from the command line, a `--config` YAML file or a preset section, checked alike.

    from conceptcaps_pipeline.options import parse_options
    args, = parse_options(("vae", "sample"), ["--run", "runs/demo", "--config", "sample.yaml", "--n", "50"])
    args, = parse_options(("vae", "sample"), [], options={"run": "runs/demo", "min-per-tag": 20})

The parser is TRL's (`TrlParser`, an `HfArgumentParser`), so every dataclass field is a flag and
the values convert the way the flags do. On top of it: YAML keys may be spelt with dashes like
the flags (`min-per-tag`) or with underscores; an unknown key is refused with the closest known
ones; every value from a file or preset is converted and checked as if it had been typed on the
command line (an `int` option given `abc` or `[1, 2]` is an error, not a surprise three stages
later); and every parse error is one `ConceptCapsError` line instead of argparse's usage block.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
from pathlib import Path

from conceptcaps_pipeline.errors import ConceptCapsError

TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def make_parser(words: tuple[str, ...]):
    """The parser of one sub-command: TrlParser over its dataclasses, with one-line errors."""
    from trl import TrlParser

    from conceptcaps_pipeline.cli import COMMANDS

    module_name, _, class_names, help_line = COMMANDS[words]
    module = importlib.import_module(module_name)
    types = [getattr(module, name) for name in class_names]

    class Parser(TrlParser):
        def error(self, message):  # argparse prints its usage block and exits; one line says more
            raise ConceptCapsError(f"{self.prog}: {message} (`{self.prog} --help` lists the options).")

    parser = Parser(types, prog=f"conceptcaps {' '.join(words)}", description=(module.__doc__ or help_line).strip(),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    for action in parser._actions:
        # HfArgumentParser gives a bool option's `--no_x` twin the help of `--x`; say what it does.
        flag = action.option_strings[0] if action.option_strings else ""
        if flag.startswith("--no_") and action.const is False:
            action.help = f"Same as --{flag[len('--no_'):]} false."
    return parser


def read_config(path: str | os.PathLike) -> dict:
    """A `--config` YAML file as a mapping, with one clear error for a missing or malformed file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConceptCapsError(f"--config {path} not found: pass the path of a YAML file of options.") from None
    except UnicodeDecodeError:
        raise ConceptCapsError(f"--config {path} is not UTF-8 text: re-encode it as UTF-8.") from None
    except OSError as err:
        raise ConceptCapsError(f"--config {path} cannot be read ({err.strerror}).") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConceptCapsError(f"--config {path} is not valid YAML{line} ({getattr(err, 'problem', None) or err}): "
                               f"fix the file (one `option: value` per line).") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConceptCapsError(f"--config {path} holds a {type(config).__name__}, not a mapping of options: write one "
                               f"`option: value` per line.")
    return config


def _convert(action, key: str, value, where: str):
    """`value` as the flag `--key` would have parsed it, or one clear error."""
    if value is None:
        return None
    converter = action.type
    if action.nargs in ("+", "*") or isinstance(action.default, list):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_convert_one(converter, action, key, item, where) for item in items]
    if isinstance(value, (list, tuple, dict)) and converter is not json.loads:
        raise ConceptCapsError(f"{where}: {key} = {value!r} is a {type(value).__name__}; give one value.")
    return _convert_one(converter, action, key, value, where)


def _convert_one(converter, action, key: str, value, where: str):
    name = getattr(converter, "__name__", "")
    try:
        if converter is None or converter is str:
            if isinstance(value, (dict, list)):
                raise ValueError("not a single value")
            converted = value if isinstance(value, str) else str(value)
        elif name == "string_to_bool":
            if isinstance(value, bool):
                converted = value
            elif str(value).lower() in TRUE + FALSE:
                converted = str(value).lower() in TRUE
            else:
                raise ValueError("not true or false")
        elif converter in (int, float):
            if isinstance(value, (bool, dict, list)):
                raise ValueError("not a number")
            converted = converter(value) if not isinstance(value, str) else converter(value.strip())
            if converter is int and isinstance(value, float) and value != int(value):
                raise ValueError("not a whole number")
        elif converter is json.loads and not isinstance(value, str):
            converted = value
        else:
            converted = converter(value if isinstance(value, str) else str(value))
    except (TypeError, ValueError, json.JSONDecodeError) as err:
        kind = {int: "an integer", float: "a number"}.get(converter, "true or false" if name == "string_to_bool" else
                                                           getattr(converter, "__name__", "a value"))
        raise ConceptCapsError(f"{where}: {key} = {value!r} is not {kind} ({err}).") from None
    if action.choices is not None and converted not in action.choices:
        raise ConceptCapsError(f"{where}: {key} = {value!r} is not one of {list(action.choices)}.")
    return converted


def apply_options(parser, options: dict, where: str) -> None:
    """Set `options` (a config file's or preset's mapping) as the parser's defaults, checked like flags."""
    actions: dict[str, list] = {}
    aliases: dict[str, str] = {}  # a flag's other spellings (`--out` for `--run`) work as keys too
    for action in parser._actions:
        if action.dest != "help":
            actions.setdefault(action.dest, []).append(action)  # a bool flag has a --no_ twin on the same dest
            if action.const is not False:
                aliases.update({o.lstrip("-").replace("-", "_"): action.dest for o in action.option_strings})
    for key, value in options.items():
        dest = str(key).replace("-", "_")
        dest = aliases.get(dest, dest)
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConceptCapsError(f"{where}: unknown option {key!r}{hint} (`{parser.prog} --help` lists the options).")
        converted = _convert(actions[dest][0], dest, value, where)
        for action in actions[dest]:
            action.default = converted
            action.required = False


def parse_options(words: tuple[str, ...], argv: list[str] | None = None, options: dict | None = None,
                  where: str = "preset section"):
    """The dataclass instances of a sub-command from `options` (a preset section), `--config` and `argv`.

    Later sources win: options, then the `--config` file, then the flags of `argv`.
    """
    parser = make_parser(words)
    argv = list(argv or [])
    if options:
        apply_options(parser, options, where)
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ConceptCapsError(f"{parser.prog}: --config needs the path of a YAML file.")
        path = argv[at + 1]
        del argv[at:at + 2]
        config = read_config(path)
        env = config.pop("env", None) or {}
        if not isinstance(env, dict):
            raise ConceptCapsError(f"--config {path}: `env` must map variable names to values.")
        for name, value in env.items():  # as TrlParser: `env:` sets environment variables
            os.environ[str(name)] = str(value)
        apply_options(parser, config, f"--config {path}")
    *instances, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        flags = [a for a in unknown if a.startswith("-")] or unknown
        known = [opt for action in parser._actions for opt in action.option_strings]
        close = difflib.get_close_matches(flags[0], known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConceptCapsError(f"{parser.prog}: unknown option {flags[0]!r}{hint} (`{parser.prog} --help` lists the "
                               f"options).")
    return instances
