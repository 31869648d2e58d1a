r"""Which concepts does an audio classifier use for a class? TCAV on a ConceptCaps release.

    conceptcaps tcav --run runs/demo --model sanchit-gandhi/distilhubert-finetuned-gtzan \
        --layers hubert.encoder.layers.0 hubert.encoder.layers.1 \
        --concepts "fast tempo" "slow tempo" piano "acoustic guitar" --targets jazz metal rock
    conceptcaps tcav --run runs/probe --dataset my-org/conceptcaps --model ./my-classifier \
        --layers encoder.layers.3 --concepts piano --targets jazz --n 30 --primary piano:jazz
    conceptcaps tcav --run runs/probe --model my_package.models:genre_cnn --layers conv2 --concepts piano \
        --targets 3 --sampling_rate 22050                       # any torch module from a factory (or a .pt2 file)
    conceptcaps tcav --run runs/demo --model ./my-classifier --layers encoder.layers.3 --concepts piano \
        --targets jazz --min_evidence 0.75                      # positives whose audio CLAP hears piano in

Reads the `audio` config of RUN/release (or --dataset: a release folder or a Hub dataset id).
--model is a transformers audio classifier (Hub id or folder, with its feature extractor;
--trust_remote_code for custom code), a `torch.export` file (.pt2), or MODULE:FUNCTION, a
factory returning a torch module (or (module, preprocess)). Clips are resampled to the
model's rate and cut or zero-padded to --max_duration (default: the longest clip).

This command is a thin layer over the Python API (`conceptcaps_pipeline.tcav.run`, tcav/api.py,
which says what is computed): it loads the model and the release, checks everything that
needs no forward pass (targets, layers, concepts and their positives against --n, --primary),
chooses each target's inputs from --input_split, and writes RUN/tcav/scores.json (every
score, p-value, threshold and accuracy), RUN/tcav/report.md, RUN/tcav/tcav.png and
RUN/manifests/tcav.json. Activations are cached per (model, layer, clip) in
RUN/tcav/activations/, so another concept, target or seed needs no new forward pass.
--min_evidence q draws each concept's positives from the clips whose evidence for it is >= q
(the release's `evidence` column, else RUN/audio_evidence/ when RUN/release is read); its random
sets still avoid every clip labelled with it; scores.json's `evidence` and the report say how
many positives remained.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import finished, stable_hash, stage, write_json, write_manifest
from conceptcaps_pipeline.tcav.api import MIN_CAVS, TcavSettings, check_settings  # noqa: F401 - MIN_CAVS re-exported

logger = logging.getLogger(__name__)

STAGE = "tcav"
INPUT_MODES = ("top", "tag", "all")


@dataclass(kw_only=True)
class TcavArguments(TcavSettings):
    run: str = field(metadata={"help": "Run directory: reads RUN/release (unless --dataset), writes RUN/tcav/."})
    model: str = field(metadata={"help": "A transformers audio classifier (Hub id or folder with its feature "
                                         "extractor), a torch.export file (.pt2), or MODULE:FUNCTION (a factory "
                                         "returning a torch module, or (module, preprocess))."})
    layers: list[str] = field(default_factory=list, metadata={"help": "Module names to test, e.g. hubert.encoder.layers.1 "
                                                                     "(an unknown name lists the closest ones)."})
    concepts: list[str] = field(default_factory=list, metadata={"help": "Taxonomy tags to test, e.g. piano 'slow tempo'."})
    targets: list[str] = field(default_factory=list, metadata={"help": "Class names of the model (its id2label), e.g. "
                                                                      "jazz metal rock, or class indices."})
    dataset: str | None = field(default=None, metadata={"help": "A release folder or Hub dataset id (default RUN/release)."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of --dataset (branch, tag or commit)."})
    concept_split: str = field(default="train", metadata={"help": "Split the concept and random sets come from."})
    min_evidence: float = field(default=0.0, metadata={"help": "Draw each concept's positives only from clips whose "
                                                                "evidence for it (its CLAP rank percentile in its "
                                                                "category, `conceptcaps audio score`) is >= this; "
                                                                "random sets still avoid every labelled clip. 0: every "
                                                                "positive, no evidence read."})
    input_split: str = field(default="test", metadata={"help": "Split the target inputs come from."})
    n_inputs: int = field(default=50, metadata={"help": "Input clips per target (fewer if the split is smaller)."})
    inputs: str = field(default="top", metadata={"help": "Target inputs: top (clips the model rates most likely to be "
                                                         "the target), tag (clips holding the tag of that name), all "
                                                         "(the same random clips for every target)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the custom code of a transformers "
                                                                     "checkpoint (read it first); never asked."})
    sampling_rate: int = field(default=16_000, metadata={"help": "Input rate of a .pt2 or factory model that does not "
                                                                 "say its own (transformers models: their feature "
                                                                 "extractor's)."})
    num_threads: int = field(default=0, metadata={"help": "Torch CPU threads (0: torch's default)."})
    cpu: bool = field(default=False, metadata={"help": "Run on the CPU even where a GPU is present."})
    force: bool = field(default=False, metadata={"help": "Recompute even if RUN/tcav is up to date."})


def check_arguments(args: TcavArguments) -> None:
    """Every option that can be checked before a model or dataset loads: one clear error each."""
    for name in ("layers", "concepts", "targets"):
        if not getattr(args, name):
            raise ConceptCapsError(f"--{name} is required: `conceptcaps tcav --help` explains it.")
    check_settings(args)
    if args.n_inputs < 1:
        raise ConceptCapsError(f"--n_inputs {args.n_inputs}: give at least one input clip per target.")
    if args.inputs not in INPUT_MODES:
        raise ConceptCapsError(f"--inputs {args.inputs!r}: use one of {', '.join(INPUT_MODES)}.")
    if args.sampling_rate < 1:
        raise ConceptCapsError(f"--sampling_rate {args.sampling_rate}: give a positive rate in Hz, e.g. 16000.")
    from conceptcaps_pipeline.release.evidence import check_min_evidence

    check_min_evidence(args.min_evidence)


def settings_of(args: TcavArguments) -> TcavSettings:
    return TcavSettings(**{k: getattr(args, k) for k in TcavSettings.__dataclass_fields__})


# -- the data ----------------------------------------------------------------------------------
def load_splits(args: TcavArguments, run: Path) -> dict:
    """{split: (Dataset, clip source)} of the audio config for the concept and input splits.

    A local release loads without its audio column and its clips are read from the Parquet files a
    row group at a time (`ReleaseClips`): loading the audio column would first copy every clip of
    the split into an Arrow cache, a read and a peak memory that grow with the split. A Hub
    dataset loads whole and its clips are read from its audio column (`DatasetClips`).
    """
    from conceptcaps_pipeline.release.concepts import load_release_lean
    from conceptcaps_pipeline.tcav.model import DatasetClips, ReleaseClips

    source = args.dataset or str(run / "release")
    if not args.dataset and not (run / "release").is_dir():
        raise ConceptCapsError(f"{run / 'release'} not found: run `conceptcaps build --run {run}` first, or pass "
                               f"--dataset (a release folder or Hub dataset id).")
    splits = {}
    for split in dict.fromkeys([args.concept_split, args.input_split]):
        try:
            dataset, audio = load_release_lean(source, "audio", split, args.revision)
            splits[split] = (dataset, ReleaseClips(audio) if audio is not None else DatasetClips(dataset))
        except ValueError as err:
            raise ConceptCapsError(f"cannot read split {split!r} of the audio config of {source}: {err}. "
                                   f"tcav needs a release built with audio (the `audio` config).") from err
        except (FileNotFoundError, ConnectionError, OSError) as err:
            raise ConceptCapsError(f"cannot load {source}: {str(err).splitlines()[0] if str(err) else err}. Pass a "
                                   f"release folder or a Hub dataset id reachable from here (HF_HUB_OFFLINE).") from err
    return splits


def clip_seconds(*datasets_) -> float | None:
    """The longest clip of the splits, from their `duration_s` column (no audio read)."""
    longest = [max(ds["duration_s"]) for ds in datasets_ if "duration_s" in ds.column_names and len(ds)]
    return float(max(longest)) if longest else None


def target_inputs(dataset, logits: np.ndarray | None, targets: dict[str, int], args: TcavArguments) -> dict:
    """Row indices of the input split that each target's scores are computed on."""
    from conceptcaps_pipeline.release.concepts import tag_mask

    count = min(args.n_inputs, len(dataset))
    chosen = {}
    for target, class_index in targets.items():
        if args.inputs == "top":
            shifted = logits - logits.max(axis=1, keepdims=True)
            probability = np.exp(shifted[:, class_index]) / np.exp(shifted).sum(axis=1)
            chosen[target] = sorted(np.argsort(-probability, kind="stable")[:count].tolist())
        elif args.inputs == "tag":
            holders = np.flatnonzero(tag_mask(dataset, target))
            if not len(holders):
                raise ConceptCapsError(f"--inputs tag: no clip of split {args.input_split!r} holds the tag {target!r}.")
            chosen[target] = holders[:count].tolist()
        else:
            rng = np.random.default_rng(stable_hash(f"{args.seed}|inputs") % 2**32)
            chosen[target] = sorted(rng.choice(len(dataset), size=count, replace=False).tolist())
    return chosen


