"""Run-directory helpers shared by every stage: atomic writes, manifests, artifact checks.

A stage writes each artifact to a temporary name in the same folder and renames it into
place, so a reader (or a resumed run) never sees half a file. Each stage also writes
`RUN/manifests/<stage>.json` with its arguments, package versions, input hashes, counts
and wall time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import ConceptCapsError

# Which stage writes which artifact, so that a missing one can say what to run.
PRODUCERS = {
    "taxonomy.json": "conceptcaps distill --source SOURCE --out RUN",
    "distilled.parquet": "conceptcaps distill --source SOURCE --out RUN",
    "vae": "conceptcaps vae train --run RUN",
    "attributes.parquet": "conceptcaps vae sample --run RUN --n N",
    "captioner": "conceptcaps captioner train --run RUN --model MODEL",
    "captions.parquet": "conceptcaps captions generate --run RUN",
    "audio": "conceptcaps audio generate --run RUN",
    "release": "conceptcaps build --run RUN",
}

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
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


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
    return json.loads(path.read_text()) if path.exists() else None


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
    from . import __version__

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
