"""The metrics of `conceptcaps evaluate`: each group's rows beside the paper's Table 1, and the details.

    from conceptcaps_pipeline.evaluate.metrics import coverage_rows, sets_rows, vae_rows, vae_scores
    rows, details = coverage_rows(Path("runs/demo"))          # attribute coverage of RUN/captions.parquet
    rows = vae_rows(vae_scores(Path("runs/demo")))            # RUN/vae/metrics.json, or recomputed

A row is {stage, metric, value, paper, better} (`row`). The groups: the VAE (eval/vae_metrics),
caption quality (eval/caption_quality, on validation captions this module writes with the run's
captioner), attribute coverage (eval/attribute_coverage), sampled sets (eval/vae_metrics) and the
audio (eval/clap_score, eval/fad). `conceptcaps evaluate` (run.py) decides which groups can run.
"""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.models import load_pretrained, resolve_model
from conceptcaps_pipeline.run_dir import read_json, read_manifest
from conceptcaps_pipeline.vae.train import PAPER_VAE_METRICS, load_metric

if TYPE_CHECKING:  # annotations only: run.py imports this module
    from conceptcaps_pipeline.evaluate.run import EvaluateArguments

logger = logging.getLogger(__name__)

# Baselines the paper compares with: what each scores, from the file its stage option writes.
BASELINES = {
    "zero_shot": {"groups": ("caption_quality", "coverage"), "captions": "captions_zero_shot.parquet",
                  "made_by": "conceptcaps captions generate --run RUN --zero_shot"},
    "random_control": {"groups": ("sets",), "attributes": "attributes_random.parquet",
                       "made_by": "conceptcaps vae sample --run RUN --random_control"},
}
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


def row(stage: str, metric: str, value, paper_key: str | None, better: str) -> dict:
    return {"stage": stage, "metric": metric, "value": None if value is None else float(value),
            "paper": PAPER.get(paper_key) if paper_key else None, "better": better}


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
def read_rows(path: Path, columns: list[str] | None = None) -> list[dict]:
    from conceptcaps_pipeline.run_dir import read_table

    return read_table(path, columns, fix="re-run the stage that writes it with --force").to_pylist()


def first_genre(r: dict) -> str:
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
    distilled = read_rows(run / "distilled.parquet", ["aspect_list", "split"])
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
    from conceptcaps_pipeline.captions.generate import (
        clean_caption,
        degeneracy,
        derived_seed,
        generate_batch,
        load_captioner,
        resolve_models,
    )
    from conceptcaps_pipeline.captions.prompts import user_message
    from tqdm.auto import tqdm

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
    distilled = read_rows(run / "distilled.parquet")
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
    captions = read_rows(run / name, ["caption", "aspect_list"])
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

    sets = [r["aspect_list"] for r in read_rows(run / name, ["aspect_list"])]
    train = [r["aspect_list"] for r in read_rows(run / "distilled.parquet", ["aspect_list", "split"]) if r["split"] == "train"]
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
def _same_model(a: str | None, b: str | None) -> bool:
    """Two model arguments name the same checkpoint: the same Hub id, or local folders that resolve to one."""
    if not a or not b:
        return False
    if a == b:
        return True
    left, right = Path(a).expanduser(), Path(b).expanduser()
    return left.exists() and right.exists() and left.resolve() == right.resolve()


