"""Score a run with the eval/ metric modules; write RUN/eval/metrics.json, report.md and figures.

    conceptcaps evaluate --run runs/demo
    conceptcaps evaluate --run runs/demo --reference_audio data/gtzan_clips            # + FAD, FAD∞
    conceptcaps evaluate --run runs/demo --reference_audio sanchit-gandhi/gtzan --reference_split train \\
        --reference_column audio                                                       # GTZAN from the Hub
    conceptcaps evaluate --run runs/demo --reference_audio some-org/some-audio-set --reference_split test \\
        --clap_model /models/larger_clap_music --bertscore_model /models/roberta-large --mauve_model /models/gpt2-large
    conceptcaps evaluate --run runs/demo --skip caption_quality fad

Every metric that the run's artifacts allow is computed, each with its `evaluate` module:
- VAE (eval/vae_metrics): read from RUN/vae/metrics.json, or recomputed from RUN/vae when
  that file is missing: reconstruction Jaccard and Hamming loss on the validation split,
  diversity and tag co-occurrence cosine of prior samples.
- caption quality (eval/caption_quality: BLEU, ROUGE-L, BERTScore, MAUVE): the run's
  captioner (RUN/captioner, or --captioner_adapter/--captioner_model) captions the
  validation attribute sets of RUN/distilled.parquet with the decoding settings of the
  run's captions stage (generation/captions/generate.py), and the usable captions are
  compared with the MusicCaps experts' captions of the same clips.
- attribute coverage (eval/attribute_coverage) of RUN/captions.parquet, with the share of
  captions that still remark on recording quality (also of the validation captions).
- sampled sets (eval/vae_metrics) of RUN/attributes.parquet: diversity, co-occurrence
  cosine and tags-per-set distance from the distilled training sets.
- CLAP score (eval/clap_score) of each clip in RUN/audio/ against its caption.
- FAD and FAD∞ (eval/fad) between the CLAP embeddings of the run's clips and of --reference_audio
  (a folder of audio files, a local dataset folder, or a Hub dataset id: --reference_column of
  --reference_split). FAD∞ extrapolates FAD to infinitely many clips, comparable across sample sizes.

A metric whose inputs are missing is listed under "skipped" in metrics.json with the reason.
RUN/eval/ is written atomically: metrics.json (rows: stage, metric, value, paper, better),
report.md (the table beside the paper's numbers, models, figures, skipped metrics),
validation_captions.parquet and figures/*.png. BLEU is sacreBLEU's 0-100 score divided by
100 in the table, to sit beside the paper's 0.2465. The VAE's Jaccard is shown under both
definitions, labelled: the paper's (0.5 threshold, pooled) beside the paper's 0.716, and the
pipeline's decoding rule (mean per set). Writes RUN/manifests/evaluate.json.

Baselines (`--baseline NAME`, docs/evaluate.md) are scored into RUN/eval_NAME/ (manifest
evaluate_NAME), leaving RUN/eval/ as it is: `zero_shot` scores RUN/captions_zero_shot.parquet
(`captions generate --zero_shot`) and the validation captions of the captioner's base model
without its adapter; `random_control` scores RUN/attributes_random.parquet (`vae sample
--random_control`).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.models import load_pretrained, resolve_model, run_relative, tiny_models
from conceptcaps_pipeline.run_dir import (
    atomic_dir,
    finished,
    portable,
    read_json,
    read_manifest,
    require,
    stage,
    write_manifest,
)
from conceptcaps_pipeline.vae.train import PAPER_VAE_METRICS, load_metric

logger = logging.getLogger(__name__)

STAGE = "evaluate"
GROUPS = ("vae", "caption_quality", "coverage", "sets", "clap", "fad")
# Baselines the paper compares with: what each scores, from the file its stage option writes.
BASELINES = {
    "zero_shot": {"groups": ("caption_quality", "coverage"), "captions": "captions_zero_shot.parquet",
                  "made_by": "conceptcaps captions generate --run RUN --zero_shot"},
    "random_control": {"groups": ("sets",), "attributes": "attributes_random.parquet",
                       "made_by": "conceptcaps vae sample --run RUN --random_control"},
}
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff")  # what soundfile decodes
# A --reference_audio folder holding any of these is a dataset (datasets.load_dataset or load_from_disk),
# not a folder of clips: parquet/arrow/csv/json data files, an audiofolder's metadata.csv/jsonl.
DATASET_SUFFIXES = (".parquet", ".arrow", ".csv", ".json", ".jsonl")

# Table 1 of the paper (PAPER.md). BLEU there is on the 0-1 scale.
PAPER = {
    "jaccard": PAPER_VAE_METRICS["jaccard"], "hamming_loss": PAPER_VAE_METRICS["hamming_loss"],
    "diversity": PAPER_VAE_METRICS["diversity"], "cooccurrence_cosine": PAPER_VAE_METRICS["cooccurrence_cosine"],
    "bertscore_f1": 0.9132, "bleu": 0.2465, "rougeL": 0.4263, "mauve": 0.9236,
    "clap_score": 0.4745, "fad": 0.4603,
}
# Decoding settings that reference captions take from the run's captions stage, so they are
# written the way the dataset's captions were.
CAPTION_SETTINGS = ("max_new_tokens", "do_sample", "temperature", "top_p", "max_attempts", "ngram_size",
                    "max_ngram_repeats", "min_words", "require_end_of_turn", "dtype", "merge_adapter")


@dataclass
class EvaluateArguments:
    run: str = field(metadata={"help": "Run directory to score; writes RUN/eval/."})
    reference_audio: str | None = field(
        default=None,
        metadata={"help": "Reference set for FAD: a folder of audio files (wav/flac/ogg/mp3, read recursively), "
                          "a dataset folder (parquet/arrow/csv/json files, an audiofolder with metadata, or "
                          "save_to_disk output), or a Hub dataset id, e.g. sanchit-gandhi/gtzan (the paper: GTZAN); "
                          "a dataset's clips are --reference_column of --reference_split. No FAD without it."},
    )
    reference_split: str = field(
        default="train", metadata={"help": "Split of a --reference_audio dataset (not used for a folder of clips)."}
    )
    reference_column: str = field(
        default="audio", metadata={"help": "Audio column of a --reference_audio dataset (not used for a folder of clips)."}
    )
    max_reference_clips: int | None = field(default=None, metadata={"help": "Use at most N reference clips (first N)."})
    clap_model: str = field(
        default="laion/larger_clap_music",
        metadata={"help": "CLAP model (Hub id or local folder) for the CLAP score and the FAD embeddings."},
    )
    bertscore_model: str = field(default="roberta-large", metadata={"help": "BERTScore encoder (Hub id or local folder)."})
    bertscore_num_layers: int | None = field(
        default=None, metadata={"help": "BERTScore layer (default: bert-score's tuned layer, else the last one)."}
    )
    mauve_model: str = field(default="gpt2-large", metadata={"help": "MAUVE feature model (Hub id or local folder)."})
    mauve_pooling: str = field(
        default="last", metadata={"help": "MAUVE features: 'last' token (mauve-text, for GPT-2) or 'mean' (encoders)."}
    )
    mauve_num_buckets: str = field(default="auto", metadata={"help": "MAUVE k-means clusters; auto: a tenth of the texts."})
    captioner_adapter: str | None = field(
        default=None,
        metadata={"help": "Captioner adapter for the validation captions (default: the one the captions stage used, "
                          "else RUN/captioner); 'none': the base model alone."},
    )
    captioner_model: str | None = field(
        default=None, metadata={"help": "Captioner base model (default: the one named by the adapter)."}
    )
    max_reference_captions: int | None = field(
        default=None, metadata={"help": "Caption at most N validation attribute sets (first N by id; default all)."}
    )
    caption_batch_size: int = field(default=16, metadata={"help": "Prompts per generate() call for validation captions."})
    metric_batch_size: int = field(default=32, metadata={"help": "Texts per forward pass for BERTScore and MAUVE."})
    clap_batch_size: int = field(default=8, metadata={"help": "Clips (and texts) per CLAP forward pass."})
    skip: list[str] = field(default_factory=list, metadata={"help": f"Metric groups not to compute: {', '.join(GROUPS)}."})
    top_tags: int = field(default=25, metadata={"help": "Tags shown in the tag-frequency figure."})
    seed: int = field(default=0, metadata={"help": "Seed of the validation captions and of MAUVE's clustering."})
    device: str | None = field(default=None, metadata={"help": "Torch device of the metric models (default: cuda if any)."})
    baseline: str | None = field(
        default=None,
        metadata={"help": "Score a baseline into RUN/eval_NAME/ instead: zero_shot (captions_zero_shot.parquet and the "
                          "base model's validation captions) or random_control (attributes_random.parquet)."},
    )
    force: bool = field(default=False, metadata={"help": "Evaluate again even if RUN/eval is up to date."})


def row(stage: str, metric: str, value, paper_key: str | None, better: str) -> dict:
    return {"stage": stage, "metric": metric, "value": None if value is None else float(value),
            "paper": PAPER.get(paper_key) if paper_key else None, "better": better}


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def metrics_table(metrics: dict) -> str:
    """The rows of a metrics.json as a markdown table, ours beside the paper's."""
    lines = ["| stage | metric | ConceptCaps (this run) | paper | better |", "| --- | --- | --- | --- | --- |"]
    for r in metrics.get("rows", []):
        arrow = {"higher": "higher ↑", "lower": "lower ↓"}.get(r.get("better"), r.get("better") or "")
        lines.append(f"| {r['stage']} | {r['metric']} | {_fmt(r.get('value'))} | {_fmt(r.get('paper'))} | {arrow} |")
    return "\n".join(lines)


