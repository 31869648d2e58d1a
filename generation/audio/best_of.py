"""Best of K: synthesise K candidates per caption, keep the one whose audio carries its labels best.

    from conceptcaps_pipeline.audio.best_of import candidate_seeds, choose_candidates, read_candidate_records
    seeds = candidate_seeds(base_seed=0, key="cc-000001", k=4)   # seeds[0] is today's single-clip seed
    choice = choose_candidates(scores)   # scores: {id: [per-label evidence of candidate 0, 1, ...]}
    choice["cc-000001"].index, choice["cc-000001"].means         # the kept candidate, every candidate's mean
    read_candidate_records("runs/demo/audio")["cc-000001"]        # what `audio generate --candidates K` recorded
    conceptcaps audio generate --run runs/demo --candidates 4     # the stage that uses it (docs/audio.md)

The candidate seeds derive from the base seed, the key the generator seeds by (a batch's first
id in `audio generate`) and the candidate index only, so they never depend on the process count
or on what was done before: a resumed run makes the same candidates and keeps the same one.
Candidate 0's seed is `batch_seed(base_seed, key)`, the seed of the single clip `audio generate`
makes today, so `--candidates 1` changes nothing. A candidate's score is the mean evidence of its
labels (rank percentile of each label among its category's tags, `audio score`); the highest mean
wins, ties go to the lowest index (deterministic). Every candidate's score is kept, for the record:
`audio generate` stores it in the parquet metadata of the shard that holds the kept clip
(`shard_metadata`, `read_candidate_records`), so clip and record are written in one atomic rename.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from conceptcaps_pipeline.errors import ConceptCapsError


def candidate_seed(base_seed: int, key: str, index: int) -> int:
    """The seed of candidate `index` for `key`; index 0 equals `audio generate`'s `batch_seed(base_seed, key)`."""
    text = f"{base_seed}:{key}" if index == 0 else f"{base_seed}:{key}:candidate-{index}"
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF  # as batch_seed: a positive int31


def candidate_seeds(base_seed: int, key: str, k: int) -> list[int]:
    """The K candidate seeds of `key` (all distinct)."""
    if k < 1:
        raise ConceptCapsError(f"--candidates {k}: give 1 (one clip per caption, as without it) or more.")
    seeds = [candidate_seed(base_seed, key, i) for i in range(k)]
    if len(set(seeds)) != k:  # a 32-bit collision: vanishingly rare, but a repeated candidate would waste a slot
        raise ConceptCapsError(f"candidate seeds of {key!r} collide for --seed {base_seed}: choose another --seed.")
    return seeds


@dataclass
class Choice:
    """The kept candidate of one caption, and every candidate's score."""

    index: int  # the kept candidate
    seed: int | None  # its seed (when seeds were given)
    means: list[float | None] = field(default_factory=list)  # mean evidence of each candidate's labels
    evidence: list[list[float]] = field(default_factory=list)  # each candidate's per-label evidence

    def record(self) -> dict:
        """JSON-ready: what the manifest stores per caption."""
        return {"kept": self.index, "seed": self.seed, "candidate_means": self.means}


def _mean(values) -> float | None:
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def choose_candidate(evidence: list[list[float]], seeds: list[int] | None = None) -> Choice:
    """Keep the candidate whose labels have the highest mean evidence (ties: the lowest index).

    evidence: per candidate, the evidence of each label (aligned with the caption's labels). A
    candidate without any score (no labels) counts as lowest; if none has one, candidate 0 is kept.
    """
    if not evidence:
        raise ValueError("choose_candidate needs at least one candidate")
    if seeds is not None and len(seeds) != len(evidence):
        raise ValueError(f"{len(seeds)} seeds for {len(evidence)} candidates")
    means = [_mean(e) for e in evidence]
    best = 0
    for i, m in enumerate(means):
        if m is not None and (means[best] is None or m > means[best]):
            best = i
    return Choice(index=best, seed=seeds[best] if seeds is not None else None, means=means,
                  evidence=[list(map(float, e)) for e in evidence])


def choose_candidates(scores: dict[str, list[list[float]]],
                      seeds: dict[str, list[int]] | None = None) -> dict[str, Choice]:
    """`choose_candidate` for every id of `scores` ({id: per-candidate label evidence})."""
    return {i: choose_candidate(e, seeds.get(i) if seeds else None) for i, e in scores.items()}


def score_candidates(scorer, clips: list[list[bytes]], labels: list[list[str]], tags: list[tuple[str, str]],
                     text: np.ndarray) -> list[list[list[float]]]:
    """Per caption, per candidate, the evidence of each label: the rank percentile of the label among its
    category's tags for that candidate's audio (what `audio score` stores as `evidence`).

    clips: per caption, its K candidates' FLAC bytes; text: unit tag embeddings aligned with `tags`
    ((tag, category) pairs, from `score.tag_embeddings`). `scorer`: a `score.ClapScorer` or stand-in.
    """
    from conceptcaps_pipeline.audio.score import clip_evidence

    flat = [c for candidates in clips for c in candidates]
    if not flat:
        return [[] for _ in clips]
    audio = np.asarray(scorer.embed_audio(flat), dtype=np.float64)
    similarities = np.clip(audio @ np.asarray(text, dtype=np.float64).T, -1.0, 1.0)
    flat_labels = [labels[i] for i, candidates in enumerate(clips) for _ in candidates]
    evidence = clip_evidence(similarities, [t for t, _ in tags], [c for _, c in tags], flat_labels)["rank_percentile"]
    out, position = [], 0
    for candidates in clips:
        out.append(evidence[position : position + len(candidates)])
        position += len(candidates)
    return out