def stored_audio_embeddings(run: Path, model: str) -> dict[str, np.ndarray]:
    """{id: unit CLAP audio embedding} that `conceptcaps audio score` stored for the clips as they are now, when it
    used the same CLAP model; else {}.

    Why it may stand in: audio score embeds with the CLAP score's own code and windowing
    (conceptcaps_eval.clap_score.clap_windows), so a stored embedding is the one this stage would
    compute; the clip key (caption fingerprint, seed, settings) leaves out clips made again since.
    """
    from conceptcaps_pipeline.audio.score import STAGE, clip_key, embedding_paths, read_audio_embeddings
    from conceptcaps_pipeline.audio.shards import INDEX_COLUMNS, read_shards
    from conceptcaps_pipeline.run_dir import read_manifest

    scored = (read_manifest(run, STAGE) or {}).get("model")
    if not embedding_paths(run) or not _same_model(scored, model):
        return {}
    index = read_shards(run / "audio", columns=INDEX_COLUMNS)
    keys: dict[str, str] = {}
    for i, c, s, st in zip(*(index.column(n).to_pylist() for n in ("id", "caption_sha256", "seed", "settings"))):
        keys.setdefault(i, clip_key(c, s, st))
    return read_audio_embeddings(run, scored, keys)


def run_audio_embeddings(run: Path, clap, args: EvaluateArguments, model: str) -> dict:
    """CLAP embeddings and per-clip CLAP scores of RUN/audio/, one shard at a time (memory stays at one shard).

    Audio embeddings that `audio score` stored with the same CLAP model are reused, not computed twice
    (`stored_audio_embeddings`); a shard whose clips all have one is not read past its ids."""
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.audio.shards import shard_paths

    captions = {r["id"]: r["caption"] for r in read_rows(run / "captions.parquet", ["id", "caption"])} \
        if (run / "captions.parquet").exists() else {}
    ids, scores, embeddings, uncaptioned, seen = [], [], [], 0, set()
    options = {"model": model, "batch_size": args.clap_batch_size, "device": args.device}
    stored = stored_audio_embeddings(run, model)
    reused = 0
    for path in shard_paths(run / "audio"):
        shard_ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
        columns = ["id"] if all(i in stored for i in shard_ids) else ["id", "audio"]
        table = pq.read_table(path, columns=columns).to_pylist()
        table = [r for r in table if r["id"] not in seen]  # a resumed run never repeats ids; be safe anyway
        seen.update(r["id"] for r in table)
        if not table:
            continue
        todo = [k for k, r in enumerate(table) if r["id"] not in stored]
        computed = clap.embed_audio([{"bytes": table[k]["audio"], "path": ""} for k in todo], **options) if todo else None
        position = {k: j for j, k in enumerate(todo)}
        audio = np.stack([stored[r["id"]] if r["id"] in stored else computed[position[k]]
                          for k, r in enumerate(table)]).astype(np.float32)
        reused += len(table) - len(todo)
        embeddings.append(audio)
        captioned = [i for i, r in enumerate(table) if r["id"] in captions]
        uncaptioned += len(table) - len(captioned)
        if captioned:
            text = clap.embed_text([captions[table[i]["id"]] for i in captioned], **options)
            # Both sides are unit vectors: the cosine is the dot product, exactly as clap_score computes it.
            cosines = np.clip(np.sum(text.astype(np.float64) * audio[captioned].astype(np.float64), axis=1), -1, 1)
            ids += [table[i]["id"] for i in captioned]
            scores += cosines.tolist()
    if reused:
        logger.info("evaluate: %d of %d clip embeddings reused from `audio score` (same CLAP model)", reused, len(seen))
    return {"ids": ids, "scores": scores, "uncaptioned_clips": uncaptioned, "reused_embeddings": reused,
            "missing_clips": len(set(captions) - seen),
            "embeddings": np.concatenate(embeddings) if embeddings else np.zeros((0, 0))}


def audio_metrics(args: EvaluateArguments, run: Path, models: dict, skipped: dict, reference) -> tuple[list, dict]:
    """CLAP score rows, and FAD and FAD∞ rows when `reference` (what reference_clips returned) is given."""
    clap = load_metric("clap_score")
    embedded = run_audio_embeddings(run, clap, args, models["clap"])
    rows, details = [], {"clips_scored": len(embedded["scores"]), "uncaptioned_clips": embedded["uncaptioned_clips"],
                         "clap_embeddings_reused": embedded["reused_embeddings"],
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
