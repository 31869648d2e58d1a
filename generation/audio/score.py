r"""Score every clip of RUN/audio/ against every taxonomy tag with a CLAP model: per-label evidence.

    conceptcaps audio score --run runs/demo                                   # laion/larger_clap_music
    conceptcaps audio score --run runs/demo --model /models/larger_clap_music --batch_size 16
    conceptcaps audio score --run runs/demo --force                           # redo every embedding
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m conceptcaps_pipeline.cli \
        audio score --run runs/demo                                           # every GPU of a node

A clip's labels are the tags it was *asked* for (RUN/captions.parquet); nothing else checks that
the audio carries them. This stage asks a CLAP model, zero-shot:

1. Audio embeddings, once per clip, with the windowing of the evaluation's CLAP score
   (`conceptcaps_eval.clap_score.clap_windows`: mono, resampled, consecutive model-length
   windows from sample 0, length-weighted mean of unit window embeddings). They are stored in
   RUN/audio_evidence/embeddings/*.parquet (id, clip_key, model, embedding), one file per
   batch, written atomically, so a killed run (even `kill -9`) loses at most the batch in flight
   and a resumed run embeds only the clips that lack one (`read_audio_embeddings` hands them to
   other stages, e.g. evaluate). A clip's `clip_key` is a hash of what its sound depends on
   (caption fingerprint, seed, settings): a clip made again gets a new key and is embedded again.
2. Text embeddings, once per tag: the unit mean of the CLAP text embeddings of a small prompt
   ensemble (`PROMPTS`, `--prompts`), stored in RUN/audio_evidence/text_embeddings.parquet.
3. Per clip: the cosine similarity to every tag (RUN/audio_evidence/similarities.parquet, a
   list aligned with text_embeddings.parquet's tag order), and per label
   (RUN/audio_evidence/evidence.parquet, lists aligned with `labels`):
   - `evidence`: the label's rank percentile, the share of the other tags of its category that
     the clip is less similar to (ties count half): 1 = the label is the clip's closest tag of
     its category, 0 = the farthest. This is what `min_evidence` thresholds: it compares a clip
     with itself only, so it does not depend on the rest of the run.
   - `similarity`: the raw cosine (CLAP's own scale; not comparable across tags).
   - `calibrated`: the cosine as a z-score against the same tag's cosines over every clip of
     the run: how much closer this clip is to the tag than the run's clips are on average.
     It removes a tag's prompt bias (some prompts sit close to all music), but depends on the run.
4. Per concept: RUN/audio_evidence/agreement.json (`conceptcaps_pipeline.release.evidence`):
   ROC-AUC of the tag's similarity, labelled clips vs the rest, and the share of labelled clips
   where the tag ranks in its category's top k, both with seeded bootstrap intervals.

The stage holds RUN/.locks/audio_score.lock and writes RUN/manifests/audio_score.json. Evidence
is a model's opinion, not ground truth: docs/evidence.md says what CLAP can and cannot hear.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import require, stage

logger = logging.getLogger(__name__)

STAGE = "audio_score"
FOLDER = "audio_evidence"
DEFAULT_MODEL = "laion/larger_clap_music"
# The prompt ensemble: a bare tag is what CLAP's training captions rarely are, so the tag is
# also put in short music phrases; the mean of the unit embeddings is less sensitive to one
# template's wording than any single one (the CLIP zero-shot practice). {category} is the
# category's name (genre, mood, instrument, tempo).
PROMPTS = ("{tag}", "{tag} music", "music with {tag}", "music whose {category} is {tag}")
EMBEDDING_GLOB = "emb-*.parquet"


@dataclass
class ScoreArguments:
    run: str = field(metadata={"help": "Run directory with captions.parquet, taxonomy.json and audio/."})
    model: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "CLAP checkpoint (Hub id or local folder with a ClapModel and its ClapProcessor); "
                          "the evaluation's CLAP by default, so their audio embeddings agree."})
    prompts: list[str] = field(
        default_factory=lambda: list(PROMPTS),
        metadata={"help": "Prompt templates whose mean text embedding stands for a tag; {tag} and {category} "
                          "are filled in."})
    batch_size: int = field(default=8, metadata={"help": "Clips (and texts) per CLAP forward pass; one embedding "
                                                         "file is written per batch."})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ...; default: cuda when available."})
    top_k: int = field(default=3, metadata={"help": "Agreement: the share of positives whose tag ranks in its "
                                                    "category's top k (top 1 in categories of at most 2k tags)."})
    n_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for the agreement intervals."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap resampling."})
    force: bool = field(default=False, metadata={"help": "Embed every clip again (the old embeddings are set aside "
                                                         "until the new ones are written)."})


# -- the scorer ---------------------------------------------------------------------------------
class ClapScorer:
    """A CLAP model that embeds FLAC clips and texts into one space (unit vectors).

    Any object with the same `name`, `embed_audio(list[bytes]) -> (n, d)` and
    `embed_text(list[str]) -> (n, d)` can stand in for it (`score_audio(args, scorer=...)`):
    that is how another scorer is swapped in (docs/evidence.md).
    """

    def __init__(self, model: str, device: str | None = None, batch_size: int = 8):
        from conceptcaps_eval.clap_score.clap_windows import load_clap

        try:
            self.clap, self.processor, self.device = load_clap(model, device)
        except ValueError as err:
            raise ConceptCapsError(f"--model {model}: {err}") from None
        self.name = model
        self.batch_size = batch_size

    def embed_audio(self, clips: list[bytes]) -> np.ndarray:
        from conceptcaps_eval.clap_score.clap_windows import embed_audio_items

        items = [{"bytes": data, "path": ""} for data in clips]
        return embed_audio_items(self.clap, self.processor, items, batch_size=self.batch_size, device=self.device)

    def embed_text(self, texts: list[str]) -> np.ndarray:
        from conceptcaps_eval.clap_score.clap_windows import embed_texts

        return embed_texts(self.clap, self.processor, list(texts), self.batch_size, self.device)


# -- pure parts ---------------------------------------------------------------------------------
def prompt_texts(tag: str, category: str, prompts: list[str] | tuple[str, ...] = PROMPTS) -> list[str]:
    """The ensemble's texts for one tag: `prompt_texts("piano", "instrument")[1] == "piano music"`."""
    return [p.format(tag=tag, category=category) for p in prompts]


