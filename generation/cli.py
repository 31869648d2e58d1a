"""The `conceptcaps` command: one sub-command per pipeline stage.

    conceptcaps --help
    conceptcaps --version
    conceptcaps env                      # versions, devices and paths, for a bug report
    conceptcaps vae                      # a group lists its commands
    conceptcaps distill --help
    conceptcaps vae train --run runs/demo --epochs 150

Every sub-command parses its dataclass(es) of arguments the TRL way: `--config FILE.yaml`
gives defaults, command-line flags override them. Stage modules are imported only when
their command runs, so `--help` stays fast. A `ConceptCapsError` (bad input, missing
artifact), a flag or config error, or a full or read-only disk is printed as one line,
without a traceback, and exits with status 2; Ctrl-C prints one line and exits with 130.
The environment variables the project reads (thread counts, CONCEPTCAPS_FREE_MEMORY, the Hugging
Face and torch cache folders) are checked first, the same way: `check_environment`.

Logging goes to stderr through the project's own loggers only (level from
CONCEPTCAPS_LOG_LEVEL, default INFO): other libraries keep Python's default (warnings and
errors), so a DEBUG run shows this project's detail, not every font matplotlib looks at.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from conceptcaps_pipeline.stages import STAGES, by_words, groups

# The loggers this project owns; only these are configured (see the module docstring).
PROJECT_LOGGERS = ("conceptcaps_pipeline", "conceptcaps_eval", "conceptcaps", "__main__", "evaluate_modules")


def _usage(group: str | None = None) -> str:
    """The command list: every command, or those of one group (`conceptcaps vae`)."""
    chosen = [entry for entry in STAGES if group is None or entry.words[0] == group]
    width = max(len(" ".join(entry.words)) for entry in chosen)
    name = f"conceptcaps {group}" if group else "conceptcaps"
    lines = [
        f"usage: {name} <command> [options]   ({name} <command> --help for its options)",
        "",
        "Build, evaluate and publish the ConceptCaps dataset. Stages share one run directory.",
        "",
        "commands:",
    ]
    lines += [f"  {' '.join(entry.words):<{width}}  {entry.help}" for entry in chosen]
    if group is None:
        lines += ["", "options:", "  -h, --help   this list", "  --version    the installed conceptcaps version"]
    return "\n".join(lines)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at each record (not the stream of the first call), as
    Python's last-resort handler does, so a redirected or captured stderr gets the lines."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


def _project_or_warning(record: logging.LogRecord) -> bool:
    """Pass this project's records at its level, and anyone's warnings and errors."""
    return record.levelno >= logging.WARNING or record.name.split(".")[0] in PROJECT_LOGGERS


def configure_logging(level: str | None = None) -> None:
    """One stderr handler on the root logger; the project's loggers at `level` (CONCEPTCAPS_LOG_LEVEL or INFO).

    The root logger keeps its WARNING level and the handler passes other libraries' records only
    from WARNING up, so third-party DEBUG/INFO chatter (matplotlib's font manager, faiss, absl)
    stays off. The handler sits on the root so that a library calling `logging.basicConfig`
    later finds one there and adds no second (every line would print twice), and a host
    application's (or pytest's) root handlers see the project's records too. Then the libraries'
    own chatter (model-loading bars, known warnings) is prevented or filtered: generation/quiet.py.
    """
    from conceptcaps_pipeline.errors import ConceptCapsError

    level = (level or os.environ.get("CONCEPTCAPS_LOG_LEVEL") or "INFO").upper()
    if level not in logging.getLevelNamesMapping():
        raise ConceptCapsError(f"CONCEPTCAPS_LOG_LEVEL={level!r} is not a logging level: use DEBUG, INFO, WARNING "
                               f"or ERROR.")
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not getattr(h, "conceptcaps", False)]  # main() may run many times
    handler = _StderrHandler()
    handler.conceptcaps = True
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_project_or_warning)
    root.addHandler(handler)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)
    from conceptcaps_pipeline.quiet import quiet_libraries

    quiet_libraries()  # library chatter prevented or filtered, each with its reason (generation/quiet.py)


def _find(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    for length in (2, 1):
        words = tuple(argv[:length])
        if by_words(words) is not None:
            return words, argv[length:]
    return None


def make_parser(words: tuple[str, ...]):
    """The TrlParser of one sub-command (YAML `--config` plus command-line overrides)."""
    from conceptcaps_pipeline.options import make_parser as options_parser

    return options_parser(words)


def run_command(argv: list[str]):
    """Parse argv for the sub-command it names and run it; returns the stage's result."""
    from conceptcaps_pipeline.errors import ConceptCapsError
    from conceptcaps_pipeline.options import parse_options

    found = _find(argv)
    if found is None:
        group = [" ".join(s.words) for s in STAGES if s.words[0] == (argv[0] if argv else "")]
        hint = f"its commands are: {', '.join(group)}" if group else "`conceptcaps --help` lists the commands"
        raise ConceptCapsError(f"unknown command {' '.join(argv[:2])!r}: {hint}.")
    words, rest = found
    if "-h" in rest or "--help" in rest:
        make_parser(words).parse_args_into_dataclasses(args=["--help"])  # prints the help and exits 0
    entry = by_words(words)
    arguments = parse_options(words, rest)
    check_environment()  # after parsing: a config file's `env:` block has set its variables by now
    function = getattr(importlib.import_module(entry.module), entry.function)
    set_cpu_threads()
    return function(*arguments)


def cpu_threads(cores: int, load: float) -> int:
    """Torch threads for a CPU run: the cores other processes leave free (at least one).

    Why: torch starts one thread per core; when other processes keep cores busy, the surplus
    threads wait on each other and a small model runs many times slower (measured: 18x for a VAE
    step with 2 threads on 2 shared cores).

    >>> cpu_threads(2, 1.2), cpu_threads(2, 0.1), cpu_threads(64, 3.0), cpu_threads(8, 20.0)
    (1, 2, 61, 1)
    """
    return max(1, min(cores, cores - round(load)))


