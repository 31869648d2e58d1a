"""Reading and planning a run for the release: captions, clip index, checks, and which row goes
where, in which order, for every config at once.

    from conceptcaps_pipeline.release.plan import load_taxonomy, plan_run
    plan = plan_run("runs/demo", load_taxonomy("runs/demo").tags, with_audio=True)
    plan.split_ids("train", 0.25)        # the 25pct config's train ids, in row order

`plan_run` reads RUN/captions.parquet and the index columns of RUN/audio/ (no audio bytes) and
decides the splits (release/splits.py) and the subsets once; `conceptcaps build` writes every
config from one plan, and the `datasets` builder (conceptcaps.py) plans the same way.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from conceptcaps_pipeline.audio.shards import INDEX_COLUMNS, caption_sha256, read_shards
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.release.splits import SPLITS, SUBSETS, SplitAssignment, assign_splits, nested_subsets
from conceptcaps_pipeline.taxonomy import CATEGORIES, Taxonomy

logger = logging.getLogger(__name__)

CAPTION_COLUMNS = ("id", "caption", "aspect_list", *CATEGORIES, "coverage")


def run_fingerprint(run: str | Path) -> str:
    """A short digest of the run's inputs: the builder's cache folder changes when the run does."""
    run = Path(run)
    digest = hashlib.sha256()
    for name in ("captions.parquet", "taxonomy.json"):
        path = run / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    # Shard names and sizes stand for the audio: hashing every clip would read the whole run.
    for shard in sorted((run / "audio").glob("shard-r*-*.parquet")):
        digest.update(f"{shard.name}:{shard.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def load_taxonomy(run: str | Path) -> Taxonomy:
    """RUN/taxonomy.json, the run's taxonomy (tag order = ClassLabel order)."""
    path = Path(run) / "taxonomy.json"
    if not path.is_file():
        raise ConceptCapsError(
            f"{path} not found: the builder needs the run's taxonomy. Point data_dir (or --run) at a run "
            f"directory, or run `conceptcaps distill --source SOURCE --run {run}` first."
        )
    return Taxonomy.load(path)


def load_tags(run: str | Path) -> list[str]:
    """The taxonomy's tags in its order (the `labels` ClassLabel names) from RUN/taxonomy.json."""
    return load_taxonomy(run).tags


def read_captions(run: str | Path, tags: list[str]) -> list[dict]:
    """RUN/captions.parquet as checked rows: unique ids, captions, known tags, real lists."""
    path = Path(run) / "captions.parquet"
    if not path.is_file():
        raise ConceptCapsError(
            f"{path} not found: the dataset's rows are the run's captions. "
            f"Run `conceptcaps captions generate --run {run}` first."
        )
    from conceptcaps_pipeline.run_dir import check_id, read_table

    table = read_table(path, fix=f"re-run `conceptcaps captions generate --run {run} --force`")
    missing = [c for c in CAPTION_COLUMNS if c not in table.column_names]
    if missing:
        raise ConceptCapsError(f"{path} lacks the column(s) {missing}: re-run `conceptcaps captions generate --run {run} --force`.")
    known, seen, rows = set(tags), set(), []
    for row in table.select(list(CAPTION_COLUMNS)).to_pylist():
        clip_id = row["id"]
        if not clip_id or clip_id in seen:
            raise ConceptCapsError(f"{path}: id {clip_id!r} is empty or repeated; re-run `conceptcaps captions generate --run {run} --force`.")
        seen.add(clip_id)
        # Ids become file names (the card's example clips, the explorer's) and card text: one pattern, checked here.
        check_id(clip_id, f"{path}: id", f"sample again with a valid --id_prefix (`conceptcaps vae sample --run {run} "
                                         f"--force`), then caption again")
        if not row["caption"] or not str(row["caption"]).strip():
            raise ConceptCapsError(f"{path}: the caption of id {clip_id!r} is empty; re-run `conceptcaps captions generate --run {run} --force`.")
        for column in ("aspect_list", *CATEGORIES):
            if not isinstance(row[column], list):
                raise ConceptCapsError(f"{path}: {column} of id {clip_id!r} is {row[column]!r}, not a list of tags.")
        unknown = [t for t in row["aspect_list"] if t not in known]
        if unknown or not row["aspect_list"]:
            raise ConceptCapsError(
                f"{path}: id {clip_id!r} has {'the tags ' + repr(unknown) + ' that are not in the taxonomy' if unknown else 'an empty aspect_list'} "
                f"({Path(run) / 'taxonomy.json'}). Sample and caption again with this run's taxonomy "
                f"(`conceptcaps vae sample --run {run} --force`, then `conceptcaps captions generate --run {run} --force`)."
            )
        rows.append(row)
    return rows