@dataclass
class BatchChoice:
    """What `best_of_batch` returns: the kept clip of every id (FLAC bytes, as scored, and the audio that made
    them), each id's choice, and every candidate's audio (for --keep_candidates)."""

    clips: list[bytes]
    choices: dict[str, Choice]
    audio: list[np.ndarray] = field(default_factory=list)  # the kept candidate's audio, per id
    candidates: list[list[np.ndarray]] = field(default_factory=list)  # per candidate, one array per id
    seeds: list[int] = field(default_factory=list)  # the batch's candidate seeds


def best_of_batch(make, ids: list[str], labels: list[list[str]], *, key: str, base_seed: int, k: int,
                  sampling_rate: int, scorer, tags: list[tuple[str, str]], text: np.ndarray,
                  subtype: str = "PCM_16") -> BatchChoice:
    """Synthesise K candidates of one generation batch and keep, per id, the best candidate.

    make(seed) -> one audio array per id of the batch (what `audio generate` does for a batch and a
    seed); `key` is the batch's seed key (its first id), so candidate 0 is the clip `audio generate`
    makes without candidates. Each candidate is encoded to FLAC (`shards.encode_flac`, with the
    shards' `subtype`) before it is scored, so the kept clip's score is the score of the bytes that
    are shipped. The caller writes `audio` (or `clips`) in place of the single clips and
    `choices[id].record()` beside them. A candidate with NaN/Inf samples scores lowest.
    """
    from conceptcaps_pipeline.audio.shards import encode_flac

    seeds = candidate_seeds(base_seed, key, k)
    per_candidate, arrays = [], []
    for seed in seeds:
        audio = make(seed)
        if len(audio) != len(ids):
            raise ValueError(f"make({seed}) returned {len(audio)} clips for {len(ids)} ids")
        audio = [np.asarray(a, dtype=np.float32) for a in audio]
        arrays.append(audio)
        # Why the check: FLAC cannot hold NaN/Inf (soundfile fails), and the writer would refuse the clip anyway.
        per_candidate.append([encode_flac(a, sampling_rate, subtype) if np.isfinite(a).all() else None
                              for a in audio])
    clips = [[per_candidate[c][i] for c in range(k)] for i in range(len(ids))]
    finite = [[c for c in range(k) if clips[i][c] is not None] for i in range(len(ids))]
    scored = score_candidates(scorer, [[clips[i][c] for c in finite[i]] for i in range(len(ids))], labels, tags, text)
    scores = []
    for i in range(len(ids)):  # a non-finite candidate has no score: it is never kept
        by_candidate = dict(zip(finite[i], scored[i]))
        scores.append([by_candidate.get(c, [float("nan")] * len(labels[i])) for c in range(k)])
    # Every id of a batch shares the batch's seeds: candidate c of the batch used seeds[c].
    choices = {i: choose_candidate(s, seeds) for i, s in zip(ids, scores)}
    kept = [choices[i].index for i in ids]
    return BatchChoice(clips=[clips[n][kept[n]] for n in range(len(ids))], choices=choices,
                       audio=[arrays[kept[n]][n] for n in range(len(ids))], candidates=arrays, seeds=seeds)


RECORD_KEY = b"conceptcaps.candidates"  # the audio shards' parquet metadata key of the best-of-K records


def shard_metadata(choices: dict[str, Choice], scorer: str, labels: dict[str, list[str]],
                   seeds: list[int]) -> dict[bytes, bytes]:
    """The parquet key-value metadata that records, in the shard itself, every candidate's score of its ids.

    Why in the shard: it is written atomically with the clips it describes, so a killed run never
    leaves a clip without its record or a record without its clip.
    """
    import json

    def finite(values):  # JSON has no NaN: a label without a score (a one-tag category) is null
        return [None if v is None or not np.isfinite(v) else float(v) for v in values]

    record = {"scorer": scorer, "clips": {
        i: {"kept": c.index, "seed": c.seed, "candidate_seeds": list(seeds), "candidate_means": finite(c.means), "labels": list(labels.get(i, [])),
            "evidence": [finite(e) for e in c.evidence]} for i, c in choices.items()}}
    return {RECORD_KEY: json.dumps(record, sort_keys=True, allow_nan=False).encode()}


def read_candidate_records(audio_dir) -> dict[str, dict]:
    """{id: record} of the best-of-K records in RUN/audio/ shards, for the rows each shard holds.

    A record: kept (index), seed (the kept candidate's), candidate_seeds, candidate_means (mean label evidence of
    every candidate, in candidate order), labels, evidence (per candidate, per label) and scorer.
    Clips made without --candidates have no record.
    """
    import json

    import pyarrow.parquet as pq
    from conceptcaps_pipeline.audio.shards import shard_paths

    records: dict[str, dict] = {}
    for path in shard_paths(audio_dir):
        metadata = pq.read_schema(path).metadata or {}
        if RECORD_KEY not in metadata:
            continue
        stored = json.loads(metadata[RECORD_KEY])
        for clip_id in pq.read_table(path, columns=["id"]).column("id").to_pylist():
            if clip_id in stored["clips"]:  # rows moved aside (changed captions) keep their shard's metadata
                records[clip_id] = {**stored["clips"][clip_id], "scorer": stored["scorer"]}
    return records
