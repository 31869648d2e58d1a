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
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from generation.audio_shards import INDEX_COLUMNS, read_shards
from generation.errors import ConceptCapsError
from generation.taxonomy import CATEGORIES, Taxonomy

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
_LICENSE = "cc-by-sa-4.0"

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
        ConceptCapsConfig(name="default", description="Captions and concept labels (no audio)."),
        ConceptCapsConfig(name="audio", with_audio=True, description="Captions, concept labels and the audio."),
    ]
    for name, fraction in SUBSETS.items():
        share = f"{fraction:.0%} of every split"
        configs.append(ConceptCapsConfig(name=name, fraction=fraction, description=f"{share}, no audio."))
        configs.append(ConceptCapsConfig(name=f"{name}_audio", fraction=fraction, with_audio=True,
                                         description=f"{share}, with audio."))
    return configs


# -- reading a run: the one place ---------------------------------------------------------------
def stable_hash(text: str) -> int:
    """A hash of `text` that is the same on every machine and Python process (unlike hash())."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16)


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


def load_tags(run: str | Path) -> list[str]:
    """The taxonomy's tags in its order (the ClassLabel names) from RUN/taxonomy.json."""
    path = Path(run) / "taxonomy.json"
    if not path.is_file():
        raise ConceptCapsError(
            f"{path} not found: the builder needs the run's taxonomy. Point data_dir (or --run) at a run "
            f"directory, or run `conceptcaps distill --source SOURCE --out {run}` first."
        )
    return Taxonomy.load(path).tags


def read_captions(run: str | Path, tags: list[str]) -> list[dict]:
    """RUN/captions.parquet as checked rows: unique ids, captions, known tags, real lists."""
    path = Path(run) / "captions.parquet"
    if not path.is_file():
        raise ConceptCapsError(
            f"{path} not found: the dataset's rows are the run's captions. "
            f"Run `conceptcaps captions generate --run {run}` first."
        )
    table = pq.read_table(path)
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


def _seed_splits(groups, tag_groups, rare_first, fractions, salt: int) -> dict:
    """Steps 2 and 3 of `assign_splits` with one tie-breaking salt: {group: split} for the seeded groups."""
    rank = {key: stable_hash(f"{salt}|" + "|".join(key)) for key in groups}
    seed_order = sorted(fractions, key=lambda s: (fractions[s], s))  # the small splits first
    rare = set(rare_first)
    split_of_group: dict[tuple[str, ...], str] = {}
    coverage = {tag: Counter() for tag in rare}  # tag -> split -> seeded groups holding it

    def move(key, split):
        for tag in (u for u in key if u in rare):
            if key in split_of_group:
                coverage[tag][split_of_group[key]] -= 1
            if split is not None:
                coverage[tag][split] += 1
        if split is None:
            split_of_group.pop(key, None)
        else:
            split_of_group[key] = split

    def satisfied(tag):
        return all(coverage[tag][s] > 0 for s in fractions)

    def waste(key, split, tag):
        # Tags of the group that are already in `split` would spend one of their few groups there.
        return sum(1 / len(tag_groups[u]) for u in key if u in rare and u != tag and coverage[u][split] > 0)

    for tag in rare_first:
        for split in (s for s in seed_order if not coverage[tag][s]):
            free = [k for k in tag_groups[tag] if k not in split_of_group]
            if not free:
                break
            move(min(free, key=lambda k: (waste(k, split, tag), len(groups[k]), rank[k])), split)

    # Hill climbing: move a group of a tag that misses a split into it when that raises the number
    # of the group's seeded tags that are in every split (so it ends: the count only grows).
    improved = True
    while improved:
        improved = False
        for tag in (t for t in rare_first if not satisfied(t)):
            for split in (s for s in seed_order if not coverage[tag][s]):
                for key in sorted(tag_groups[tag], key=lambda k: (len(groups[k]), rank[k])):
                    affected = [u for u in key if u in rare]
                    before, origin = sum(map(satisfied, affected)), split_of_group.get(key)
                    move(key, split)
                    if sum(map(satisfied, affected)) > before:
                        improved = True
                        break
                    move(key, origin)
    return split_of_group


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
    4. Filling: every other group, in order of a hash of its attribute set, goes to the split
       furthest below its share (70/15/15 of the rows).
    Steps 2-3 run with up to `attempts` fixed hash salts for the ties, stopping at the first that
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

    sizes = dict.fromkeys(fractions, 0)
    for key, split in split_of_group.items():
        sizes[split] += len(groups[key])
    total = sum(len(ids) for ids in groups.values())
    order = list(fractions)
    key_hash = {key: stable_hash("|".join(key)) for key in groups}
    for key in sorted((k for k in groups if k not in split_of_group), key=lambda k: (key_hash[k], k)):
        split = max(order, key=lambda s: (fractions[s] * total - sizes[s], -order.index(s)))
        split_of_group[key] = split
        sizes[split] += len(groups[key])

    split_of = {clip_id: split_of_group[key] for key, ids in groups.items() for clip_id in ids}
    return SplitAssignment(split_of, {t: len(tag_groups[t]) for t in missing(split_of_group)})