# -- models -----------------------------------------------------------------------------------
def check_model(name: str, option: str, what: str) -> str:
    """A local folder (as an absolute path) or a Hub id whose config loads; else an error naming --option."""
    from transformers import AutoConfig

    name = resolve_model(name, option)
    load_pretrained(AutoConfig, name, option, what)
    return name


@contextmanager
def _model_errors(option: str):
    """Turn a metric module's model-loading ValueError into a ConceptCapsError that names --option."""
    try:
        yield
    except ValueError as err:
        if str(err).startswith("cannot load"):
            raise ConceptCapsError(f"{err} (set it with --{option}.)") from err
        raise


def _free_accelerator_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- data -------------------------------------------------------------------------------------
def _rows(path: Path, columns: list[str] | None = None) -> list[dict]:

    from conceptcaps_pipeline.run_dir import read_table

    return read_table(path, columns, fix="re-run the stage that writes it with --force").to_pylist()


def _first_genre(r: dict) -> str:
    return (r.get("genre") or ["(no genre)"])[0]


# -- VAE --------------------------------------------------------------------------------------
def vae_scores(run: Path) -> dict:
    """RUN/vae/metrics.json, or the same scores recomputed with eval/vae_metrics when it is missing."""
    metrics_path = run / "vae" / "metrics.json"
    if metrics_path.exists():
        return read_json(metrics_path, fix=f"re-run `conceptcaps vae train --run {run} --force`")
    from conceptcaps_pipeline.taxonomy import Taxonomy
    from conceptcaps_pipeline.vae.model import BetaVAE
    from conceptcaps_pipeline.vae.train import VaeTrainArguments, score_vae

    logger.info("evaluate: %s missing; recomputing the VAE metrics from %s", metrics_path, run / "vae")
    model = BetaVAE.from_pretrained(str(run / "vae"))
    manifest = read_manifest(run, "vae_train") or {}
    settings = {k: v for k, v in (manifest.get("arguments") or {}).items() if k in VaeTrainArguments.__dataclass_fields__}
    vae_args = VaeTrainArguments(**{**settings, "run": str(run)})
    distilled = _rows(run / "distilled.parquet", ["aspect_list", "split"])
    splits = {s: [r["aspect_list"] for r in distilled if r["split"] == s] for s in ("train", "validation")}
    return score_vae(model, Taxonomy.load(run / "taxonomy.json"), {k: v for k, v in splits.items() if v},
                     splits["train"], vae_args)


