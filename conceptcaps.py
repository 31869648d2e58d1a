"""ConceptCaps as a `datasets` builder that reads a ConceptCaps run directory.

    from conceptcaps import ConceptCaps
    builder = ConceptCaps(config_name="audio", data_dir="runs/demo")      # or "default", "25pct", ...
    builder.download_and_prepare()
    ds = builder.as_dataset()                                             # DatasetDict: train/validation/test

datasets >= 4 does not run loading scripts (`load_dataset("conceptcaps.py")` is refused), so the
builder is used by instantiating the class, as above. The published form of the dataset is the
Parquet release that `conceptcaps build --run RUN` writes with this very builder into RUN/release/
(`load_dataset("RUN/release", "audio")`), see docs/release.md.

The run directory must hold `captions.parquet` and `taxonomy.json`, and `audio/` for the audio
configs. Everything that turns a run into dataset rows lives here, once: reading the captions and
clips, the labels, the 70/15/15 split (`assign_splits`), the 25% and 10% subsets (`subset_ids`)
and the row order.

Configs: `default` (captions and labels), `audio` (the same rows plus the clip), `25pct`,
`25pct_audio`, `10pct`, `10pct_audio` (the same deterministic share of every split, with and
without audio). Rows are keyed by their id.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from conceptcaps_pipeline.audio.shards import INDEX_COLUMNS, read_shards
from conceptcaps_pipeline.release.concepts import ConceptSets, concept_sets, load_release, tag_mask  # noqa: F401 - the public API
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import stable_hash
from conceptcaps_pipeline.taxonomy import CATEGORIES, Taxonomy

logger = logging.getLogger(__name__)

_CITATION = """\
@article{sienkiewicz2026conceptcaps,
  title   = {ConceptCaps -- a Distilled Concept Dataset for Interpretability in Music Models},
  author  = {Sienkiewicz and Neumann and Modrzejewski},
  journal = {arXiv preprint arXiv:2601.14157},
  year    = {2026}
}
"""
_DESCRIPTION = (
    "Synthetic music for concept-based interpretability (TCAV and similar): every clip has an explicit "
    "label set from a four-category taxonomy (genre, mood, instrument, tempo), a caption that states "
    "those labels, and audio generated from the caption."
)
_HOMEPAGE = "https://arxiv.org/abs/2601.14157"
_LICENSE = "cc-by-sa-4.0"  # the captions and labels (MusicCaps); an audio config adds its model's terms (_info)
# The dataset's version: every config carries it, and the release card's `configs:` entries with
# it, so `load_dataset(release, config).info.version` reads it too.
VERSION = datasets.Version("1.0.0")

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"train": 0.70, "validation": 0.15, "test": 0.15}
MIN_TAG_SAMPLES = 3  # a tag with at least this many samples must appear in every split
SUBSETS = {"25pct": 0.25, "10pct": 0.10}
CAPTION_COLUMNS = ("id", "caption", "aspect_list", *CATEGORIES, "coverage")


@dataclass
class ConceptCapsConfig(datasets.BuilderConfig):
    """A ConceptCaps config: with or without the audio column, and the share of each split kept."""

    with_audio: bool = False
    fraction: float = 1.0  # 1.0: every row; 0.25 / 0.10: the subsets (the same share of every split)


def _configs() -> list[ConceptCapsConfig]:
    configs = [
        ConceptCapsConfig(name="default", version=VERSION, description="Captions and concept labels (no audio)."),
        ConceptCapsConfig(name="audio", version=VERSION, with_audio=True,
                          description="Captions, concept labels and the audio."),
    ]
    for name, fraction in SUBSETS.items():
        share = f"{fraction:.0%} of every split"
        configs.append(ConceptCapsConfig(name=name, version=VERSION, fraction=fraction, description=f"{share}, no audio."))
        configs.append(ConceptCapsConfig(name=f"{name}_audio", version=VERSION, fraction=fraction, with_audio=True,
                                         description=f"{share}, with audio."))
    return configs


# -- reading a run: the one place ---------------------------------------------------------------
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
    from conceptcaps_pipeline.run_dir import read_table

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


def check_clips(run: str | Path, rows: dict[str, dict], audio: AudioIndex, headers: bool = False) -> None:
    """Refuse to ship a clip that was made from another caption or (`headers`) does not open at its length.

    Both checks are cheap: a caption fingerprint per clip, and the FLAC header (rate and frame
    count) of every clip, read one shard at a time; `conceptcaps audio verify` decodes every sample.
    """
    import io

    import soundfile as sf

    from conceptcaps_pipeline.audio.shards import caption_sha256

    run = Path(run)
    stale = [i for i in audio.ids if i in rows and audio.made_from.get(i) != caption_sha256(str(rows[i]["caption"]))]
    if stale:
        raise ConceptCapsError(
            f"{len(stale)} clip(s) in {run / 'audio'} were made from another caption than the one in "
            f"{run / 'captions.parquet'} (first: {stale[:5]}): run `conceptcaps audio generate --run {run}` to make "
            f"them again from the current captions (it sets the old clips aside), then build."
        )
    bad = []
    for shard, ids in audio.shards if headers else []:
        wanted = [i for i in ids if i in rows]
        if not wanted:
            continue
        table = pq.read_table(shard, columns=["id", "audio"])
        for clip_id, data in zip(table.column("id").to_pylist(), table.column("audio").to_pylist()):
            if clip_id not in rows:
                continue
            try:
                info = sf.info(io.BytesIO(data))
                ok = (info.format == "FLAC" and info.samplerate == audio.sampling_rate
                      and abs(info.frames / info.samplerate - audio.duration_s[clip_id]) < 1e-3)
            except Exception:  # noqa: BLE001 - any reader error means the clip cannot be shipped
                ok = False
            if not ok:
                bad.append(f"{clip_id} ({shard.name})")
    if bad:
        raise ConceptCapsError(
            f"{len(bad)} clip(s) in {run / 'audio'} do not open as FLAC of their recorded rate and length (first: "
            f"{bad[:5]}): run `conceptcaps audio verify --run {run} --repair`, then `conceptcaps audio generate "
            f"--run {run}` to make them again, then build."
        )


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


@dataclass
class SplitAssignment:
    split_of: dict[str, str]  # id -> train / validation / test
    unsatisfiable: dict[str, int]  # tag -> distinct attribute sets, for tags with >= 3 samples not in every split


class _Placement:
    """Groups placed in splits so far, and how many placed groups of each rare tag every split holds."""

    def __init__(self, tag_groups, rare, splits):
        self.tag_groups, self.rare, self.splits = tag_groups, set(rare), list(splits)
        self.split_of: dict[tuple[str, ...], str] = {}
        self.coverage = {tag: Counter() for tag in self.rare}

    def move(self, key, split) -> None:
        """Place group `key` in `split` (None: take it out again)."""
        old = self.split_of.get(key)
        for tag in (u for u in key if u in self.rare):
            if old is not None:
                self.coverage[tag][old] -= 1
            if split is not None:
                self.coverage[tag][split] += 1
        if split is None:
            self.split_of.pop(key, None)
        else:
            self.split_of[key] = split

    def satisfied(self, tag) -> bool:
        return all(self.coverage[tag][s] > 0 for s in self.splits)

    def lacking(self, tag) -> list[str]:
        return [s for s in self.splits if not self.coverage[tag][s]]

    def gain(self, key, split) -> int:
        """How many more of the group's rare tags would be in every split after moving it to `split`."""
        before = sum(self.satisfied(u) for u in key if u in self.rare)
        origin = self.split_of.get(key)
        self.move(key, split)
        after = sum(self.satisfied(u) for u in key if u in self.rare)
        self.move(key, origin)
        return after - before


