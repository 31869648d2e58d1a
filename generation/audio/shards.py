"""RUN/audio/ shards: FLAC encoding, atomic shard writes from a writer thread, and reading back.

Each writer (one per process and session) writes its own files
`shard-r{rank:03d}-{writer}-{n:06d}.parquet` (one per generated batch; `writer` is a random
token, so no process can overwrite or delete another's file) with the columns id, audio (FLAC
bytes), duration_s, sampling_rate, seed, model, caption_sha256 (the caption the clip was made
from) and settings (JSON: the model and sampling settings that made it). A shard is written to
a temporary name and renamed into place, so its rows are all complete or the file does not
exist; after a crash (even `kill -9`) at most the batches in flight are lost.

    from conceptcaps_pipeline.audio.shards import read_shards
    table = read_shards("runs/demo/audio")                  # every row, audio included
    index = read_shards("runs/demo/audio", columns=INDEX_COLUMNS)
"""

from __future__ import annotations

import hashlib
import io
import logging
import queue
import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import atomic_path

logger = logging.getLogger(__name__)

SHARD_GLOB = "shard-r*-*.parquet"
# shard-r000-000012.parquet (one writer per rank, older runs) or shard-r000-1a2b3c4d-000012.parquet
SHARD_NAME = re.compile(r"^shard-r(\d{3,})-(?:([0-9a-f]{8})-)?(\d{6,})\.parquet$")
INDEX_COLUMNS = ["id", "duration_s", "sampling_rate", "seed", "model", "caption_sha256", "settings"]


def shard_schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("audio", pa.binary()), ("duration_s", pa.float64()),
        ("sampling_rate", pa.int32()), ("seed", pa.int64()), ("model", pa.string()),
        ("caption_sha256", pa.string()), ("settings", pa.string()),
    ])


def caption_sha256(caption: str) -> str:
    """The fingerprint that ties a clip to the caption it was made from."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


def shard_paths(audio_dir: str | Path) -> list[Path]:
    """Finished shards, in name order (temporary files of a crashed writer are not matched)."""
    audio_dir = Path(audio_dir)
    if not audio_dir.is_dir():
        return []
    return sorted(p for p in audio_dir.glob(SHARD_GLOB) if SHARD_NAME.match(p.name))


def new_writer_token() -> str:
    """A token no other writer uses: it is part of every shard name the writer makes."""
    return uuid.uuid4().hex[:8]


def read_shards(audio_dir: str | Path, columns: list[str] | None = None):
    """All shard rows as one pyarrow Table, with a `shard` column naming each row's file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = shard_schema()
    wanted = columns or schema.names
    tables = []
    for path in shard_paths(audio_dir):
        try:
            shard = pq.ParquetFile(path)  # the footer once (each read costs up to 64 KB: a small shard's size)
            present = set(shard.schema_arrow.names)
            table = shard.read(columns=[c for c in wanted if c in present])
        except Exception as err:
            raise ConceptCapsError(
                f"audio shard {path} cannot be read ({str(err).splitlines()[0] if str(err) else err}). Shards are "
                f"written atomically, so this file was damaged after it was written: move it out of {path.parent} and "
                f"re-run `conceptcaps audio generate` to redo its clips."
            ) from err
        for column in (c for c in wanted if c not in present):  # shards of older versions lack the fingerprints
            table = table.append_column(schema.field(column), pa.nulls(table.num_rows, schema.field(column).type))
        table = table.select(wanted)
        tables.append(table.append_column("shard", pa.array([path.name] * table.num_rows, pa.string())))
    if not tables:
        empty = pa.schema([schema.field(c) for c in wanted] + [pa.field("shard", pa.string())])
        return empty.empty_table()
    return pa.concat_tables(tables)


def remove_stale_temporaries(audio_dir: str | Path) -> int:
    """Delete half-written shards left by a killed writer (names `.shard-*.tmp`)."""
    count = 0
    for path in Path(audio_dir).glob(".shard-r*.tmp"):
        path.unlink(missing_ok=True)
        count += 1
    return count


def move_rows_aside(run: str | Path, drop: dict[str, set[str]], stage: str = "audio") -> Path | None:
    """Take the rows whose ids are in `drop[shard name]` out of RUN/audio/, recoverably.

    Each affected shard is first moved to RUN/.set-aside/<stage>/<time>/audio/ (run_dir.set_aside),
    then its other rows are written back as a new shard. A crash in between leaves those rows in
    the set-aside copy only, so they are made again: never two copies of a clip.
    """
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.run_dir import set_aside

    audio_dir = Path(run) / "audio"
    paths = [audio_dir / name for name, ids in sorted(drop.items()) if ids]
    folder = set_aside(run, stage, paths)
    if folder is None:
        return None
    token = new_writer_token()
    for n, path in enumerate(paths):
        moved = folder / "audio" / path.name
        table = pq.read_table(moved)
        keep = [i for i, clip_id in enumerate(table.column("id").to_pylist()) if clip_id not in drop[path.name]]
        if keep:
            rank = SHARD_NAME.match(path.name).group(1)
            with atomic_path(audio_dir / f"shard-r{rank}-{token}-{n:06d}.parquet") as tmp:
                pq.write_table(table.take(keep), tmp)
    return folder


