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
import enum
import importlib
import json
import os
from pathlib import Path

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.stages import by_words

TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def make_parser(words: tuple[str, ...]):
    """The parser of one sub-command: TrlParser over its dataclasses, with one-line errors and defaults in the help."""
    from trl import TrlParser

    entry = by_words(words)
    module = importlib.import_module(entry.module)
    types = [getattr(module, name) for name in entry.arguments]

    class Parser(TrlParser):
        def error(self, message):  # argparse prints its usage block and exits; one line says more
            raise ConceptCapsError(f"{self.prog}: {message} (`{self.prog} --help` lists the options).")

    parser = Parser(types, prog=f"conceptcaps {' '.join(words)}", description=(module.__doc__ or entry.help).strip(),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    for action in parser._actions:
        # HfArgumentParser gives a bool option's `--no_x` twin the help of `--x`; say what it does.
        flag = action.option_strings[0] if action.option_strings else ""
        if flag.startswith("--no_") and action.const is False:
            action.help = f"Same as --{flag[len('--no_'):]} false."
        elif flag and action.help is not argparse.SUPPRESS and action.default is not argparse.SUPPRESS \
                and not action.required and "default:" not in (action.help or "").lower():
            # Why: a user deciding whether to pass a flag needs what happens without it.
            shown = show_default(action.default).replace("%", "%%")  # argparse %-formats help strings
            action.help = f"{action.help or ''} (default: {shown})".lstrip()
    return parser


def show_default(value) -> str:
    """A default as the flag would take it: `true`, `1000`, `a b` for a list, `not set` for None.

    >>> show_default(None), show_default(True), show_default([]), show_default(["rock", "jazz"]), show_default(0.5)
    ('not set', 'true', 'none', 'rock jazz', '0.5')
    """
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(show_default(v) for v in value) if value else "none"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


CONFIG_LIMIT = 1 << 20  # bytes: a file of options is a few lines; a larger one is a mistake or an attack


def _strict_loader():
    """yaml.SafeLoader that refuses aliases (`*name`: a few lines could expand to gigabytes) and duplicate keys
    (the later one would silently win)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.constructor.ConstructorError(
                    None, None, f"alias *{event.anchor} (aliases are not accepted in option files: write the value)",
                    event.start_mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # a list or mapping as a key: reported as not a mapping of options below
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (keep one)", key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return Loader


def _check_finite(value, where: str) -> None:
    import math

    if isinstance(value, float) and not math.isfinite(value):
        raise ConceptCapsError(f"{where} = {value}: give a finite number (not .inf or .nan).")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}: {key}")
    elif isinstance(value, list):
        for item in value:
            _check_finite(item, where)


def read_config(path: str | os.PathLike) -> dict:
    """A `--config` YAML file as a mapping, with one clear error for a missing, oversized or malformed file.

    Checked before any work: at most CONFIG_LIMIT bytes, no aliases, no duplicate keys, finite numbers.
    """
    import yaml

    path = Path(path)
    try:
        if path.is_dir() or (path.exists() and not path.is_file()):
            raise ConceptCapsError(f"--config {path} is not a file: pass the path of a YAML file of options.")
        size = path.stat().st_size
        if size > CONFIG_LIMIT:
            raise ConceptCapsError(f"--config {path} has {size} bytes, more than an option file's {CONFIG_LIMIT}: "
                                   f"pass the right file.")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConceptCapsError(f"--config {path} not found: pass the path of a YAML file of options.") from None
    except UnicodeDecodeError:
        raise ConceptCapsError(f"--config {path} is not UTF-8 text: re-encode it as UTF-8.") from None
    except OSError as err:
        raise ConceptCapsError(f"--config {path} cannot be read ({err.strerror}).") from None
    try:
        config = yaml.load(text, Loader=_strict_loader())  # a SafeLoader subclass: no Python objects
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConceptCapsError(f"--config {path} is not valid YAML{line} ({getattr(err, 'problem', None) or err}): "
                               f"fix the file (one `option: value` per line).") from None
    except RecursionError:
        raise ConceptCapsError(f"--config {path} is nested too deeply: write one `option: value` per line.") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConceptCapsError(f"--config {path} holds a {type(config).__name__}, not a mapping of options: write one "
                               f"`option: value` per line.")
    _check_finite(config, f"--config {path}")
    return config


ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,127}"


def apply_env(env, path: str) -> None:
    """A config file's `env:` mapping (as TrlParser): names like HF_HOME, scalar values; all checked, then set."""
    import re

    if not isinstance(env, dict):
        raise ConceptCapsError(f"--config {path}: `env` must map variable names to values.")
    for name, value in env.items():
        if not isinstance(name, str) or not re.fullmatch(ENV_NAME, name):
            raise ConceptCapsError(f"--config {path}: `env` key {name!r} is not a variable name (letters, digits and _, "
                                   f"not starting with a digit).")
        if not isinstance(value, (str, int, float, bool)) or "\x00" in str(value) or len(str(value)) > 4096:
            raise ConceptCapsError(f"--config {path}: `env` value of {name} must be one short text or number.")
    for name, value in env.items():
        os.environ[name] = str(value)


def check_values(instances) -> None:
    """Every float option finite, and --run a folder (or a new name) of a valid length: before any work."""
    import dataclasses
    import math

    for instance in instances:
        if not dataclasses.is_dataclass(instance):
            continue
        for item in dataclasses.fields(instance):
            value = getattr(instance, item.name)
            values = value if isinstance(value, (list, tuple)) else [value]
            for one in values:
                if isinstance(one, float) and not math.isfinite(one):
                    raise ConceptCapsError(f"--{item.name} {one}: give a finite number.")
        run = getattr(instance, "run", None)
        if isinstance(run, str) and run:
            _check_run(run)
        if isinstance(getattr(instance, "id_prefix", None), str):
            from conceptcaps_pipeline.run_dir import check_id

            check_id(instance.id_prefix, "--id_prefix")
        if isinstance(getattr(instance, "repo_id", None), str):
            # The Hub's own rule (huggingface_hub.validate_repo_id): also what keeps markup out of the card.
            from conceptcaps_pipeline.release.push import check_repo_id

            check_repo_id(instance.repo_id)


def _check_run(run: str) -> None:
    path = Path(run)
    if "\x00" in run or len(os.fsencode(run)) > 4096 or any(len(os.fsencode(part)) > 255 for part in path.parts):
        raise ConceptCapsError(f"--run {run[:80]!r}{'...' if len(run) > 80 else ''}: a folder name is at most 255 bytes "
                               f"(a path 4096): give a shorter run directory.")
    if path.exists() and not path.is_dir():
        raise ConceptCapsError(f"--run {run}: it is not a folder: give a run directory (or a new name for one).")


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
    # --config FILE or --config=FILE, once.
    given = [i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
    if len(given) > 1:
        raise ConceptCapsError(f"{parser.prog}: --config is given {len(given)} times: pass one file (merge the options "
                               f"into it, or override single options with flags).")
    if given:
        at = given[0]
        if argv[at].startswith("--config="):
            path, width = argv[at][len("--config="):], 1
        elif at + 1 < len(argv) and not argv[at + 1].startswith("--"):
            path, width = argv[at + 1], 2
        else:
            path, width = "", 1
        if not path:
            raise ConceptCapsError(f"{parser.prog}: --config needs the path of a YAML file.")
        del argv[at:at + width]
        config = read_config(path)
        env = config.pop("env", None) or {}
        apply_options(parser, config, f"--config {path}")
        apply_env(env, path)  # as TrlParser: `env:` sets environment variables (after every check of the file)
    *instances, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        flags = [a for a in unknown if a.startswith("-")] or unknown
        known = [opt for action in parser._actions for opt in action.option_strings]
        close = difflib.get_close_matches(flags[0], known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConceptCapsError(f"{parser.prog}: unknown option {flags[0]!r}{hint} (`{parser.prog} --help` lists the "
                               f"options).")
    check_values(instances)
    return instances