def _seed_splits(groups, tag_groups, rare_first, fractions, salt: int) -> dict:
    """Steps 2 to 4 of `assign_splits` with one tie-breaking salt: {group: split} for the seeded groups."""
    rank = {key: stable_hash(f"{salt}|" + "|".join(key)) for key in groups}
    seed_order = sorted(fractions, key=lambda s: (fractions[s], s))  # the small splits first
    placed = _Placement(tag_groups, rare_first, seed_order)
    coverage = placed.coverage

    def waste(key, split, tag):
        # Tags of the group that are already in `split` would spend one of their few groups there.
        return sum(1 / len(tag_groups[u]) for u in key if u in placed.rare and u != tag and coverage[u][split] > 0)

    for tag in rare_first:
        for split in placed.lacking(tag):
            free = [k for k in tag_groups[tag] if k not in placed.split_of]
            if not free:
                break
            placed.move(min(free, key=lambda k: (waste(k, split, tag), len(groups[k]), rank[k])), split)

    # Hill climbing: move a group of a tag that misses a split into it when that raises the number
    # of the group's seeded tags that are in every split (so it ends: the count only grows).
    improved = True
    while improved:
        improved = False
        for tag in (t for t in rare_first if not placed.satisfied(t)):
            for split in placed.lacking(tag):
                for key in sorted(tag_groups[tag], key=lambda k: (len(groups[k]), rank[k])):
                    if placed.gain(key, split) > 0:
                        placed.move(key, split)
                        improved = True
                        break
    _random_walk(placed, [t for t in rare_first if len(tag_groups[t]) >= len(fractions)], random.Random(salt))
    return placed.split_of


