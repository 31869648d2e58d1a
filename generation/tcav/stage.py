r"""Which concepts does an audio classifier use for a class? TCAV on a ConceptCaps release, with captum.

    conceptcaps tcav --run runs/demo --model sanchit-gandhi/distilhubert-finetuned-gtzan \
        --layers hubert.encoder.layers.0 hubert.encoder.layers.1 \
        --concepts "fast tempo" "slow tempo" piano "acoustic guitar" --targets jazz metal rock
    conceptcaps tcav --run runs/probe --dataset my-org/conceptcaps --revision main --model ./my-classifier \
        --layers encoder.layers.3 --concepts piano --targets jazz --n 30 --n_random 30

Reads the `audio` config of RUN/release (or --dataset: a release folder or a Hub dataset id) and
any `AutoModelForAudioClassification` checkpoint (Hub id or folder). The datasets `Audio` feature
resamples every clip to the rate of the model's feature extractor; clips are cut or zero-padded
to --max_duration seconds.

The statistics follow the TCAV paper (Kim et al., 2018), with the safeguards a reviewer asks for:
  1. For each concept, --n_cavs CAVs, each trained (captum CAVs, `HeldOutLinearClassifier`) on a
     fresh subset of --n clips that hold the concept against a fresh random set of --n clips that
     do not. Each CAV's held-out accuracy is reported; a concept whose mean accuracy at a layer is
     below --min_cav_accuracy has no direction there ("not separable") and is never significant.
  2. The TCAV score of a CAV for a target class (captum's `TCAV.interpret`) is the share of the
     target's inputs (by default the --n_inputs clips of --input_split the model rates most
     likely to be that class) whose class log-probability (--output logit: the logit, as in the
     TCAV paper) rises along the CAV.
  3. The null: --n_random random concepts per concept, each a random pool of as many clips as the
     concept has positives, with --n_cavs CAVs drawn from it the same way. A concept's CAVs share
     its positives, so only a null built like this holds its level (benchmarks/tcav_calibration.py
     measures the textbook alternative, `--test ttest`, calling noise significant too often).
  4. For every (concept, target, layer): a two-sided test of the concept's mean score against the
     random concepts' (`tcav_stats.compare_pooled`), Holm's correction over all of them, and the
     effect size (the distance from the random concepts' mean in units of their spread).
Every clip of the concept and input splits is forwarded once: activations (averaged over time by
default) and logits are cached per (model, layer, clip) in RUN/tcav/activations/, so another
concept or target needs no new forward pass over them; each target needs one forward and
backward pass over its inputs for the gradients.

Writes RUN/tcav/scores.json (every score, p-value and accuracy), RUN/tcav/report.md,
RUN/tcav/tcav.png (TCAV score per concept and target with error bars and significance marks)
and RUN/manifests/tcav.json.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import finished, stable_hash, write_json, write_manifest

logger = logging.getLogger(__name__)

STAGE = "tcav"
INPUT_MODES = ("top", "tag", "all")
POOLINGS = ("mean", "flatten")
OUTPUTS = ("logit", "log_softmax")
MIN_CAVS = 10


@dataclass
class TcavArguments:
    run: str = field(metadata={"help": "Run directory: reads RUN/release (unless --dataset), writes RUN/tcav/."})
    model: str = field(metadata={"help": "AutoModelForAudioClassification checkpoint: Hub id or folder."})
    layers: list[str] = field(default_factory=list, metadata={"help": "Module names to test, e.g. hubert.encoder.layers.1 "
                                                                     "(an unknown name lists the closest ones)."})
    concepts: list[str] = field(default_factory=list, metadata={"help": "Taxonomy tags to test, e.g. piano 'slow tempo'."})
    targets: list[str] = field(default_factory=list, metadata={"help": "Class names of the model (its config's "
                                                                      "id2label), e.g. jazz metal rock."})
    dataset: str | None = field(default=None, metadata={"help": "A release folder or Hub dataset id (default RUN/release)."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of --dataset (branch, tag or commit)."})
    concept_split: str = field(default="train", metadata={"help": "Split the concept and random sets come from."})
    input_split: str = field(default="test", metadata={"help": "Split the target inputs come from."})
    n: int = field(default=50, metadata={"help": "Clips per concept subset and per random set (the paper: 50)."})
    n_cavs: int = field(default=30, metadata={"help": f"CAVs per concept, each on fresh sets (at least {MIN_CAVS})."})
    n_random: int = field(default=20, metadata={"help": f"Random concepts the concept is tested against, each with "
                                                         f"--n_cavs CAVs (at least {MIN_CAVS})."})
    n_inputs: int = field(default=50, metadata={"help": "Input clips per target (fewer if the split is smaller)."})
    inputs: str = field(default="top", metadata={"help": "Target inputs: top (clips the model rates most likely to be "
                                                         "the target), tag (clips holding the tag of that name), all."})
    output: str = field(default="log_softmax", metadata={"help": "What the score differentiates: log_softmax (the class "
                                                                 "log-probability, blind to shifts shared by every "
                                                                 "logit) or logit (the TCAV paper's class logit)."})
    min_cav_accuracy: float = field(default=0.7, metadata={"help": "Mean held-out CAV accuracy below which a concept "
                                                                   "is 'not separable' at a layer."})
    alpha: float = field(default=0.05, metadata={"help": "Significance level after correction."})
    correction: str = field(default="holm", metadata={"help": "Over every (concept, target, layer): holm, bonferroni, "
                                                              "fdr_bh or none."})
    test: str = field(default="pooled", metadata={"help": "pooled (the concept's mean score against random concepts "
                                                          "of its size; holds its level), or the TCAV paper's ttest / "
                                                          "mannwhitney of CAV scores (anti-conservative with few "
                                                          "positives; for comparison)."})
    pooling: str = field(default="mean", metadata={"help": "Layer activation per clip: mean (over time: --pool_dims) "
                                                           "or flatten (every unit; needs equal-length clips)."})
    pool_dims: list[int] = field(default_factory=list, metadata={"help": "Axes --pooling mean averages (default: 1 for "
                                                                        "(batch, time, features), 2 3 for 4-D maps)."})
    max_duration: float = field(default=30.0, metadata={"help": "Seconds of each clip the model hears (cut or padded)."})
    batch_size: int = field(default=8, metadata={"help": "Clips per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of every set draw and CAV fit."})
    num_threads: int = field(default=0, metadata={"help": "Torch CPU threads (0: torch's default)."})
    cpu: bool = field(default=False, metadata={"help": "Run on the CPU even where a GPU is present."})
    force: bool = field(default=False, metadata={"help": "Recompute even if RUN/tcav is up to date."})


def check_arguments(args: TcavArguments) -> None:
    """Every option that can be checked before a model or dataset loads: one clear error each."""
    from conceptcaps_pipeline.tcav.stats import CORRECTIONS, TESTS

    for name in ("layers", "concepts", "targets"):
        if not getattr(args, name):
            raise ConceptCapsError(f"--{name} is required: `conceptcaps tcav --help` explains it.")
    checks = [
        (args.n >= 2, f"--n {args.n}: a concept subset needs at least 2 clips."),
        (args.n_cavs >= MIN_CAVS, (f"--n_cavs {args.n_cavs}: use at least {MIN_CAVS} CAVs per concept; one CAV "
                                  f"says little.")),
        (args.n_random >= MIN_CAVS, (f"--n_random {args.n_random}: use at least {MIN_CAVS} random concepts; fewer "
                                    f"make the test against them meaningless.")),
        (args.n_inputs >= 1, f"--n_inputs {args.n_inputs}: give at least one input clip per target."),
        (0 < args.alpha < 1, f"--alpha {args.alpha}: give a level between 0 and 1, e.g. 0.05."),
        (0 <= args.min_cav_accuracy <= 1, f"--min_cav_accuracy {args.min_cav_accuracy}: give an accuracy in [0, 1]."),
        (args.correction in CORRECTIONS, f"--correction {args.correction!r}: use one of {', '.join(CORRECTIONS)}."),
        (args.test in TESTS, f"--test {args.test!r}: use one of {', '.join(TESTS)}."),
        (args.inputs in INPUT_MODES, f"--inputs {args.inputs!r}: use one of {', '.join(INPUT_MODES)}."),
        (args.output in OUTPUTS, f"--output {args.output!r}: use one of {', '.join(OUTPUTS)}."),
        (args.pooling in POOLINGS, f"--pooling {args.pooling!r}: use one of {', '.join(POOLINGS)}."),
        (args.max_duration > 0, f"--max_duration {args.max_duration}: give a positive number of seconds."),
        (args.batch_size >= 1, f"--batch_size {args.batch_size}: give at least 1."),
    ]
    for ok, message in checks:
        if not ok:
            raise ConceptCapsError(message)


# -- the data ----------------------------------------------------------------------------------
def load_splits(args: TcavArguments, run: Path) -> dict:
    """{split: Dataset} of the audio config for the concept and input splits."""
    from conceptcaps_pipeline.release.concepts import load_release

    source = args.dataset or str(run / "release")
    if not args.dataset and not (run / "release").is_dir():
        raise ConceptCapsError(f"{run / 'release'} not found: run `conceptcaps build --run {run}` first, or pass "
                               f"--dataset (a release folder or Hub dataset id).")
    splits = {}
    for split in dict.fromkeys([args.concept_split, args.input_split]):
        try:
            splits[split] = load_release(source, "audio", split, args.revision)
        except ValueError as err:
            raise ConceptCapsError(f"cannot read split {split!r} of the audio config of {source}: {err}. "
                                   f"tcav needs a release built with audio (the `audio` config).") from err
        except (FileNotFoundError, ConnectionError, OSError) as err:
            raise ConceptCapsError(f"cannot load {source}: {str(err).splitlines()[0] if str(err) else err}. Pass a "
                                   f"release folder or a Hub dataset id reachable from here (HF_HUB_OFFLINE).") from err
    return splits


def target_inputs(dataset, logits: np.ndarray, targets: dict[str, int], args: TcavArguments) -> dict[str, list[int]]:
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


# -- the sets ---------------------------------------------------------------------------------
def draw_cav_sets(dataset, concepts: list[str], args: TcavArguments) -> dict:
    """Row indices of every CAV of every concept and of its random concepts.

    {concept: {"concept": [(positives, randoms)] * n_cavs, "null": [[(positives, randoms)] * n_cavs] * n_random}}.
    A random concept is a random pool of as many clips as the concept has positives; its CAVs
    are drawn from it exactly as the concept's are drawn from its positives.
    """
    from conceptcaps_pipeline.release.concepts import draw_sets, tag_mask

    sets = {}
    for concept in concepts:
        mask = tag_mask(dataset, concept)
        where = f"--concepts {concept!r} in split {args.concept_split!r}"
        rng = np.random.default_rng(stable_hash(f"{args.seed}|concept|{concept}") % 2**32)
        own = [_one_set(draw_sets(mask, args.n, 1, rng, what=where)) for _ in range(args.n_cavs)]
        null = []
        for _ in range(args.n_random):
            pool = np.zeros(len(mask), dtype=bool)
            pool[rng.choice(len(mask), size=int(mask.sum()), replace=False)] = True
            null.append([_one_set(draw_sets(pool, args.n, 1, rng, what=where)) for _ in range(args.n_cavs)])
        sets[concept] = {"concept": own, "null": null}
    return sets


def _one_set(drawn):
    positives, (randoms,) = drawn
    return positives, randoms


# -- captum ------------------------------------------------------------------------------------
def train_cavs(sets: dict, activations: dict, probes: dict, save_path: Path, seed: int):
    """captum CAVs (`HeldOutLinearClassifier`) of every set; returns (experimental sets, their keys, accuracies).

    Keys are (concept, role, random concept index or -1, CAV index); accuracies are keyed by key + (layer,).
    """
    import torch
    from captum.concept import CAV, Concept
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm.auto import tqdm

    from conceptcaps_pipeline.tcav.stats import HeldOutLinearClassifier

    classifier = HeldOutLinearClassifier(seed=seed)
    CAV.create_cav_dir_if_missing(str(save_path), "conceptcaps")
    experiments, keys, accuracy = [], [], {}
    jobs = [((concept, "concept", -1, k), pair) for concept, parts in sets.items() for k, pair in enumerate(parts["concept"])]
    jobs += [((concept, "null", j, k), pair) for concept, parts in sets.items()
             for j, pairs in enumerate(parts["null"]) for k, pair in enumerate(pairs)]
    for key, (positives, randoms) in tqdm(jobs, desc="tcav CAVs", unit="set"):
        first = 2 * len(experiments)
        concepts = [Concept(first, f"set{first}", None), Concept(first + 1, f"set{first + 1}", None)]
        labels = torch.tensor([first] * len(positives) + [first + 1] * len(randoms))
        for layer, probe in probes.items():
            x = torch.from_numpy(np.concatenate([activations[layer][positives], activations[layer][randoms]]))
            # What captum's train_cav does, on activations held in memory rather than reloaded from disk.
            stats = classifier.train_and_eval(DataLoader(TensorDataset(x, labels), batch_size=len(labels)))
            CAV(concepts, probe, {"weights": classifier.weights(), "classes": classifier.classes(), **stats},
                str(save_path), "conceptcaps").save()
            accuracy[(*key, layer)] = float(stats["accs"])
        experiments.append(concepts)
        keys.append(key)
    return experiments, keys, accuracy


def score_cavs(wrapper, probes, extractor, experiments, keys, inputs, input_ds, targets, args, device,
               save_path: Path) -> dict:
    """captum's TCAV.interpret on each target's inputs: {key + (target, layer): TCAV score (sign count)}."""
    from captum.concept import TCAV

    from conceptcaps_pipeline.tcav.model import load_clips, model_inputs
    from conceptcaps_pipeline.tcav.stats import HeldOutLinearClassifier

    # The classifier is not used here (every CAV is trained already); passing one keeps captum from
    # building its default, which warns.
    tcav = TCAV(wrapper, list(probes.values()), model_id="conceptcaps", classifier=HeldOutLinearClassifier(),
                save_path=str(save_path))
    length = round(args.max_duration * extractor.sampling_rate)
    scores = {}
    for target, class_index in targets.items():
        rows = inputs[target]
        for start in range(0, len(rows), args.batch_size):
            batch = rows[start:start + args.batch_size]
            x = model_inputs(extractor, load_clips(input_ds, batch, extractor.sampling_rate, length), device)
            result = tcav.interpret(x, experiments, target=class_index)
            for key, concepts in zip(keys, experiments):
                for layer, probe in probes.items():
                    share = float(result["-".join(str(c.id) for c in concepts)][probe]["sign_count"][0])
                    slot = (*key, target, layer)
                    scores[slot] = scores.get(slot, 0.0) + share * len(batch) / len(rows)
    return scores


# -- statistics ----------------------------------------------------------------------------------
def summarize(scores: dict, accuracy: dict, categories: dict, args: TcavArguments) -> list[dict]:
    """One result per (concept, target, layer): scores, the test against random concepts, correction, gate."""
    from conceptcaps_pipeline.tcav.stats import adjust, compare

    cavs, randoms = range(args.n_cavs), range(args.n_random)
    rows = []
    for layer in args.layers:
        for concept in args.concepts:
            cav_accuracy = [accuracy[(concept, "concept", -1, k, layer)] for k in cavs]
            null_accuracy = [accuracy[(concept, "null", j, k, layer)] for j in randoms for k in cavs]
            for target in args.targets:
                own = [scores[(concept, "concept", -1, k, target, layer)] for k in cavs]
                null = [[scores[(concept, "null", j, k, target, layer)] for k in cavs] for j in randoms]
                null_means = [float(np.mean(s)) for s in null]
                result = compare(own, null, args.test)
                rows.append({
                    "concept": concept, "category": categories.get(concept), "target": target, "layer": layer,
                    "tcav_score": float(np.mean(own)), "tcav_score_std": float(np.std(own, ddof=1)),
                    "random_score": float(np.mean(null_means)), "random_score_std": float(np.std(null_means, ddof=1)),
                    "cav_accuracy": float(np.mean(cav_accuracy)), "cav_accuracy_std": float(np.std(cav_accuracy, ddof=1)),
                    "random_cav_accuracy": float(np.mean(null_accuracy)),
                    "separable": bool(np.mean(cav_accuracy) >= args.min_cav_accuracy),
                    "p_value": result.p_value, "effect_size": result.effect_size,
                    "mean_difference": result.mean_difference,
                    "scores": own, "random_concept_means": null_means, "cav_accuracies": cav_accuracy,
                })
    for row, adjusted in zip(rows, adjust([r["p_value"] for r in rows], args.correction)):
        row["p_adjusted"] = adjusted
        row["significant"] = bool(row["separable"] and adjusted < args.alpha)
        if not row["separable"]:
            row["verdict"] = "not separable"
        elif row["significant"]:
            row["verdict"] = "uses it (above random)" if row["mean_difference"] > 0 else "uses it (below random)"
        else:
            row["verdict"] = "no evidence"
    return rows


@dataclass
class Prepared:
    """Everything a TCAV experiment needs once the model has seen every clip (see `prepare`)."""

    wrapper: object
    probes: dict  # layer -> probe module name
    extractor: object
    device: object
    concept_ds: object
    input_ds: object
    activations: dict  # layer -> (clips of the concept split, units)
    logits: np.ndarray  # (clips of the input split, classes)
    targets: dict  # target -> class index
    forwarded: int  # clips run through the model by `prepare` (the rest came from the cache)


def prepare(args: TcavArguments, run: Path) -> Prepared:
    """Load and check the model and data, and fill the activation cache for every clip of both splits."""
    import torch

    from conceptcaps_pipeline.tcav.model import (
        ActivationCache,
        attach_probes,
        check_model,
        clip_digests,
        fill_cache,
        input_name,
        load_classifier,
        logits_module,
        model_key,
    )

    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model, extractor = load_classifier(args.model, device)
    targets = check_model(model, args.model, args.targets, args.layers)
    splits = load_splits(args, run)
    concept_ds, input_ds = splits[args.concept_split], splits[args.input_split]
    from conceptcaps_pipeline.release.concepts import tag_mask

    for concept in args.concepts:
        tag_mask(concept_ds, concept)  # an unknown tag is an error before any forward pass

    wrapper = logits_module(model, input_name(extractor), args.output).to(device).eval()
    probes = attach_probes(wrapper, [f"model.{layer}" for layer in args.layers], args.pooling, args.pool_dims)
    probes = {layer: probes[f"model.{layer}"] for layer in args.layers}
    cache = ActivationCache(run / "tcav" / "activations",
                            model_key(model, extractor, args.max_duration, args.pooling, args.pool_dims))
    forward = {"max_duration": args.max_duration, "batch_size": args.batch_size, "device": device}
    concept_digests, input_digests = clip_digests(concept_ds), clip_digests(input_ds)
    forwarded = fill_cache(cache, wrapper, probes, extractor, concept_ds, concept_digests, range(len(concept_ds)),
                           **forward)
    forwarded += fill_cache(cache, wrapper, probes, extractor, input_ds, input_digests, range(len(input_ds)), **forward)
    return Prepared(wrapper, probes, extractor, device, concept_ds, input_ds,
                    {layer: cache.get(layer, concept_digests) for layer in args.layers},
                    cache.get("logits", input_digests), targets, forwarded)


def experiment(prepared: Prepared, args: TcavArguments, work: Path) -> dict:
    """Draw the sets, train the CAVs, score them on each target's inputs and test: the scores.json document."""
    from conceptcaps import tag_categories

    p = prepared
    sets = draw_cav_sets(p.concept_ds, args.concepts, args)
    chosen = target_inputs(p.input_ds, p.logits, p.targets, args)
    experiments, keys, accuracy = train_cavs(sets, p.activations, p.probes, work, args.seed)
    scores = score_cavs(p.wrapper, p.probes, p.extractor, experiments, keys, chosen, p.input_ds, p.targets, args,
                        p.device, work)
    results = summarize(scores, accuracy, tag_categories(p.concept_ds), args)
    ids = p.input_ds["id"] if "id" in p.input_ds.column_names else list(range(len(p.input_ds)))
    return {
        "settings": {k: v for k, v in asdict(args).items() if k not in ("run", "force", "num_threads", "cpu")},
        "device": str(p.device),
        "clips": {"concept_split": len(p.concept_ds), "input_split": len(p.input_ds), "forwarded_now": p.forwarded},
        "cavs": len(experiments),
        "inputs": {t: [ids[i] for i in rows] for t, rows in chosen.items()},
        "tests": len(results),
        "significant": sum(r["significant"] for r in results),
        "results": results,
    }


