"""Concept sets for TCAV and similar probes, and the concept metadata of a release.

    from datasets import load_dataset
    from conceptcaps import concept_sets

    train = load_dataset("runs/demo/release", split="train")
    sets = concept_sets(train, "piano", n=50, n_random=10, seed=0)
    sets.positives          # 50 rows that hold "piano"
    sets.randoms[3]         # 50 rows without "piano": the 4th of 10 random sets
    positives, randoms = sets

`concept_sets` works on any loaded ConceptCaps split (or the `audio` config, or a streaming-free
subset of either). `concept_counts` recounts, from a release folder's Parquet files, what
`conceptcaps build` writes to `RELEASE/concepts.json`: each tag's category and positives per
config and split, and how often two tags share a row.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.taxonomy import CATEGORIES

CONCEPTS_FILE = "concepts.json"


def load_release(source: str | Path, config: str = "default", split: str | None = None, revision: str | None = None,
                 **kwargs):
    """`datasets.load_dataset(source, config, split=...)` that never serves another folder's data.

    A Hub id loads as usual (its cache follows the commit). A local release folder gets a cache of
    its own, keyed by the names, sizes and times of its files: datasets 5.2 keys the cache of a
    local folder by the folder's name and card alone, so `runs/a/release` would be served the
    cached rows of `runs/b/release`, or of the same folder before it was rebuilt.
    """
    import hashlib

    import datasets

    path = Path(source).expanduser()
    if path.is_dir():
        digest = hashlib.sha256(str(path.resolve()).encode())
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            stat = file.stat()
            digest.update(f"{file.relative_to(path).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        kwargs.setdefault("cache_dir", str(Path(datasets.config.HF_DATASETS_CACHE) / "conceptcaps-local" /
                                           digest.hexdigest()[:16]))
        return datasets.load_dataset(str(path), config, split=split, **kwargs)
    return datasets.load_dataset(str(source), config, split=split, revision=revision, **kwargs)


@dataclass(frozen=True)
class ConceptSets:
    """One positive set of a concept and `n_random` random sets that never hold it."""

    tag: str
    positives: object  # a datasets.Dataset
    randoms: list = field(default_factory=list)  # datasets.Dataset each

    def __iter__(self):  # `positives, randoms = concept_sets(...)`
        return iter((self.positives, self.randoms))


def tag_mask(dataset, tag: str) -> np.ndarray:
    """Which rows of a ConceptCaps split hold `tag` (via the typed `labels` column)."""
    import difflib

    names = dataset.features["labels"].feature.names
    if tag not in names:
        close = difflib.get_close_matches(tag, names, n=3, cutoff=0.5)
        raise ConceptCapsError(
            f"{tag!r} is not a ConceptCaps tag of this dataset"
            f"{' (closest: ' + ', '.join(map(repr, close)) + ')' if close else ''}; "
            f"the tags are dataset.features['labels'].feature.names."
        )
    index = names.index(tag)
    return np.array([index in labels for labels in dataset["labels"]], dtype=bool)


def random_sets(allowed: np.ndarray, count: int, size: int, rng: np.random.Generator,
                what: str = "the concept") -> list[np.ndarray]:
    """`count` sets of `size` row indices drawn afresh from the rows where `allowed` is true (no repeats in a set)."""
    pool = np.flatnonzero(allowed)
    if count and len(pool) < size:
        raise ConceptCapsError(
            f"only {len(pool)} row(s) can go into random sets for {what}, fewer than the set size {size}: "
            f"lower n (or the random set size)."
        )
    return [np.sort(rng.choice(pool, size=size, replace=False)) for _ in range(count)]


def draw_sets(positive: np.ndarray, n: int, n_random: int, rng: np.random.Generator, *,
              random_from: np.ndarray | None = None, random_size: int | None = None,
              what: str = "the concept") -> tuple[np.ndarray, list[np.ndarray]]:
    """Row indices: n positives (without replacement) and n_random random sets of `random_size` rows.

    Random rows come from `random_from` (default: every row) and never from the positive rows.
    """
    random_size = n if random_size is None else random_size
    if n < 1 or n_random < 0 or random_size < 1:
        raise ConceptCapsError(f"set sizes must be positive (n={n}, random size={random_size}) and n_random >= 0.")
    positives = np.flatnonzero(positive)
    if len(positives) < n:
        raise ConceptCapsError(
            f"{what} has only {len(positives)} positive row(s), fewer than n={n}: lower n, use a split or release "
            f"with more positives, or sample more sets that hold it (`conceptcaps vae sample --min_per_tag {n}`)."
        )
    chosen = np.sort(rng.choice(positives, size=n, replace=False))
    allowed = ~positive if random_from is None else (random_from & ~positive)
    return chosen, random_sets(allowed, n_random, random_size, rng, what)


def concept_sets(dataset, tag: str, n: int = 50, n_random: int = 10, seed: int = 0) -> ConceptSets:
    """One positive set and `n_random` random negative sets of a concept, for TCAV and similar probes.

    Args:
        dataset: a ConceptCaps split (`load_dataset(release, split="train")`, any config).
        tag: a taxonomy tag, e.g. "piano" or "slow tempo".
        n: rows per set: the positive set holds `n` rows with `tag`, drawn at random without
            replacement; each random set holds `n` rows without `tag`.
        n_random: how many random sets (TCAV tests a concept against many).
        seed: the same seed gives the same sets.

    Raises a ConceptCapsError naming the count available when fewer than `n` rows hold `tag`.

    >>> import datasets
    >>> labels = datasets.List(datasets.ClassLabel(names=["piano", "rock"]))
    >>> ds = datasets.Dataset.from_dict({"labels": [[0], [1], [0, 1], [1], [1]]},
    ...                                 features=datasets.Features({"labels": labels}))
    >>> sets = concept_sets(ds, "piano", n=2, n_random=3)
    >>> sorted(sets.positives["labels"]), [len(r) for r in sets.randoms]
    ([[0], [0, 1]], [2, 2, 2])
    >>> concept_sets(ds, "piano", n=3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    conceptcaps_pipeline.errors.ConceptCapsError: 'piano' has only 2 positive row(s), fewer than n=3: ...
    """
    chosen, randoms = draw_sets(tag_mask(dataset, tag), n, n_random, np.random.default_rng(seed), what=repr(tag))
    return ConceptSets(tag, dataset.select(chosen), [dataset.select(r) for r in randoms])


def concept_counts(release: str | Path, configs: list[str], splits: list[str], category_of: dict[str, str],
                   tags: list[str]) -> dict:
    """Recount a release folder's concept metadata from its Parquet files (the body of concepts.json)."""
    import pyarrow.parquet as pq

    release = Path(release)
    positives = {tag: {c: dict.fromkeys(splits, 0) for c in configs} for tag in tags}
    rows = {c: dict.fromkeys(splits, 0) for c in configs}
    pairs: Counter = Counter()
    for config in configs:
        for split in splits:
            for path in sorted((release / "data" / config).glob(f"{split}-*.parquet")):
                for tag_list in pq.read_table(path, columns=["aspect_list"]).column("aspect_list").to_pylist():
                    rows[config][split] += 1
                    unique = sorted(set(tag_list))
                    for tag in unique:
                        positives[tag][config][split] += 1
                    if config == "default":
                        pairs.update((a, b) for i, a in enumerate(unique) for b in unique[i + 1:])
    cooccurrence: dict[str, dict[str, int]] = {}
    for (a, b), count in sorted(pairs.items()):
        cooccurrence.setdefault(a, {})[b] = count
        cooccurrence.setdefault(b, {})[a] = count
    return {
        "rows": rows,
        "concepts": [{"tag": tag, "category": category_of[tag], "index": i, "positives": positives[tag]}
                     for i, tag in enumerate(tags)],
        # Rows of the `default` config (every split) that hold both tags; symmetric, zeros left out.
        "cooccurrence": {a: dict(sorted(cooccurrence[a].items())) for a in tags if a in cooccurrence},
    }


def concepts_document(release: str | Path, configs: list[str], splits: list[str], taxonomy, *,
                      subset_rule: dict[str, int], unsatisfiable: dict[str, int]) -> dict:
    """The whole RELEASE/concepts.json: header, rules, counts and co-occurrence."""
    counts = concept_counts(release, configs, splits, taxonomy.category_of, taxonomy.tags)
    return {
        "format": "conceptcaps-concepts/1",
        "taxonomy_version": taxonomy.version,
        "categories": {c: list(taxonomy.categories[c]) for c in CATEGORIES},
        "configs": configs,
        "splits": splits,
        "rules": {
            "split": "no label set in two splits; every tag with >= 3 samples in >= 3 distinct label sets is in "
                     "every split",
            "subset_min_positives": subset_rule,
            "subset": "a subset keeps at least one positive of every tag that has at least subset_min_positives "
                      "positives in that split of the full release; 10pct lies inside 25pct",
            "unsatisfiable_tags": unsatisfiable,
        },
        **counts,
    }