def _random_walk(placed: _Placement, spreadable: list[str], rng: random.Random, steps: int = 20_000) -> None:
    """Step 4 of `assign_splits`: a WalkSAT-style search for the tags the greedy steps left out.

    Each step takes a tag that misses a split and moves one of its groups there: the move that
    leaves the fewest tags unsatisfied, or (one step in five) a random one, which gets the search
    out of local optima. The best placement seen is kept.
    """
    def unsatisfied():
        return [t for t in spreadable if not placed.satisfied(t)]

    best = (len(unsatisfied()), dict(placed.split_of))
    for _ in range(steps if best[0] else 0):
        open_tags = unsatisfied()
        if not open_tags:
            break
        tag = rng.choice(open_tags)
        split = rng.choice(placed.lacking(tag))
        keys = placed.tag_groups[tag]
        if rng.random() < 0.2:
            key = rng.choice(keys)
        else:
            key = max(keys, key=lambda k: (placed.gain(k, split), -len(k), rng.random()))
        placed.move(key, split)
        left = len(unsatisfied())
        if left < best[0]:
            best = (left, dict(placed.split_of))
    for key in list(placed.split_of):
        placed.move(key, None)
    for key, split in best[1].items():
        placed.move(key, split)


def assign_splits(rows: list[dict], fractions: dict[str, float] | None = None,
                  min_samples: int = MIN_TAG_SAMPLES, attempts: int = 16) -> SplitAssignment:
    """Deterministic train/validation/test split by attribute set.

    1. Rows with the same attribute set (aspect_list as a set) form a group; a group goes to one
       split, so no attribute set is in two splits.
    2. Seeding: tags with at least `min_samples` samples, rarest first (fewest groups, then fewest
       samples, then name); for each split that lacks the tag yet (test, validation, train) one
       unassigned group holding it goes there: the group whose other rare tags are least often in
       that split already (weighted by 1 / their group count), then the smallest, then by hash.
    3. Repair: while a tag misses a split, one of its groups moves there if that raises the number
       of the group's tags that are in every split.
    4. Search: if a tag with groups in at least three splits' worth still misses a split, a seeded
       random walk over group moves (`_random_walk`) looks for a placement that satisfies it.
    5. Filling: every other group goes where its tags are most wanted, by iterative stratification
       (`_stratified_fill`), so that each tag's samples, and the rows, end near 70/15/15.
    Steps 2-4 run with up to `attempts` fixed salts for the ties, stopping at the first that
    satisfies every tag it can; the best one is kept, so the result is deterministic. A tag whose
    samples lie in fewer groups than splits cannot be in every split; such tags, and any the
    search did not satisfy, are returned in `unsatisfiable` with their group count.
    """
    fractions = fractions or SPLIT_FRACTIONS
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for row in rows:
        groups[tuple(sorted(set(row["aspect_list"])))].append(row["id"])
    tag_groups: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    tag_samples: dict[str, int] = defaultdict(int)
    for key, ids in groups.items():
        for tag in key:
            tag_groups[tag].append(key)
            tag_samples[tag] += len(ids)
    rare_first = sorted((t for t in tag_groups if tag_samples[t] >= min_samples),
                        key=lambda t: (len(tag_groups[t]), tag_samples[t], t))

    def missing(seeded):
        return [t for t in rare_first if {seeded[k] for k in tag_groups[t] if k in seeded} != set(fractions)]

    best = None
    for salt in range(max(1, attempts)):
        seeded = _seed_splits(groups, tag_groups, rare_first, fractions, salt)
        score = len(missing(seeded))
        if best is None or score < best[0]:
            best = (score, seeded)
        if not any(len(tag_groups[t]) >= len(fractions) for t in missing(seeded)):
            break  # every tag that can be in every split is
    split_of_group = best[1]

    _stratified_fill(split_of_group, groups, tag_groups, tag_samples, fractions)
    split_of = {clip_id: split_of_group[key] for key, ids in groups.items() for clip_id in ids}
    return SplitAssignment(split_of, {t: len(tag_groups[t]) for t in missing(split_of_group)})