def vae_rows(scores: dict) -> list[dict]:
    """The VAE rows: Jaccard under both definitions, labelled, so the paper's 0.716 sits beside its own definition
    (0.5 threshold, pooled over sets); the pipeline's decoding rule with the mean per set; then the prior samples,
    beside the random-tag control where the run's metrics.json has it."""
    split = "validation" if "validation" in scores else "train"
    samples = scores.get("samples", {})
    plain = scores[split].get("threshold_0.5", {})  # absent in metrics.json of VAEs trained before both were kept
    rows = [
        row("VAE", f"Jaccard, paper definition: 0.5 threshold, pooled ({split})", plain.get("jaccard_micro"),
            "jaccard", "higher"),
        row("VAE", f"Jaccard, decoding rule, mean per set ({split})", scores[split]["jaccard"], None, "higher"),
        row("VAE", f"Hamming loss, 0.5 threshold ({split})", plain.get("hamming_loss", scores[split]["hamming_loss"]),
            "hamming_loss", "lower"),
        row("VAE", "Diversity (% unique sets)", samples.get("diversity"), "diversity", "higher"),
        row("VAE", "Co-occurrence cosine", samples.get("cooccurrence_cosine"), "cooccurrence_cosine", "higher"),
    ]
    if "random_control" in scores:
        rows.append(row("VAE", "Co-occurrence cosine, random-tag control", scores["random_control"].get(
            "cooccurrence_cosine"), None, "higher"))
    if "size_tvd" in samples:
        rows.append(row("VAE", "Tags-per-set distance from the data (TVD)", samples["size_tvd"], None, "lower"))
    return rows


def latent_means(run: Path, sets: list[list[str]]) -> np.ndarray:
    """Posterior means mu(x) of the VAE for the given tag sets."""
    import torch

    from conceptcaps_pipeline.vae.model import BetaVAE, multi_hot

    model = BetaVAE.from_pretrained(str(run / "vae")).eval()
    with torch.no_grad():
        mu, _ = model.encode(multi_hot(sets, model.tags))
    return mu.numpy()


# -- caption quality --------------------------------------------------------------------------
def captioner_settings(args: EvaluateArguments, run: Path):
    """CaptionsArguments for the validation captions: the captions stage's decoding settings and models,
    overridden by --captioner_adapter / --captioner_model."""
    from conceptcaps_pipeline.captions.generate import STAGE as CAPTIONS_STAGE
    from conceptcaps_pipeline.captions.generate import CaptionsArguments

    zero_shot = args.baseline == "zero_shot"  # the base model alone, decoded as its captions were
    used = (read_manifest(run, f"{CAPTIONS_STAGE}_zero_shot" if zero_shot else CAPTIONS_STAGE) or {}).get(
        "arguments") or {}
    settings = {k: used[k] for k in CAPTION_SETTINGS if k in used}
    model = args.captioner_model or used.get("model") or (_zero_shot_base(run) if zero_shot else None)
    return CaptionsArguments(
        run=str(run), model=model, adapter="none" if zero_shot else args.captioner_adapter or used.get("adapter"),
        batch_size=args.caption_batch_size, seed=args.seed, **settings,
    )


def _zero_shot_base(run: Path) -> str | None:
    """The base model of RUN/captioner (what the zero-shot baseline captions with), or None without one."""
    from conceptcaps_pipeline.captions.generate import CaptionsArguments, resolve_models

    try:
        return resolve_models(CaptionsArguments(run=str(run), zero_shot=True), run)[0]
    except ConceptCapsError:
        return None


def captioner_missing(args: EvaluateArguments, run: Path) -> str | None:
    """Why no captioner can write validation captions, or None when one can."""
    settings = captioner_settings(args, run)
    base_only = settings.adapter is not None and settings.adapter.lower() == "none"
    if base_only and not settings.model:
        raise ConceptCapsError("--captioner_adapter none captions with a base model alone: pass it with "
                               "--captioner_model MODEL (a Hub id or a local folder).")
    if settings.model or (settings.adapter and not base_only) or any(
            (run / "captioner" / name).exists() for name in ("adapter_config.json", "config.json")):
        return None
    return "no captioner: run `conceptcaps captioner train --run RUN --model MODEL`, or pass --captioner_model"


def generate_validation_captions(rows: list[dict], settings) -> tuple[list[dict], dict]:
    """One caption per attribute set with the run's captioner, retried like the captions stage (each
    result has caption, failure (None when usable) and attempts), and the models that wrote them."""
    from tqdm.auto import tqdm

    from conceptcaps_pipeline.captions.generate import (
        clean_caption,
        degeneracy,
        derived_seed,
        generate_batch,
        load_captioner,
        resolve_models,
    )
    from conceptcaps_pipeline.captions.prompts import user_message

    base, adapter = resolve_models(settings, Path(settings.run))
    model, tokenizer, stop_ids = load_captioner(base, adapter, settings.dtype, settings.merge_adapter)
    checks = {k: getattr(settings, k) for k in ("ngram_size", "max_ngram_repeats", "min_words", "require_end_of_turn")}
    # Similar prompt lengths share a batch (less left padding), in a fixed order so seeds repeat.
    order = sorted(rows, key=lambda r: (-len(user_message(r)), r["id"]))
    results = {}
    batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    for b, batch in enumerate(tqdm(batches, desc="validation captions", unit="batch")):
        todo = batch
        for attempt in range(1, settings.max_attempts + 1):
            seed = derived_seed(settings.seed, b, attempt)
            # Greedy output repeats itself, so retries always sample (as the captions stage does).
            outputs = generate_batch(model, tokenizer, stop_ids, todo, settings, seed, settings.do_sample or attempt > 1)
            retry = []
            for r, (raw, ended) in zip(todo, outputs):
                caption = clean_caption(raw)
                failure = degeneracy(caption, ended, **checks)
                results[r["id"]] = {"caption": caption, "failure": failure, "attempts": attempt}
                if failure:
                    retry.append(r)
            todo = retry
            if not todo:
                break
    del model
    _free_accelerator_memory()
    return [results[r["id"]] for r in rows], {"base_model": base, "adapter": adapter}


