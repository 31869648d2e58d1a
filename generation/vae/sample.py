"""Sample attribute sets from the trained beta-VAE.

    conceptcaps vae sample --run runs/demo --n 1000 --seed 0
    conceptcaps vae sample --run runs/demo --n 1000 --min_per_tag 20          # every tag in >= 20 sets
    conceptcaps vae sample --run runs/demo --n 300 --min_per_tag 50 --tags piano "acoustic guitar"
    conceptcaps vae sample --run runs/demo --n 200 --require jazz piano --exclude "male vocal"
    conceptcaps vae sample --run runs/demo --n 200 --set tempo=0.9 --set arousal=0.2   # fast and calm (--lsr VAE)
    conceptcaps vae sample --run runs/demo --n 1000 --random_control   # baseline: RUN/attributes_random.parquet

Reads RUN/vae/ and RUN/taxonomy.json; writes RUN/attributes.parquet (id, aspect_list, one
list per category, seed, source) and RUN/manifests/vae_sample.json. The decoding rule is in
`generation/vae/model.py` (every set: >= 3 categories, at most one tempo tag, no
contradictory pair, taxonomy tags only). How many tags of each category a set holds is
drawn from the training sets (`--sizes data`, the default: RUN/vae/set_sizes.json written by
`vae train`; generation/vae/sizes.py says why), so sampled sets are as long as real ones;
`--sizes threshold` keeps every tag with probability >= --threshold instead (at most 2
genres, 3 moods, 4 instruments, 1 tempo: sets about half as long as the data's). With `--require`, z is drawn from the encoder's
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

Random control (`--random_control`): the baseline the VAE is compared with. No model: each
set takes per-category sizes drawn from the training sets (RUN/distilled.parquet) and tags
drawn uniformly at random under the same rules (--require, --exclude, the quota included).
It writes RUN/attributes_random.parquet (manifest `vae_sample_random`), so the real
attributes.parquet stays; `conceptcaps evaluate --baseline random_control` scores it
(docs/evaluate.md). `--output NAME.parquet` names another file under RUN.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import finished, require, stage, write_manifest
from conceptcaps_pipeline.taxonomy import CATEGORIES

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
    sizes: str = field(
        default="data",
        metadata={"help": "How many tags of each category a set gets: 'data' draws them from the training sets "
                          "(RUN/vae/set_sizes.json), 'threshold' keeps tags with probability >= --threshold."},
    )
    random_control: bool = field(
        default=False,
        metadata={"help": "Baseline without a model: uniformly random tags under the same rules, sizes from the data; "
                          "writes RUN/attributes_random.parquet unless --output names another file."},
    )
    output: str | None = field(
        default=None,
        metadata={"help": "File under RUN to write (default attributes.parquet; attributes_random.parquet with "
                          "--random_control)."},
    )
    id_prefix: str = field(default="cc", metadata={"help": "Ids are PREFIX-000000, PREFIX-000001, ..."})
    force: bool = field(default=False, metadata={"help": "Resample even if attributes.parquet is up to date."})


def output_name(args: VaeSampleArguments) -> str:
    """The file under RUN this sampling writes."""
    name = args.output or ("attributes_random.parquet" if args.random_control else "attributes.parquet")
    if Path(name).name != name or not name.endswith(".parquet") or name.startswith("."):
        raise ConceptCapsError(f"--output {name!r}: give a file name under the run directory ending in .parquet, "
                               f"e.g. attributes_random.parquet.")
    return name


def stage_name(output: str) -> str:
    """The manifest (and lock) name: vae_sample for attributes.parquet, vae_sample_<rest> for another file, so a
    baseline never replaces the real sets' manifest."""
    stem = Path(output).stem
    return "vae_sample" if output == "attributes.parquet" else "vae_sample_" + stem.removeprefix("attributes_")


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
    if args.sizes not in ("data", "threshold"):
        raise ConceptCapsError(f"--sizes {args.sizes!r}: choose data (sizes drawn from the training sets) or threshold.")
    if args.temperature <= 0:
        raise ConceptCapsError(f"--temperature {args.temperature}: give a positive scale of the latent noise.")
    if not 1 <= args.min_categories <= len(CATEGORIES):
        raise ConceptCapsError(f"--min_categories {args.min_categories}: give 1 to {len(CATEGORIES)}.")
    if args.min_per_tag < 0:
        raise ConceptCapsError(f"--min_per_tag {args.min_per_tag}: give 0 (no quota) or a positive number of sets.")
    taxonomy.check_known(args.tags, what="--tags tag")
    from conceptcaps_pipeline.run_dir import check_memory

    # Each set is a row of tag names and its probabilities until the file is written (about 1 KiB plus 8 bytes
    # per taxonomy tag); the quota can add --min_per_tag sets per tag. Checked before any set is drawn.
    most = args.n + args.min_per_tag * len(args.tags or taxonomy.tags)
    check_memory(most * (1024 + 8 * len(taxonomy.tags)), f"vae sample --n {args.n} --min_per_tag {args.min_per_tag} "
                 f"(up to {most:,} sets)", "ask for fewer sets, or sample in several runs")
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