@dataclass
class Prepared:
    """What a TCAV experiment needs before its statistics: the model, the data and the checks passed."""

    classifier: object
    device: object
    concept_ds: object
    input_ds: object
    masks: dict  # concept -> boolean mask over the concept split: the rows positives are drawn from
    targets: dict  # target -> class index
    seconds: float
    inputs: dict  # target -> row indices of the input split
    forwarded: int  # input clips forwarded for --inputs top (the rest came from the cache)
    labelled: dict | None = None  # with --min_evidence: concept -> its labelled rows (never in its random sets)
    evidence: dict | None = None  # with --min_evidence: threshold, source, per concept positives / kept / unscored
    concept_clips: object = None  # clip sources of the two splits (model.ReleaseClips / DatasetClips)
    input_clips: object = None


def prepare(args: TcavArguments, run: Path) -> Prepared:
    """Load the model and data; run every check that needs no forward pass; choose the target inputs."""
    import torch
    from conceptcaps_pipeline.release.concepts import tag_mask
    from conceptcaps_pipeline.tcav.api import check_concepts, family_of
    from conceptcaps_pipeline.tcav.model import (
        ActivationCache,
        Probes,
        activations,
        check_layers,
        check_targets,
        load_model,
        model_key,
        output_module,
    )

    check_arguments(args)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    classifier = load_model(args.model, device, trust_remote_code=args.trust_remote_code,
                            sampling_rate=args.sampling_rate)
    targets = check_targets(classifier, args.targets)
    check_layers(classifier.module, [classifier.layer_prefix + layer for layer in args.layers], args.model)
    splits = load_splits(args, run)
    (concept_ds, concept_clips), (input_ds, input_clips) = splits[args.concept_split], splits[args.input_split]
    masks = {concept: tag_mask(concept_ds, concept) for concept in args.concepts}  # unknown tags: an error now
    labelled, evidence = None, None
    if args.min_evidence > 0:  # positives with evidence: the release's column, else RUN/audio_evidence
        from conceptcaps_pipeline.release.concepts import run_evidence, select_by_evidence

        reads_run_release = not args.dataset or Path(args.dataset).resolve() == (run / "release").resolve()
        source = run_evidence(concept_ds, run, reads_run_release, args.min_evidence)
        labelled = masks
        masks, evidence = select_by_evidence(concept_ds, labelled, args.min_evidence, source,
                                             f" in split {args.concept_split!r}")
        for concept, counts in evidence["concepts"].items():
            if counts["kept"] < args.n:
                raise ConceptCapsError(
                    f"--concepts {concept!r}: only {counts['kept']} of its {counts['positives']} positives in split "
                    f"{args.concept_split!r} have evidence >= {args.min_evidence:g}, fewer than n={args.n}: lower "
                    f"--min_evidence or --n.")
    check_concepts(masks, args.n, f" in split {args.concept_split!r}", exclude=labelled)
    family_of(args, args.concepts, list(targets), args.layers)  # a bad --primary: an error now
    seconds = args.max_duration or clip_seconds(concept_ds, input_ds)
    if not seconds:
        raise ConceptCapsError("the release has no duration_s column: give --max_duration in seconds.")

    logits, forwarded = None, 0
    if args.inputs == "top":  # the model's own ratings of the input split (logits cached per clip)
        scorer = output_module(classifier, "logit").to(device).eval()
        probes = Probes(classifier.module, [])
        cache = ActivationCache(run / "tcav" / "activations", model_key(classifier, seconds, {}))
        try:
            _, logits, forwarded, _ = activations(
                scorer, probes, classifier.preprocess, input_clips, range(len(input_ds)),
                rate=classifier.sampling_rate, length=round(seconds * classifier.sampling_rate),
                batch_size=args.batch_size, cache=cache, device=device, what="tcav input ratings")
        finally:
            probes.remove()
    inputs = target_inputs(input_ds, logits, targets, args)
    return Prepared(classifier, device, concept_ds, input_ds, masks, targets, seconds, inputs, forwarded, labelled,
                    evidence, concept_clips, input_clips)