def caption_quality(args: EvaluateArguments, run: Path, models: dict, skipped: dict) -> tuple[list, dict, list]:
    """(rows, details, validation caption records) for BLEU, ROUGE-L, BERTScore and MAUVE."""
    distilled = _rows(run / "distilled.parquet")
    validation = sorted((r for r in distilled if r["split"] == "validation"), key=lambda r: r["id"])
    validation = validation[: args.max_reference_captions]
    settings = captioner_settings(args, run)
    generated, captioner = generate_validation_captions(validation, settings)
    records = [{"id": r["id"], "aspect_list": r["aspect_list"], "reference": r["caption"], **g}
               for r, g in zip(validation, generated)]
    usable = [rec for rec in records if rec["failure"] is None]
    details = {"validation_sets": len(records), "usable_captions": len(usable), "captioner": captioner,
               "decoding": {k: getattr(settings, k) for k in CAPTION_SETTINGS}}
    if not usable:
        skipped["caption quality"] = (f"none of the {len(records)} validation captions was usable (every attempt "
                                      f"degenerate); see eval/validation_captions.parquet")
        return [], details, records
    predictions, references = [r["caption"] for r in usable], [r["reference"] for r in usable]
    quality = load_metric("caption_quality")
    common = {"batch_size": args.metric_batch_size, "device": args.device}
    with _model_errors("bertscore_model"):
        scores = quality.compute(predictions=predictions, references=references, metrics=["bleu", "rougeL", "bertscore"],
                                 bertscore_model=models["bertscore"], num_layers=args.bertscore_num_layers, **common)
    buckets = args.mauve_num_buckets if args.mauve_num_buckets == "auto" else int(args.mauve_num_buckets)
    try:
        with _model_errors("mauve_model"):
            scores.update(quality.compute(predictions=predictions, references=references, metrics=["mauve"],
                                          mauve_featurize_model=models["mauve"], mauve_pooling=args.mauve_pooling,
                                          mauve_num_buckets=buckets, seed=args.seed, **common))
    except ValueError as err:  # too few texts for the clusters: the other scores still stand
        skipped["MAUVE"] = str(err)
    coverage = load_metric("attribute_coverage").compute(
        predictions=predictions, references=[r["aspect_list"] for r in usable], taxonomy=str(run / "taxonomy.json"))
    details.update(scores=scores, coverage_of_validation_captions=coverage,
                   bleu_note="scores.bleu is sacreBLEU's 0-100 corpus BLEU; the table row divides it by 100")
    rows = [
        row("LLM", "BERTScore F1", scores["bertscore_f1"], "bertscore_f1", "higher"),
        row("LLM", "BLEU (sacreBLEU / 100)", scores["bleu"] / 100.0, "bleu", "higher"),
        row("LLM", "ROUGE-L", scores["rougeL"], "rougeL", "higher"),
    ]
    if "mauve" in scores:
        rows.append(row("LLM", "MAUVE", scores["mauve"], "mauve", "higher"))
    rows.append(row("LLM", "Recording-quality remarks (validation captions)", coverage["recording_quality_rate"], None,
                    "lower"))
    return rows, details, records


def coverage_rows(run: Path, name: str = "captions.parquet") -> tuple[list, dict]:
    captions = _rows(run / name, ["caption", "aspect_list"])
    result = load_metric("attribute_coverage").compute(
        predictions=[r["caption"] for r in captions], references=[r["aspect_list"] for r in captions],
        taxonomy=str(run / "taxonomy.json"))
    result["n"] = len(captions)
    return [
        row("LLM", f"Attribute coverage ({name})", result["coverage"], None, "higher"),
        row("LLM", "Full coverage rate", result["full_coverage_rate"], None, "higher"),
        row("LLM", "Unrequested tags per caption", result["unrequested_per_caption"], None, "lower"),
        row("LLM", f"Recording-quality remarks ({name})", result["recording_quality_rate"], None, "lower"),
    ], result


def sets_rows(run: Path, name: str = "attributes.parquet") -> tuple[list, dict]:
    """Diversity, co-occurrence and set sizes of a file of attribute sets against the distilled training sets."""
    from conceptcaps_pipeline.taxonomy import Taxonomy

    sets = [r["aspect_list"] for r in _rows(run / name, ["aspect_list"])]
    train = [r["aspect_list"] for r in _rows(run / "distilled.parquet", ["aspect_list", "split"]) if r["split"] == "train"]
    taxonomy = Taxonomy.load(run / "taxonomy.json")
    result = load_metric("vae_metrics").compute(
        predictions=sets[:1], references=sets[:1], labels=taxonomy.tags, samples=sets, reference_sets=train,
        categories=[taxonomy.category_of[t] for t in taxonomy.tags])
    result = {k: v for k, v in result.items() if k not in ("jaccard", "jaccard_micro", "hamming_loss")}
    result["n"] = len(sets)
    worst = max((k for k in result if k.startswith("size_tvd_")), key=lambda k: result[k])
    return [
        row("VAE", f"Diversity (% unique sets, {name})", result["diversity"], None, "higher"),
        row("VAE", f"Co-occurrence cosine ({name})", result["cooccurrence_cosine"], None, "higher"),
        row("VAE", f"Tags-per-set distance from the data, TVD ({name})", result["size_tvd"], None, "lower"),
        row("VAE", f"Largest per-category size distance, TVD ({name})", result[worst], None, "lower"),
    ], {**result, "largest_size_distance_category": worst.removeprefix("size_tvd_")}


