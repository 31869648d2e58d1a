"""TCAV on any torch model, from Python: `conceptcaps_pipeline.tcav.run` (also `conceptcaps.tcav_run`).

    from conceptcaps_pipeline.tcav import run, TcavSettings
    document = run(model, ["encoder.conv"], {"piano": piano_mask}, {"jazz": jazz_clips}, pool=clips,
                   preprocess=to_mel, sampling_rate=16_000, targets={"jazz": 3}, settings=TcavSettings(n=30))
    document["results"]    # one row per (concept, target, layer): score, p-values, threshold, verdict

`model` is any `torch.nn.Module` that maps `preprocess(list of clips)` to (batch, classes)
scores (a tensor, or an output with `.logits`); `layers` are its module names; `concept_sets`
maps a concept name to its positives in `pool` (a boolean mask or row indices); `inputs` maps
each target (a class name or index) to the clips its scores are computed on. Clips are mono
float32 arrays at `sampling_rate` (or a datasets split with an `audio` column, streamed).
`conceptcaps tcav` is a thin layer over `run_classifier`, the same engine with a loaded release.

What the engine does (docs/tcav.md says why):
  1. Checks everything that needs no forward pass: settings, layers, targets, each concept's
     positives and negatives against --n.
  2. Forwards every clip of `pool` once (activations pooled over the time axis, which is found
     from the layer's output shape; cached per clip when `cache_dir` is given) and each target's
     inputs once forward and backward (the gradient of the target's score at each layer).
  3. Per concept: `n_cavs` CAVs, each on a fresh subset of `n` positives against `n` fresh
     random clips; and K random concepts (random pools as large as the concept's positives)
     with `n_cavs` CAVs each, built the same way. K = `n_random`, or by default enough that a
     concept beyond every random concept passes the correction alone (`stats.auto_random`).
     CAVs are ridge classifiers fitted in batches on the cached activations, so the K x n_cavs
     random CAVs cost about a millisecond each; a CAV's score for a target is the share of the
     target's inputs whose score rises along it (captum's TCAV sign count).
  4. Per (concept, target, layer): the empirical p-value of the concept's mean score among the
     random concepts' means, a correction over the family (every test, or the --primary ones),
     the smallest p the design can reach and the threshold it had to pass, and a verdict.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from conceptcaps_pipeline.errors import ConceptCapsError

logger = logging.getLogger(__name__)

OUTPUTS = ("log_softmax", "logit")
POOLINGS = ("mean", "flatten")
MIN_CAVS = 10
CHUNK_FLOATS = 8_000_000  # activations gathered per batch of CAV fits (64 MB of float64)


@dataclass
class TcavSettings:
    """The statistical design; `conceptcaps tcav` flags of the same names set them."""

    n: int = field(default=50, metadata={"help": "Clips per concept subset and per random set (the paper: 50)."})
    n_cavs: int = field(default=30, metadata={"help": f"CAVs per concept, each on fresh sets (at least {MIN_CAVS})."})
    n_random: int = field(default=0, metadata={"help": "Random concepts each concept is ranked among, each with "
                                                       "--n_cavs CAVs; 0 (default): enough that a concept beyond all "
                                                       "of them passes the correction alone (2 x tests / alpha)."})
    test: str = field(default="empirical", metadata={"help": "empirical (rank among random concepts; exact), pooled "
                                                             "(prediction-interval t-test), or the TCAV paper's ttest "
                                                             "/ mannwhitney of CAV scores (anti-conservative)."})
    correction: str = field(default="fdr_bh", metadata={"help": "Over the family of tests: fdr_bh (Benjamini-"
                                                                "Hochberg false discovery rate), holm, bonferroni or "
                                                                "none."})
    alpha: float = field(default=0.05, metadata={"help": "Level after correction (false discovery rate for fdr_bh)."})
    primary: list[str] = field(default_factory=list, metadata={"help": "Declared tests 'CONCEPT:TARGET' or "
                                                                       "'CONCEPT:TARGET:LAYER': the family corrected "
                                                                       "at --alpha; the rest are exploratory."})
    min_cav_accuracy: float = field(default=0.7, metadata={"help": "A concept is separable at a layer when its CAVs' "
                                                                   "mean held-out accuracy reaches this and beats the 95th "
                                                                   "percentile of its random concepts. (0: no gate)."})
    output: str = field(default="log_softmax", metadata={"help": "What the score differentiates: log_softmax (the "
                                                                 "class log-probability) or logit."})
    pooling: str = field(default="mean", metadata={"help": "mean (over the layer's time axis) or flatten (every unit)."})
    pool_dims: list[int] = field(default_factory=list, metadata={"help": "Axes to average, overriding the detection "
                                                                        "(e.g. 1 for (batch, time, features), 2 for "
                                                                        "(batch, channels, time))."})
    max_duration: float | None = field(default=None, metadata={"help": "Seconds of each clip the model hears (cut "
                                                                       "or zero-padded); default: the longest clip."})
    batch_size: int = field(default=8, metadata={"help": "Clips per forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed of every set draw and CAV split."})


def check_settings(s: TcavSettings) -> None:
    """Every setting checked before anything loads: one clear error each."""
    from conceptcaps_pipeline.tcav.stats import CORRECTIONS, TESTS

    checks = [
        (s.n >= 2, f"--n {s.n}: a concept subset needs at least 2 clips."),
        (s.n_cavs >= MIN_CAVS, f"--n_cavs {s.n_cavs}: use at least {MIN_CAVS} CAVs per concept; one CAV says little."),
        (s.n_random == 0 or s.n_random >= MIN_CAVS, (f"--n_random {s.n_random}: use at least {MIN_CAVS} random "
                                                     f"concepts (or 0: enough for the correction); fewer make the "
                                                     f"test against them meaningless.")),
        (0 < s.alpha < 1, f"--alpha {s.alpha}: give a level between 0 and 1, e.g. 0.05."),
        (0 <= s.min_cav_accuracy <= 1, f"--min_cav_accuracy {s.min_cav_accuracy}: give an accuracy in [0, 1]."),
        (s.correction in CORRECTIONS, f"--correction {s.correction!r}: use one of {', '.join(CORRECTIONS)}."),
        (s.test in TESTS, f"--test {s.test!r}: use one of {', '.join(TESTS)}."),
        (s.output in OUTPUTS, f"--output {s.output!r}: use one of {', '.join(OUTPUTS)}."),
        (s.pooling in POOLINGS, f"--pooling {s.pooling!r}: use one of {', '.join(POOLINGS)}."),
        (s.max_duration is None or s.max_duration > 0,
         f"--max_duration {s.max_duration}: give a positive number of seconds."),
        (s.batch_size >= 1, f"--batch_size {s.batch_size}: give at least 1."),
    ]
    for ok, message in checks:
        if not ok:
            raise ConceptCapsError(message)


def check_concepts(masks: dict, n: int, where: str = "", exclude: dict | None = None) -> None:
    """Each concept needs n positives and n rows without it (nor in `exclude[concept]`, its labelled rows when
    positives are drawn by evidence): checked before any forward pass."""
    for concept, mask in masks.items():
        positives = int(mask.sum())
        if exclude is not None and concept in exclude:
            mask = mask | exclude[concept]  # only the count of rows free for random sets reads it below
        if positives < n:
            raise ConceptCapsError(
                f"--concepts {concept!r}{where} has only {positives} positive row(s), fewer than n={n}: lower --n, "
                f"use a split or release with more positives, or sample more sets that hold it (`conceptcaps vae "
                f"sample --min_per_tag {n}`).")
        if len(mask) - int(mask.sum()) < n:
            raise ConceptCapsError(f"--concepts {concept!r}{where}: only {len(mask) - int(mask.sum())} row(s) lack it, "
                                   f"fewer than n={n} for a random set: lower --n.")


def family_of(settings: TcavSettings, concepts: list[str], targets: list[str], layers: list[str]) -> set:
    """The (concept, target, layer) tests corrected at --alpha: the --primary ones, or all of them."""
    every = {(c, t, l) for c in concepts for t in targets for l in layers}
    if not settings.primary:
        return every
    chosen = set()
    for entry in settings.primary:
        parts = entry.split(":")
        if len(parts) not in (2, 3) or parts[0] not in concepts or parts[1] not in targets or (
                len(parts) == 3 and parts[2] not in layers):
            raise ConceptCapsError(f"--primary {entry!r}: give CONCEPT:TARGET or CONCEPT:TARGET:LAYER with a concept "
                                   f"of --concepts, a target of --targets and a layer of --layers.")
        chosen |= {(parts[0], parts[1], layer) for layer in (parts[2:] or layers)}
    return chosen


def random_count(settings: TcavSettings, family_size: int) -> int:
    from conceptcaps_pipeline.tcav.stats import auto_random

    if settings.n_random:
        return settings.n_random
    return auto_random(family_size, settings.alpha) if settings.test == "empirical" else 20


# -- sets and CAVs -----------------------------------------------------------------------------
def _outside(rng: np.random.Generator, excluded: np.ndarray, n: int) -> np.ndarray:
    """n distinct rows where `excluded` is false, uniformly (rejection from all rows while that is cheap)."""
    free = len(excluded) - int(excluded.sum())
    if free < 4 * n or free < len(excluded) / 4:
        return rng.choice(np.flatnonzero(~excluded), size=n, replace=False)
    picked = np.zeros(0, dtype=np.int64)
    while len(picked) < n:
        candidates = rng.integers(0, len(excluded), size=2 * n)
        picked = np.concatenate([picked, candidates[~excluded[candidates]]])
        _, first = np.unique(picked, return_index=True)
        picked = picked[np.sort(first)]
    return picked[:n]


def draw_concept(mask: np.ndarray, n: int, n_cavs: int, n_random: int, rng: np.random.Generator,
                 exclude: np.ndarray | None = None):
    """(positives, randoms) row indices, each (1 + n_random, n_cavs, n): row 0 the concept, then random concepts.

    A random concept is a random pool of as many rows as the concept has positives (any rows); its
    CAVs are drawn from it exactly as the concept's are drawn from its positives. `exclude`: rows the
    concept's random sets never hold besides its positives (the labelled rows left out by --min_evidence:
    a clip labelled piano is no negative of piano, whatever CLAP heard).
    """
    count = int(mask.sum())
    positives = np.zeros((1 + n_random, n_cavs, n), dtype=np.int64)
    randoms = np.zeros_like(positives)
    for j in range(1 + n_random):
        pool = mask if j == 0 else np.zeros(len(mask), dtype=bool)
        if j:
            pool[rng.choice(len(mask), size=count, replace=False)] = True
        members = np.flatnonzero(pool)
        avoid = pool | exclude if j == 0 and exclude is not None else pool
        for k in range(n_cavs):
            positives[j, k] = rng.choice(members, size=n, replace=False)
            randoms[j, k] = _outside(rng, avoid, n)
    return positives, randoms


def fit_cavs(features: np.ndarray, positives: np.ndarray, randoms: np.ndarray, regularization: float = 1.0):
    """Ridge CAVs of many (positives, randoms) pairs at once: (directions towards the positives, held-out accuracy).

    `positives`/`randoms`: (C, n) row indices into `features` (rows, units), drawn in random order,
    so the first third of each is a random held-out set (stratified: the same count of each). The
    fit is the closed-form ridge regression of +1/-1 labels on centred activations under one scale
    per CAV (layers differ in scale by orders of magnitude; a per-unit scale would blow up units
    that barely vary), in whichever of the primal or dual form is smaller.
    """
    count, n = positives.shape
    test = max(1, round(n / 3))
    features = np.asarray(features, dtype=np.float32)
    units = features.shape[1]
    directions = np.zeros((count, units), dtype=np.float32)
    accuracy = np.zeros(count)
    train_y = np.concatenate([np.ones(n - test), -np.ones(n - test)])
    test_y = np.concatenate([np.ones(test), -np.ones(test)])
    step = max(1, CHUNK_FLOATS // (2 * n * units))
    for start in range(0, count, step):
        p, r = positives[start:start + step], randoms[start:start + step]
        # float32: the ridge term keeps every system well conditioned, and half the bytes move (the gather
        # of activations, not the arithmetic, is what a fit costs at hundreds of units).
        x = features[np.concatenate([p[:, test:], r[:, test:]], axis=1)]  # (c, m, units)
        held = features[np.concatenate([p[:, :test], r[:, :test]], axis=1)]
        scale = x.reshape(len(x), -1).std(axis=1)[:, None, None] + 1e-12
        mean = x.mean(axis=1, keepdims=True)
        x -= mean
        x /= scale
        m = x.shape[1]
        if m < units:
            gram = x @ x.transpose(0, 2, 1) + regularization * np.eye(m, dtype=x.dtype)
            dual = np.linalg.solve(gram, np.broadcast_to(train_y.astype(x.dtype), (len(x), m))[..., None])
            w = (x.transpose(0, 2, 1) @ dual)[..., 0]
        else:
            gram = x.transpose(0, 2, 1) @ x + regularization * np.eye(units, dtype=x.dtype)
            w = np.linalg.solve(gram, (x.transpose(0, 2, 1) @ train_y.astype(x.dtype)[:, None]))[..., 0]
        held -= mean
        decision = np.einsum("cmu,cu->cm", held, w / scale[:, 0, :])
        accuracy[start:start + step] = (np.where(decision > 0, 1.0, -1.0) == test_y).mean(axis=1)
        directions[start:start + step] = w / scale[:, 0, :]  # in the raw activation space, where gradients live
    return directions, accuracy


def sign_scores(gradients: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """TCAV scores (captum's sign count): the share of inputs whose score rises along each direction."""
    return (gradients.astype(np.float32) @ directions.T > 0).mean(axis=0)


# -- statistics ----------------------------------------------------------------------------------
def verdicts(rows: list[dict], settings: TcavSettings, family: set, needed: int) -> None:
    """Correction per family (declared or all; the rest exploratory), thresholds, reachable p and verdicts."""
    from conceptcaps_pipeline.tcav.stats import adjust, pass_threshold

    groups = {"primary": [r for r in rows if (r["concept"], r["target"], r["layer"]) in family]}
    groups["exploratory"] = [r for r in rows if (r["concept"], r["target"], r["layer"]) not in family]
    for name, members in groups.items():
        p = [r["p_value"] for r in members]
        for i, (row, adjusted) in enumerate(zip(members, adjust(p, settings.correction))):
            row["family"] = name
            row["p_adjusted"] = adjusted
            row["p_threshold"] = pass_threshold(p, i, settings.correction, settings.alpha)
            best = list(p)
            best[i] = row["p_min"]
            reachable = adjust(best, settings.correction)[i] < settings.alpha
            row["significant"] = bool(row["separable"] and adjusted < settings.alpha)
            if not row["separable"]:
                row["verdict"] = "not separable"
            elif row["significant"]:
                row["verdict"] = "uses it (above random)" if row["mean_difference"] > 0 else "uses it (below random)"
            elif not reachable:
                row["verdict"] = (f"underpowered (smallest reachable p {row['p_min']:.3g} > threshold "
                                  f"{row['p_threshold']:.3g}; rerun with --n_random {needed}"
                                  f"{' or fewer --primary tests' if settings.primary else ' or --primary'})")
            else:
                row["verdict"] = "no evidence"
            if name == "exploratory":
                row["verdict"] = f"exploratory: {row['verdict']}"


def summarize(own: dict, null: dict, accuracy: dict, concepts, targets, layers, settings: TcavSettings,
              n_random: int, categories: dict, family: set, needed: int) -> list[dict]:
    """One row per (concept, target, layer) from the CAV scores of the concept and its random concepts."""
    from conceptcaps_pipeline.tcav.stats import compare, smallest_p

    rows = []
    for layer in layers:
        for concept in concepts:
            cav_accuracy, random_accuracy = accuracy[(concept, layer)]
            random_accuracy_means = random_accuracy.mean(axis=1)
            gate = float(np.quantile(random_accuracy_means, 0.95))
            separable = settings.min_cav_accuracy == 0 or bool(
                cav_accuracy.mean() >= settings.min_cav_accuracy and cav_accuracy.mean() > gate)
            for target in targets:
                scores, random_scores = own[(concept, target, layer)], null[(concept, target, layer)]
                null_means = random_scores.mean(axis=1)
                result = compare(scores.tolist(), random_scores.tolist(), settings.test)
                rows.append({
                    "concept": concept, "category": categories.get(concept), "target": target, "layer": layer,
                    "tcav_score": float(scores.mean()), "tcav_score_std": float(scores.std(ddof=1)),
                    "random_score": float(null_means.mean()), "random_score_std": float(null_means.std(ddof=1)),
                    "random_band": [float(q) for q in np.quantile(null_means, [0.025, 0.975])],
                    "cav_accuracy": float(cav_accuracy.mean()), "cav_accuracy_std": float(cav_accuracy.std(ddof=1)),
                    "random_cav_accuracy": float(random_accuracy_means.mean()), "cav_accuracy_gate": gate,
                    "separable": separable, "p_value": result.p_value, "effect_size": result.effect_size,
                    "mean_difference": result.mean_difference,
                    "p_min": smallest_p(settings.test, n_random, settings.n_cavs),
                    "scores": scores.tolist(), "random_concept_means": null_means.tolist(),
                    "cav_accuracies": cav_accuracy.tolist(),
                })
    verdicts(rows, settings, family, needed)
    return rows


# -- the engine ----------------------------------------------------------------------------------
def run_classifier(classifier, layers: list[str], masks: dict, pool, inputs: dict, targets: dict,
                   settings: TcavSettings, *, cache_dir=None, device=None, seconds: float | None = None,
                   categories: dict | None = None, exclude: dict | None = None) -> dict:
    """The engine behind `run` and `conceptcaps tcav`; returns the scores document (no files written).

    `pool` and each `inputs[target][0]` are clip sources (`model.ArrayClips`, `model.DatasetClips`);
    `inputs[target]` = (source, row indices); `targets` = {target: class index}; `masks` = {concept:
    boolean mask over `pool`}: the rows its positives are drawn from; `exclude` = {concept: boolean
    mask}: further rows its random sets never hold (its labelled rows, when `masks` keeps only those
    with evidence); `seconds` the clip length when --max_duration is unset.
    """
    import torch
    from conceptcaps_pipeline.run_dir import stable_hash
    from conceptcaps_pipeline.tcav.model import (
        ActivationCache,
        Probes,
        activations,
        check_layers,
        gradients,
        model_key,
        output_module,
    )
    from conceptcaps_pipeline.tcav.stats import auto_random

    started = time.time()
    s = settings
    device = device or torch.device("cpu")
    concepts, target_names = list(masks), list(targets)
    # 1. Everything that needs no forward pass.
    check_settings(s)
    check_layers(classifier.module, [classifier.layer_prefix + layer for layer in layers], classifier.name)
    check_concepts(masks, s.n, exclude=exclude)
    for target, (_source, rows) in inputs.items():
        if not len(rows):
            raise ConceptCapsError(f"no input clips for target {target!r}: give at least one.")
    family = family_of(s, concepts, target_names, layers)
    n_random = random_count(s, len(family))
    needed = auto_random(len(family), s.alpha)
    planned = (n_random + 1) * s.n_cavs * len(concepts) * len(layers)
    # Why say it: K grows with the tests, so the CAVs grow with concepts x layers x tests.
    (logger.warning if planned > 2_000_000 else logger.info)(
        "tcav: %d tests in the family, %d random concepts per concept: %d CAVs to fit (about 1 ms each at 768 "
        "units)%s", len(family), n_random, planned, "; --primary keeps the family to the tests that matter"
        if planned > 2_000_000 else "")
    seconds = s.max_duration or seconds
    if not seconds:
        raise ConceptCapsError("--max_duration: the clips' length is unknown; give it in seconds.")
    rate = classifier.sampling_rate
    length = round(seconds * rate)

    # 2. The model: probes, the time axis, activations of every pool clip, gradients of the inputs.
    scorer = output_module(classifier, s.output).to(device).eval()
    probes = Probes(classifier.module, [classifier.layer_prefix + layer for layer in layers])
    try:
        dims = probes.detect_pool_dims(scorer, lambda c: _to(classifier.preprocess(c), device), rate, seconds,
                                       s.pooling, s.pool_dims, transformers_layout=bool(classifier.layer_prefix))
        cache = ActivationCache(cache_dir, model_key(classifier, seconds, dims))
        forward = {"rate": rate, "length": length, "batch_size": s.batch_size}
        preprocess = classifier.preprocess
        acts, _, forwarded, padded = activations(scorer, probes, preprocess, pool, range(len(pool)), cache=cache,
                                                 device=device, **forward)
        if padded > 0.5:
            logger.warning("tcav: %.0f%% of the clips are more than half zero padding at --max_duration %.1f s: "
                           "the activations are mostly silence; lower --max_duration to the clips' length",
                           100 * padded, seconds)
        grads = {t: gradients(scorer, probes, preprocess, source, rows, targets[t], device=device, **forward)
                 for t, (source, rows) in inputs.items()}
    finally:
        probes.remove()
    acts = {layer: acts[classifier.layer_prefix + layer] for layer in layers}
    grads = {t: {layer: g[classifier.layer_prefix + layer] for layer in layers} for t, g in grads.items()}
    forward_s = time.time() - started

    # 3. CAVs of each concept and its random concepts, scored on every target at once.
    own, null, accuracy = {}, {}, {}
    fits = 0
    for concept, mask in masks.items():
        rng = np.random.default_rng(stable_hash(f"{s.seed}|concept|{concept}") % 2**32)
        positives, randoms = draw_concept(np.asarray(mask, dtype=bool), s.n, s.n_cavs, n_random, rng,
                                          None if exclude is None or concept not in exclude else
                                          np.asarray(exclude[concept], dtype=bool))
        shape = positives.shape[:2]
        for layer in layers:
            directions, acc = fit_cavs(acts[layer], positives.reshape(-1, s.n), randoms.reshape(-1, s.n))
            fits += len(directions)
            acc = acc.reshape(shape)
            accuracy[(concept, layer)] = (acc[0], acc[1:])
            for target in target_names:
                score = sign_scores(grads[target][layer], directions).reshape(shape)
                own[(concept, target, layer)], null[(concept, target, layer)] = score[0], score[1:]
    cav_s = time.time() - started - forward_s

    # 4. Tests, correction, verdicts.
    results = summarize(own, null, accuracy, concepts, target_names, layers, s, n_random, categories or {}, family,
                        needed)
    shared = {f"{a} & {b}": len(set(inputs[a][1]) & set(inputs[b][1])) for i, a in enumerate(target_names)
              for b in target_names[i + 1:] if inputs[a][0] is inputs[b][0]}
    return {
        "settings": {**asdict(s), "n_random": n_random, "layers": list(layers), "concepts": concepts,
                     "targets": target_names, "model": classifier.name, "max_duration": seconds,
                     "pool_dims": {layer: list(dims[classifier.layer_prefix + layer]) for layer in layers}},
        "family": {"tests": len(family), "correction": s.correction, "alpha": s.alpha,
                   "primary": sorted(":".join(t) for t in family) if s.primary else "all"},
        "clips": {"pool": len(pool), "forwarded_now": forwarded, "mostly_padding": padded},
        "shared_inputs": {pair: count for pair, count in shared.items() if count},
        "cavs": fits,
        "cost_s": {"forward": round(forward_s, 2), "cavs_and_scores": round(cav_s, 2),
                   "per_cav_ms": round(1000 * cav_s / max(fits, 1), 3)},
        "tests": len(results),
        "significant": sum(r["significant"] for r in results),
        "results": results,
    }


def _to(x, device):
    return x.to(device) if hasattr(x, "to") else x


def run(model, layers: list[str], concept_sets: dict, inputs: dict, *, pool, preprocess=None,
        sampling_rate: int = 16_000, targets: dict | None = None, settings: TcavSettings | None = None,
        cache_dir=None, device=None, labelled: dict | None = None) -> dict:
    """TCAV of `concept_sets` for the `inputs`' targets at `layers` of any torch model (see the module docstring).

    concept_sets: {concept: boolean mask over `pool`, or row indices into it}.
    inputs: {target: clips (a sequence of mono arrays, or a datasets split with `audio`)} where a target
        is a class index or a name of `targets` / the model's id2label.
    pool: the clips concept and random sets are drawn from (mono arrays at `sampling_rate`, or a
        datasets split with an `audio` column).
    preprocess: list of clips -> the model's input (default: a (batch, samples) waveform tensor).
    labelled: {concept: mask or row indices} of every row labelled with it, when `concept_sets` keeps
        only some (positives by evidence, `release.concepts.select_by_evidence`): the concept's random
        sets never hold them (as `tcav --min_evidence`).
    Returns the document `conceptcaps tcav` writes to scores.json; `tcav.report.write_report`
    draws it.
    """
    import torch
    from conceptcaps_pipeline.tcav.model import ArrayClips, Classifier, DatasetClips, _labels_of, default_preprocess

    settings = settings or TcavSettings()
    check_settings(settings)
    if not isinstance(model, torch.nn.Module):
        raise ConceptCapsError(f"model is {type(model).__name__}: give a torch.nn.Module.")
    classifier = Classifier(model, preprocess or default_preprocess, int(sampling_rate), _labels_of(model),
                            type(model).__name__, type(model).__qualname__)
    source = DatasetClips(pool) if hasattr(pool, "column_names") else ArrayClips(pool)
    def as_masks(sets: dict, name: str) -> dict:
        masks = {}
        for concept, members in sets.items():
            members = np.asarray(members)
            mask = members.astype(bool) if members.dtype == bool else np.isin(np.arange(len(source)), members)
            if len(mask) != len(source):
                raise ConceptCapsError(f"{name}[{concept!r}] has {len(mask)} entries for a pool of {len(source)} "
                                       f"clips: give a mask as long as the pool, or row indices.")
            masks[concept] = mask
        return masks

    masks = as_masks(concept_sets, "concept_sets")
    exclude = None if labelled is None else as_masks(labelled, "labelled")
    label2id = {name: i for i, name in classifier.id2label.items()}
    classes = {}
    for target in inputs:
        if isinstance(target, int) or str(target).isdigit():
            classes[str(target)] = int(target)
        elif targets and target in targets:
            classes[str(target)] = int(targets[target])
        elif target in label2id:
            classes[str(target)] = label2id[target]
        else:
            raise ConceptCapsError(f"inputs target {target!r} is neither a class index nor a name in targets= or the "
                                   f"model's id2label.")
    feeds = {str(t): (DatasetClips(clips) if hasattr(clips, "column_names") else ArrayClips(list(clips)),
                      list(range(len(clips)))) for t, clips in inputs.items()}
    seconds = settings.max_duration
    if seconds is None and isinstance(source, ArrayClips):
        seconds = max(len(np.asarray(c).reshape(-1)) for c in pool) / sampling_rate
    if seconds is None:
        durations = pool["duration_s"] if "duration_s" in pool.column_names else []
        seconds = float(max(durations)) if len(durations) else None
    return run_classifier(classifier, list(layers), masks, source, feeds, classes, settings, cache_dir=cache_dir,
                          device=device, seconds=seconds, exclude=exclude)
