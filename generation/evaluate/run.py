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
- CLAP score (eval/clap_score) of each clip in RUN/audio/ against its caption; the audio embeddings
  that `conceptcaps audio score` stored with the same CLAP model are reused, not computed twice.
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

The pieces: this module is the stage (arguments, what can run, RUN/eval/); metrics.py computes
each group's rows; references.py reads FAD's reference clips; report.py writes report.md and
gathers the figures' data; figures.py draws them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.evaluate.metrics import (
    BASELINES,
    audio_metrics,
    caption_quality,
    captioner_missing,
    check_model,
    coverage_rows,
    read_rows,
    sets_rows,
    vae_rows,
    vae_scores,
)
from conceptcaps_pipeline.evaluate.references import reference_clips
from conceptcaps_pipeline.evaluate.report import draw_figures, fmt, write_report
from conceptcaps_pipeline.run_dir import atomic_dir, finished, portable, require, run_relative, stage, write_manifest

logger = logging.getLogger(__name__)

STAGE = "evaluate"
GROUPS = ("vae", "caption_quality", "coverage", "sets", "clap", "fad")


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
    if "validation" not in {r["split"] for r in read_rows(run / "distilled.parquet", ["split"])}:
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
        logger.info("evaluate: %-6s %-40s %s (paper %s)", r["stage"], r["metric"], fmt(r["value"]), fmt(r["paper"]))
    for name, reason in skipped.items():
        logger.info("evaluate: skipped %s: %s", name, reason)
    counts = {"rows": len(rows), "skipped": len(skipped), "figures": len(details["figures"])}
    return write_manifest(run, stage, args, inputs=inputs, counts=counts, started=started,
                          extra={"rows": rows, "skipped": skipped, "metrics": run_relative(out / "metrics.json", run),
                                 "report": run_relative(out / "report.md", run)})
