"""Run-directory helpers shared by every stage: atomic writes, locks, manifests, artifact checks.

A stage writes each artifact to a temporary name in the same folder and renames it into
place, so a reader (or a resumed run) never sees half a file; the renamed file has the
permissions any file gets (the umask), not those of a private temporary file. A folder is
published by exchanging it with the old one in one system call (`publish`: Linux
renameat2(RENAME_EXCHANGE); elsewhere a two-phase swap with a journal that the next writer
completes or rolls back, `recover`), so at no moment is neither the old nor the new complete
output in place, and clean-up of leftovers never touches the committed output. A stage holds
`RUN/.locks/<stage>.lock` while it works (`stage_lock`, taken by the `@stage` decorator of
every stage's entry function), so a second process on the same run stops with the first
one's pid instead of writing beside it. Work that `--force` replaces is set aside
(`set_aside`), dropped once the new work has succeeded, and put back if it fails. Each stage
also writes `RUN/manifests/<stage>.json` with its arguments, package versions, input hashes,
counts, wall time and every output file's size, sha256 and Parquet row count: `finished` calls
a stage up to date only while its files match that record and its inputs were not made from
inputs that changed since (`check_upstream`). A kill between a publication and its manifest
leaves a record that does not match, so the stage runs again. Paths inside the run are stored
as `RUN/...` (`run_relative`, `portable`), so a run directory can be moved or copied and still
resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
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

logger = logging.getLogger(__name__)

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


# -- atomic publication of folders ------------------------------------------------------------------
# One mechanism for every output folder: the new output is written into a hidden temporary folder
# beside the final one, then swapped in. On Linux the swap is renameat2(RENAME_EXCHANGE): one system
# call that exchanges the two names, so at every moment the final name holds either the old complete
# output or the new complete one; the old one is then at the temporary name and is deleted. Where
# renameat2 is missing (another OS, an old kernel, a file system without it), a two-phase swap with a
# journal (`.NAME.swap.json`: which folder is the new one, where the old one went) is used; the next
# process that touches NAME (`recover`, called by every `atomic_dir` and by `stage_lock`) completes a
# swap whose new folder is in place and rolls back one that did not start.
RENAME_EXCHANGE = 2  # from <linux/fs.h>
_AT_FDCWD = -100


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Exchange the names `a` and `b` in one system call; False where the system cannot (then nothing changed)."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


# Tests replace this with a function that returns False, to exercise the journal on Linux too.
exchange = _renameat2_exchange


def _journal(final: Path) -> Path:
    return final.parent / f".{final.name}.swap.json"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        os.unlink(path)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename is still atomic
    finally:
        os.close(fd)


def publish(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the complete folder (or file) `new` at `final`, replacing what is there; never neither in place."""
    new, final = Path(new), Path(final)
    if not final.exists() and not final.is_symlink():
        os.rename(new, final)  # nothing to replace: one rename is atomic
    elif exchange(new, final):
        _fsync_folder(final.parent)
        _remove(new)  # the old output, now at the temporary name
    else:
        old = new.with_name(new.name[: -len(".tmp")] + ".old" if new.name.endswith(".tmp") else new.name + ".old")
        journal = _journal(final)
        with atomic_path(journal) as tmp:
            tmp.write_text(json.dumps({"new": new.name, "old": old.name}))
        os.rename(final, old)  # phase 1: from here the journal completes the swap
        os.rename(new, final)  # phase 2
        _fsync_folder(final.parent)
        _remove(old)
        os.unlink(journal)
    _fsync_folder(final.parent)