def experiment(prepared: Prepared, args: TcavArguments, run: Path) -> dict:
    """The scores.json document: the engine (tcav/api.py) on the prepared model and data."""
    from conceptcaps_pipeline.tcav.api import run_classifier

    from conceptcaps import tag_categories

    p = prepared
    source = p.input_clips
    document = run_classifier(p.classifier, args.layers, p.masks, p.concept_clips,
                              {t: (source, rows) for t, rows in p.inputs.items()}, p.targets, settings_of(args),
                              cache_dir=run / "tcav" / "activations", device=p.device, seconds=p.seconds,
                              categories=tag_categories(p.concept_ds), exclude=p.labelled)
    ids = p.input_ds["id"] if "id" in p.input_ds.column_names else list(range(len(p.input_ds)))
    document["settings"].update({k: v for k, v in asdict(args).items()
                                 if k not in document["settings"] and k not in ("run", "force", "num_threads", "cpu")})
    document["settings"]["max_duration"] = p.seconds
    document["device"] = str(p.device)
    document["clips"].update({"concept_split": len(p.concept_ds), "input_split": len(p.input_ds)})
    document["clips"]["forwarded_now"] += p.forwarded
    document["inputs"] = {t: [ids[i] for i in rows] for t, rows in p.inputs.items()}
    if p.evidence is not None:  # how many positives remained per concept, and where the evidence came from
        document["evidence"] = p.evidence
    return document