def thread_count(name: str) -> int | None:
    """The thread count an environment variable asks for (None when unset), or one error naming it.

    OMP_NUM_THREADS may list one count per nesting level (`4,2`, OpenMP's syntax); the first is ours.
    """
    from conceptcaps_pipeline.errors import ConceptCapsError

    value = os.environ.get(name, "").strip()
    if not value:
        return None
    first = value.split(",")[0].strip() if name == "OMP_NUM_THREADS" else value
    if not first.isdigit() or not 1 <= int(first) <= MAX_THREADS:
        raise ConceptCapsError(f"${name}={value!r} is not a thread count: give a whole number from 1 to {MAX_THREADS} "
                               f"(e.g. {name}=4), or unset it to use the free cores.")
    return int(first)


# Above this a thread count is a typo (torch would try to start that many threads).
MAX_THREADS = 4096
# Cache folders the libraries write into; the datasets cache is written by every `load_dataset`.
CACHE_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_ASSETS_CACHE", "TRANSFORMERS_CACHE",
                   "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def check_cache_path(name: str) -> None:
    """$name, when set, is a folder that exists or can be made, and can be written: else one error naming it.

    Why before the stage: datasets, transformers and huggingface_hub create these folders on first
    use, deep inside a load, where a file in the way or a read-only disk is a traceback far from
    the variable that caused it.
    """
    from conceptcaps_pipeline.errors import ConceptCapsError

    value = os.environ.get(name)
    if value is None:
        return
    if not value.strip():
        raise ConceptCapsError(f"${name} is set but empty: give a cache folder, or unset it.")
    path = os.path.abspath(os.path.expanduser(value))
    too_long = [part for part in path.split(os.sep) if len(part.encode()) > 255]
    if too_long or len(path.encode()) >= 4096:
        raise ConceptCapsError(f"${name}={value!r} is an impossible path (a name over 255 bytes or a path over 4096): "
                               f"give a shorter cache folder.")
    probe = path
    while not os.path.lexists(probe):  # the nearest part that exists decides whether the folder can be made
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConceptCapsError(f"${name}={value!r} is an impossible cache folder: {probe} is a file, not a folder; "
                               f"give a folder path, or unset it.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConceptCapsError(f"${name}={value!r} is not writable ({probe} cannot be written: read-only or "
                               f"permission denied): give a writable cache folder, or unset it.")


def check_environment() -> None:
    """Every environment variable the project reads, checked before any work: one error line each.

    CONCEPTCAPS_LOG_LEVEL is checked by configure_logging; CONCEPTCAPS_FREE_MEMORY is parsed here as
    audio generate parses it (bytes, or one value per rank separated by commas).
    """
    from conceptcaps_pipeline.errors import ConceptCapsError

    for name in ("CONCEPTCAPS_NUM_THREADS", "OMP_NUM_THREADS"):
        thread_count(name)
    value = os.environ.get("CONCEPTCAPS_FREE_MEMORY", "").strip()
    if value:
        import math

        for item in value.split(","):
            try:
                number = float(item.strip())
            except ValueError:
                number = math.nan
            if not math.isfinite(number) or number < 0:
                raise ConceptCapsError(f"$CONCEPTCAPS_FREE_MEMORY={value!r}: give bytes (e.g. 40e9), or one value per "
                                       f"rank separated by commas; {item.strip()!r} is not a finite number >= 0.")
    for name in CACHE_VARIABLES:
        check_cache_path(name)


def set_cpu_threads() -> None:
    """Set torch's CPU threads from the free cores, unless OMP_NUM_THREADS or CONCEPTCAPS_NUM_THREADS says otherwise."""
    chosen = thread_count("CONCEPTCAPS_NUM_THREADS") or thread_count("OMP_NUM_THREADS")
    import torch

    if chosen:
        torch.set_num_threads(chosen)
    elif not torch.cuda.is_available() and hasattr(os, "getloadavg"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(cpu_threads(cores, os.getloadavg()[0]))


def one_line(message: str) -> str:
    """A message on one line: line breaks of a longer message become '; '."""
    parts = [part.strip() for part in str(message).splitlines() if part.strip()]
    return "; ".join(parts)


def os_error_message(err: OSError) -> str | None:
    """One line for the file-system errors a user can fix (full disk, read-only or forbidden place)."""
    import errno

    fixes = {
        errno.ENOSPC: "free space on that disk, then re-run the same command to resume",
        errno.EDQUOT: "free space within your quota, then re-run the same command to resume",
        errno.EROFS: "the file system is read-only: pass a writable --run",
        errno.EACCES: "permission denied: pass a --run you can write, or fix the permissions",
        errno.EPERM: "operation not permitted: pass a --run you can write, or fix the permissions",
    }
    fix = fixes.get(err.errno)
    if fix is None:
        return None
    where = err.filename or "a file"
    return f"cannot write {where} ({err.strerror}): {fix}."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("--version", "-V"):
        from conceptcaps_pipeline import __version__

        print(f"conceptcaps {__version__}")
        return 0
    if argv[0] in groups() and (len(argv) == 1 or argv[1] in ("-h", "--help")):
        print(_usage(argv[0]))
        return 0
    from conceptcaps_pipeline.errors import ConceptCapsError

    try:
        configure_logging()
        run_command(argv)
    except ConceptCapsError as err:
        print(f"conceptcaps: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("conceptcaps: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except OSError as err:
        message = os_error_message(err)
        if message is None:
            raise
        print(f"conceptcaps: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