def _stratified_fill(split_of_group: dict, groups: dict, tag_groups: dict, tag_samples: dict, fractions: dict) -> None:
    """Step 5 of `assign_splits`: iterative stratification (Sechidis et al., 2011) over label-set groups.

    The tag with the fewest unplaced samples goes first; each of its unplaced groups (in hash
    order) goes to the split that most wants that tag (share of the tag's samples not yet there),
    then the split furthest below its share of rows. Every tag thus ends near 70/15/15.
    """
    order = list(fractions)
    total = sum(len(ids) for ids in groups.values())
    want_rows = {s: fractions[s] * total for s in order}
    want_tag = {t: {s: fractions[s] * n for s in order} for t, n in tag_samples.items()}
    left = dict(tag_samples)

    def place(key, split):
        split_of_group[key] = split
        size = len(groups[key])
        want_rows[split] -= size
        for tag in key:
            want_tag[tag][split] -= size
            left[tag] -= size

    for key, split in list(split_of_group.items()):
        del split_of_group[key]
        place(key, split)
    key_hash = {key: stable_hash("|".join(key)) for key in groups}
    while len(split_of_group) < len(groups):
        tag = min((t for t in left if left[t] > 0), key=lambda t: (left[t], t))
        for key in sorted((k for k in tag_groups[tag] if k not in split_of_group), key=lambda k: (key_hash[k], k)):
            split = max(order, key=lambda s: (want_tag[tag][s], want_rows[s], -order.index(s)))
            place(key, split)


def subset_min_positives(fraction: float) -> int:
    """Positives a tag needs in a split for a `fraction` subset to keep it: those whose expected
    count in a uniform subset is at least one (4 for 25%, 10 for 10%)."""
    return math.ceil(1 / fraction - 1e-9)