def link_tree(source: Path, dest: Path) -> None:
    """Hard-link every file under `source` to the same place under `dest` (a copy where links are refused)."""
    import shutil

    for path in sorted(source.rglob("*")) if source.is_dir() else []:
        if path.is_file() and not path.name.startswith("."):  # a dot-file is a cache write in flight: not an entry
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)


@stage(STAGE, check=check_arguments)
def run_tcav(args: TcavArguments) -> dict:
    """Run the stage: load, check, cache activations, CAVs and scores, statistics, outputs; returns the manifest."""
    from conceptcaps_pipeline.models import run_relative
    from conceptcaps_pipeline.run_dir import atomic_dir
    from conceptcaps_pipeline.tcav.report import write_report

    started = time.time()
    run = Path(args.run)
    out = run / "tcav"
    inputs_record = {"release": (run / "release" / "concepts.json") if not args.dataset else args.dataset}
    if args.min_evidence > 0 and (run / "audio_evidence" / "evidence.parquet").is_file():
        inputs_record["evidence"] = run / "audio_evidence" / "evidence.parquet"  # new evidence: not up to date
    done = finished(run, STAGE, args, inputs_record, [out / "scores.json", out / "report.md"])
    if done and not args.force:
        logger.info("tcav: %s is up to date; --force recomputes it", out)
        return done

    prepared = prepare(args, run)
    out.mkdir(parents=True, exist_ok=True)
    document = experiment(prepared, args, run)
    document["settings"]["model"] = run_relative(args.model, run)
    # Why a folder swap: scores.json, report.md and the figure are one result; a kill between two file writes
    # left new scores beside an old report. The activation cache (written entry by entry, each whole, while the
    # experiment ran) is hard-linked into the new folder, so the swap costs no copy and keeps every entry.
    with atomic_dir(out) as tmp:
        link_tree(out / "activations", tmp / "activations")
        write_json(tmp / "scores.json", document)
        figure = write_report(tmp, document)
    logger.info("tcav: %d of %d (concept, target, layer) tests significant after %s correction; %s",
                document["significant"], document["tests"], args.correction, out / "report.md")
    counts = {"tests": document["tests"], "significant": document["significant"], "cavs": document["cavs"],
              "random_concepts": document["settings"]["n_random"],
              "forwarded_clips": document["clips"]["forwarded_now"], "figure": figure}
    return write_manifest(run, STAGE, args, inputs=inputs_record, counts=counts, started=started)