def top_up(draw, taxonomy, sets: list[list[str]], args: VaeSampleArguments) -> list[tuple[str, list[str]]]:
    """Conditional samples that bring every quota tag to --min_per_tag sets: [(tag, set), ...] in drawing order.

    `draw(n, seed, require)` gives n sets holding the required tags (the VAE's q(z | tags), or
    the random control). Rarest tag first (then taxonomy order); each tag's draws use a seed
    derived from --seed and the tag, so the result does not depend on which other tags needed a top-up.
    """
    from collections import Counter

    from conceptcaps_pipeline.run_dir import stable_hash
    from tqdm.auto import tqdm

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
        for tags in draw(missing, seed, [*args.require, tag]):
            counts.update(set(tags))
            added.append((tag, tags))
    bar.close()
    return added


@stage("vae_sample", lock=lambda args: stage_name(output_name(args)))  # a baseline's file has its own lock
def sample_attributes(args: VaeSampleArguments) -> dict:
    """Sample, validate every set against the rules, write attributes.parquet."""
    from conceptcaps_pipeline.taxonomy import Taxonomy
    from conceptcaps_pipeline.vae.model import BetaVAE, sample_sets
    from conceptcaps_pipeline.vae.sizes import SetSizes, random_sets

    started = time.time()
    run = Path(args.run)
    output = output_name(args)
    stage = stage_name(output)
    taxonomy_path = require(run, "taxonomy.json")
    if args.random_control:  # no model: sizes from the training sets of distilled.parquet
        if args.set:
            raise ConceptCapsError("--set steers a VAE's latent dimensions; the random control has none: drop --set.")
        inputs = {"distilled": require(run, "distilled.parquet"), "taxonomy": taxonomy_path}
    else:
        vae_dir = require(run, "vae")
        inputs = {"vae": vae_dir / "model.safetensors", "taxonomy": taxonomy_path}
        if args.sizes == "data":
            inputs["set_sizes"] = vae_dir / "set_sizes.json"
    if args.set:
        inputs["lsr"] = vae_dir / "lsr.json"
    out = run / output
    done = finished(run, stage, args, inputs, [out])
    if done and not args.force:
        logger.info("vae sample: %s is up to date; --force resamples", out)
        return done

    taxonomy = Taxonomy.load(taxonomy_path)
    check_request(taxonomy, args)
    if args.random_control:
        from conceptcaps_pipeline.run_dir import read_table

        table = read_table(inputs["distilled"], ["aspect_list", "split"],
                           fix=f"re-run `conceptcaps distill --run {run} --force`")
        sizes = SetSizes.from_sets([list(r["aspect_list"]) for r in table.to_pylist() if r["split"] == "train"], taxonomy)

        def draw(n: int, seed: int, required: list[str]) -> list[list[str]]:
            return random_sets(taxonomy, n, seed, sizes, require=required, exclude=args.exclude,
                               min_categories=args.min_categories)

        return _write(args, run, out, stage, taxonomy, draw, inputs, started, "random")
    fixed = None
    if args.set:  # pinned regularised latent dimensions (generation/vae/lsr.py)
        from conceptcaps_pipeline.vae.lsr import steering

        fixed = steering(run, args.set)
    try:
        model = BetaVAE.from_pretrained(str(vae_dir))
    except Exception as err:
        raise ConceptCapsError(f"cannot load the VAE from {vae_dir} ({err}); re-run `conceptcaps vae train --run {run} --force`.") from err
    if list(model.tags) != taxonomy.tags:
        raise ConceptCapsError(f"{vae_dir} was trained on another taxonomy than {taxonomy_path}: retrain with --force.")

    rule = {"threshold": args.threshold, "min_categories": args.min_categories}
    sizes = SetSizes.load(vae_dir) if args.sizes == "data" else None

    def draw(n: int, seed: int, required: list[str]) -> list[list[str]]:
        return sample_sets(model, taxonomy, n, seed, require=required, exclude=args.exclude,
                           temperature=args.temperature, fixed=fixed, sizes=sizes, **rule)

    return _write(args, run, out, stage, taxonomy, draw, inputs, started, "prior")


