"""Sample attribute sets from the trained beta-VAE.

    conceptcaps vae sample --run runs/demo --n 1000 --seed 0
    conceptcaps vae sample --run runs/demo --n 1000 --min_per_tag 20          # every tag in >= 20 sets
    conceptcaps vae sample --run runs/demo --n 300 --min_per_tag 50 --tags piano "acoustic guitar"
    conceptcaps vae sample --run runs/demo --n 200 --require jazz piano --exclude "male vocal"
    conceptcaps vae sample --run runs/demo --n 200 --set tempo=0.9 --set arousal=0.2   # fast and calm (--lsr VAE)

Reads RUN/vae/ and RUN/taxonomy.json; writes RUN/attributes.parquet (id, aspect_list, one
list per category, seed, source) and RUN/manifests/vae_sample.json. The decoding rule is in
`generation/vae_model.py` (every set: >= 3 categories, at most one tempo tag, no
contradictory pair, taxonomy tags only). With `--require`, z is drawn from the encoder's
posterior for the required tags and those tags are always kept; `--exclude`d tags never
appear. With `--set ATTR=VALUE` (a VAE trained with `--lsr`, docs/latent.md), the latent
dimension of each named attribute is fixed at the value that the map in RUN/vae/lsr.json
gives for VALUE, in the attribute's own units (tempo 0 slow .. 1 fast, arousal and valence
0 .. 1, instrument count, vocal 0/1).

Concept quota (`--min_per_tag N`): after the `--n` prior samples (source `prior`), every
taxonomy tag (or each tag of `--tags`) that is in fewer than N sets is topped up with
conditional samples z ~ q(z | tag) that keep the tag (source `conditional:<tag>`), under
the same decoding rule. Tags are topped up from the rarest up, counting the tags that
earlier top-ups brought in, so every quota tag ends with at least N sets. The same seed and
model give the same file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConceptCapsError
from .run_dir import finished, require, write_manifest, write_parquet
from .taxonomy import CATEGORIES

logger = logging.getLogger(__name__)


@dataclass
class VaeSampleArguments:
    run: str = field(metadata={"help": "Run directory holding vae/ and taxonomy.json."})
    n: int = field(default=1000, metadata={"help": "Number of attribute sets to sample."})
    seed: int = field(default=0, metadata={"help": "Sampling seed; the same seed gives the same file."})
    require: list[str] = field(default_factory=list, metadata={"help": "Tags every set must contain."})
    exclude: list[str] = field(default_factory=list, metadata={"help": "Tags no set may contain."})
    threshold: float = field(default=0.5, metadata={"help": "Decoding threshold on tag probabilities."})
    min_categories: int = field(default=3, metadata={"help": "Each set covers at least this many categories."})
    temperature: float = field(default=1.0, metadata={"help": "Scale of the latent noise (1 = the prior)."})
    min_per_tag: int = field(
        default=0,
        metadata={"help": "Concept quota: top up with conditional samples q(z | tag) until every tag of --tags "
                          "(default: every taxonomy tag) is in at least this many sets; 0 = off."},
    )
    tags: list[str] = field(
        default_factory=list, metadata={"help": "Tags the --min_per_tag quota applies to (default: every taxonomy tag)."}
    )
    set: list[str] = field(
        default_factory=list,
        metadata={"action": "extend",
                  "help": "Steer latent attributes of a VAE trained with --lsr: ATTR=VALUE in the attribute's units, "
                          "e.g. --set tempo=0.9 --set arousal=0.2 (docs/latent.md)."},
    )
    id_prefix: str = field(default="cc", metadata={"help": "Ids are PREFIX-000000, PREFIX-000001, ..."})
    force: bool = field(default=False, metadata={"help": "Resample even if attributes.parquet is up to date."})


def check_request(taxonomy, args: VaeSampleArguments) -> None:
    """Unknown, contradictory or impossible --require/--exclude: one clear error each."""
    taxonomy.check_known(args.require, what="--require tag")
    taxonomy.check_known(args.exclude, what="--exclude tag")
    both = sorted(set(args.require) & set(args.exclude))
    if both:
        raise ConceptCapsError(f"{both} both required and excluded: drop them from --require or from --exclude.")
    clash = taxonomy.contradiction_in(set(args.require))
    if clash:
        raise ConceptCapsError(
            f"--require {clash[0]!r} and {clash[1]!r} contradict each other (taxonomy `contradictions`, "
            f"or two tempo tags): require only one of them."
        )
    if args.n <= 0:
        raise ConceptCapsError(f"--n {args.n}: ask for at least one sample.")
    if not 0 < args.threshold < 1:
        raise ConceptCapsError(f"--threshold {args.threshold}: give a probability in (0, 1).")
    if args.temperature <= 0:
        raise ConceptCapsError(f"--temperature {args.temperature}: give a positive scale of the latent noise.")
    if not 1 <= args.min_categories <= len(CATEGORIES):
        raise ConceptCapsError(f"--min_categories {args.min_categories}: give 1 to {len(CATEGORIES)}.")
    if args.min_per_tag < 0:
        raise ConceptCapsError(f"--min_per_tag {args.min_per_tag}: give 0 (no quota) or a positive number of sets.")
    taxonomy.check_known(args.tags, what="--tags tag")
    if args.tags and not args.min_per_tag:
        raise ConceptCapsError("--tags names the tags of the concept quota: give --min_per_tag N as well.")
    for tag in args.tags:
        if tag in args.exclude:
            raise ConceptCapsError(f"--tags {tag!r} is also excluded (--exclude): drop it from one of them.")
        clash = taxonomy.contradiction_in(set(args.require) | {tag})
        if clash:
            raise ConceptCapsError(
                f"--tags {tag!r} contradicts --require {clash[0] if clash[1] == tag else clash[1]!r}: no set can hold "
                f"both; drop it from --tags."
            )


def quota_tags(taxonomy, args: VaeSampleArguments) -> list[str]:
    """The tags the concept quota applies to: --tags, or every taxonomy tag that a set may hold."""
    if args.tags:
        return list(dict.fromkeys(args.tags))
    excluded = set(args.exclude)
    return [t for t in taxonomy.tags if t not in excluded and taxonomy.contradiction_in(set(args.require) | {t}) is None]


def top_up(model, taxonomy, sets: list[list[str]], args: VaeSampleArguments, rule: dict,
           fixed: dict[int, float] | None = None) -> list[tuple[str, list[str]]]:
    """Conditional samples that bring every quota tag to --min_per_tag sets: [(tag, set), ...] in drawing order.

    Rarest tag first (then taxonomy order); each tag's draws use a seed derived from --seed and
    the tag, so the result does not depend on which other tags needed a top-up.
    """
    from collections import Counter

    from tqdm.auto import tqdm

    from .run_dir import stable_hash
    from .vae_model import sample_sets

    counts = Counter(t for tags in sets for t in set(tags))
    position = taxonomy.index
    pending = set(quota_tags(taxonomy, args))
    added: list[tuple[str, list[str]]] = []
    bar = tqdm(total=len(pending), desc="vae sample quota", unit="tag")
    while pending:
        tag = min(pending, key=lambda t: (counts[t], position[t]))
        pending.discard(tag)
        bar.update(1)
        missing = args.min_per_tag - counts[tag]
        if missing <= 0:
            continue
        seed = stable_hash(f"{args.seed}|conditional|{tag}") & 0x7FFFFFFF
        drawn = sample_sets(model, taxonomy, missing, seed, require=[*args.require, tag], exclude=args.exclude,
                            temperature=args.temperature, fixed=fixed, **rule)
        for tags in drawn:
            counts.update(set(tags))
            added.append((tag, tags))
    bar.close()
    return added


def sample_attributes(args: VaeSampleArguments) -> dict:
    """Sample, validate every set against the rules, write attributes.parquet."""
    from .run_dir import stage_lock

    with stage_lock(args.run, "vae_sample"):
        return _sample(args)


def _sample(args: VaeSampleArguments) -> dict:
    import pyarrow as pa

    from .taxonomy import Taxonomy
    from .vae_model import BetaVAE, sample_sets

    started = time.time()
    run = Path(args.run)
    vae_dir = require(run, "vae")
    taxonomy_path = require(run, "taxonomy.json")
    inputs = {"vae": vae_dir / "model.safetensors", "taxonomy": taxonomy_path}
    if args.set:
        inputs["lsr"] = vae_dir / "lsr.json"
    out = run / "attributes.parquet"
    done = finished(run, "vae_sample", args, inputs, [out])
    if done and not args.force:
        logger.info("vae sample: %s is up to date; --force resamples", out)
        return done

    taxonomy = Taxonomy.load(taxonomy_path)
    check_request(taxonomy, args)
    fixed = None
    if args.set:  # pinned regularised latent dimensions (generation/vae_lsr.py)
        from .vae_lsr import steering

        fixed = steering(run, args.set)
    try:
        model = BetaVAE.from_pretrained(str(vae_dir))
    except Exception as err:
        raise ConceptCapsError(f"cannot load the VAE from {vae_dir} ({err}); re-run `conceptcaps vae train --run {run} --force`.") from err
    if list(model.tags) != taxonomy.tags:
        raise ConceptCapsError(f"{vae_dir} was trained on another taxonomy than {taxonomy_path}: retrain with --force.")

    rule = {"threshold": args.threshold, "min_categories": args.min_categories}
    sets = sample_sets(model, taxonomy, args.n, args.seed, require=args.require, exclude=args.exclude,
                       temperature=args.temperature, fixed=fixed, **rule)
    sources = ["prior"] * len(sets)
    if args.min_per_tag:
        for tag, tags in top_up(model, taxonomy, sets, args, rule, fixed):
            sets.append(tags)
            sources.append(f"conditional:{tag}")
    rows = []
    for i, (tags, source) in enumerate(zip(sets, sources)):
        by_category = taxonomy.split_by_category(tags)
        covered = sum(1 for c in CATEGORIES if by_category[c])
        if covered < args.min_categories:
            raise ConceptCapsError(
                f"sample {i} covers only {covered} categories ({tags}): the --exclude list leaves too few tags; "
                f"exclude fewer tags or lower --min_categories."
            )
        rows.append({"id": f"{args.id_prefix}-{i:06d}", "aspect_list": tags, **by_category, "seed": args.seed,
                     "source": source})
    string_list = pa.list_(pa.string())
    schema = pa.schema([("id", pa.string()), ("aspect_list", string_list), *[(c, string_list) for c in CATEGORIES],
                        ("seed", pa.int64()), ("source", pa.string())])
    write_parquet(pa.Table.from_pylist(rows, schema=schema), out)
    counts = sample_counts(rows, quota_tags(taxonomy, args) if args.min_per_tag else [])
    logger.info("vae sample: wrote %d sets (%d prior, %d conditional; %d unique) to %s", counts["n"], counts["prior"],
                counts["conditional"], counts["unique_sets"], out)
    return write_manifest(run, "vae_sample", args, inputs=inputs, counts=counts, started=started)


def sample_counts(rows: list[dict], quota: list[str]) -> dict:
    """Manifest counts: sizes, sources, and the per-tag counts of the quota tags."""
    from collections import Counter

    per_tag = Counter(t for r in rows for t in set(r["aspect_list"]))
    conditional = Counter(r["source"].split(":", 1)[1] for r in rows if r["source"] != "prior")
    counts = {
        "n": len(rows),
        "prior": sum(r["source"] == "prior" for r in rows),
        "conditional": sum(conditional.values()),
        "unique_sets": len({frozenset(r["aspect_list"]) for r in rows}),
        "mean_tags": sum(len(r["aspect_list"]) for r in rows) / len(rows),
        "tags_present": len(per_tag),
    }
    if quota:
        counts.update(quota_tags=len(quota), quota_min_sets=min(per_tag[t] for t in quota),
                      conditional_per_tag=dict(sorted(conditional.items())))
    return counts