def tag_embeddings(scorer, tags: list[tuple[str, str]], prompts=PROMPTS) -> np.ndarray:
    """Unit text embeddings (n_tags, d) of (tag, category) pairs: the normalised mean over the prompt ensemble."""
    texts = [text for tag, category in tags for text in prompt_texts(tag, category, prompts)]
    embedded = np.asarray(scorer.embed_text(texts), dtype=np.float64).reshape(len(tags), len(prompts), -1)
    mean = embedded.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def rank_percentiles(similarities: np.ndarray, members: list[int]) -> np.ndarray:
    """(n_clips, len(members)): for each clip and tag of one category (column indices `members`), the share
    of the category's other tags with a lower similarity (ties count half). NaN for a one-tag category."""
    block = similarities[:, members]
    m = block.shape[1]
    if m < 2:
        return np.full(block.shape, np.nan)
    below = (block[:, None, :] < block[:, :, None]).sum(axis=2)
    equal = (block[:, None, :] == block[:, :, None]).sum(axis=2) - 1  # not the tag itself
    return (below + 0.5 * equal) / (m - 1)


def clip_evidence(similarities: np.ndarray, tags: list[str], categories: list[str],
                  labels: list[list[str]]) -> dict[str, list]:
    """Per clip, lists aligned with its labels: rank_percentile, similarity, calibrated (per-tag z-score).

    `similarities` is (n_clips, n_tags) in the order of `tags` (with `categories` the category of each).
    """
    column = {tag: j for j, tag in enumerate(tags)}
    percentile = np.full(similarities.shape, np.nan)
    for category in dict.fromkeys(categories):
        members = [j for j, c in enumerate(categories) if c == category]
        percentile[:, members] = rank_percentiles(similarities, members)
    # Why a z-score per tag: raw cosines of two tags are not on one scale (a prompt can sit near all music).
    spread = similarities.std(axis=0)
    calibrated = (similarities - similarities.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    out = {"rank_percentile": [], "similarity": [], "calibrated": []}
    for i, clip_labels in enumerate(labels):
        unknown = [t for t in clip_labels if t not in column]
        if unknown:
            raise ConceptCapsError(f"label(s) {unknown} of clip {i} are not taxonomy tags: re-run `conceptcaps captions "
                                   f"generate --force` with this run's taxonomy.json.")
        js = [column[t] for t in clip_labels]
        out["rank_percentile"].append([float(percentile[i, j]) for j in js])
        out["similarity"].append([float(similarities[i, j]) for j in js])
        out["calibrated"].append([float(calibrated[i, j]) for j in js])
    return out


def clip_key(caption_sha256: str | None, seed, settings: str | None) -> str:
    """What a clip's sound depends on, hashed: a clip made again from another caption or seed gets a new key."""
    return hashlib.sha256(f"{caption_sha256}|{seed}|{settings}".encode()).hexdigest()[:16]


# -- files --------------------------------------------------------------------------------------
def embedding_paths(run: str | Path) -> list[Path]:
    return sorted((Path(run) / FOLDER / "embeddings").glob(EMBEDDING_GLOB))


def read_audio_embeddings(run: str | Path, model: str | None = None, keys: dict[str, str] | None = None) -> dict:
    """{id: unit embedding} of RUN/audio_evidence/embeddings/ (one per id), optionally only those of `model`
    and whose clip_key equals `keys[id]` (the clip as it is now)."""
    import pyarrow.parquet as pq

    found = {}
    for path in embedding_paths(run):
        for row in pq.read_table(path).to_pylist():
            if model is not None and row["model"] != model:
                continue
            if keys is not None and keys.get(row["id"]) != row["clip_key"]:
                continue
            found.setdefault(row["id"], np.asarray(row["embedding"], dtype=np.float32))
    return found


def _write_embeddings(folder: Path, ids: list[str], keys: list[str], model: str, embeddings: np.ndarray,
                      token: str, number: int) -> Path:
    import pyarrow as pa
    from conceptcaps_pipeline.run_dir import write_parquet

    table = pa.table({"id": pa.array(ids, pa.string()), "clip_key": pa.array(keys, pa.string()),
                      "model": pa.array([model] * len(ids), pa.string()),
                      "embedding": pa.array([e.astype(np.float32).tolist() for e in embeddings],
                                            pa.list_(pa.float32()))})
    path = folder / f"emb-{token}-{number:06d}.parquet"
    write_parquet(table, path)  # atomic: the file holds the whole batch or does not exist
    return path


def _labels(captions_path: Path) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """(ids, labels, label categories) from captions.parquet's category columns, in CATEGORIES order."""
    from conceptcaps_pipeline.run_dir import read_table
    from conceptcaps_pipeline.taxonomy import CATEGORIES

    table = read_table(captions_path, ["id", *CATEGORIES],
                       fix=f"re-run `conceptcaps captions generate --run {captions_path.parent}`")
    ids = table.column("id").to_pylist()
    columns = {c: table.column(c).to_pylist() for c in CATEGORIES}
    labels, categories = [], []
    for i in range(len(ids)):
        row = [(t, c) for c in CATEGORIES for t in (columns[c][i] or [])]
        labels.append([t for t, _ in row])
        categories.append([c for _, c in row])
    return ids, labels, categories


def check_arguments(args: ScoreArguments) -> None:
    checks = [
        (args.batch_size >= 1, f"--batch_size {args.batch_size}: give 1 or more."),
        (args.top_k >= 1, f"--top_k {args.top_k}: give 1 or more."),
        (args.n_bootstrap >= 0, f"--n_bootstrap {args.n_bootstrap}: give 0 (no intervals) or more."),
        (bool(args.prompts), "--prompts is empty: give at least one template such as '{tag} music'."),
    ]
    for prompt in args.prompts:
        checks.append(("{tag}" in prompt, f"--prompts {prompt!r} has no {{tag}}: every template must name the tag."))
        try:
            prompt.format(tag="x", category="y")
        except (KeyError, IndexError, ValueError):
            checks.append((False, f"--prompts {prompt!r}: only {{tag}} and {{category}} can be filled in."))
    for ok, message in checks:
        if not ok:
            raise ConceptCapsError(message)


# -- the stage ----------------------------------------------------------------------------------
class _OneProcess:
    """What the stage needs of accelerate's PartialState, for a run without a launcher."""

    is_main_process, process_index, num_processes = True, 0, 1

    def wait_for_everyone(self) -> None:
        pass

    @contextlib.contextmanager
    def split_between_processes(self, items):
        yield items


def _processes(args: ScoreArguments) -> dict:
    """The processes' state: accelerate's PartialState under a launcher (`accelerate launch`, torchrun), else one.

    Why not always PartialState: a plain run then leaves no process group behind in the caller's process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {"state": _OneProcess()}
    import torch
    from accelerate import PartialState
    from accelerate.utils import is_mps_available, is_xpu_available, parse_flag_from_env

    # Why cpu=: without an accelerator PartialState joins the process group (gloo) only when told
    # to run on CPU; otherwise every process would think it is alone (as in audio generate).
    no_accelerator = not (torch.cuda.is_available() or is_xpu_available() or is_mps_available())
    return {"state": PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or no_accelerator)}


@stage(STAGE, check=check_arguments, prepare=_processes,
       lock=lambda args, state: STAGE if state.is_main_process else None)
def score_audio(args: ScoreArguments, scorer=None, state=None) -> dict:
    """Embed the clips that lack an embedding, then score every clip against every tag; returns the manifest.

    `scorer` replaces the CLAP model (an object like `ClapScorer`); by default `args.model` is loaded.
    The main process holds RUN/.locks/audio_score.lock (`@stage`). Under `accelerate launch` the
    clips to embed are split between the processes (each writes its own embedding files), then the
    main process scores; the others return an empty dict.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.audio.shards import INDEX_COLUMNS, read_shards, shard_paths
    from conceptcaps_pipeline.release.evidence import write_agreement
    from conceptcaps_pipeline.run_dir import (
        drop_set_aside,
        finished,
        set_aside,
        write_manifest,
        write_parquet,
    )
    from conceptcaps_pipeline.taxonomy import Taxonomy
    from tqdm.auto import tqdm

    started = time.time()
    run = Path(args.run)
    captions_path = require(run, "captions.parquet")
    taxonomy_path = require(run, "taxonomy.json")
    require(run, "audio")
    folder = run / FOLDER
    outputs = [folder / name for name in ("evidence.parquet", "similarities.parquet", "text_embeddings.parquet",
                                          "agreement.json")]
    if state.is_main_process:  # only the lock holder: another launch's writers may be at work otherwise
        for leftover in (folder / "embeddings").glob(".emb-*.tmp"):
            leftover.unlink()  # a batch a killed run was writing: it is embedded again
    ids, labels, label_categories = _labels(captions_path)
    taxonomy = Taxonomy.load(taxonomy_path)
    index = read_shards(run / "audio", columns=INDEX_COLUMNS)
    keys = {}
    for i, c, s, st in zip(*(index.column(n).to_pylist() for n in ("id", "caption_sha256", "seed", "settings"))):
        keys.setdefault(i, clip_key(c, s, st))
    missing = [i for i in ids if i not in keys]
    if missing:
        raise ConceptCapsError(f"{len(missing)} caption(s) of {captions_path} have no clip in {run / 'audio'} "
                               f"(first: {missing[0]}): run `conceptcaps audio generate --run {run}` first.")
    model = scorer.name if scorer is not None else args.model
    clips_digest = hashlib.sha256("\n".join(f"{i} {keys[i]}" for i in ids).encode()).hexdigest()
    inputs = {"captions": captions_path, "taxonomy": taxonomy_path}
    previous = None if args.force else finished(run, STAGE, args, inputs, outputs)
    if previous is not None and previous.get("clips_sha256") == clips_digest and previous.get("model") == model:
        if state.is_main_process:
            logger.info("audio score: up to date (%d clips, %s); --force redoes it", len(ids), model)
        state.wait_for_everyone()
        return previous if state.is_main_process else {}

    # 1. Audio embeddings of the clips that lack one (this model, this clip), split between the processes.
    if scorer is None:
        device = args.device or (str(state.device) if state.num_processes > 1 else None)
        scorer = ClapScorer(args.model, device, args.batch_size)
    if args.force and state.is_main_process:
        aside = set_aside(run, STAGE, [folder])
        if aside:
            logger.info("audio score: --force: the old evidence is set aside in %s until the new one is written",
                        aside)
    state.wait_for_everyone()  # why: no process reads or writes embeddings before --force has set the old aside
    wanted = {i: keys[i] for i in ids}
    done = read_audio_embeddings(run, model, wanted)
    missing_ids = [i for i in ids if i not in done]
    with state.split_between_processes(missing_ids) as mine:  # contiguous shares, the same on every process
        todo = set(mine)
    if state.is_main_process:
        logger.info("audio score: %d of %d clips already embedded with %s; %d to embed on %d process(es)", len(done),
                    len(ids), model, len(missing_ids), state.num_processes)
    embedded_now = 0
    if todo:
        (folder / "embeddings").mkdir(parents=True, exist_ok=True)
        token, number = uuid.uuid4().hex[:8], 0
        progress = tqdm(total=len(todo), desc="audio score", unit="clip", disable=None)
        pending: list[dict] = []

        def flush(batch: list[dict]) -> None:
            nonlocal number, embedded_now
            embeddings = np.asarray(scorer.embed_audio([r["audio"] for r in batch]), dtype=np.float32)
            batch_ids = [r["id"] for r in batch]
            _write_embeddings(folder / "embeddings", batch_ids, [wanted[i] for i in batch_ids], model,
                              embeddings, token, number)
            number += 1
            embedded_now += len(batch)
            progress.update(len(batch))

        # Batches run across shard boundaries (an audio shard holds one generation batch, often
        # smaller than a scoring batch); memory stays at one shard plus one batch.
        for path in shard_paths(run / "audio"):
            for row in pq.read_table(path, columns=["id", "audio"]).to_pylist():
                if row["id"] in todo:
                    todo.discard(row["id"])  # a clip stored in two shards (a repaired run) is embedded once
                    pending.append(row)
                if len(pending) == args.batch_size:
                    flush(pending)
                    pending = []
        if pending:
            flush(pending)
        progress.close()
    state.wait_for_everyone()  # every process's embeddings are written
    if not state.is_main_process:
        return {}
    embedded_now = len(missing_ids)
    done = read_audio_embeddings(run, model, wanted)
    absent = [i for i in ids if i not in done]
    if absent:  # a process failed without raising here: refuse to score a partial run
        raise ConceptCapsError(f"{len(absent)} clip(s) have no embedding after this run (first: {absent[0]}): re-run "
                               f"the same command to embed them.")

    # 2. Text embeddings, once per tag, from the prompt ensemble.
    tags = [(tag, category) for category, members in taxonomy.categories.items() for tag in members]
    text = tag_embeddings(scorer, tags, args.prompts)
    write_parquet(pa.table({
        "tag": [t for t, _ in tags], "category": [c for _, c in tags],
        "embedding": pa.array([e.astype(np.float32).tolist() for e in text], pa.list_(pa.float32())),
    }), folder / "text_embeddings.parquet")

    # 3. Similarities and per-label evidence.
    audio = np.stack([done[i] for i in ids]).astype(np.float64)
    similarities = np.clip(audio @ text.T, -1.0, 1.0)
    evidence = clip_evidence(similarities, [t for t, _ in tags], [c for _, c in tags], labels)
    strings, floats = pa.list_(pa.string()), pa.list_(pa.float64())
    mean = [float(np.nanmean(r)) if r and not np.all(np.isnan(r)) else None for r in evidence["rank_percentile"]]
    write_parquet(pa.table({
        "id": pa.array(ids, pa.string()), "labels": pa.array(labels, strings),
        "categories": pa.array(label_categories, strings),
        "evidence": pa.array(evidence["rank_percentile"], floats),
        "similarity": pa.array(evidence["similarity"], floats),
        "calibrated": pa.array(evidence["calibrated"], floats),
        "mean_evidence": pa.array(mean, pa.float64()),
    }), folder / "evidence.parquet")
    write_parquet(pa.table({"id": pa.array(ids, pa.string()),
                            "similarity": pa.array(similarities.astype(np.float32).tolist(),
                                                   pa.list_(pa.float32()))}),
                  folder / "similarities.parquet")

    # 4. Per-concept agreement, then the manifest (the commit record).
    agreement = write_agreement(run, top_k=args.top_k, n_bootstrap=args.n_bootstrap, seed=args.seed)
    drop_set_aside(run, STAGE)
    summary = {tag: {"auc": a["auc"], "top_k_share": a["top_k_share"]} for tag, a in agreement["concepts"].items()}
    manifest = write_manifest(
        run, STAGE, args, inputs=inputs, started=started,
        counts={"clips": len(ids), "embedded_now": embedded_now, "tags": len(tags),
                "prompts": len(args.prompts),
                "mean_evidence": float(np.nanmean([m for m in mean if m is not None])) if any(
                    m is not None for m in mean) else None},
        extra={"model": model, "clips_sha256": clips_digest, "agreement": summary}, outputs=outputs,
    )
    logger.info("audio score: %d clips scored against %d tags (%d embedded now); RUN/%s/", len(ids), len(tags),
                embedded_now, FOLDER)
    return manifest