@dataclass
class AudioIndex:
    """Where each clip is: shards in name order, each with its ids in stored order."""

    shards: list[tuple[Path, list[str]]] = field(default_factory=list)
    sampling_rate: int | None = None
    made_from: dict[str, str | None] = field(default_factory=dict)  # id -> sha256 of the caption it was made from
    duration_s: dict[str, float] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [i for _, ids in self.shards for i in ids]


def read_audio_index(run: str | Path) -> AudioIndex:
    """Index RUN/audio/ (ids, rates) without reading any audio; refuses duplicate clips and mixed rates."""
    audio_dir = Path(run) / "audio"
    table = read_shards(audio_dir, columns=INDEX_COLUMNS)
    if table.num_rows == 0:
        return AudioIndex()
    rates = set(table.column("sampling_rate").to_pylist())
    if len(rates) != 1:
        raise ConceptCapsError(
            f"{audio_dir} mixes sampling rates {sorted(rates)}: one run holds clips of one model. "
            f"Regenerate with `conceptcaps audio generate --run {run} --force`."
        )
    index, seen = AudioIndex(sampling_rate=int(rates.pop())), set()
    index.made_from = dict(zip(table.column("id").to_pylist(), table.column("caption_sha256").to_pylist()))
    index.duration_s = dict(zip(table.column("id").to_pylist(), table.column("duration_s").to_pylist()))
    by_shard: dict[str, list[str]] = defaultdict(list)
    for clip_id, shard in zip(table.column("id").to_pylist(), table.column("shard").to_pylist()):
        if clip_id in seen:
            raise ConceptCapsError(
                f"{audio_dir}: id {clip_id!r} has more than one clip (shards {shard} and another). "
                f"Run `conceptcaps audio verify --run {run} --repair` to keep one."
            )
        seen.add(clip_id)
        by_shard[shard].append(clip_id)
    index.shards = [(audio_dir / name, ids) for name, ids in by_shard.items()]
    return index


def check_fingerprints(run: str | Path, rows: dict[str, dict], audio: AudioIndex) -> None:
    """Refuse to ship a clip that was made from another caption (a fingerprint per clip, no audio read)."""
    run = Path(run)
    stale = [i for i in audio.ids if i in rows and audio.made_from.get(i) != caption_sha256(str(rows[i]["caption"]))]
    if stale:
        raise ConceptCapsError(
            f"{len(stale)} clip(s) in {run / 'audio'} were made from another caption than the one in "
            f"{run / 'captions.parquet'} (first: {stale[:5]}): run `conceptcaps audio generate --run {run}` to make "
            f"them again from the current captions (it sets the old clips aside), then build."
        )