def subset_ids(ids: list[str], fraction: float) -> set[str]:
    """The deterministic `fraction` of `ids` kept by a subset: the ids with the smallest hash.

    At least one id of a non-empty split is kept; a 10% subset lies inside the 25% one.
    """
    if fraction >= 1.0:
        return set(ids)
    keep = max(1, round(fraction * len(ids))) if ids else 0
    return set(sorted(ids, key=lambda i: (stable_hash(i), i))[:keep])


@dataclass
class RunPlan:
    """Everything needed to write the rows of one config: split membership, order and clip locations."""

    rows: dict[str, dict]
    splits: dict[str, list[str]]  # split -> ids, in row order
    audio: AudioIndex
    assignment: SplitAssignment


def plan_run(run: str | Path, tags: list[str], *, with_audio: bool, fraction: float = 1.0) -> RunPlan:
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
    extra = sorted(set(audio.ids) - set(by_id))
    if extra:
        logger.warning("%d clip(s) in %s have no caption in captions.parquet and are left out (first: %s)",
                       len(extra), run / "audio", extra[:5])
    order = clipped + sorted(set(by_id) - set(clipped))
    assignment = assign_splits(rows)
    splits = {}
    for split in SPLITS:
        ids = [i for i in order if assignment.split_of[i] == split]
        keep = subset_ids(ids, fraction)
        splits[split] = [i for i in ids if i in keep]
    return RunPlan(by_id, splits, audio, assignment)


def features(tags: list[str], sampling_rate: int | None = None) -> datasets.Features:
    """The typed columns; `audio` and `duration_s` only when a sampling rate is given."""
    strings = datasets.List(datasets.Value("string"))
    columns = {
        "id": datasets.Value("string"),
        "caption": datasets.Value("string"),
        "aspect_list": strings,
        **{category: strings for category in CATEGORIES},
        # Typed concept labels: filter with `names.index("piano") in row["labels"]`.
        "labels": datasets.List(datasets.ClassLabel(names=list(tags))),
        "coverage": datasets.Value("float32"),
    }
    if sampling_rate is not None:
        columns["audio"] = datasets.Audio(sampling_rate=sampling_rate)
        columns["duration_s"] = datasets.Value("float32")
    return datasets.Features(columns)


# -- the builder --------------------------------------------------------------------------------
class ConceptCaps(datasets.GeneratorBasedBuilder):
    """ConceptCaps rows from a run directory: `ConceptCaps(config_name=..., data_dir=RUN)`."""

    VERSION = datasets.Version("1.0.0")
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
        rate = None
        if self.config.with_audio:
            rate = read_audio_index(run).sampling_rate
            if rate is None:
                raise ConceptCapsError(
                    f"config {self.config.name!r} needs clips in {run / 'audio'}, and there are none: run "
                    f"`conceptcaps audio generate --run {run}` first, or use a config without audio."
                )
        return datasets.DatasetInfo(
            description=_DESCRIPTION, features=features(load_tags(run), rate), homepage=_HOMEPAGE,
            license=_LICENSE, citation=_CITATION,
        )

    def _split_generators(self, dl_manager):
        self._plan = plan_run(self.config.data_dir, self.info.features["labels"].feature.names,
                              with_audio=self.config.with_audio, fraction=self.config.fraction)
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
        names = self.info.features["labels"].feature
        out = {k: row[k] for k in CAPTION_COLUMNS if k != "coverage"}
        out["labels"] = sorted(names.str2int(t) for t in set(row["aspect_list"]))
        out["coverage"] = row["coverage"] if row["coverage"] is not None and not math.isnan(row["coverage"]) else None
        return out


def label_names(dataset) -> list[str]:
    """The taxonomy tags behind the `labels` ClassLabel of a loaded ConceptCaps split."""
    return dataset.features["labels"].feature.names


def concept_sets(dataset, tag: str):
    """(positives, negatives) of one concept: the rows whose labels hold `tag`, and all the others."""
    names = label_names(dataset)
    if tag not in names:
        raise KeyError(f"{tag!r} is not a ConceptCaps tag; see label_names(dataset).")
    index = names.index(tag)
    has = [index in labels for labels in dataset["labels"]]
    positives = dataset.select([i for i, h in enumerate(has) if h])
    negatives = dataset.select([i for i, h in enumerate(has) if not h])
    return positives, negatives


if __name__ == "__main__":  # pragma: no cover - a quick look at a run
    import sys

    logging.basicConfig(level=logging.INFO)
    _builder = ConceptCaps(config_name=sys.argv[2] if len(sys.argv) > 2 else "default", data_dir=sys.argv[1])
    _builder.download_and_prepare()
    logger.info("%s", _builder.as_dataset())