# -- audio --------------------------------------------------------------------------------------
def run_audio_embeddings(run: Path, clap, args: EvaluateArguments, model: str) -> dict:
    """CLAP embeddings and per-clip CLAP scores of RUN/audio/, one shard at a time (memory stays at one shard)."""
    import pyarrow.parquet as pq

    from conceptcaps_pipeline.audio.shards import shard_paths

    captions = {r["id"]: r["caption"] for r in _rows(run / "captions.parquet", ["id", "caption"])} \
        if (run / "captions.parquet").exists() else {}
    ids, scores, embeddings, uncaptioned, seen = [], [], [], 0, set()
    options = {"model": model, "batch_size": args.clap_batch_size, "device": args.device}
    for path in shard_paths(run / "audio"):
        table = pq.read_table(path, columns=["id", "audio"]).to_pylist()
        table = [r for r in table if r["id"] not in seen]  # a resumed run never repeats ids; be safe anyway
        seen.update(r["id"] for r in table)
        if not table:
            continue
        audio = clap.embed_audio([{"bytes": r["audio"], "path": ""} for r in table], **options)
        embeddings.append(audio)
        captioned = [i for i, r in enumerate(table) if r["id"] in captions]
        uncaptioned += len(table) - len(captioned)
        if captioned:
            text = clap.embed_text([captions[table[i]["id"]] for i in captioned], **options)
            # Both sides are unit vectors: the cosine is the dot product, exactly as clap_score computes it.
            cosines = np.clip(np.sum(text.astype(np.float64) * audio[captioned].astype(np.float64), axis=1), -1, 1)
            ids += [table[i]["id"] for i in captioned]
            scores += cosines.tolist()
    return {"ids": ids, "scores": scores, "uncaptioned_clips": uncaptioned,
            "missing_clips": len(set(captions) - seen),
            "embeddings": np.concatenate(embeddings) if embeddings else np.zeros((0, 0))}


def reference_clips(args: EvaluateArguments, chunk: int = 256):
    """(description, iterator of lists of audio items) of --reference_audio: file paths, or the
    {"bytes", "path"} items of a dataset's audio column, `chunk` at a time (memory stays bounded).

    A folder of audio files alone is read file by file (recursively, every clip); a folder holding
    data files (parquet, arrow, csv, json, an audiofolder's metadata) or a dataset saved with
    save_to_disk, and any other name (a Hub dataset id), are datasets: --reference_split and
    --reference_column say where the clips are. The split and column are checked, and the dataset
    loaded, here: call it before any long work."""
    source = args.reference_audio
    path = Path(source).expanduser()
    limit = args.max_reference_clips
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file())
        if not any(p.suffix.lower() in DATASET_SUFFIXES for p in found):
            files = [str(p) for p in found if p.suffix.lower() in AUDIO_SUFFIXES][:limit]
            if not files:
                raise ConceptCapsError(f"--reference_audio {source}: the folder holds no audio file "
                                       f"({', '.join(AUDIO_SUFFIXES)}) and no dataset; pass a folder of clips.")
            return f"{len(files)} audio files under {path}", (files[i : i + chunk] for i in range(0, len(files), chunk))
    elif path.exists() or source.startswith((".", "/", "~")):
        raise ConceptCapsError(f"--reference_audio {source}: not a folder of audio files, a dataset folder or a Hub "
                               f"dataset id. Pass a folder holding {', '.join(AUDIO_SUFFIXES)} files.")
    import datasets

    data = load_reference_dataset(args, path if path.is_dir() else None)
    column = args.reference_column
    data = data.select_columns([column])
    if isinstance(data.features[column], datasets.Audio):
        data = data.cast_column(column, datasets.Audio(decode=False))  # encoded bytes: the CLAP module decodes them
    n = len(data) if limit is None else min(limit, len(data))
    chunks = (list(data.select(range(i, min(i + chunk, n)))[column]) for i in range(0, n, chunk))
    return f"{n} clips of {source} ({args.reference_split})", chunks


def load_reference_dataset(args: EvaluateArguments, folder: Path | None):
    """The --reference_split of the --reference_audio dataset (a local folder, or a Hub id when `folder`
    is None), with --reference_column checked; one clear error when any of the three is wrong."""
    import datasets

    source, split, column = args.reference_audio, args.reference_split, args.reference_column

    def cannot_load(err: Exception) -> ConceptCapsError:
        return ConceptCapsError(
            f"cannot load --reference_audio {source!r} split {split!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Pass a local folder of audio files, a dataset folder, "
            f"or a Hub dataset id reachable from here (download it first where the Hub is reachable, "
            f"`hf download {source} --repo-type dataset --local-dir DIR`, then pass --reference_audio DIR).")

    def no_column(columns) -> ConceptCapsError:
        return ConceptCapsError(f"--reference_audio {source}: no column {column!r} in split {split!r} (columns: "
                                f"{', '.join(columns)}); pass --reference_column with the audio column.")

    if folder is not None and any((folder / n).exists() for n in ("state.json", "dataset_dict.json")):
        try:
            data = datasets.load_from_disk(str(folder))
        except Exception as err:  # a damaged save_to_disk folder
            raise cannot_load(err) from err
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ConceptCapsError(f"--reference_audio {source}: no split {split!r} (splits: {', '.join(data)}); "
                                       f"pass --reference_split with one of them.")
            data = data[split]
    else:
        name = str(folder) if folder is not None else source
        # The builder lists the splits (and, when the dataset card declares them, the columns) without
        # downloading the data: a wrong split or column fails before gigabytes of audio arrive.
        try:
            builder = datasets.load_dataset_builder(name)
        except Exception as err:  # not found, offline, a loading script (unsupported by datasets>=4), bad files
            raise cannot_load(err) from err
        splits = [str(s) for s in (builder.config.data_files or builder.info.splits or {})]
        if splits and split not in splits:
            raise ConceptCapsError(f"--reference_audio {source}: no split {split!r} (splits: {', '.join(splits)}); "
                                   f"pass --reference_split with one of them.")
        if builder.info.features is not None and column not in builder.info.features:
            raise no_column(builder.info.features)
        try:
            data = datasets.load_dataset(name, split=split)
        except Exception as err:  # load_dataset raises many types (offline, bad files)
            raise cannot_load(err) from err
    if column not in data.column_names:
        raise no_column(data.column_names)
    return data