def subset_ids(rows: dict[str, list[str]], fraction: float, within: set[str] = frozenset()) -> set[str]:
    """The ids of one split that a `fraction` subset keeps, stratified by tag.

    `rows` maps the split's ids to their tags. The subset holds `within` (a smaller subset it must
    contain), then covers every tag with at least `subset_min_positives(fraction)` positives in the
    split: rarest uncovered tag first, the row holding it that covers the most uncovered such tags
    (ties: the smallest hash of the id). Then rows with the smallest hash fill it up to
    max(1, round(fraction * len(rows))) rows (it is larger only when covering needs more rows).
    Deterministic: the result does not depend on the order of `rows`.
    """
    if fraction >= 1.0:
        return set(rows)
    if not rows:
        return set()
    keep = set(within)
    need = subset_min_positives(fraction)
    by_hash = sorted(rows, key=lambda i: (stable_hash(i), i))
    rank = {clip_id: position for position, clip_id in enumerate(by_hash)}
    holders: dict[str, list[str]] = defaultdict(list)
    for clip_id in by_hash:
        for tag in set(rows[clip_id]):
            holders[tag].append(clip_id)
    uncovered = {t for t, ids in holders.items() if len(ids) >= need} - {t for i in keep for t in rows[i]}
    while uncovered:
        tag = min(uncovered, key=lambda t: (len(holders[t]), t))
        best = max(holders[tag], key=lambda i: (len(uncovered & set(rows[i])), -rank[i]))
        keep.add(best)
        uncovered -= set(rows[best])
    size = max(1, round(fraction * len(rows)))
    for clip_id in by_hash:
        if len(keep) >= size:
            break
        keep.add(clip_id)
    return keep


def nested_subsets(rows: dict[str, list[str]], fractions=None) -> dict[float, set[str]]:
    """`subset_ids` for every fraction (default: the configs' 25% and 10%), smallest first, each inside the next."""
    subsets, within = {}, set()
    for fraction in sorted(fractions or SUBSETS.values()):
        within = subsets[fraction] = subset_ids(rows, fraction, within)
    return subsets


@dataclass
class RunPlan:
    """Everything needed to write the rows of one config: split membership, order and clip locations."""

    rows: dict[str, dict]
    splits: dict[str, list[str]]  # split -> ids, in row order
    audio: AudioIndex
    assignment: SplitAssignment


