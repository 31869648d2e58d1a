"""Per-concept agreement between labels and audio, and drawing positives by evidence.

    from conceptcaps_pipeline.release.evidence import read_agreement, positives_with_evidence
    agreement = read_agreement("runs/demo")                 # RUN/audio_evidence/agreement.json
    agreement["concepts"]["piano"]["auc"], agreement["concepts"]["piano"]["auc_interval"]
    kept = positives_with_evidence("runs/demo", "piano", min_evidence=0.75)
    kept.ids, kept.kept, kept.positives                       # the clips labelled piano that CLAP hears it in

`conceptcaps audio score --run RUN` (generation/audio/score.py) writes the inputs
(RUN/audio_evidence/similarities.parquet, text_embeddings.parquet, evidence.parquet) and calls
`write_agreement`. For each taxonomy tag:

- `auc`: ROC-AUC of the tag's CLAP similarity, clips labelled with it (positives) against the
  clips not labelled with it (negatives): 1 = every labelled clip is closer to the tag than every
  other clip; 0.5 = the model cannot tell them apart (the label is not heard, or CLAP cannot hear it).
- `top_k_share`: the share of positives where the tag ranks in its category's top k
  (`k`: `top_k`, or 1 in a category of at most 2k tags, where top k would be most of it);
  `chance` is k / (tags in the category), the share a scorer that hears nothing gets.
- `*_interval`: percentile bootstrap intervals (positives and negatives resampled separately,
  seeded), at `confidence` (95%).

A tag with fewer than 2 positives or no negatives has no AUC (None).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from conceptcaps_pipeline.errors import ConceptCapsError

logger = logging.getLogger(__name__)

FOLDER = "audio_evidence"
BOOTSTRAP_CHUNK = 100  # resamples per vectorised step: memory stays at chunk x clips counts


# -- statistics ---------------------------------------------------------------------------------
def _pairs_below(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each positive: indices into the sorted negatives where values stop being lower / stop being equal."""
    order = np.sort(negative)
    return np.searchsorted(order, positive, "left"), np.searchsorted(order, positive, "right")


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC-AUC of `scores` for the boolean mask `positive` (Mann-Whitney, ties count half); None when
    either side is empty."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return None
    lo, hi = _pairs_below(pos, neg)
    return float((lo + 0.5 * (hi - lo)).sum() / (len(pos) * len(neg)))


