"""Explain the VAE's latent dimensions by traversal: which tags each one brings in or drops.

    conceptcaps vae explain --run runs/demo
    conceptcaps vae explain --run runs/demo --top_kl 16 --anchors 96 --seeds 5
    conceptcaps vae explain --run runs/demo --dims 0 3 17

Reads RUN/vae/ (and RUN/vae/lsr.json when the VAE was trained with --lsr), RUN/taxonomy.json
and RUN/distilled.parquet; writes RUN/vae/explain.json, RUN/vae/explain.md and
RUN/manifests/vae_explain.json. The explanation is symbolic and needs no other model.

Which dimensions: the regularised ones (their attribute named) and the `--top_kl` dimensions
with the largest mean KL(q(z_d | x) || N(0, 1)) over the training split (the ones the model
uses), or exactly `--dims`.

How, per dimension d and per seed (`--seeds` seeds from `--seed`): `--anchors` training rows
are drawn, encoded to their posterior means, and z_d of each is set to `--steps` values
evenly spread over the traversal range (the wider of [-span, span] and the 2nd..98th
percentile of z_d over the training split); every point is decoded with the threshold rule
of generation/vae/model.py (as reconstruction: deterministic, a tag is in when its
probability reaches --threshold), so a tag appears or vanishes because of z_d alone. For each tag and anchor, the change is the tag's share of the upper half of
the traversal minus its share of the lower half (in [-1, 1]); the tag's effect is the
mean change over anchors, then over seeds. Tags with effect >= `--min_effect` "raise",
<= -`--min_effect` "lower". Monotonicity: the share of anchors whose tag sequence, when it
changes at all, changes in one direction only.

Certainty (0..1): per listed tag, the share of seeds that find the same direction (with at
least half the effect) times the share of the anchors' change that points that way (1 when
no anchor moves against it); the dimension's certainty is the effect-weighted mean over its
listed tags. A dimension that moves no tag is "changes no tag", certain in the share of
seeds that agree. Below `--min_certainty` the explanation is withheld ("uncertain") and the
evidence is kept in explain.json. The same seed, model and data give the same files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import finished, require, stage, write_manifest

logger = logging.getLogger(__name__)


@dataclass
class VaeExplainArguments:
    run: str = field(metadata={"help": "Run directory holding vae/, taxonomy.json and distilled.parquet."})
    dims: list[int] = field(
        default_factory=list, metadata={"help": "Explain exactly these latent dimensions (default: the regularised "
                                                "ones and the --top_kl dimensions)."})
    top_kl: int = field(default=8, metadata={"help": "Also explain this many dimensions of largest mean KL."})
    anchors: int = field(default=48, metadata={"help": "Training rows (posterior means) traversed per seed."})
    seeds: int = field(default=3, metadata={"help": "Independent draws of anchors; certainty needs their agreement."})
    seed: int = field(default=0, metadata={"help": "First seed; the seeds are seed, seed+1, ..."})
    steps: int = field(default=9, metadata={"help": "Points along each traversal."})
    span: float = field(default=2.5, metadata={"help": "Traverse at least [-span, span] (the prior's bulk)."})
    min_effect: float = field(default=0.1, metadata={"help": "A tag raises/lowers when |effect| reaches this."})
    max_tags: int = field(default=5, metadata={"help": "Tags named per side of an explanation."})
    min_certainty: float = field(default=0.7, metadata={"help": "Below this certainty the explanation is withheld."})
    threshold: float = field(default=0.5, metadata={"help": "Decoding threshold on tag probabilities."})
    min_categories: int = field(default=3, metadata={"help": "Decoded sets cover at least this many categories."})
    force: bool = field(default=False, metadata={"help": "Explain again even if explain.json is up to date."})


def check_arguments(args: VaeExplainArguments) -> None:
    checks = [
        (args.top_kl >= 0, f"--top_kl {args.top_kl}: give 0 or more."),
        (args.anchors >= 2, f"--anchors {args.anchors}: give at least 2."),
        (args.seeds >= 1, f"--seeds {args.seeds}: give at least 1."),
        (args.steps >= 3, f"--steps {args.steps}: give at least 3 (a traversal needs a middle)."),
        (args.span > 0, f"--span {args.span}: give a positive latent distance."),
        (0 < args.min_effect <= 1, f"--min_effect {args.min_effect}: give a share in (0, 1]."),
        (args.max_tags >= 1, f"--max_tags {args.max_tags}: give at least 1."),
        (0 <= args.min_certainty <= 1, f"--min_certainty {args.min_certainty}: give a value in [0, 1]."),
        (0 < args.threshold < 1, f"--threshold {args.threshold}: give a probability in (0, 1)."),
        (1 <= args.min_categories <= 4, f"--min_categories {args.min_categories}: give 1 to 4."),
    ]
    for ok, message in checks:
        if not ok:
            raise ConceptCapsError(message)


@stage("vae_explain", check=check_arguments)
def explain_vae(args: VaeExplainArguments) -> dict:
    """Explain, write RUN/vae/explain.json|md; returns the stage manifest."""
    from conceptcaps_pipeline.run_dir import read_table, write_json
    from conceptcaps_pipeline.vae.lsr import LSR_FILE, load_lsr, load_model, posterior_means
    from conceptcaps_pipeline.vae.model import kl_per_dimension

    started = time.time()
    run = Path(args.run)
    vae_dir = require(run, "vae")
    inputs = {"vae": vae_dir / "model.safetensors", "taxonomy": require(run, "taxonomy.json"),
              "distilled": require(run, "distilled.parquet")}
    if (vae_dir / LSR_FILE).exists():
        inputs["lsr"] = vae_dir / LSR_FILE
    out_json, out_md = vae_dir / "explain.json", vae_dir / "explain.md"
    done = finished(run, "vae_explain", args, inputs, [out_json, out_md])
    if done and not args.force:
        logger.info("vae explain: %s is up to date; --force explains again", out_json)
        return done

    model, taxonomy = load_model(run)
    record = load_lsr(run)
    regularised = {int(e["dim"]): name for name, e in (record or {"attributes": {}})["attributes"].items()}
    bad = [d for d in args.dims if not 0 <= d < model.latent_dim]
    if bad:
        raise ConceptCapsError(f"--dims {bad[0]}: the VAE has latent dimensions 0 to {model.latent_dim - 1}.")
    table = read_table(inputs["distilled"], ["aspect_list", "split"],
                       fix=f"re-run `conceptcaps distill --run {run} --force`").to_pylist()
    train = [list(r["aspect_list"]) for r in table if r["split"] == "train"] or [list(r["aspect_list"]) for r in table]
    if len(train) < args.anchors:
        raise ConceptCapsError(f"--anchors {args.anchors}: the training split has only {len(train)} rows; ask for fewer.")

    means = posterior_means(model, train)
    kl = kl_per_dimension(model, train)
    dims = list(dict.fromkeys(args.dims)) if args.dims else choose_dims(kl, regularised, args.top_kl)
    if not dims:
        raise ConceptCapsError("nothing to explain: the VAE has no regularised dimension and --top_kl is 0; give "
                               "--top_kl N or --dims D ...")
    explanations = [explain_dim(model, taxonomy, means, d, kl, regularised, record, args) for d in dims]
    result = {
        "dims": explanations,
        "settings": {k: getattr(args, k) for k in ("anchors", "seeds", "seed", "steps", "span", "min_effect",
                                                    "max_tags", "min_certainty", "threshold", "min_categories")},
        "latent_dim": model.latent_dim,
        "active_dims": int((kl > 0.01).sum()),
    }
    write_json(out_json, result)
    from conceptcaps_pipeline.run_dir import atomic_path

    with atomic_path(out_md) as tmp:
        tmp.write_text(render_markdown(result), encoding="utf-8")
    counts = {"dims": len(explanations), "explained": sum(e["explanation"] != "uncertain" for e in explanations),
              "uncertain": sum(e["explanation"] == "uncertain" for e in explanations),
              "regularised": len(regularised), "active_dims": result["active_dims"]}
    logger.info("vae explain: %d dimensions, %d uncertain; wrote %s", counts["dims"], counts["uncertain"], out_md)
    return write_manifest(run, "vae_explain", args, inputs=inputs, counts=counts, started=started)


def choose_dims(kl: np.ndarray, regularised: dict[int, str], top_kl: int) -> list[int]:
    """The regularised dimensions, then the top_kl others by mean KL (largest first)."""
    others = [int(d) for d in np.argsort(-kl, kind="stable") if int(d) not in regularised]
    return sorted(regularised) + others[:top_kl]


def explain_dim(model, taxonomy, means: np.ndarray, dim: int, kl: np.ndarray, regularised: dict[int, str],
                record: dict | None, args: VaeExplainArguments) -> dict:
    """Traverse one dimension around anchors for every seed; the tags it raises and lowers, and how surely."""
    import torch
    from conceptcaps_pipeline.vae.lsr import decode_latents, latent_to_attribute

    low = min(-args.span, float(np.percentile(means[:, dim], 2)))
    high = max(args.span, float(np.percentile(means[:, dim], 98)))
    grid = np.linspace(low, high, args.steps)
    tags = model.tags
    index = {t: i for i, t in enumerate(tags)}
    half = args.steps // 2
    per_seed_effect, per_seed_abs, per_seed_monotone, per_seed_changed = [], [], [], []
    for s in range(args.seeds):
        rng = np.random.default_rng(args.seed + s)
        anchors = means[rng.choice(len(means), size=args.anchors, replace=False)]
        z = torch.tensor(np.repeat(anchors, args.steps, axis=0), dtype=torch.float32)
        z[:, dim] = torch.tensor(np.tile(grid, args.anchors), dtype=torch.float32)
        sets = decode_latents(model, taxonomy, z, threshold=args.threshold, min_categories=args.min_categories)
        presence = np.zeros((args.anchors, args.steps, len(tags)))
        for row, tag_set in enumerate(sets):
            for tag in tag_set:
                presence[row // args.steps, row % args.steps, index[tag]] = 1.0
        # change per anchor and tag: share of the upper half minus share of the lower half
        change = presence[:, -half:].mean(1) - presence[:, :half].mean(1)
        steps = np.diff(presence, axis=1)
        changed = (steps != 0).any(1)
        monotone = ~((steps > 0).any(1) & (steps < 0).any(1))
        per_seed_effect.append(change.mean(0))
        per_seed_abs.append(np.abs(change).mean(0))
        per_seed_monotone.append((monotone & changed).sum(0))
        per_seed_changed.append(changed.sum(0))
    effect_s = np.array(per_seed_effect)  # [seeds, tags]
    effect = effect_s.mean(0)
    consistency = np.divide(np.abs(effect), np.array(per_seed_abs).mean(0), out=np.zeros_like(effect),
                            where=np.array(per_seed_abs).mean(0) > 0)
    monotonicity = np.divide(np.sum(per_seed_monotone, 0), np.sum(per_seed_changed, 0), out=np.ones_like(effect),
                             where=np.sum(per_seed_changed, 0) > 0)
    agreement = ((np.sign(effect_s) == np.sign(effect)) & (np.abs(effect_s) >= args.min_effect / 2)).mean(0)

    def listed(sign: int) -> list[dict]:
        chosen = [i for i in np.argsort(-sign * effect, kind="stable") if sign * effect[i] >= args.min_effect]
        return [{"tag": tags[i], "effect": round(float(effect[i]), 3),
                 "monotonicity": round(float(monotonicity[i]), 3),
                 "certainty": round(float(agreement[i] * consistency[i]), 3)} for i in chosen[:args.max_tags]]

    raises, lowers = listed(1), listed(-1)
    moved = raises + lowers
    if moved:
        weights = np.array([abs(t["effect"]) for t in moved])
        certainty = float(np.average([t["certainty"] for t in moved], weights=weights))
        parts = [f"{word}: {', '.join(t['tag'] for t in side)}" for word, side in (("raises", raises), ("lowers", lowers))
                 if side]
        text = "; ".join(parts)
    else:
        certainty = float((np.abs(effect_s).max(1) < args.min_effect).mean())
        text = "changes no tag"
    entry = {
        "dim": dim,
        "kind": f"regularised: {regularised[dim]}" if dim in regularised else "top KL",
        "kl": round(float(kl[dim]), 4),
        "range": [round(low, 3), round(high, 3)],
        "raises": raises,
        "lowers": lowers,
        "certainty": round(certainty, 3),
        "explanation": text if certainty >= args.min_certainty else "uncertain",
        "evidence": text,
        "effect_per_seed": {tags[i]: [round(float(e), 3) for e in effect_s[:, i]] for i in
                            sorted({index[t["tag"]] for t in moved})},
    }
    if dim in regularised and record is not None:
        name = regularised[dim]
        entry["attribute"] = {"name": name, "units": record["attributes"][name]["units"],
                              "at_range": [round(latent_to_attribute(record, name, v), 3) for v in (low, high)]}
    return entry


def render_markdown(result: dict) -> str:
    """explain.md: one line per dimension, then the settings."""
    lines = [
        "# What the VAE's latent dimensions do",
        "",
        (f"Traversal of {len(result['dims'])} of {result['latent_dim']} latent dimensions "
        f"({result['active_dims']} with mean KL > 0.01) around {result['settings']['anchors']} training rows "
        f"per seed, {result['settings']['seeds']} seeds (`conceptcaps vae explain`). \"raises\": tags that appear as "
        f"the dimension grows; \"lowers\": tags that vanish. Explanations below certainty "
        f"{result['settings']['min_certainty']} are withheld (\"uncertain\")."),
        "",
        "| dim | kind | KL | explanation | certainty |",
        "| ---: | --- | ---: | --- | ---: |",
    ]
    for entry in result["dims"]:
        kind = entry["kind"]
        if "attribute" in entry:
            at = entry["attribute"]["at_range"]
            kind += f" ({at[0]:g} to {at[1]:g})"
        lines.append(f"| {entry['dim']} | {kind} | {entry['kl']:.3f} | {entry['explanation']} | {entry['certainty']:.2f} |")
    lines += ["", "Settings: " + ", ".join(f"{k} {v}" for k, v in result["settings"].items()) + ".", ""]
    return "\n".join(lines)