def audio_metrics(args: EvaluateArguments, run: Path, models: dict, skipped: dict, reference) -> tuple[list, dict]:
    """CLAP score rows, and FAD and FAD∞ rows when `reference` (what reference_clips returned) is given."""
    clap = load_metric("clap_score")
    embedded = run_audio_embeddings(run, clap, args, models["clap"])
    rows, details = [], {"clips_scored": len(embedded["scores"]), "uncaptioned_clips": embedded["uncaptioned_clips"],
                         "captions_without_clip": embedded["missing_clips"]}
    if embedded["scores"]:
        scores = np.asarray(embedded["scores"])
        details["clap"] = {"clap_score": float(scores.mean()), "clap_score_std": float(scores.std()),
                           "clap_scores": dict(zip(embedded["ids"], map(float, scores)))}
        rows.append(row("audio", "CLAP score (raw cosine)", scores.mean(), "clap_score", "higher"))
    else:
        skipped["CLAP"] = "no clip in RUN/audio has a caption in RUN/captions.parquet"
    if reference is not None:
        description, chunks = reference
        options = {"model": models["clap"], "batch_size": args.clap_batch_size, "device": args.device}
        embeddings = [clap.embed_audio(chunk, **options) for chunk in chunks]
        embeddings = np.concatenate(embeddings) if embeddings else np.zeros((0, 0))
        try:
            fad = load_metric("fad").compute(predictions=embedded["embeddings"], references=embeddings, seed=args.seed)
        except ValueError as err:  # fewer than 2 clips on a side
            skipped["FAD"] = str(err)
        else:
            details["fad"] = {**fad, "reference": description, "embedding_dim": int(embeddings.shape[1])}
            rows.append(row("audio", "FAD (CLAP embeddings)", fad["fad"], "fad", "lower"))
            if fad["fad_inf"] is None:  # 2 clips: a single subset size, no line to extrapolate
                skipped["FAD∞"] = f"{fad['n_predictions']} clips give a single subset size; FAD∞ needs more"
            else:  # the paper reports no FAD∞: no paper value
                rows.append(row("audio", "FAD∞ (CLAP embeddings)", fad["fad_inf"], None, "lower"))
    del clap
    _free_accelerator_memory()
    return rows, details


# -- figures and report -----------------------------------------------------------------------
def draw_figures(run: Path, out: Path, args: EvaluateArguments, details: dict) -> tuple[dict, dict]:
    """({name: relative path}, {name: reason not drawn}) of the PNGs written under out/figures/."""
    from conceptcaps_pipeline.evaluate import figures

    drawn, missing = {}, {}
    folder = out / "figures"
    distilled = _rows(run / "distilled.parquet", ["aspect_list", "genre"])
    reference_sets = [r["aspect_list"] for r in distilled]
    clap = details.get("audio", {}).get("clap")
    if clap:
        drawn["CLAP score histogram"] = figures.clap_histogram(
            list(clap["clap_scores"].values()), folder / "clap_scores.png", paper_mean=PAPER["clap_score"])
    else:
        missing["CLAP score histogram"] = "no CLAP scores"
    names = [BASELINES[args.baseline].get(k) for k in ("captions", "attributes")] if args.baseline else \
        ["captions.parquet", "attributes.parquet"]
    source = next((n for n in names if n and (run / n).exists()), None)
    if source:
        run_sets = [r["aspect_list"] for r in _rows(run / source, ["aspect_list"])]
        labels = (f"this run ({source})", "MusicCaps (distilled)")
        drawn["Tag frequency vs MusicCaps"] = figures.tag_frequency(
            run_sets, reference_sets, folder / "tag_frequency.png", top=args.top_tags, labels=labels)
        drawn["Tags per sample"] = figures.tags_per_sample(run_sets, reference_sets, folder / "tags_per_sample.png",
                                                           labels=labels)
    else:
        missing["Tag frequency vs MusicCaps"] = missing["Tags per sample"] = \
            "no RUN/captions.parquet or RUN/attributes.parquet"
    latent = "VAE latent space (PCA of posterior means)"
    if not (run / "vae" / "model.safetensors").exists():
        missing[latent] = "no RUN/vae/model.safetensors"
    else:
        try:
            means = latent_means(run, reference_sets)
        except KeyError as err:  # the VAE was trained on another taxonomy than distilled.parquet uses
            missing[latent] = f"tag {err} of distilled.parquet is not in the VAE's vocabulary: retrain the VAE"
        else:
            drawn[latent] = figures.latent_space(
                figures.pca_2d(means), [_first_genre(r) for r in distilled], folder / "vae_latent_pca.png",
                title="VAE posterior means of the distilled sets (PCA), by first genre")
    return {k: str(Path(p).relative_to(out)) for k, p in drawn.items()}, missing


