"""Run-directory helpers shared by every stage: atomic writes, locks, manifests, artifact checks.

A stage writes each artifact to a temporary name in the same folder and renames it into
place, so a reader (or a resumed run) never sees half a file; the renamed file has the
permissions any file gets (the umask), not those of a private temporary file. A stage holds
`RUN/.locks/<stage>.lock` while it works (`stage_lock`, taken by the `@stage` decorator of
every stage's entry function), so a second process on the same run stops with the first
one's pid instead of writing beside it. Work that `--force` replaces is
set aside (`set_aside`) and dropped only once the new work has succeeded. Each stage also
writes `RUN/manifests/<stage>.json` with its arguments, package versions, input hashes,
counts and wall time. Paths inside the run are stored as `RUN/...` (`run_relative`), so a run
directory can be moved or copied and still resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.stages import STAGES, by_name

# Which stage writes which artifact (the stage table's outputs), so that a missing one can say what to run.
PRODUCERS = {output: f"{s.command} {s.usage}".strip() for s in STAGES for output in s.outputs}

PACKAGES = (
    "torch", "transformers", "datasets", "huggingface-hub", "peft", "trl",
    "accelerate", "evaluate", "numpy", "pyarrow",
)


def require(run: str | os.PathLike, name: str) -> Path:
    """Return RUN/name, or raise a clear error saying which stage makes it."""
    path = Path(run) / name
    if not path.exists():
        hint = PRODUCERS.get(name, "the stage that writes it")
        raise ConceptCapsError(
            f"{path} not found: this stage needs `{name}` in the run directory {run}. "
            f"Run `{hint.replace('RUN', str(run))}` first, or pass the right --run."
        )
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp makes the file 0600; the artifact gets what any new file gets (0666 less the umask).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; swap it into place only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def remove_leftovers(folder: str | os.PathLike, names: list[str]) -> int:
    """Delete the temporary files and folders an interrupted atomic write of `names` left in `folder`.

    Call it only while holding the stage's lock: then no other process is writing them.
    """
    count = 0
    folder = Path(folder)
    for name in names:
        for path in folder.glob(f".{name}.*.tmp"):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
            count += 1
    return count


# -- locks -------------------------------------------------------------------------------------
# The files each stage writes atomically into RUN (its outputs in the stage table), by lock name:
# what an interrupted write of them leaves is removed when the stage next takes its lock.
STAGE_FILES = {s.record: list(s.outputs) for s in STAGES if s.outputs}


@contextmanager
def stage_lock(run: str | os.PathLike, stage: str) -> Iterator[Path]:
    """Hold RUN/.locks/<stage>.lock (an flock: the kernel drops it when the holder dies, even by kill -9).

    A second holder gets one clear error naming the first one's pid and command. Holding it, the
    stage removes what an interrupted write of its manifest and files left (`STAGE_FILES`). The
    lock file is removed when the lock is released, so a finished run leaves no trace of it.
    """
    import fcntl

    run = Path(run)
    path = run / ".locks" / f"{stage.replace(' ', '_')}.lock"
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # the folder was removed by a releasing holder just now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConceptCapsError(
                f"{stage} is already running on {run} ({holder}; lock {path}): wait for it to finish, or stop that "
                f"process, then re-run the same command to resume."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was replaced while we waited for it: lock the current one
    os.ftruncate(fd, 0)
    remove_leftovers(run / "manifests", [f"{stage.replace(' ', '_')}.json"])
    remove_leftovers(run, STAGE_FILES.get(stage.replace(" ", "_"), []))
    command = " ".join(["conceptcaps", *sys.argv[1:]])[:300] if sys.argv else "python"
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, `{command}`".encode(), 0)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # before unlocking: whoever locks the old file next sees it is gone
        os.close(fd)
        try:
            path.parent.rmdir()
        except OSError:
            pass  # another stage's lock is still there


def stage(name: str, *, check: Callable | None = None, lock: str | Callable | None = None,
          prepare: Callable[..., dict] | None = None) -> Callable:
    """The skeleton of every stage's entry function: check the arguments, take the stage's lock, run.

        @stage("vae_train", check=check_arguments)
        def train_vae(args: VaeTrainArguments) -> dict:
            ...  # runs holding RUN/.locks/vae_train.lock; returns the manifest

    `name` is the stage's entry in `conceptcaps_pipeline.stages`. The first argument of the
    function is the dataclass whose `run` is the run directory. In order:

    - `check(*arguments)` raises a `ConceptCapsError` for a bad argument, before anything is touched;
    - `prepare(*arguments)` does the work that must precede the lock (accelerate's process state)
      and returns keyword arguments for the function;
    - `lock` names the lock: a string, or a function of the arguments (and what `prepare`
      returned) that returns it, or None for a process that takes none (a worker under
      `accelerate launch`: the main process holds it). Default: the stage's manifest name.
    """
    entry = by_name(name)
    if entry is None:  # a programming error: the table is the one list of stages
        raise KeyError(f"stage {name!r} is not in conceptcaps_pipeline.stages.STAGES")

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def run_stage(*arguments, **options):
            if check is not None:
                check(*arguments)
            prepared = prepare(*arguments) if prepare is not None else {}
            held = lock(*arguments, **prepared) if callable(lock) else (lock or entry.record)
            with stage_lock(arguments[0].run, held) if held else contextlib.nullcontext():
                return function(*arguments, **options, **prepared)

        run_stage.stage = entry
        return run_stage

    return decorate


# -- work replaced by --force --------------------------------------------------------------------
def set_aside(run: str | os.PathLike, stage: str, paths: list[Path]) -> Path | None:
    """Move `paths` (inside RUN) to RUN/.set-aside/<stage>/<time>/, keeping their layout; returns that folder.

    `--force` calls this only after every argument was checked and the model loaded, and
    `drop_set_aside` deletes it once the new work has succeeded; until then it can be moved back.
    """
    existing = [Path(p) for p in paths if Path(p).exists()]
    if not existing:
        return None
    run = Path(run).resolve()
    folder = run / ".set-aside" / stage.replace(" ", "_") / time.strftime("%Y%m%dT%H%M%S")
    for path in existing:
        target = folder / Path(path).resolve().relative_to(run)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    return folder


def drop_set_aside(run: str | os.PathLike, stage: str) -> None:
    """Delete what `set_aside` kept for `stage` (the new work has succeeded)."""
    run = Path(run)
    shutil.rmtree(run / ".set-aside" / stage.replace(" ", "_"), ignore_errors=True)
    for folder in (run / ".set-aside",):
        try:
            folder.rmdir()
        except OSError:
            pass


# -- paths inside the run --------------------------------------------------------------------------
def run_relative(path: str | os.PathLike | None, run: str | os.PathLike) -> str | None:
    """`RUN/...` for a path inside the run directory, else the value unchanged (a Hub id, an outside path)."""
    if not path:
        return path
    try:
        inside = Path(path).expanduser().resolve().relative_to(Path(run).resolve())
    except (ValueError, OSError):
        return str(path)
    return "RUN" if str(inside) == "." else "RUN/" + inside.as_posix()


def from_run_relative(value: str | None, run: str | os.PathLike) -> str | None:
    """The path a `run_relative` value stands for in the run directory as it is now."""
    if value and (value == "RUN" or value.startswith("RUN/")):
        return str(Path(run).resolve() / value[4:]) if value != "RUN" else str(Path(run).resolve())
    return value


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_parquet(table, path: str | os.PathLike) -> None:
    """Write a pyarrow Table or pandas DataFrame atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_table(path: str | os.PathLike, columns: list[str] | None = None, fix: str = "re-run the stage that writes it"):
    """pyarrow.parquet.read_table with one clear error for a missing, truncated or corrupt file."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        return pq.read_table(path, columns=columns)
    except FileNotFoundError:
        raise ConceptCapsError(f"{path} not found: {fix}.") from None
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConceptCapsError(f"{path} cannot be read as Parquet ({reason}): {fix}.") from err


def read_json(path: str | os.PathLike, fix: str = "delete it and re-run the stage that writes it with --force"):
    """json.loads of a file with one clear error for an unreadable or invalid file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ConceptCapsError(f"{path} is not valid JSON ({str(err).splitlines()[0][:120]}): {fix}.") from err


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stable_hash(text: str) -> int:
    """A hash of `text` that is the same on every machine and Python process (unlike hash())."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def manifest_path(run: str | os.PathLike, stage: str) -> Path:
    return Path(run) / "manifests" / f"{stage.replace(' ', '_')}.json"


def read_manifest(run: str | os.PathLike, stage: str) -> dict | None:
    path = manifest_path(run, stage)
    if not path.exists():
        return None
    manifest = read_json(path, fix=f"delete it and re-run `conceptcaps {stage.replace('_', ' ')}` (with --force to redo "
                                   f"the stage's work)")
    if not isinstance(manifest, dict):
        raise ConceptCapsError(f"{path} is not a manifest (a JSON object): delete it and re-run the stage.")
    return manifest


def write_manifest(
    run: str | os.PathLike,
    stage: str,
    args: Any,
    *,
    inputs: dict[str, str | os.PathLike] | None = None,
    counts: dict[str, Any] | None = None,
    started: float,
    extra: dict[str, Any] | None = None,
) -> dict:
    """Record what a stage did: arguments, versions, input hashes, counts, wall time."""
    from conceptcaps_pipeline import __version__

    hashes = {}
    for key, path in (inputs or {}).items():
        path = Path(path)
        hashes[key] = file_sha256(path) if path.is_file() else str(path)
    manifest = {
        "stage": stage,
        "conceptcaps_version": __version__,
        "arguments": dataclasses.asdict(args) if dataclasses.is_dataclass(args) else args,
        "packages": package_versions(),
        "inputs": hashes,
        "counts": counts or {},
        "wall_time_s": round(time.time() - started, 3),
        # The thread count changes a CPU run's speed, and its exact floats (docs/audio.md).
        "torch_threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if extra:
        manifest.update(extra)
    write_json(manifest_path(run, stage), manifest)
    return manifest


def _comparable(args: Any) -> dict:
    data = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args)
    # The run's own location and --force do not change what a stage produces: a run
    # directory that was moved or copied is still finished.
    for key in ("force", "out", "run"):
        data.pop(key, None)
    return json.loads(json.dumps(data, default=str))


def finished(run: str | os.PathLike, stage: str, args: Any, inputs: dict, outputs: list) -> dict | None:
    """The manifest of an identical finished run of `stage`, or None if it must (re)run.

    Identical means: same arguments (but --force and the run path), same input hashes, all outputs present.
    """
    manifest = read_manifest(run, stage)
    if manifest is None or not all(Path(p).exists() for p in outputs):
        return None
    if manifest.get("arguments") is None or _comparable(manifest["arguments"]) != _comparable(args):
        return None
    for key, path in inputs.items():
        path = Path(path)
        current = file_sha256(path) if path.is_file() else str(path)
        if manifest.get("inputs", {}).get(key) != current:
            return None
    return manifest
