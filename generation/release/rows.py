"""The dataset's typed columns and rows, and its configs: the one definition that the `datasets`
builder (conceptcaps.py) and `conceptcaps build` (release/write.py) share.

    from conceptcaps_pipeline.release.rows import CONFIGS, features, make_example
    columns = features(taxonomy, sampling_rate=32_000)          # the audio configs' Features
    example = make_example(caption_row, columns, clip)          # one row, ready for encode_example
"""

from __future__ import annotations

import math

import datasets
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


def tag_categories(dataset_or_features) -> dict[str, str]:
    """tag -> category, read from the features (each category column is a ClassLabel over its tags)."""
    columns = getattr(dataset_or_features, "features", dataset_or_features)
    return {tag: category for category in CATEGORIES if category in columns
            for tag in columns[category].feature.names}


def make_example(row: dict, columns: datasets.Features, clip: dict | None = None,
                 category_of: dict[str, str] | None = None) -> dict:
    """One dataset row from a checked caption row (plan.read_captions) and, for audio configs, its clip
    ({"audio": FLAC bytes, "duration_s": ...}). `category_of`: `tag_categories(columns)`, passed in by
    callers that make many rows."""
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
    return out