REPORT_NOTES = (
    "The paper column is Table 1 of Sienkiewicz et al. (arXiv 2601.14157). The paper's VAE Jaccard thresholds the "
    "decoder's probabilities at 0.5 and pools intersections and unions over all sets: its row is computed that way; "
    "the decoding-rule row (the pipeline's rule, mean Jaccard per set) has no paper value. BLEU is sacreBLEU's 0-100 corpus score "
    "divided by 100, the paper's 0-1 scale. The CLAP score is the raw cosine (not 100 x cos). Hamming loss is per "
    "tag over this run's vocabulary, so it depends on its size. FAD depends on the reference set and on the number "
    "of clips; compare it only between sets of similar sizes. FAD∞ is FAD extrapolated to infinitely many clips "
    "(the intercept of FAD = a + b / n over random subsets of the run's clips, as fadtk computes it): it is "
    "comparable across sample sizes, against the same reference set and CLAP model."
)
CAPTION_NOTE = (
    "Caption quality: {usable_captions} usable captions of {validation_sets} validation attribute sets, written by "
    "the run's captioner and compared with the MusicCaps experts' captions of the same clips "
    "(`validation_captions.parquet`); outputs the captions stage would refuse are not scored."
)


FAD_NOTE = (
    "FAD∞: the line FAD = {fad_inf:.4g} + {fad_inf_slope:.4g} / n (r² {fad_inf_r2:.3f}) fitted to the FADs of "
    "{points} random subsets of {smallest} to {n_predictions} of the run's clips against the {n_references} "
    "reference clips ({reference}); `details.audio.fad.fad_inf_curve` in metrics.json holds the points."
)


def write_report(path: Path, run: Path, metrics: dict) -> None:
    details = metrics["details"]
    lines = [f"# ConceptCaps evaluation of `{run.name}`", "",
             f"Run directory `{run}`, evaluated {details['finished_at']}.", "",
             metrics_table(metrics), "", REPORT_NOTES, ""]
    if details.get("baseline"):
        made = details["baseline"].get("captions") or details["baseline"].get("attributes")
        lines[2:2] = [(f"**Baseline `{details['baseline']['name']}`**: `{made}`, made by "
                      f"`{details['baseline']['made_by']}`; compare with `eval/report.md` of the same run."), ""]
    if details.get("caption_quality"):
        lines += [CAPTION_NOTE.format(**details["caption_quality"]), ""]
    fad = details.get("audio", {}).get("fad", {})
    if fad.get("fad_inf") is not None:
        curve = fad["fad_inf_curve"]
        lines += [FAD_NOTE.format(**fad, points=len(curve), smallest=curve[0][0]), ""]
    tiny = sorted(set(tiny_models(run, list(details["models"].values()))))
    if tiny:
        warning = (f"**These models are tiny random-weight models built from configs ({', '.join(tiny)}): "
                   "the captions and audio are noise and these figures say nothing about the method.**")
        lines += [warning, ""]
    lines += ["## Models", ""] + [f"- {k}: `{run_relative(v, run)}`" for k, v in details["models"].items()] + [""]
    lines += ["## Figures", ""]
    for title, relative in details["figures"].items():
        lines += [f"### {title}", "", f"![{title}]({relative})", ""]
    not_drawn = [f"- {title}: not drawn ({reason})" for title, reason in details.get("figures_not_drawn", {}).items()]
    lines += not_drawn + ([""] if not_drawn else []) + ["## Skipped", ""]
    lines += [f"- {name}: {reason}" for name, reason in metrics["skipped"].items()] or ["Nothing was skipped."]
    path.write_text("\n".join(lines).rstrip() + "\n")


# -- the stage --------------------------------------------------------------------------------
def _inputs(run: Path) -> dict:
    inputs = {"distilled": run / "distilled.parquet", "taxonomy": run / "taxonomy.json"}
    optional = {"attributes": "attributes.parquet", "captions": "captions.parquet", "vae": "vae/model.safetensors",
                "vae_metrics": "vae/metrics.json", "captioner": "captioner/adapter_model.safetensors",
                "audio_manifest": "manifests/audio.json"}
    inputs.update({k: run / p for k, p in optional.items() if (run / p).exists()})
    return inputs


def check_arguments(args: EvaluateArguments) -> None:
    checks = [
        (min(args.caption_batch_size, args.metric_batch_size, args.clap_batch_size) >= 1,
         "--caption_batch_size, --metric_batch_size and --clap_batch_size must be at least 1."),
        (args.top_tags >= 1, f"--top_tags {args.top_tags}: give at least 1."),
        (args.max_reference_clips is None or args.max_reference_clips >= 1,
         f"--max_reference_clips {args.max_reference_clips}: give at least 1 (or leave it out)."),
        (args.max_reference_captions is None or args.max_reference_captions >= 1,
         f"--max_reference_captions {args.max_reference_captions}: give at least 1 (or leave it out)."),
        (args.mauve_pooling in ("last", "mean"), f"--mauve_pooling {args.mauve_pooling!r}: use last or mean."),
        (args.mauve_num_buckets == "auto" or str(args.mauve_num_buckets).isdigit(),
         f"--mauve_num_buckets {args.mauve_num_buckets!r}: give auto or a whole number."),
        (args.bertscore_num_layers is None or args.bertscore_num_layers >= 1,
         f"--bertscore_num_layers {args.bertscore_num_layers}: give at least 1 (or leave it out)."),
    ]
    for ok, message in checks:
        if not ok:
            raise ConceptCapsError(message)
    if args.baseline is not None and args.baseline not in BASELINES:
        raise ConceptCapsError(f"--baseline {args.baseline}: unknown baseline; choose from {', '.join(BASELINES)}.")


