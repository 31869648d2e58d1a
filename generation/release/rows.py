"""The dataset's typed columns and rows, and its configs: the one definition that the `datasets`
builder (conceptcaps.py) and `conceptcaps build` (release/write.py) share.

    from conceptcaps_pipeline.release.rows import CONFIGS, features, make_example
    columns = features(taxonomy, sampling_rate=32_000)          # the audio configs' Features
    example = make_example(caption_row, columns, clip)          # one row, ready for encode_example
    evidence = label_evidence(run)                              # {id: {label: evidence}}, None if not scored
    columns = features(taxonomy, 32_000, evidence=evidence is not None)   # ... plus the `evidence` column
    example = make_example(caption_row, columns, clip, evidence=evidence[caption_row["id"]])

The audio configs carry `evidence` (a list of float32 aligned with `labels`) when the run was
scored (`conceptcaps audio score`): each label's rank percentile among its category's tags by
CLAP similarity (generation/audio/score.py); null where there is none (a one-tag category).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import datasets
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.release.plan import CAPTION_COLUMNS
from conceptcaps_pipeline.release.splits import SUBSETS
from conceptcaps_pipeline.taxonomy import CATEGORIES, Taxonomy

# The dataset's version: every config carries it, and the release card's `configs:` entries with
# it, so `load_dataset(release, config).info.version` reads it too.
VERSION = datasets.Version("1.0.0")

# name -> (with audio, share of every split kept): each text config followed by its audio twin.
CONFIGS: dict[str, tuple[bool, float]] = {"default": (False, 1.0), "audio": (True, 1.0)}
for _name, _fraction in SUBSETS.items():
    CONFIGS[_name] = (False, _fraction)
    CONFIGS[f"{_name}_audio"] = (True, _fraction)


def features(taxonomy: Taxonomy, sampling_rate: int | None = None, evidence: bool = False) -> datasets.Features:
    """The typed columns; `audio` and `duration_s` only when a sampling rate is given, and `evidence` with them
    when the run was scored (`evidence=True`).

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
        if evidence:
            # Aligned with `labels` (same length, same order): row["evidence"][k] is the evidence of row["labels"][k].
            columns["evidence"] = datasets.List(datasets.Value("float32"))
    return datasets.Features(columns)


def tag_categories(dataset_or_features) -> dict[str, str]:
    """tag -> category, read from the features (each category column is a ClassLabel over its tags)."""
    columns = getattr(dataset_or_features, "features", dataset_or_features)
    return {tag: category for category in CATEGORIES if category in columns
            for tag in columns[category].feature.names}


def make_example(row: dict, columns: datasets.Features, clip: dict | None = None,
                 category_of: dict[str, str] | None = None, evidence: dict[str, float | None] | None = None) -> dict:
    """One dataset row from a checked caption row (plan.read_captions) and, for audio configs, its clip
    ({"audio": FLAC bytes, "duration_s": ...}). `category_of`: `tag_categories(columns)`, passed in by
    callers that make many rows. `evidence`: {label: evidence} of the clip (`label_evidence(run)[id]`), for
    features with an `evidence` column; a label without a score gets null."""
    out = {k: row[k] for k in CAPTION_COLUMNS if k not in ("coverage", *CATEGORIES)}
    category_of = category_of or tag_categories(columns)
    for category in CATEGORIES:
        # Filed by the taxonomy, not by the captions file, so a category column never holds another's tag.
        out[category] = [columns[category].feature.str2int(t) for t in row["aspect_list"]
                         if category_of.get(t) == category]
    out["labels"] = sorted(columns["labels"].feature.str2int(t) for t in set(row["aspect_list"]))
    out["coverage"] = row["coverage"] if row["coverage"] is not None and not math.isnan(row["coverage"]) else None
    if clip is not None:
        out["duration_s"] = clip["duration_s"]
        out["audio"] = {"bytes": clip["audio"], "path": f"{row['id']}.flac"}
    if "evidence" in columns:
        names = columns["labels"].feature
        out["evidence"] = [_score((evidence or {}).get(names.int2str(k))) for k in out["labels"]]
    return out


def _score(value) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def label_evidence(run: str | Path) -> dict[str, dict[str, float | None]] | None:
    """{id: {label: evidence}} of RUN/audio_evidence/evidence.parquet, or None when the run was not scored.

    Evidence of other clips is refused, never shipped: `audio score`'s manifest records a digest of
    the clips it scored (id and clip key: caption fingerprint, seed, settings), and the clips in
    RUN/audio must be those; its evidence.parquet must be the file it recorded.
    """
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.audio.score import FOLDER, STAGE, clip_key
    from conceptcaps_pipeline.audio.shards import INDEX_COLUMNS, read_shards
    from conceptcaps_pipeline.run_dir import check_record, read_manifest, read_table

    run = Path(run)
    path = run / FOLDER / "evidence.parquet"
    if not path.is_file():
        return None
    fix = f"run `conceptcaps audio score --run {run}` (it embeds only the clips that changed), then build again"
    manifest = read_manifest(run, STAGE)
    record = {k: v for k, v in ((manifest or {}).get("outputs") or {}).items() if k.endswith(f"{FOLDER}/evidence.parquet")}
    if manifest is None or not record or check_record(record, run):
        raise ConceptCapsError(f"{path} is not the file `audio score` recorded in {run / 'manifests'} (an interrupted "
                               f"or older scoring): {fix}.")
    ids = read_table(run / "captions.parquet", ["id"]).column("id").to_pylist()
    index = read_shards(run / "audio", columns=INDEX_COLUMNS)
    keys: dict[str, str] = {}
    for i, c, s, st in zip(*(index.column(n).to_pylist() for n in ("id", "caption_sha256", "seed", "settings"))):
        keys.setdefault(i, clip_key(c, s, st))
    # The same digest `audio score` records (score_audio): the clips as they are now.
    digest = hashlib.sha256("\n".join(f"{i} {keys.get(i)}" for i in ids).encode()).hexdigest()
    if manifest.get("clips_sha256") != digest:
        raise ConceptCapsError(f"{path} scores other clips than those in {run / 'audio'} now (audio or captions made "
                               f"again since `audio score`): {fix}.")
    table = pq.read_table(path, columns=["id", "labels", "evidence"])
    return {i: {tag: _score(value) for tag, value in zip(labels or [], values or [])}
            for i, labels, values in zip(*(table.column(c).to_pylist() for c in ("id", "labels", "evidence")))}