def plan_run(run: str | Path, tags: list[str], *, with_audio: bool, fraction: float = 1.0,
             check_headers: bool = False) -> RunPlan:
    """Read and check a run and decide which row goes where, in which order.

    Row order: the order in which the clips are stored in RUN/audio (shard by shard), so that the
    audio config reads each shard once; rows without a clip (text configs only) follow by id. The
    order is the same in every config, so the default and audio configs line up row by row.
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
    splits = {}
    for split in SPLITS:
        ids = [i for i in order if assignment.split_of[i] == split]
        if fraction < 1.0:
            members = {i: by_id[i]["aspect_list"] for i in ids}
            keep = nested_subsets(members, {*SUBSETS.values(), fraction})[fraction]
            ids = [i for i in ids if i in keep]
        splits[split] = ids
    return RunPlan(by_id, splits, audio, assignment)


def features(taxonomy: Taxonomy, sampling_rate: int | None = None) -> datasets.Features:
    """The typed columns; `audio` and `duration_s` only when a sampling rate is given.

    Each category column is a list of ClassLabel over that category's tags, so the tag -> category
    map is part of the features (`ds.features["instrument"].feature.names`); `labels` holds every
    tag of the row as a ClassLabel over the whole taxonomy, and `aspect_list` the same as strings.
    """
    strings = datasets.List(datasets.Value("string"))
    columns = {
        "id": datasets.Value("string"),
        "caption": datasets.Value("string"),
        "aspect_list": strings,
        **{category: datasets.List(datasets.ClassLabel(names=list(taxonomy.categories[category])))
           for category in CATEGORIES},
        # Typed concept labels: filter with `names.index("piano") in row["labels"]`.
        "labels": datasets.List(datasets.ClassLabel(names=list(taxonomy.tags))),
        "coverage": datasets.Value("float32"),
    }
    if sampling_rate is not None:
        columns["audio"] = datasets.Audio(sampling_rate=sampling_rate)
        columns["duration_s"] = datasets.Value("float32")
    return datasets.Features(columns)


# -- the builder --------------------------------------------------------------------------------
class ConceptCaps(datasets.GeneratorBasedBuilder):
    """ConceptCaps rows from a run directory: `ConceptCaps(config_name=..., data_dir=RUN)`."""

    VERSION = VERSION
    BUILDER_CONFIG_CLASS = ConceptCapsConfig
    BUILDER_CONFIGS = _configs()
    DEFAULT_CONFIG_NAME = "default"

    def __init__(self, *args, hash: str | None = None, **kwargs):
        data_dir = kwargs.get("data_dir")
        if data_dir is None:
            raise ConceptCapsError("ConceptCaps needs data_dir=RUN, a run directory with captions.parquet and taxonomy.json.")
        # Why: the cache folder is keyed by this hash, so a run that changed is prepared again
        # instead of being served from an old cache.
        super().__init__(*args, hash=hash or run_fingerprint(data_dir), **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        run = Path(self.config.data_dir)
        rate, licence = None, _LICENSE
        if self.config.with_audio:
            rate = read_audio_index(run).sampling_rate
            if rate is None:
                raise ConceptCapsError(
                    f"config {self.config.name!r} needs clips in {run / 'audio'}, and there are none: run "
                    f"`conceptcaps audio generate --run {run}` first, or use a config without audio."
                )
            from conceptcaps_pipeline.dataset_card.licence import release_licence

            # The clips carry the terms of the weights that made them (MusicGen: CC BY-NC 4.0).
            licence = release_licence(run, [self.config.name]).configs[self.config.name].text
        return datasets.DatasetInfo(
            description=_DESCRIPTION, features=features(load_taxonomy(run), rate), homepage=_HOMEPAGE,
            license=licence, citation=_CITATION,
        )

    def _split_generators(self, dl_manager):
        self._plan = plan_run(self.config.data_dir, self.info.features["labels"].feature.names,
                              with_audio=self.config.with_audio, fraction=self.config.fraction)
        self._category_of = tag_categories(self.info.features)
        return [datasets.SplitGenerator(name=split, gen_kwargs={"split": split}) for split in SPLITS]

    def _generate_examples(self, split: str):
        plan = self._plan
        wanted = set(plan.splits[split])
        if self.config.with_audio:
            # Shard by shard, in stored order: each shard is read once per split, one at a time.
            for shard, ids in plan.audio.shards:
                mine = [i for i in ids if i in wanted]
                if not mine:
                    continue
                table = pq.read_table(shard, columns=["id", "audio", "duration_s"]).to_pylist()
                clips = {r["id"]: r for r in table}
                for clip_id in mine:
                    clip = clips[clip_id]
                    yield clip_id, {**self._text(plan.rows[clip_id]), "duration_s": clip["duration_s"],
                                    "audio": {"bytes": clip["audio"], "path": f"{clip_id}.flac"}}
        else:
            for clip_id in plan.splits[split]:
                yield clip_id, self._text(plan.rows[clip_id])

    def _text(self, row: dict) -> dict:
        columns = self.info.features
        out = {k: row[k] for k in CAPTION_COLUMNS if k not in ("coverage", *CATEGORIES)}
        category_of = self._category_of
        for category in CATEGORIES:
            # Filed by the taxonomy, not by the captions file, so a category column never holds another's tag.
            out[category] = [columns[category].feature.str2int(t) for t in row["aspect_list"]
                             if category_of.get(t) == category]
        out["labels"] = sorted(columns["labels"].feature.str2int(t) for t in set(row["aspect_list"]))
        out["coverage"] = row["coverage"] if row["coverage"] is not None and not math.isnan(row["coverage"]) else None
        return out


def label_names(dataset) -> list[str]:
    """The taxonomy tags behind the `labels` ClassLabel of a loaded ConceptCaps split."""
    return dataset.features["labels"].feature.names


def tag_categories(dataset_or_features) -> dict[str, str]:
    """tag -> category, read from the features (each category column is a ClassLabel over its tags)."""
    columns = getattr(dataset_or_features, "features", dataset_or_features)
    return {tag: category for category in CATEGORIES if category in columns
            for tag in columns[category].feature.names}


if __name__ == "__main__":  # pragma: no cover - a quick look at a run
    import sys

    logging.basicConfig(level=logging.INFO)
    _builder = ConceptCaps(config_name=sys.argv[2] if len(sys.argv) > 2 else "default", data_dir=sys.argv[1])
    _builder.download_and_prepare()
    logger.info("%s", _builder.as_dataset())