def run_tcav(args: TcavArguments) -> dict:
    """Run the stage: load, cache activations, captum CAVs and scores, statistics, outputs; returns the manifest."""


    from conceptcaps_pipeline.run_dir import stage_lock

    started = time.time()
    check_arguments(args)
    run = Path(args.run)
    with stage_lock(run, STAGE):
        return _run(args, run, started)


def _run(args: TcavArguments, run: Path, started: float) -> dict:

    from conceptcaps_pipeline.models import run_relative
    from conceptcaps_pipeline.tcav.report import write_report

    out = run / "tcav"
    inputs_record = {"release": (run / "release" / "concepts.json") if not args.dataset else args.dataset}
    done = finished(run, STAGE, args, inputs_record, [out / "scores.json", out / "report.md"])
    if done and not args.force:
        logger.info("tcav: %s is up to date; --force recomputes it", out)
        return done

    prepared = prepare(args, run)
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(".captum-*"):  # the work folder of an interrupted run
        shutil.rmtree(leftover, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=".captum-", dir=out) as work:
        document = experiment(prepared, args, Path(work))
    document["settings"]["model"] = run_relative(args.model, run)
    write_json(out / "scores.json", document)
    figure = write_report(out, document)
    logger.info("tcav: %d of %d (concept, target, layer) tests significant after %s correction; %s",
                document["significant"], document["tests"], args.correction, out / "report.md")
    counts = {"tests": document["tests"], "significant": document["significant"], "cavs": document["cavs"],
              "forwarded_clips": prepared.forwarded, "figure": figure}
    return write_manifest(run, STAGE, args, inputs=inputs_record, counts=counts, started=started)