def recover(final: str | os.PathLike) -> str | None:
    """Finish what an interrupted `publish` to `final` left; returns "completed", "rolled back" or None.

    Call it only while holding the stage's lock. A journaled swap whose old output was moved away is
    completed (its new folder was complete before the journal was written); one that did not start is
    rolled back. Then the temporary folders of `final` are deleted: each holds either an uncommitted
    new output or an old one already replaced, never the committed output (that is always at `final`).
    """
    final = Path(final)
    journal = _journal(final)
    outcome = None
    if journal.is_file():
        try:
            record = json.loads(journal.read_text())
            new, old = final.parent / record["new"], final.parent / record["old"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            record = None
        if record is not None:
            if not final.exists() and new.exists():
                os.rename(new, final)  # phase 1 happened, phase 2 did not: complete it
                outcome = "completed"
            elif not final.exists() and old.exists():
                os.rename(old, final)  # cannot complete: the old output goes back
                outcome = "rolled back"
            elif final.exists() and new.exists():
                outcome = "rolled back"  # phase 1 never happened: the old output is in place
            else:
                outcome = "completed"
            _fsync_folder(final.parent)
            for path in (new, old):
                if path != final and (path.exists() or path.is_symlink()):
                    _remove(path)
        os.unlink(journal)
    for path in final.parent.glob(f".{final.name}.*.tmp"):
        _remove(path)
    for path in final.parent.glob(f".{final.name}.*.old"):
        _remove(path)
    for path in final.parent.glob(f".{journal.name}.*.tmp"):  # a journal that was never written
        _remove(path)
    if outcome:
        logger.warning("%s: an interrupted publication was %s", final, outcome)
    return outcome


def check_replaceable(final: str | os.PathLike, marker: str | None) -> None:
    """Refuse to replace `final` unless it is absent or holds `marker` (the command's own earlier output)."""
    final = Path(final)
    if marker and (final.exists() or final.is_symlink()) and (final.is_symlink() or not (final / marker).is_file()):
        raise ConceptCapsError(
            f"{final} exists and is not an earlier output of this command (it has no {marker}): it is left as it "
            f"is. Give a new folder, or move that one away first.")


@contextmanager
def atomic_dir(final: str | os.PathLike, *, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; swap it into place only on success (`publish`).

    `marker`: a file name that the stage's own output always holds. An existing `final` without it
    (the run directory, another stage's folder, a user's folder) is refused before anything is
    written: a stage replaces only what it made.
    """
    final = Path(final)
    check_replaceable(final, marker)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def remove_leftovers(folder: str | os.PathLike, names: list[str]) -> int:
    """Finish or undo an interrupted publication of each of `names` in `folder` (`recover`); returns how many
    names had leftovers. Never deletes the committed output: that is always at its final name.

    Call it only while holding the stage's lock: then no other process is writing them.
    """
    count = 0
    folder = Path(folder)
    for name in names:
        if any(folder.glob(f".{name}.*.tmp")) or any(folder.glob(f".{name}.*.old")) or _journal(folder / name).exists():
            count += 1
        recover(folder / name)
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
                started = time.time()
                try:
                    return function(*arguments, **options, **prepared)
                except BaseException as err:
                    # A --force that failed (or was interrupted) after setting the old output aside: put it back.
                    restored = restore_set_aside(arguments[0].run, started) if held else []
                    if not restored:
                        raise
                    note = f"the earlier output is back in place ({', '.join(restored)})"
                    if isinstance(err, ConceptCapsError):
                        raise ConceptCapsError(f"{str(err).rstrip()} {note[0].upper()}{note[1:]}.") from err
                    logger.warning("%s: %s", entry.record, note)
                    raise

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
    moved = [Path(path).resolve().relative_to(run).as_posix() for path in existing]
    folder.mkdir(parents=True, exist_ok=True)
    # What was moved, so that a failed --force can put exactly it back (`restore_set_aside`).
    write_json(folder / SET_ASIDE_LIST, {"moved": moved, "pid": os.getpid()})
    for path, relative in zip(existing, moved):
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    return folder


SET_ASIDE_LIST = ".moved.json"


def restore_set_aside(run: str | os.PathLike, since: float) -> list[str]:
    """Put back what this process set aside (since `since`) for a --force that then failed; returns the RUN/ paths.

    Only whole outputs (direct children of RUN, e.g. captions.parquet and captions/) are put back, replacing
    what the failed new work left in their place; files set aside from inside a folder (single audio shards)
    stay in .set-aside, since the new work beside them is resumable.
    """
    run = Path(run).resolve()
    restored = []
    for listing in sorted((run / ".set-aside").glob(f"*/*/{SET_ASIDE_LIST}")):
        try:
            record = json.loads(listing.read_text())
        except (OSError, ValueError):
            continue
        moved = record.get("moved") or []
        if record.get("pid") != os.getpid() or listing.stat().st_mtime < since - 1 or \
                any("/" in m for m in moved):
            continue
        for relative in moved:
            kept, place = listing.parent / relative, run / relative
            if not kept.exists():
                continue
            if place.exists() or place.is_symlink():
                _remove(place)  # the failed new work's partial output
            os.replace(kept, place)
            restored.append(f"RUN/{relative}")
        shutil.rmtree(listing.parent, ignore_errors=True)
        for folder in (listing.parent.parent, run / ".set-aside"):
            try:
                folder.rmdir()
            except OSError:
                pass
    return restored


def drop_set_aside(run: str | os.PathLike, stage: str) -> None:
    """Delete what `set_aside` kept for `stage` (the new work has succeeded)."""
    run = Path(run)
    shutil.rmtree(run / ".set-aside" / stage.replace(" ", "_"), ignore_errors=True)
    for folder in (run / ".set-aside",):
        try:
            folder.rmdir()
        except OSError:
            pass


# -- memory ------------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes of memory this process can still take (MemAvailable), or None where the system does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(needed: float, what: str, fix: str) -> None:
    """Refuse, before allocating, work whose estimated memory (`needed` bytes) exceeds what is available."""
    free = available_memory()
    if free is not None and needed > free:
        raise ConceptCapsError(f"{what} needs about {needed / 2**30:.1f} GiB of memory, more than the "
                               f"{free / 2**30:.1f} GiB available: {fix}.")


# -- identifiers and paths built from data ------------------------------------------------------------
# One pattern for clip ids and --id_prefix: they become file names (RUN/release/examples/<id>.wav, the
# explorer's clips) and text in the card, so only letters, digits and `._-`, not starting with `.` or `-`.
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"


def check_id(value: str, where: str, fix: str = "give one such as cc or demo-2026") -> str:
    """`value` if it matches ID_PATTERN (and holds no `..`), else one clear error naming `where` and `fix`."""
    import re

    if not isinstance(value, str) or not re.fullmatch(ID_PATTERN, value) or ".." in value:
        shown = repr(value)[:80]
        raise ConceptCapsError(f"{where} {shown}: ids use only letters, digits, '.', '_' and '-' (at most 128, not "
                               f"starting with '.' or '-', no '..'): {fix}.")
    return value


def inside(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """`path` if it resolves inside `root`; a path built from data that leaves it is refused."""
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(Path(root).resolve()):
        raise ConceptCapsError(f"{path} is outside {root}: a name from the data or a flag may not leave the run "
                               f"directory; fix the id or value that built it.")
    return Path(path)


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
    except OSError as err:
        import errno

        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise  # the disk, not the file: the CLI says so in one line (rebuilding the file would not help)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConceptCapsError(f"{path} cannot be read as Parquet ({reason}): {fix}.") from err
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



# -- what a stage wrote: the manifest's commit record ------------------------------------------------
HASH_LIMIT = 64 << 20  # bytes: larger files are checked by size (and Parquet row count) only; hashing them would
# cost more than most stages' skip saves. Captions, attributes, the VAE and every release file but audio shards fit.


def _files_of(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts))


# Entries of files this process wrote and hashed as their bytes passed (`remember_entry`), keyed by what
# identifies that very file version: device, inode, size and mtime (ns). Why: the build record would otherwise
# re-read every shard it just wrote (~1x the audio bytes again); a file changed or replaced since
# has another key, so it is read as before.
_WRITTEN: dict[tuple, dict] = {}


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def remember_entry(path: str | os.PathLike, *, size: int, sha256: str, rows: int | None = None) -> None:
    """Record the size, sha256 and (Parquet) row count of a file just written and closed, so that `file_entry`
    (and `file_record`) does not read it again. Renaming the file keeps the entry (same inode and mtime)."""
    path = Path(path)
    key = _stat_key(path)
    if key[2] != size:
        return  # not the bytes that were hashed: leave it to file_entry to read
    entry: dict[str, Any] = {"bytes": size, "sha256": sha256 if size <= HASH_LIMIT else None}
    if path.suffix == ".parquet":
        entry["rows"] = rows
    _WRITTEN[key] = entry


def file_entry(path: Path) -> dict:
    """Size, sha256 (up to HASH_LIMIT) and, for Parquet, row count of one file."""
    known = _WRITTEN.get(_stat_key(path))
    if known is not None and (path.suffix != ".parquet" or known.get("rows") is not None):
        return dict(known)
    size = path.stat().st_size
    entry: dict[str, Any] = {"bytes": size, "sha256": file_sha256(path) if size <= HASH_LIMIT else None}
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            entry["rows"] = pq.ParquetFile(path).metadata.num_rows
        except Exception:  # noqa: BLE001 - recorded as unreadable; a check against it then fails
            entry["rows"] = None
    return entry


def file_record(paths: list[str | os.PathLike], base: str | os.PathLike, *, prefix: str = "RUN/") -> dict[str, dict]:
    """{prefix + path relative to base: file_entry} for each file, and each file inside each folder, of `paths`
    (hidden files, the temporary folders of unfinished writes, excluded)."""
    base = Path(base).resolve()
    record = {}
    for path in paths:
        for file in _files_of(Path(path)):
            record[prefix + file.resolve().relative_to(base).as_posix()] = file_entry(file)
    return record


def check_record(record: dict, base: str | os.PathLike, *, prefix: str = "RUN/", folders: list | None = None) -> list[str]:
    """What differs between the files under `base` and `record` (from `file_record`): one phrase per file.

    `folders` (paths under base): a file in them that the record does not name is reported as extra.
    """
    base = Path(base)
    problems = []
    for key, entry in record.items():
        path = base / key[len(prefix):]
        if not path.is_file():
            problems.append(f"{key} is missing")
            continue
        size = path.stat().st_size
        if size != entry.get("bytes"):
            problems.append(f"{key} has {size} bytes, not the {entry.get('bytes')} recorded")
        elif entry.get("sha256") and file_sha256(path) != entry["sha256"]:
            problems.append(f"{key} changed since it was written (sha256 differs)")
        elif "rows" in entry and file_entry(path).get("rows") != entry["rows"]:
            problems.append(f"{key} does not hold the {entry['rows']} rows recorded")
    for folder in folders or []:
        for file in _files_of(base / folder):
            key = prefix + file.relative_to(base).as_posix()
            if key not in record:
                problems.append(f"{key} is not part of it (extra file)")
    return problems


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


# The outputs each stage named in its skip check (`finished`), recorded by its `write_manifest` in the same
# process: the stage code names its outputs once.
_DECLARED: dict[tuple[str, str], list] = {}


def _key(run: str | os.PathLike, stage: str) -> tuple[str, str]:
    return (str(Path(run).resolve()), stage.replace(" ", "_"))


def input_record(run: str | os.PathLike, inputs: dict[str, str | os.PathLike] | None) -> dict[str, str]:
    """sha256 of each input file; a folder (or a missing path) as its RUN/-relative path."""
    record = {}
    for key, path in (inputs or {}).items():
        path = Path(path)
        record[key] = file_sha256(path) if path.is_file() else run_relative(path, run)
    return record


def portable(value: Any, run: str | os.PathLike) -> Any:
    """`value` with every string that names an existing path inside `run` replaced by its `RUN/...` form."""
    if isinstance(value, dict):
        return {key: portable(item, run) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item, run) for item in value]
    if isinstance(value, str) and value and (os.sep in value or value in (".", str(run))):
        try:
            if Path(value).expanduser().exists():
                return run_relative(value, run)
        except OSError:
            return value
    return value


def make_manifest(
    run: str | os.PathLike,
    stage: str,
    args: Any,
    *,
    inputs: dict[str, str | os.PathLike] | None = None,
    counts: dict[str, Any] | None = None,
    started: float,
    extra: dict[str, Any] | None = None,
    outputs: list[str | os.PathLike] | None = None,
) -> dict:
    """The manifest `write_manifest` writes, without writing it (a stage that publishes it inside its output)."""
    from conceptcaps_pipeline import __version__

    arguments = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else args
    # Paths inside the run (the run itself, a model in RUN/models/) are stored as RUN/...: a copied run
    # names nothing of the original. Everything else (Hub ids, outside paths, numbers) as given.
    arguments = portable(arguments, run)
    if outputs is None:
        outputs = _DECLARED.get(_key(run, stage))
    manifest = {
        "stage": stage,
        "conceptcaps_version": __version__,
        "arguments": arguments,
        "packages": package_versions(),
        "inputs": input_record(run, inputs),
        "input_files": {key: run_relative(path, run) for key, path in (inputs or {}).items()},
        "counts": counts or {},
        "wall_time_s": round(time.time() - started, 3),
        # The thread count changes a CPU run's speed, and its exact floats (docs/audio.md).
        "torch_threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if outputs is not None:
        # The commit record: what `finished` compares the files with before it calls them up to date.
        manifest["outputs"] = file_record(outputs, run)
    if extra:
        manifest.update(extra)
    return manifest


def write_manifest(run: str | os.PathLike, stage: str, args: Any, **fields: Any) -> dict:
    """Record what a stage did: arguments, versions, input hashes, counts, wall time, and each output file's
    size, sha256 and row count (`outputs`, default: those the stage named to `finished`). `fields` are
    `make_manifest`'s keyword arguments (inputs, counts, started, extra, outputs)."""
    manifest = make_manifest(run, stage, args, **fields)
    write_json(manifest_path(run, stage), manifest)
    return manifest


def _comparable(args: Any) -> dict:
    data = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args)
    # The run's own location and --force do not change what a stage produces: a run
    # directory that was moved or copied is still finished.
    for key in ("force", "out", "run"):
        data.pop(key, None)
    return json.loads(json.dumps(data, default=str))


def _same_input(recorded: str | None, run: str | os.PathLike, path: Path) -> bool:
    if path.is_file():
        return recorded == file_sha256(path)
    # A folder: recorded as its RUN/ path (older manifests: as the path given then).
    return recorded in (run_relative(path, run), str(path))


def check_upstream(run: str | os.PathLike, inputs: dict) -> None:
    """Refuse inputs made from an older version of their own inputs: `X` was written by a stage whose recorded
    input hashes no longer match the files (e.g. captions.parquet made from attributes.parquet before
    `vae sample --force`). Names the command that brings it up to date."""
    run = Path(run)
    folder = run / "manifests"
    if not folder.is_dir():
        return
    wanted = {run_relative(p, run): Path(p) for p in inputs.values() if Path(p).is_file()}
    for path in sorted(folder.glob("*.json")):
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if not isinstance(manifest, dict) or not isinstance(manifest.get("outputs"), dict):
            continue
        made = [key for key in wanted if key in manifest["outputs"]]
        if not made:
            continue
        for name, recorded in (manifest.get("inputs") or {}).items():
            source = from_run_relative((manifest.get("input_files") or {}).get(name), run)
            source = Path(source) if source else None
            if source is None or not source.is_file() or not isinstance(recorded, str) or len(recorded) != 64:
                continue
            if file_sha256(source) != recorded:
                stage = str(manifest.get("stage", path.stem)).replace("_", " ")
                raise ConceptCapsError(
                    f"{made[0]} was made by `{stage}` from an older {run_relative(source, run)} (its input {name!r} "
                    f"changed since): run `conceptcaps {stage} --run {run} --force` first, then this command.")


def finished(run: str | os.PathLike, stage: str, args: Any, inputs: dict, outputs: list) -> dict | None:
    """The manifest of an identical finished run of `stage`, or None if it must (re)run.

    Identical means: same arguments (but --force and the run path), same input hashes, and every output
    file as the manifest recorded it (size always, sha256 up to HASH_LIMIT, Parquet row count). An input
    made from an older version of its own inputs is refused (`check_upstream`). The outputs named here
    are those `write_manifest` records for the stage.
    """
    # The files named here, and every file of the stage's own output folders (the stage table): a page that
    # lost app.js, or a VAE folder that lost its config, is not up to date.
    declared = [Path(p) for p in outputs]
    declared += [Path(run) / name for name in STAGE_FILES.get(stage.replace(" ", "_"), [])
                 if Path(run) / name not in declared]
    _DECLARED[_key(run, stage)] = declared
    check_upstream(run, inputs)
    manifest = read_manifest(run, stage)
    if manifest is None or not all(Path(p).exists() for p in outputs):
        return None
    current = portable(dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args), run)
    if manifest.get("arguments") is None or _comparable(manifest["arguments"]) != _comparable(current):
        return None
    for key, path in inputs.items():
        if not _same_input(manifest.get("inputs", {}).get(key), run, Path(path)):
            return None
    record = manifest.get("outputs")
    if not isinstance(record, dict) or not record:
        return None  # an older manifest without a record of its files: nothing to verify against, so redo
    problems = check_record(record, run)
    if problems:
        logger.warning("%s: not up to date, the outputs differ from %s: %s", stage.replace("_", " "),
                       manifest_path(run, stage), "; ".join(problems[:3]))
        return None
    return manifest