def clip_opens(data: bytes, sampling_rate: int, duration_s: float) -> bool:
    """Whether FLAC bytes open (header only) at the run's rate and the clip's recorded length."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
        return (info.format == "FLAC" and info.samplerate == sampling_rate
                and abs(info.frames / info.samplerate - duration_s) < 1e-3)
    except Exception:  # noqa: BLE001 - any reader error means the clip cannot be shipped
        return False


def refuse_unopenable(run: str | Path, bad: list[str]) -> None:
    """One error for clips that `clip_opens` refused (`bad`: "id (shard)" strings)."""
    if bad:
        raise ConceptCapsError(
            f"{len(bad)} clip(s) in {Path(run) / 'audio'} do not open as FLAC of their recorded rate and length "
            f"(first: {bad[:5]}): run `conceptcaps audio verify --run {run} --repair`, then `conceptcaps audio "
            f"generate --run {run}` to make them again, then build."
        )


def check_clips(run: str | Path, rows: dict[str, dict], audio: AudioIndex, headers: bool = False) -> None:
    """Refuse to ship a clip that was made from another caption or (`headers`) does not open at its length.

    Both checks are cheap: a caption fingerprint per clip, and the FLAC header (rate and frame
    count) of every clip, read one shard at a time; `conceptcaps audio verify` decodes every sample.
    `conceptcaps build` checks the headers in its one pass over the audio instead (release/write.py).
    """
    import pyarrow.parquet as pq

    check_fingerprints(run, rows, audio)
    bad = []
    for shard, ids in audio.shards if headers else []:
        if not any(i in rows for i in ids):
            continue
        table = pq.read_table(shard, columns=["id", "audio"])
        for clip_id, data in zip(table.column("id").to_pylist(), table.column("audio").to_pylist()):
            if clip_id in rows and not clip_opens(data, audio.sampling_rate, audio.duration_s[clip_id]):
                bad.append(f"{clip_id} ({shard.name})")
    refuse_unopenable(run, bad)


@dataclass
class RunPlan:
    """Everything needed to write the rows of every config: split membership, subsets, order and clip locations."""

    rows: dict[str, dict]
    splits: dict[str, list[str]]  # split -> every id of the split, in row order
    audio: AudioIndex
    assignment: SplitAssignment
    subsets: dict[float, dict[str, set[str]]] = field(default_factory=dict)  # fraction -> split -> ids kept

    def split_ids(self, split: str, fraction: float = 1.0) -> list[str]:
        """The ids of `split` in a config that keeps `fraction` of it, in row order."""
        if fraction >= 1.0:
            return self.splits[split]
        keep = self.subsets[fraction][split]
        return [i for i in self.splits[split] if i in keep]


def plan_run(run: str | Path, tags: list[str], *, with_audio: bool, check_headers: bool = False,
             fractions=None) -> RunPlan:
    """Read and check a run and decide which row goes where, in which order, for every config.

    Row order: the order in which the clips are stored in RUN/audio (shard by shard), so that
    writing the audio configs reads each shard once; rows without a clip (text configs only)
    follow by id. The order is the same in every config, so the default and audio configs line up
    row by row. `fractions`: the subsets to plan (default: every config's, 25% and 10%).
    """
    run = Path(run)
    rows = read_captions(run, tags)
    by_id = {row["id"]: row for row in rows}
    audio = read_audio_index(run)
    clipped = [i for i in audio.ids if i in by_id]
    if with_audio:
        if audio.sampling_rate is None:
            raise ConceptCapsError(
                f"{run / 'audio'} holds no clips: the audio configs need them. Run `conceptcaps audio generate "
                f"--run {run}` first, or build the text configs only (`conceptcaps build --run {run} --audio false`)."
            )
        lacking = sorted(set(by_id) - set(clipped))
        if lacking:
            raise ConceptCapsError(
                f"{len(lacking)} caption id(s) of {run / 'captions.parquet'} have no clip in {run / 'audio'} "
                f"(first: {lacking[:5]}). Run `conceptcaps audio generate --run {run}` to make the missing clips "
                f"(it resumes), then `conceptcaps audio verify --run {run}`."
            )
        check_clips(run, by_id, audio, headers=check_headers)
    extra = sorted(set(audio.ids) - set(by_id))
    if extra:
        logger.warning("%d clip(s) in %s have no caption in captions.parquet and are left out (first: %s)",
                       len(extra), run / "audio", extra[:5])
    order = clipped + sorted(set(by_id) - set(clipped))
    assignment = assign_splits(rows)
    splits = {split: [i for i in order if assignment.split_of[i] == split] for split in SPLITS}
    wanted = sorted({*(fractions or SUBSETS.values())} - {1.0})
    subsets = {fraction: {} for fraction in wanted}
    for split, ids in splits.items() if wanted else ():
        # Nested: each smaller subset lies inside the larger, in every split.
        for fraction, keep in nested_subsets({i: by_id[i]["aspect_list"] for i in ids}, wanted).items():
            subsets[fraction][split] = keep
    return RunPlan(by_id, splits, audio, assignment, subsets)
