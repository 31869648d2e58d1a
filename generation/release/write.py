"""Write every config, split and subset of a release in one pass over the run's audio shards.

    from conceptcaps_pipeline.release.plan import load_taxonomy, plan_run
    from conceptcaps_pipeline.release.write import write_configs
    plan = plan_run(run, load_taxonomy(run).tags, with_audio=True)
    infos = write_configs(plan, ["default", "audio", ...], load_taxonomy(run), "release/data",
                          max_shard_size="500MB", rows_per_group=100, max_group_bytes=64 << 20, run=run,
                          evidence=label_evidence(run))        # release/rows.py; None: not scored

Subsets and splits are row selections of the same clips, so each source shard of RUN/audio is
read once and each of its clips goes to every (config, split) that holds it: the bytes read are
the audio bytes once (issue: the builder-per-config build read them about ten times). Each
(config, split) has its own Parquet writer (datasets' `ParquetWriter`, so the files are what
`download_and_prepare(file_format="parquet")` writes: same schema, features metadata and row
groups); a writer holds at most one row group, cut at `rows_per_group` rows or once its encoded
audio passes `max_group_bytes` (default 64 MB), whichever comes first: memory is bounded by
(writers x budget) whatever the clip length, not by the dataset. Short clips keep datasets' 100-row
groups; 30-s clips (~1 MB of FLAC each) make groups of ~64 rows (docs/release.md, "Row groups"). The FLAC header of every clip is checked as it passes.
Shards are cut like datasets' builder cuts them: a new file once the current one holds more than
`max_shard_size` bytes (Arrow size, before compression), so a shard exceeds it by at most one group.
Each shard is hashed as its bytes are written (`_HashingFile`) and its size, sha256 and row count handed to
`run_dir.remember_entry`, so the build record does not read the shards back (the stage reads the audio once).
With `evidence` (a scored run), the audio configs carry each row's per-label evidence as a column.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.release.plan import RunPlan, clip_opens, refuse_unopenable
from conceptcaps_pipeline.release.splits import SPLITS

logger = logging.getLogger(__name__)

# Why 64 MB: datasets' own audio row groups are 100 rows (config.ARROW_RECORD_BATCH_SIZE_FOR_AUDIO_DATASETS); with 30-s
# FLAC clips that is ~100 MB per group and ~2.2 GB of buffers over a release's 9 audio writers (measured at N = 960). 64 MB keeps a group
# well under what the Hub's viewer and `streaming=True` read at once and still holds dozens of clips.
MAX_GROUP_BYTES = 64 << 20


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


class _HashingFile:
    """A write-only binary file that hashes (sha256) and counts the bytes as they pass on their way to disk."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close(), which the Parquet writer calls
        self._digest = hashlib.sha256()
        self.size = 0
        self.sha256: str | None = None

    def write(self, data) -> int:
        view = memoryview(data)
        self._digest.update(view)
        self.size += view.nbytes
        return self._file.write(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._file.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            self.sha256 = self._digest.hexdigest()


@dataclass
class _SplitWriter:
    """The Parquet shards of one (config, split): a new file whenever the current one passes max_shard_size."""

    folder: Path
    split: str
    features: object
    max_shard_size: int
    rows_per_group: int
    max_group_bytes: int = MAX_GROUP_BYTES
    paths: list[Path] = field(default_factory=list)
    num_examples: int = 0
    num_bytes: int = 0
    _writer: object = None
    _stream: _HashingFile | None = None
    _group_bytes: int = 0

    def write(self, example: dict) -> None:
        if self._writer is not None and self._writer._num_bytes > self.max_shard_size:
            self._close_file()
        if self._writer is None:
            self._open_file()
        encoded = self.features.encode_example(example)
        # The writer itself flushes at rows_per_group rows; flush earlier once the buffered audio passes the
        # byte budget, so a group of long clips does not hold rows_per_group of them in memory.
        self._writer.write(encoded)
        if not self._writer.current_examples:  # flushed at the row count
            self._group_bytes = 0
            return
        self._group_bytes += _audio_bytes(encoded)
        if self._group_bytes >= self.max_group_bytes:
            self._writer.write_examples_on_file()
            self._group_bytes = 0

    def close(self) -> None:
        """Finish the last file (an empty split gets one file with the schema) and give the files their final names."""
        if self._writer is None and not self.paths:
            self._open_file()
        if self._writer is not None:
            self._close_file()
        for index, path in enumerate(self.paths):
            # A rename keeps the inode and mtime, so the entry remembered at _close_file still names the file.
            path.rename(self.folder / shard_name(self.split, index, len(self.paths)))

    def _open_file(self) -> None:
        self._group_bytes = 0
        from datasets.arrow_writer import ParquetWriter

        path = self.folder / f".{self.split}-{len(self.paths):05d}.parquet"
        self.paths.append(path)
        self._stream = _HashingFile(path)
        self._writer = ParquetWriter(stream=self._stream, features=self.features, writer_batch_size=self.rows_per_group)

    def _close_file(self) -> None:
        from conceptcaps_pipeline.run_dir import remember_entry

        examples, size = self._writer.finalize()  # closes the stream: the digest is final
        self._writer.close()
        self._writer = None
        self._stream.close()
        remember_entry(self._stream.path, size=self._stream.size, sha256=self._stream.sha256, rows=examples)
        self._stream = None
        self.num_examples += examples
        self.num_bytes += size


def _example_ids(plan: RunPlan, members: dict) -> set[str]:
    """The ids dataset_card.examples.choose_examples will pick from the `audio` config (rows with a clip)."""
    from conceptcaps_pipeline.dataset_card.examples import DEFAULT_COUNT, choose_examples

    with_clip = {i for _, stored in plan.audio.shards for i in stored}
    rows = [plan.rows[i] for split in SPLITS for i in members["audio", split] if i in with_clip]
    return {row["id"] for row in choose_examples(rows, DEFAULT_COUNT)}


def _audio_bytes(encoded: dict) -> int:
    """The encoded audio bytes of one example (0 for a text row): what dominates a row group's memory."""
    audio = encoded.get("audio")
    if isinstance(audio, dict) and audio.get("bytes") is not None:
        return len(audio["bytes"])
    return 0


def write_configs(plan: RunPlan, configs: list[str], taxonomy, data_dir: str | Path, *, max_shard_size: str | int,
                  rows_per_group: int, run: str | Path, progress: bool = True, max_group_bytes: int | None = None,
                  evidence: dict[str, dict[str, float | None]] | None = None) -> dict:
    """Write data_dir/<config>/<split>-NNNNN-of-NNNNN.parquet for every config; returns {config: DatasetInfo}
    (features, splits and sizes: what the card's `dataset_info` holds). `evidence`: {id: {label: evidence}}
    (`rows.label_evidence(run)`) puts the `evidence` column into the audio configs; None leaves it out.
    `max_group_bytes`: a row group is written once its encoded audio reaches this many bytes, even before
    `rows_per_group` rows; None: MAX_GROUP_BYTES (read at call time, so a caller may lower it for a whole build)."""
    if max_group_bytes is None:
        max_group_bytes = MAX_GROUP_BYTES
    if max_group_bytes < 1:
        raise ConceptCapsError(f"max_group_bytes {max_group_bytes}: give at least 1 byte of audio per Parquet row group.")
    import datasets
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.release.rows import CONFIGS, features, make_example, tag_categories
    from datasets.utils.py_utils import convert_file_size_to_int
    from tqdm.auto import tqdm

    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ConceptCapsError(f"unknown config(s) {unknown}: ConceptCaps has {sorted(CONFIGS)}.")
    limit = convert_file_size_to_int(max_shard_size)
    data_dir = Path(data_dir)
    infos, writers, members = {}, {}, {}
    for name in configs:
        with_audio, fraction = CONFIGS[name]
        info = datasets.DatasetInfo(features=features(taxonomy, plan.audio.sampling_rate if with_audio else None,
                                                      evidence=with_audio and evidence is not None))
        infos[name] = info
        (data_dir / name).mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            writers[name, split] = _SplitWriter(data_dir / name, split, info.features, limit, rows_per_group,
                                                max_group_bytes)
            members[name, split] = set(plan.split_ids(split, fraction))
    text = [n for n in configs if not CONFIGS[n][0]]
    audio = [n for n in configs if CONFIGS[n][0]]
    text_features = infos[text[0]].features if text else None
    audio_features = infos[audio[0]].features if audio else None
    category_of = tag_categories(text_features or audio_features)
    split_of = plan.assignment.split_of
    # The card's example clips (dataset_card/examples.py) are chosen from the audio config's rows, which the plan
    # already knows: pick them now and keep their bytes as they pass, so the card reads no shard again.
    examples = _example_ids(plan, members) if "audio" in audio else set()
    example_clips = {}

    def emit(clip_id: str, clip: dict | None) -> None:
        split = split_of[clip_id]
        row = plan.rows[clip_id]
        if text:
            example = make_example(row, text_features, category_of=category_of)
            for name in text:
                if clip_id in members[name, split]:
                    writers[name, split].write(example)
        if clip is not None and audio:
            example = make_example(row, audio_features, clip, category_of,
                                   evidence=None if evidence is None else evidence.get(clip_id, {}))
            for name in audio:
                if clip_id in members[name, split]:
                    writers[name, split].write(example)

    bar = tqdm(total=len(plan.rows), desc="build", unit="row", disable=not progress)
    done, bad = set(), []
    # 1. The clips, shard by shard in stored order (= row order): each source shard is read once.
    for shard, stored in plan.audio.shards:
        mine = [i for i in stored if i in plan.rows]
        if not mine:
            continue
        if not audio:
            for clip_id in mine:
                emit(clip_id, None)
        else:
            table = pq.read_table(shard, columns=["id", "audio", "duration_s"])
            clips = dict(zip(table.column("id").to_pylist(), zip(table.column("audio").to_pylist(),
                                                                   table.column("duration_s").to_pylist())))
            del table
            for clip_id in mine:
                data, duration = clips.pop(clip_id)
                if not clip_opens(data, plan.audio.sampling_rate, plan.audio.duration_s[clip_id]):
                    bad.append(f"{clip_id} ({shard.name})")
                    continue
                emit(clip_id, {"audio": data, "duration_s": duration})
                if clip_id in examples:
                    example_clips[clip_id] = data
        done.update(mine)
        bar.update(len(mine))
    refuse_unopenable(run, bad)  # before any file is final: the caller's staged folder is dropped
    # 2. Rows without a clip (text configs of a run without audio), by id as the plan orders them.
    for split in SPLITS:
        for clip_id in plan.splits[split]:
            if clip_id not in done:
                emit(clip_id, None)
                bar.update(1)
    bar.close()
    for writer in writers.values():
        writer.close()
    if example_clips:
        from conceptcaps_pipeline.dataset_card.examples import stash_clips

        stash_clips(data_dir.parent, example_clips)
    out = {}
    for name, info in infos.items():
        splits = datasets.SplitDict(dataset_name="conceptcaps")
        for split in SPLITS:
            writer = writers[name, split]
            splits.add(datasets.SplitInfo(name=split, num_bytes=writer.num_bytes, num_examples=writer.num_examples,
                                          dataset_name="conceptcaps"))
        info.splits = splits
        info.config_name = name
        info.dataset_name = "conceptcaps"
        info.builder_name = "conceptcaps"
        info.dataset_size = sum(s.num_bytes for s in splits.values())
        out[name] = info
    return out