# Rows go to the Parquet file this many at a time: memory holds one chunk of rows, not --n of them.
WRITE_CHUNK = 4096


def _write(args: VaeSampleArguments, run: Path, out: Path, stage: str, taxonomy, draw, inputs: dict, started: float,
           source: str) -> dict:
    """Draw --n sets (and the quota's top-ups), check each against the rules, write the file and the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.run_dir import atomic_path

    sets = draw(args.n, args.seed, list(args.require))
    sources = [source] * len(sets)
    if args.min_per_tag:
        for tag, tags in top_up(draw, taxonomy, sets, args):
            sets.append(tags)
            sources.append(f"conditional:{tag}")
    string_list = pa.list_(pa.string())
    schema = pa.schema([("id", pa.string()), ("aspect_list", string_list), *[(c, string_list) for c in CATEGORIES],
                        ("seed", pa.int64()), ("source", pa.string())])
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, len(sets), WRITE_CHUNK):
            rows = [_row(args, taxonomy, i, sets[i], sources[i]) for i in range(start, min(len(sets), start + WRITE_CHUNK))]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    counts = sample_counts(sets, sources, quota_tags(taxonomy, args) if args.min_per_tag else [])
    logger.info("vae sample: wrote %d sets (%d %s, %d conditional; %d unique; %.2f tags each) to %s", counts["n"],
                counts["prior"], source, counts["conditional"], counts["unique_sets"], counts["mean_tags"], out)
    return write_manifest(run, stage, args, inputs=inputs, counts=counts, started=started)


def _row(args: VaeSampleArguments, taxonomy, i: int, tags: list[str], origin: str) -> dict:
    """Row i of the output file; one clear error for a set that covers too few categories."""
    by_category = taxonomy.split_by_category(tags)
    covered = sum(1 for c in CATEGORIES if by_category[c])
    if covered < args.min_categories:
        raise ConceptCapsError(
            f"sample {i} covers only {covered} categories ({tags}): the --exclude list leaves too few tags; "
            f"exclude fewer tags or lower --min_categories."
        )
    return {"id": f"{args.id_prefix}-{i:06d}", "aspect_list": tags, **by_category, "seed": args.seed, "source": origin}


def sample_counts(sets: list[list[str]], sources: list[str], quota: list[str]) -> dict:
    """Manifest counts: sizes, sources, and the per-tag counts of the quota tags."""
    from collections import Counter

    per_tag = Counter(t for tags in sets for t in set(tags))
    conditional = Counter(origin.split(":", 1)[1] for origin in sources if origin.startswith("conditional:"))
    counts = {
        "n": len(sets),
        "prior": sum(not origin.startswith("conditional:") for origin in sources),
        "conditional": sum(conditional.values()),
        "unique_sets": len({hash(frozenset(tags)) for tags in sets}),  # ints, not N frozensets
        "mean_tags": sum(map(len, sets)) / len(sets),
        "tags_present": len(per_tag),
    }
    if quota:
        counts.update(quota_tags=len(quota), quota_min_sets=min(per_tag[t] for t in quota),
                      conditional_per_tag=dict(sorted(conditional.items())))
    return counts