def bootstrap_auc(scores: np.ndarray, positive: np.ndarray, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """AUCs of `n_bootstrap` stratified resamples (positives and negatives drawn with replacement separately).

    Why it is fast at 24k clips: the larger side matters only through how many of its draws fall
    between consecutive values of the smaller side, so it is resampled as multinomial counts over
    those at most 2m+1 bins (m: the smaller side's size), exactly as drawing its clips would; the
    smaller side is resampled clip by clip. The roles swap when positives outnumber negatives
    (AUC(positives, negatives) = 1 - AUC(negatives, positives), ties counting half on both sides).
    """
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    if positive.sum() > (~positive).sum():
        return 1.0 - bootstrap_auc(scores, ~positive, n_bootstrap, rng)
    pos, neg = scores[positive], np.sort(scores[~positive])
    n_pos, n_neg = len(pos), len(neg)
    lo, hi = _pairs_below(pos, neg)
    edges = np.unique(np.concatenate([lo, hi, [0, n_neg]]))  # sorted-negative indices where a bin starts or ends
    sizes = np.diff(edges)
    lo_edge, hi_edge = np.searchsorted(edges, lo), np.searchsorted(edges, hi)
    out = []
    for start in range(0, n_bootstrap, BOOTSTRAP_CHUNK):
        size = min(BOOTSTRAP_CHUNK, n_bootstrap - start)
        pos_counts = rng.multinomial(n_pos, np.full(n_pos, 1.0 / n_pos), size=size)
        bin_counts = rng.multinomial(n_neg, sizes / n_neg, size=size)
        below = np.concatenate([np.zeros((size, 1)), np.cumsum(bin_counts, axis=1)], axis=1)  # draws under each edge
        wins = below[:, lo_edge] + 0.5 * (below[:, hi_edge] - below[:, lo_edge])  # (size, n_pos)
        out.append((pos_counts * wins).sum(axis=1) / (n_pos * n_neg))
    return np.concatenate(out) if out else np.zeros(0)


def bootstrap_share(hits: np.ndarray, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """Shares of True in `n_bootstrap` resamples of `hits` with replacement.

    Why a binomial: the number of True among n draws with replacement from `hits` is exactly
    Binomial(n, mean(hits)), so no clip-by-clip draw is needed."""
    hits = np.asarray(hits, dtype=np.float64)
    if n_bootstrap == 0 or len(hits) == 0:
        return np.zeros(0)
    return rng.binomial(len(hits), hits.mean(), size=n_bootstrap) / len(hits)


def _interval(values: np.ndarray, confidence: float) -> list[float] | None:
    if len(values) == 0:
        return None
    tail = (1 - confidence) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def category_ranks(similarities: np.ndarray, categories: list[str]) -> np.ndarray:
    """(n_clips, n_tags): each tag's rank among its category's tags for each clip (1 = closest; ties favour it)."""
    ranks = np.zeros(similarities.shape, dtype=np.int64)
    for category in dict.fromkeys(categories):
        members = [j for j, c in enumerate(categories) if c == category]
        block = similarities[:, members]
        ranks[:, members] = 1 + (block[:, None, :] > block[:, :, None]).sum(axis=2)
    return ranks


def effective_k(top_k: int, category_size: int) -> int:
    """The k of a category: `top_k`, but 1 where the category has at most 2 * top_k tags (tempo's 4)."""
    return top_k if category_size > 2 * top_k else 1


def agreement(similarities: np.ndarray, labelled: np.ndarray, tags: list[str], categories: list[str], *,
              top_k: int = 3, n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Per-tag agreement of labels and audio.

    similarities: (n_clips, n_tags) CLAP cosines; labelled: (n_clips, n_tags) booleans (the clip's labels);
    tags/categories: the columns' tag and category. Returns {"settings": ..., "concepts": {tag: {...}}}.
    """
    similarities = np.asarray(similarities, dtype=np.float64)
    labelled = np.asarray(labelled, dtype=bool)
    if similarities.shape != labelled.shape or similarities.shape[1] != len(tags) or len(tags) != len(categories):
        raise ValueError(f"shapes disagree: similarities {similarities.shape}, labels {labelled.shape}, "
                         f"{len(tags)} tags, {len(categories)} categories")
    ranks = category_ranks(similarities, categories)
    sizes = {c: categories.count(c) for c in set(categories)}
    concepts = {}
    for j, (tag, category) in enumerate(zip(tags, categories)):
        # One generator per tag, seeded by the tag's position: a tag's interval does not depend on the others'.
        rng = np.random.default_rng([seed, j])
        mask = labelled[:, j]
        n_pos, n_neg = int(mask.sum()), int((~mask).sum())
        k = effective_k(top_k, sizes[category])
        entry = {"category": category, "positives": n_pos, "negatives": n_neg, "k": k,
                 "chance": k / sizes[category], "auc": None, "auc_interval": None,
                 "top_k_share": None, "top_k_interval": None}
        if n_pos >= 2 and n_neg >= 1:
            entry["auc"] = roc_auc(similarities[:, j], mask)
            entry["auc_interval"] = _interval(bootstrap_auc(similarities[:, j], mask, n_bootstrap, rng), confidence)
        if n_pos >= 1:
            hits = ranks[mask, j] <= k
            entry["top_k_share"] = float(hits.mean())
            entry["top_k_interval"] = _interval(bootstrap_share(hits, n_bootstrap, rng), confidence)
        concepts[tag] = entry
    return {"settings": {"top_k": top_k, "n_bootstrap": n_bootstrap, "seed": seed, "confidence": confidence},
            "concepts": concepts}


# -- run files ----------------------------------------------------------------------------------
def _need(path: Path, run: Path) -> Path:
    if not path.is_file():
        raise ConceptCapsError(f"{path} not found: run `conceptcaps audio score --run {run}` first.")
    return path


def read_scores(run: str | Path) -> dict:
    """{"ids", "tags", "categories", "similarities" (n, T), "labels" (list per clip)} of RUN/audio_evidence/."""
    import pyarrow.parquet as pq

    run = Path(run)
    folder = run / FOLDER
    text = pq.read_table(_need(folder / "text_embeddings.parquet", run), columns=["tag", "category"])
    sims = pq.read_table(_need(folder / "similarities.parquet", run))
    evidence = pq.read_table(_need(folder / "evidence.parquet", run), columns=["id", "labels"])
    ids = sims.column("id").to_pylist()
    if evidence.column("id").to_pylist() != ids:
        raise ConceptCapsError(f"{folder}: evidence.parquet and similarities.parquet hold different clips (an "
                               f"interrupted write): re-run `conceptcaps audio score --run {run} --force`.")
    return {"ids": ids, "tags": text.column("tag").to_pylist(), "categories": text.column("category").to_pylist(),
            "similarities": np.asarray(sims.column("similarity").to_pylist(), dtype=np.float64),
            "labels": evidence.column("labels").to_pylist()}


def write_agreement(run: str | Path, *, top_k: int = 3, n_bootstrap: int = 1000, seed: int = 0,
                    confidence: float = 0.95) -> dict:
    """Compute the per-concept agreement of RUN's scores and write RUN/audio_evidence/agreement.json."""
    from conceptcaps_pipeline.run_dir import write_json

    scores = read_scores(run)
    column = {t: j for j, t in enumerate(scores["tags"])}
    labelled = np.zeros(scores["similarities"].shape, dtype=bool)
    for i, clip_labels in enumerate(scores["labels"]):
        labelled[i, [column[t] for t in clip_labels if t in column]] = True
    result = agreement(scores["similarities"], labelled, scores["tags"], scores["categories"], top_k=top_k,
                       n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
    write_json(Path(run) / FOLDER / "agreement.json", result)
    return result


def read_agreement(run: str | Path) -> dict:
    """RUN/audio_evidence/agreement.json."""
    path = _need(Path(run) / FOLDER / "agreement.json", Path(run))
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class EvidenceFilter:
    """The positives of one tag whose evidence reaches a threshold."""

    tag: str
    min_evidence: float
    ids: list[str] = field(default_factory=list)  # kept, in the run's order
    positives: int = 0  # clips labelled with the tag (before the filter)

    @property
    def kept(self) -> int:
        return len(self.ids)

    def describe(self) -> str:
        share = self.kept / self.positives if self.positives else 0.0
        return (f"{self.tag}: {self.kept} of {self.positives} positives ({share:.0%}) have evidence >= "
                f"{self.min_evidence:g}")


def evidence_by_label(run: str | Path) -> dict[str, dict[str, float]]:
    """{id: {label: evidence (rank percentile)}} of RUN/audio_evidence/evidence.parquet."""
    import pyarrow.parquet as pq

    run = Path(run)
    table = pq.read_table(_need(run / FOLDER / "evidence.parquet", run), columns=["id", "labels", "evidence"])
    return {i: dict(zip(labels, values)) for i, labels, values in
            zip(*(table.column(c).to_pylist() for c in ("id", "labels", "evidence")))}


def check_min_evidence(min_evidence: float) -> None:
    """A threshold on rank percentiles: a number in [0, 1], or one clear error (NaN too)."""
    if not 0.0 <= min_evidence <= 1.0:  # False for NaN as well
        raise ConceptCapsError(f"--min_evidence {min_evidence}: give a rank percentile in [0, 1] (0 keeps every "
                               f"positive, 1 only clips whose closest tag of the category is the label).")


def positives_with_evidence(run_or_evidence, tag: str, min_evidence: float,
                            ids: list[str] | None = None) -> EvidenceFilter:
    """The clips labelled `tag` whose evidence for it (rank percentile in [0, 1]) is at least `min_evidence`.

    `run_or_evidence`: a run directory or what `evidence_by_label` returned; `ids`: restrict to these
    clips (a split), in their order. What `concept_sets(..., min_evidence=q)`, `concepts export
    --min_evidence` and `tcav --min_evidence` draw their positives with.
    """
    check_min_evidence(min_evidence)
    evidence = run_or_evidence if isinstance(run_or_evidence, dict) else evidence_by_label(run_or_evidence)
    order = ids if ids is not None else list(evidence)
    result = EvidenceFilter(tag=tag, min_evidence=min_evidence)
    for clip in order:
        labels = evidence.get(clip)
        if labels is None or tag not in labels:
            continue
        result.positives += 1
        value = labels[tag]
        if value is not None and not np.isnan(value) and value >= min_evidence:
            result.ids.append(clip)
    logger.info("evidence: %s", result.describe())
    return result


def concepts_evidence(run: str | Path) -> dict | None:
    """What concepts.json carries of `audio score` (None when the run has not been scored): the scorer, the
    settings and, per tag, the AUC and top-k share with their intervals."""
    from conceptcaps_pipeline.run_dir import read_manifest

    run = Path(run)
    if not (run / FOLDER / "agreement.json").is_file():
        return None
    found = read_agreement(run)
    manifest = read_manifest(run, "audio_score") or {}
    keys = ("auc", "auc_interval", "top_k_share", "top_k_interval", "k", "chance", "positives")
    return {"model": manifest.get("model"), "measure": "ROC-AUC of the tag's CLAP similarity, labelled clips vs the "
                                                       "rest of the run; top-k share of labelled clips (docs/evidence.md)",
            "prompts": (manifest.get("arguments") or {}).get("prompts"), "settings": found.get("settings", {}),
            "concepts": {tag: {k: entry.get(k) for k in keys} for tag, entry in found.get("concepts", {}).items()}}


def extreme_clips(run_or_evidence, tag: str, n: int = 3) -> dict[str, list[tuple[str, float]]]:
    """The `n` positives of `tag` with the highest and the lowest evidence, as (id, evidence): the clips to
    listen to before trusting a concept (the explorer's "hear the best and worst" list). Ties: run order."""
    evidence = run_or_evidence if isinstance(run_or_evidence, dict) else evidence_by_label(run_or_evidence)
    scored = [(clip, float(labels[tag])) for clip, labels in evidence.items()
              if tag in labels and labels[tag] is not None and not np.isnan(labels[tag])]
    ranked = sorted(scored, key=lambda pair: -pair[1])  # stable: equal evidence keeps the run's order
    return {"highest": ranked[:n], "lowest": sorted(scored, key=lambda pair: pair[1])[:n]}