def encode_flac(audio: np.ndarray, sampling_rate: int, subtype: str = "PCM_16") -> bytes:
    """(channels, samples) float audio in [-1, 1] -> FLAC bytes (values outside are clipped)."""
    import soundfile as sf

    buffer = io.BytesIO()
    frames = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0).T  # soundfile wants (samples, channels)
    sf.write(buffer, frames, sampling_rate, format="FLAC", subtype=subtype)
    return buffer.getvalue()


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """FLAC bytes -> ((channels, samples) float32, sampling rate)."""
    import soundfile as sf

    audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return audio.T, rate


@dataclass
class Batch:
    """One generated batch on its way to disk (only the rows whose `keep` is true are written)."""

    ids: list[str]
    audio: np.ndarray  # (batch, channels, samples) float32
    seed: int
    caption_sha256: list[str]
    keep: list[bool] | None = None
    seeds: list[int] | None = None  # per row, where rows differ (best of K: each id's kept candidate); else `seed`
    metadata: dict[bytes, bytes] | None = None  # the shard's parquet key-value metadata (best-of-K records)


@dataclass
class WriterStats:
    clips: int = 0
    shards: int = 0
    audio_seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)  # id -> reason (not written)


class ShardWriter:
    """A thread that encodes batches to FLAC and writes one shard per batch.

    `put` returns at once unless `max_pending` batches already wait (back-pressure keeps
    memory bounded); the generation loop therefore never waits on encoding or disk. An error
    in the thread is raised again by the next `put` or by `close`.
    """

    def __init__(self, audio_dir: str | Path, rank: int, sampling_rate: int, model_id: str,
                 subtype: str = "PCM_16", max_pending: int = 4, settings: str = "{}"):
        self.audio_dir = Path(audio_dir)
        self.audio_dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.sampling_rate = sampling_rate
        self.model_id = model_id
        self.subtype = subtype
        self.settings = settings
        self.token = new_writer_token()
        self.stats = WriterStats()
        self._next = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"shard-writer-r{rank}", daemon=True)
        self._thread.start()

    def put(self, batch: Batch) -> None:
        self._raise_if_failed()
        self._queue.put(batch)

    def close(self) -> WriterStats:
        """Write everything queued, stop the thread, and return what was written."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()
        return self.stats

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the shard writer of rank {self.rank} failed: {self._error}") from self._error

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            if self._error is None:
                try:
                    self._write(batch)
                except BaseException as err:  # noqa: BLE001 - handed to the generating thread
                    self._error = err

    def _write(self, batch: Batch) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = []
        keep = batch.keep or [True] * len(batch.ids)
        seeds = batch.seeds or [batch.seed] * len(batch.ids)
        for clip_id, audio, fingerprint, wanted, seed in zip(batch.ids, batch.audio, batch.caption_sha256, keep, seeds):
            if not wanted:
                continue  # made only so that the batch is the same as in a run that was never interrupted
            if not np.isfinite(audio).all():
                # FLAC cannot hold NaN/Inf: leave the id missing so that `audio verify` reports it
                # and a re-run regenerates it.
                self.stats.failed[clip_id] = "non-finite samples"
                logger.warning("rank %d: clip %s has NaN/Inf samples; not written", self.rank, clip_id)
                continue
            rows.append({
                "id": clip_id, "audio": encode_flac(audio, self.sampling_rate, self.subtype),
                "duration_s": audio.shape[-1] / self.sampling_rate, "sampling_rate": self.sampling_rate,
                "seed": seed, "model": self.model_id, "caption_sha256": fingerprint, "settings": self.settings,
            })
        if not rows:
            return
        path = self.audio_dir / f"shard-r{self.rank:03d}-{self.token}-{self._next:06d}.parquet"
        with atomic_path(path) as tmp:
            schema = shard_schema().with_metadata(batch.metadata) if batch.metadata else shard_schema()
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
        self._next += 1
        self.stats.shards += 1
        self.stats.clips += len(rows)
        self.stats.audio_seconds += sum(r["duration_s"] for r in rows)