# A baseline's evaluation has its own manifest and lock (RUN/eval_<baseline>/), so it never waits on the run's.
@stage(STAGE, check=check_arguments, lock=lambda args: f"{STAGE}_{args.baseline}" if args.baseline else STAGE)
def evaluate_run(args: EvaluateArguments) -> dict:
    """Score the run, write RUN/eval/ atomically, and return the stage manifest."""
    from conceptcaps_pipeline.audio.shards import shard_paths
    started = time.time()
    run = Path(args.run)
    require(run, "distilled.parquet")
    require(run, "taxonomy.json")
    unknown = sorted(set(args.skip) - set(GROUPS))
    if unknown:
        raise ConceptCapsError(f"--skip {' '.join(unknown)}: unknown metric group(s); choose from {', '.join(GROUPS)}.")
    inputs = _inputs(run)
    baseline = BASELINES.get(args.baseline) if args.baseline else None
    stage, out = (f"{STAGE}_{args.baseline}", run / f"eval_{args.baseline}") if baseline else (STAGE, run / "eval")
    captions_file = (baseline or {}).get("captions", "captions.parquet")
    attributes_file = (baseline or {}).get("attributes", "attributes.parquet")
    if baseline:
        made = baseline.get("captions") or baseline.get("attributes")
        if not (run / made).exists():
            raise ConceptCapsError(f"--baseline {args.baseline}: {run / made} not found: make it first with "
                                   f"`{baseline['made_by']}`.")
        inputs[made.removesuffix(".parquet")] = run / made
    done = finished(run, stage, args, inputs, [out / "metrics.json", out / "report.md"])
    if done and not args.force:
        logger.info("evaluate: %s is up to date; --force evaluates again", out)
        return done

    # Decide what can run, and check its models, before any long work starts.
    skipped, plan, models = {}, {}, {}
    wanted = {g: g not in args.skip for g in GROUPS}
    outside = {g for g in GROUPS if baseline and g not in baseline["groups"]}
    reasons = {
        "vae": None if any((run / "vae" / n).exists() for n in ("metrics.json", "model.safetensors"))
        else "no RUN/vae: run `conceptcaps vae train --run RUN`",
        "caption_quality": captioner_missing(args, run),
        "coverage": None if (run / captions_file).exists() else
        f"no RUN/{captions_file}: run `conceptcaps captions generate --run RUN`",
        "sets": None if (run / attributes_file).exists() else
        f"no RUN/{attributes_file}: run `conceptcaps vae sample --run RUN`",
        "clap": None if shard_paths(run / "audio") else "no RUN/audio shards: run `conceptcaps audio generate --run RUN`",
    }
    if "validation" not in {r["split"] for r in _rows(run / "distilled.parquet", ["split"])}:
        reasons["caption_quality"] = "RUN/distilled.parquet has no validation rows to caption"
    reasons["fad"] = reasons["clap"] or (None if args.reference_audio else "no --reference_audio given")
    names = {"vae": "VAE", "caption_quality": "caption quality", "coverage": "attribute coverage",
             "sets": "sampled sets", "clap": "CLAP", "fad": "FAD"}
    for group in GROUPS:
        plan[group] = wanted[group] and group not in outside and reasons[group] is None
        if not plan[group]:
            skipped[names[group]] = (f"not part of the {args.baseline} baseline" if group in outside else
                                     f"--skip {group}" if not wanted[group] else reasons[group])
    if plan["caption_quality"]:
        models["bertscore"] = check_model(args.bertscore_model, "bertscore_model", "BERTScore encoder")
        models["mauve"] = check_model(args.mauve_model, "mauve_model", "MAUVE feature model")
    if plan["clap"] or plan["fad"]:
        models["clap"] = check_model(args.clap_model, "clap_model", "CLAP model")
    reference = reference_clips(args) if plan["fad"] else None  # a wrong split or column fails here, early

    rows, details, records = [], {}, []
    if plan["vae"]:
        scores = vae_scores(run)
        rows += vae_rows(scores)
        details["vae"] = scores
    if plan["caption_quality"]:
        quality_rows, details["caption_quality"], records = caption_quality(args, run, models, skipped)
        rows += quality_rows
    if plan["coverage"]:
        coverage, details["coverage"] = coverage_rows(run, captions_file)
        rows += coverage
    if plan["sets"]:
        set_rows, details["sets"] = sets_rows(run, attributes_file)
        rows += set_rows
    if plan["clap"]:
        audio_rows, details["audio"] = audio_metrics(args, run, models, skipped, reference)
        rows += audio_rows

    captioner = details.get("caption_quality", {}).get("captioner", {})
    details["models"] = {"CLAP (CLAP score, FAD)": models.get("clap"), "BERTScore": models.get("bertscore"),
                         "MAUVE features": models.get("mauve"), "captioner base model": captioner.get("base_model"),
                         "captioner adapter": captioner.get("adapter")}
    details["models"] = {k: v for k, v in details["models"].items() if v}
    details["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if baseline:
        details["baseline"] = {"name": args.baseline, **baseline}
    with atomic_dir(out) as tmp:
        details["figures"], details["figures_not_drawn"] = draw_figures(run, tmp, args, details)
        # Paths inside the run (models in RUN/models/, the run's files) as RUN/...: a copied run names nothing
        # of the original (run_dir.portable).
        metrics = portable({"rows": rows, "skipped": skipped, "details": details}, run)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
        write_report(tmp / "report.md", run, metrics)
        if records:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(records), tmp / "validation_captions.parquet")
    for r in rows:
        logger.info("evaluate: %-6s %-40s %s (paper %s)", r["stage"], r["metric"], _fmt(r["value"]), _fmt(r["paper"]))
    for name, reason in skipped.items():
        logger.info("evaluate: skipped %s: %s", name, reason)
    counts = {"rows": len(rows), "skipped": len(skipped), "figures": len(details["figures"])}
    return write_manifest(run, stage, args, inputs=inputs, counts=counts, started=started,
                          extra={"rows": rows, "skipped": skipped, "metrics": run_relative(out / "metrics.json", run),
                                 "report": run_relative(out / "report.md", run)})
