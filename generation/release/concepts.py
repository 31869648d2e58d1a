"""Concept sets for TCAV and similar probes, and the concept metadata of a release.

    from datasets import load_dataset
    from conceptcaps import concept_sets

    train = load_dataset("runs/demo/release", split="train")
    sets = concept_sets(train, "piano", n=50, n_random=10, seed=0)
    sets.positives          # 50 rows that hold "piano"
    sets.randoms[3]         # 50 rows without "piano": the 4th of 10 random sets
    positives, randoms = sets
    both = concept_sets(train, ["piano", "organ"], n=50, n_random=10)   # {tag: ConceptSets}, shared randoms
    concepts = to_captum_concepts(sets, preprocess)                       # captum Concepts for TCAV.interpret
    heard = concept_sets(train, "piano", n=50, min_evidence=0.75, evidence="runs/demo")  # CLAP hears piano
    heard.evidence          # {"positives": 80, "kept": 61, ...}: how many positives remain

`concept_sets` works on any loaded ConceptCaps split (or the `audio` config, or a streaming-free
subset of either). It and `conceptcaps concepts export` are one function (`choose_sets`): the
same split, tags, sizes and seed give the same sets. A tag's positives depend only on the seed
and the tag (not on the other tags asked for); random sets hold none of the tags asked for
together and are disjoint when the pool allows (else they overlap as little as chance lets,
never repeat when distinct sets exist, and a warning says so). `concept_counts` recounts, from a release folder's Parquet files, what
`conceptcaps build` writes to `RELEASE/concepts.json`: each tag's category and positives per
config and split, and how often two tags share a row.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.taxonomy import CATEGORIES

logger = logging.getLogger(__name__)

CONCEPTS_FILE = "concepts.json"


def check_built_release(path: Path) -> None:
    """A release folder that `conceptcaps build` wrote (it holds the build record) must still be what the build
    wrote: a missing, extra or changed file is refused before any set is drawn from it. Folders without a record
    (a downloaded snapshot) are read as they are."""
    from conceptcaps_pipeline.release.record import BUILD_RECORD, verify_release

    if not (path / BUILD_RECORD).is_file():
        return
    problems = verify_release(path)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ConceptCapsError(f"{path} is not the release its build wrote: {'; '.join(problems[:3])}{more}: rebuild it "
                               f"with `conceptcaps build --run {path.parent} --force`.")


def load_release(source: str | Path, config: str = "default", split: str | None = None, revision: str | None = None,
                 *, check: bool = True, **kwargs):
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
        if check:  # check=False: the caller has just checked it (the check reads every file of the release)
            check_built_release(path)
        digest = hashlib.sha256(str(path.resolve()).encode())
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            stat = file.stat()
            digest.update(f"{file.relative_to(path).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        kwargs.setdefault("cache_dir", str(Path(datasets.config.HF_DATASETS_CACHE) / "conceptcaps-local" /
                                           digest.hexdigest()[:16]))
        return datasets.load_dataset(str(path), config, split=split, **kwargs)
    return datasets.load_dataset(str(source), config, split=split, revision=revision, **kwargs)


class SplitAudio:
    """The stored (undecoded) `audio` of a split, read from its Parquet files a row group at a time.

    Rows are numbered as `load_dataset` numbers them (files in the config's order, row groups in
    file order), so the indices of a split loaded without its audio column address the same clips.
    Why not the loaded split's own column: `load_dataset` first copies every clip of the split into
    an Arrow cache, which costs a read and memory that grow with the split; here memory holds one
    row group (the last one read is kept, so walking a split in order reads each group once).
    """

    def __init__(self, files: list[str]):
        import pyarrow.parquet as pq

        self.files, firsts, self.groups, start = list(files), [], [], 0
        for file in self.files:
            meta = pq.ParquetFile(file).metadata
            for group in range(meta.num_row_groups):
                self.groups.append((file, group, start))
                firsts.append(start)
                start += meta.row_group(group).num_rows
        self.firsts, self.total, self._last = np.array(firsts, dtype=np.int64), start, (None, None)

    def __len__(self) -> int:
        return self.total

    def _group(self, g: int):
        import pyarrow.parquet as pq

        if self._last[0] != g:
            file, group, _ = self.groups[g]
            self._last = (None, None)  # drop the previous group before reading the next
            self._last = (g, pq.ParquetFile(file).read_row_group(group, columns=["audio"]).column("audio"))
        return self._last[1]

    def rows(self, indices) -> list[dict]:
        """[{"bytes", "path"}] of `indices`, in their order; one clear error for an index outside the split."""
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < self.total]
        if bad:
            raise ConceptCapsError(f"rows {bad[:3]} are outside the split's {self.total} rows ({self.files[:1]}...).")
        where = np.searchsorted(self.firsts, indices, side="right") - 1
        out: dict = {}
        for g in sorted(set(where.tolist())):  # each group once per call, in file order
            column, first = self._group(g), self.groups[g][2]
            for i, w in zip(indices, where):
                if w == g:
                    out[i] = column[i - first].as_py()
        return [out[i] for i in indices]


def load_release_lean(source: str | Path, config: str, split: str, revision: str | None = None):
    """(split without its `audio` column, `SplitAudio` of its clips) for a local release folder.

    Labels, ids and durations load as usual (`load_release`, a few bytes a row); the audio stays in
    the Parquet files and is read a row group at a time. A Hub id has no local files: (the full
    split, None), and callers read its audio column.
    """
    import datasets
    import pyarrow.parquet as pq

    path = Path(source).expanduser()
    if not path.is_dir():
        return load_release(source, config, split, revision), None
    check_built_release(path)
    builder = datasets.load_dataset_builder(str(path), config)
    files = (builder.config.data_files or {}).get(split)
    if not files:
        raise ValueError(f"Unknown split {split!r}: config {config!r} of {path} has splits "
                         f"{sorted(builder.config.data_files or {})}")
    columns = [name for name in pq.read_schema(files[0]).names if name != "audio"]
    dataset = load_release(path, config, split, check=False, columns=columns)
    audio = SplitAudio(list(files))
    if len(audio) != len(dataset):
        raise ConceptCapsError(f"{path}: split {split!r} has {len(dataset)} rows but its Parquet files hold "
                               f"{len(audio)}: rebuild it with `conceptcaps build --force`.")
    return dataset, audio


@dataclass(frozen=True)
class ConceptSets:
    """One positive set of a concept and `n_random` random sets that never hold it."""

    tag: str
    positives: object  # a datasets.Dataset
    randoms: list = field(default_factory=list)  # datasets.Dataset each
    # With min_evidence: {"min_evidence", "source", "positives" (labelled), "kept" (evidence >= it), "unscored"}.
    evidence: dict | None = None

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


def choose_sets(masks: dict[str, np.ndarray], n: int, n_random: int, random_size: int | None = None, seed: int = 0,
                what: str = "", *, eligible: dict[str, np.ndarray] | None = None, min_evidence: float = 0.0) -> dict:
    """Row indices of every concept's positives and of the shared random sets: `concept_sets` and the export.

    `masks`: the rows labelled with each tag; `eligible`: the labelled rows positives may be drawn
    from (those with evidence >= `min_evidence`, `select_by_evidence`); random sets avoid every
    labelled row either way.

    {"concepts": {tag: sorted rows}, "random": [sorted rows, ...], "shared": {"a & b": rows in both
    positive sets}, "random_excludes": tags, "overlapping_random": bool}.

    >>> masks = {"piano": np.array([1, 0, 1, 0, 0, 1, 0, 0], bool), "organ": np.array([1, 1, 0, 0, 0, 0, 0, 0], bool)}
    >>> sets = choose_sets(masks, n=2, n_random=2, seed=0)
    >>> sorted(set(sets["random"][0]) | set(sets["random"][1])) == [3, 4, 6, 7]     # disjoint, none of the tags
    True
    >>> choose_sets({"piano": masks["piano"]}, n=2, n_random=0)["concepts"]["piano"] == sets["concepts"]["piano"]
    True
    """
    import logging

    from conceptcaps_pipeline.run_dir import stable_hash

    random_size = n if random_size is None else random_size
    if n < 1 or n_random < 0 or random_size < 1:
        raise ConceptCapsError(f"set sizes must be positive (n={n}, random size={random_size}) and n_random >= 0.")
    concepts = {}
    for tag, mask in masks.items():
        # Why a generator per tag: a tag's positives then depend on the seed and the tag alone, so
        # exporting [piano] or [piano, organ] gives piano the same clips.
        rng = np.random.default_rng([seed, stable_hash(f"positives|{tag}") % 2**32])
        if eligible is not None and tag in eligible:
            kept = int(eligible[tag].sum())
            if kept < n:
                raise ConceptCapsError(
                    f"{tag!r}{what} has only {kept} positive row(s) with evidence >= {min_evidence:g} (of "
                    f"{int(mask.sum())} labelled), fewer than n={n}: lower n or min_evidence (--min_evidence), or "
                    f"make clips that carry it (`conceptcaps audio generate --candidates K`).")
            mask = eligible[tag]
        chosen, _ = draw_sets(mask, n, 0, rng, what=f"{tag!r}{what}")
        concepts[tag] = chosen.tolist()
    any_tag = np.any(np.stack(list(masks.values())), axis=0)
    pool = np.flatnonzero(~any_tag)
    label = "the tags " + ", ".join(map(repr, masks)) + what
    if n_random and len(pool) < random_size:
        raise ConceptCapsError(f"only {len(pool)} row(s) hold none of {label}, fewer than the random set size "
                               f"{random_size}: lower n (or the random set size).")
    rng = np.random.default_rng([seed, stable_hash("random sets") % 2**32])
    randoms: list[list[int]] = []
    overlapping = n_random * random_size > len(pool)
    if not overlapping:  # disjoint: one permutation of the pool, cut into sets
        order = rng.permutation(pool)
        randoms = [sorted(order[k * random_size:(k + 1) * random_size].tolist()) for k in range(n_random)]
    else:
        from math import comb

        distinct = comb(len(pool), random_size) >= n_random
        for _ in range(n_random):
            for _attempt in range(100):
                candidate = sorted(rng.choice(pool, size=random_size, replace=False).tolist())
                if candidate not in randoms or not distinct:
                    break
            randoms.append(candidate)
        logging.getLogger(__name__).warning(
            "concept sets: %d random sets of %d rows from a pool of %d rows without %s overlap%s; lower n_random or "
            "the random set size for disjoint sets", n_random, random_size, len(pool), label,
            "" if distinct else " and repeat (fewer distinct sets exist than asked for)")
    tags = list(concepts)
    shared = {f"{a} & {b}": sorted(set(concepts[a]) & set(concepts[b])) for i, a in enumerate(tags)
              for b in tags[i + 1:]}
    return {"concepts": concepts, "random": randoms, "shared": {k: v for k, v in shared.items() if v},
            "random_excludes": tags, "overlapping_random": overlapping}


def evidence_lookup(dataset, evidence=None) -> tuple[dict, str]:
    """({id: {tag: evidence}}, where it came from) for the rows of a ConceptCaps split.

    `evidence`: a run directory scored by `conceptcaps audio score` (RUN/audio_evidence/), or a
    ready {id: {tag: evidence}}; default: the split's own `evidence` column (a list aligned with
    `labels`). A split with neither gets one error saying how to make it.
    """
    if evidence is not None and not isinstance(evidence, dict):
        from conceptcaps_pipeline.release.evidence import FOLDER
        from conceptcaps_pipeline.release.rows import label_evidence

        path = Path(evidence) / FOLDER / "evidence.parquet"
        # Why the build's reader: it refuses evidence of other clips (audio made again since `audio score`).
        found = label_evidence(evidence)
        if found is None:
            raise ConceptCapsError(f"{path} not found: run `conceptcaps audio score --run {evidence}` first.")
        return found, str(path)
    if evidence is not None:
        return evidence, "the evidence given"
    if "evidence" not in dataset.column_names:
        raise ConceptCapsError(
            "min_evidence needs per-label evidence, and this dataset has no `evidence` column: run `conceptcaps audio "
            "score --run RUN`, then rebuild the release (`conceptcaps build --run RUN --force`), or pass evidence=RUN "
            "(the scored run directory).")
    names = dataset.features["labels"].feature.names
    ids = dataset["id"] if "id" in dataset.column_names else list(range(len(dataset)))
    lookup = {}
    for clip, labels, values in zip(ids, dataset["labels"], dataset["evidence"]):
        values = values or []
        if len(values) != len(labels):
            raise ConceptCapsError(f"row {clip!r}: its `evidence` column has {len(values)} value(s) for {len(labels)} "
                                   f"label(s) (they are aligned): rebuild the release (`conceptcaps build --force`).")
        lookup[clip] = {names[label]: value for label, value in zip(labels, values)}
    return lookup, "the release's evidence column"


def select_by_evidence(dataset, masks: dict[str, np.ndarray], min_evidence: float, evidence=None,
                       what: str = "") -> tuple[dict[str, np.ndarray], dict]:
    """The labelled rows of each tag whose evidence for it is >= `min_evidence`, and how many remain.

    Returns ({tag: boolean mask}, {"min_evidence", "source", "concepts": {tag: {"positives", "kept",
    "unscored"}}}); `unscored`: labelled rows without a value (not scored, null or NaN; never kept).
    One log line per tag. Values and threshold are compared at float32 precision, the release
    column's, so the column and RUN/audio_evidence keep the same rows (evidence 0.7 passes q = 0.7).
    """
    from conceptcaps_pipeline.release.evidence import check_min_evidence

    check_min_evidence(min_evidence)
    lookup, source = evidence_lookup(dataset, evidence)
    ids = dataset["id"] if "id" in dataset.column_names else list(range(len(dataset)))
    threshold = np.float32(min_evidence)
    eligible, counts = {}, {}
    for tag, mask in masks.items():
        rows = np.flatnonzero(mask)
        eligible[tag] = np.zeros(len(mask), dtype=bool)
        unscored = 0
        for i in rows:
            value = lookup.get(ids[i], {}).get(tag)
            if value is None or np.isnan(value):
                unscored += 1
                continue
            eligible[tag][i] = np.float32(value) >= threshold
        kept = int(eligible[tag].sum())
        counts[tag] = {"positives": len(rows), "kept": kept, "unscored": unscored}
        logger.info("concept sets: %r%s: %d of %d positives (%.0f%%) have evidence >= %g (%s)%s", tag, what, kept,
                    len(rows), 100 * kept / max(len(rows), 1), min_evidence, source,
                    f"; {unscored} have none (not scored)" if unscored else "")
    return eligible, {"min_evidence": min_evidence, "source": source, "concepts": counts}


def run_evidence(dataset, run: str | Path, reads_run_release: bool, min_evidence: float):
    """Where a command's --min_evidence reads evidence: None (the release's own `evidence` column) or the
    run directory (RUN/audio_evidence/, when the release read is RUN/release); else one clear error."""
    from conceptcaps_pipeline.release.evidence import FOLDER

    if "evidence" in dataset.column_names:
        return None
    run = Path(run)
    if reads_run_release and (run / FOLDER / "evidence.parquet").is_file():
        return run
    where = f"{run / FOLDER / 'evidence.parquet'} is not there" if reads_run_release else "--dataset is not RUN/release"
    raise ConceptCapsError(
        f"--min_evidence {min_evidence:g} needs per-label evidence: the release has no `evidence` column and {where}: "
        f"run `conceptcaps audio score --run {run}` and rebuild (`conceptcaps build --run {run} --force`).")


def concept_sets(dataset, tag, n: int = 50, n_random: int = 10, seed: int = 0, random_size: int | None = None, *,
                 min_evidence: float = 0.0, evidence=None):
    """Positive sets of one or more concepts and `n_random` random negative sets, for TCAV and similar probes.

    Args:
        dataset: a ConceptCaps split (`load_dataset(release, split="train")`, any config).
        tag: a taxonomy tag, e.g. "piano" or "slow tempo" (returns a ConceptSets), or a list of tags
            (returns {tag: ConceptSets}, every one with the same random sets, which hold none of the tags).
        n: rows per positive set, drawn at random without replacement.
        n_random: how many random sets (TCAV tests a concept against many).
        seed: the same seed gives the same sets, and the same as `conceptcaps concepts export`.
        random_size: rows per random set (default n).
        min_evidence: draw positives only from rows whose evidence for the tag (its rank percentile
            among its category's tags by CLAP, `conceptcaps audio score`) is at least this; 0 (default)
            reads no evidence and gives the same sets as before. Random sets still avoid every row
            labelled with a tag. How many remain: `sets.evidence` and a log line.
        evidence: where the evidence is: a scored run directory, or {id: {tag: evidence}}; default the
            split's `evidence` column (a list aligned with `labels`).

    Raises a ConceptCapsError naming the count available when fewer than `n` rows hold a tag.

    >>> import datasets
    >>> labels = datasets.List(datasets.ClassLabel(names=["piano", "rock"]))
    >>> ds = datasets.Dataset.from_dict({"labels": [[0], [1], [0, 1], [1], [1], [1], [1]]},
    ...                                 features=datasets.Features({"labels": labels}))
    >>> sets = concept_sets(ds, "piano", n=2, n_random=2)
    >>> sorted(sets.positives["labels"]), [len(r) for r in sets.randoms]
    ([[0], [0, 1]], [2, 2])
    >>> concept_sets(ds, "piano", n=3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    conceptcaps_pipeline.errors.ConceptCapsError: 'piano' has only 2 positive row(s), fewer than n=3: ...
    """
    from conceptcaps_pipeline.release.evidence import check_min_evidence

    check_min_evidence(min_evidence)
    tags = [tag] if isinstance(tag, str) else list(tag)
    masks = {t: tag_mask(dataset, t) for t in tags}
    eligible, report = None, None
    if min_evidence > 0:  # why only then: 0 keeps every positive, so it needs no evidence and changes nothing
        eligible, report = select_by_evidence(dataset, masks, min_evidence, evidence)
    chosen = choose_sets(masks, n, n_random, random_size, seed, eligible=eligible, min_evidence=min_evidence)
    randoms = [dataset.select(rows) for rows in chosen["random"]]
    sets = {t: ConceptSets(t, dataset.select(rows), randoms,
                           None if report is None else {"min_evidence": min_evidence, "source": report["source"],
                                                        **report["concepts"][t]})
            for t, rows in chosen["concepts"].items()}
    return sets[tag] if isinstance(tag, str) else sets


def to_captum_concepts(sets, preprocess=None, *, sampling_rate: int = 16_000, max_duration: float | None = None,
                       batch_size: int = 8, first_id: int = 0) -> list:
    """captum `Concept`s of `concept_sets(...)` output, ready for `captum.concept.TCAV.interpret`.

    `sets`: a ConceptSets (-> [its positives, random 0, random 1, ...]) or {tag: ConceptSets}
    (-> every tag's positives, then the shared random sets once). Each Concept's `data_iter`
    yields model inputs: `preprocess(list of mono float32 clips at sampling_rate, cut or
    zero-padded to max_duration, default the longest clip)`, by default a (batch, samples)
    tensor. Needs the `audio` config.

        concepts = to_captum_concepts(concept_sets(train, "piano", n=50), extractor_fn)
        TCAV(model, ["layer"]).interpret(inputs, [[concepts[0], r] for r in concepts[1:]], target=3)
    """
    import torch
    from captum.concept import Concept
    from conceptcaps_pipeline.tcav.model import DatasetClips, default_preprocess, fit_length

    groups = {sets.tag: sets} if isinstance(sets, ConceptSets) else dict(sets)
    named = [(tag, s.positives) for tag, s in groups.items()]
    first = next(iter(groups.values()))
    named += [(f"random_{k}", r) for k, r in enumerate(first.randoms)]
    preprocess = preprocess or default_preprocess

    class Clips(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.source, self.count = DatasetClips(dataset), len(dataset)
            seconds = max_duration or (max(dataset["duration_s"]) if "duration_s" in dataset.column_names else None)
            self.length = round(seconds * sampling_rate) if seconds else None

        def __len__(self):
            return self.count

        def __getitem__(self, i):
            (_, _, (clip,)), = list(self.source.batches([i], 1, sampling_rate))
            return fit_length(clip, self.length) if self.length else clip

    return [Concept(first_id + k, name, torch.utils.data.DataLoader(Clips(data), batch_size=batch_size,
                                                                   collate_fn=preprocess))
            for k, (name, data) in enumerate(named)]


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
