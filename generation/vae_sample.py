"""Sample attribute sets from the trained beta-VAE.

    conceptcaps vae sample --run runs/demo --n 1000 --seed 0
    conceptcaps vae sample --run runs/demo --n 200 --require jazz piano --exclude male vocal

Reads RUN/vae/ and RUN/taxonomy.json; writes RUN/attributes.parquet (id, aspect_list, one
list per category, seed) and RUN/manifests/vae_sample.json. The decoding rule is in
`generation/vae_model.py` (every set: >= 3 categories, at most one tempo tag, no
contradictory pair, taxonomy tags only). With `--require`, z is drawn from the encoder's
posterior for the required tags and those tags are always kept; `--exclude`d tags never
appear. The same seed and model give the same file.
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


def sample_attributes(args: VaeSampleArguments) -> dict:
    """Sample, validate every set against the rules, write attributes.parquet."""
    import pyarrow as pa

    from .taxonomy import Taxonomy
    from .vae_model import BetaVAE, sample_sets

    started = time.time()
    run = Path(args.run)
    vae_dir = require(run, "vae")
    taxonomy_path = require(run, "taxonomy.json")
    inputs = {"vae": vae_dir / "model.safetensors", "taxonomy": taxonomy_path}
    out = run / "attributes.parquet"
    done = finished(run, "vae_sample", args, inputs, [out])
    if done and not args.force:
        logger.info("vae sample: %s is up to date; --force resamples", out)
        return done

    taxonomy = Taxonomy.load(taxonomy_path)
    check_request(taxonomy, args)
    try:
        model = BetaVAE.from_pretrained(str(vae_dir))
    except Exception as err:
        raise ConceptCapsError(f"cannot load the VAE from {vae_dir} ({err}); re-run `conceptcaps vae train --run {run} --force`.") from err
    if list(model.tags) != taxonomy.tags:
        raise ConceptCapsError(f"{vae_dir} was trained on another taxonomy than {taxonomy_path}: retrain with --force.")

    sets = sample_sets(
        model, taxonomy, args.n, args.seed, require=args.require, exclude=args.exclude,
        temperature=args.temperature, threshold=args.threshold, min_categories=args.min_categories,
    )
    rows = []
    for i, tags in enumerate(sets):
        by_category = taxonomy.split_by_category(tags)
        covered = sum(1 for c in CATEGORIES if by_category[c])
        if covered < args.min_categories:
            raise ConceptCapsError(
                f"sample {i} covers only {covered} categories ({tags}): the --exclude list leaves too few tags; "
                f"exclude fewer tags or lower --min_categories."
            )
        rows.append({"id": f"{args.id_prefix}-{i:06d}", "aspect_list": tags, **by_category, "seed": args.seed})
    string_list = pa.list_(pa.string())
    schema = pa.schema(
        [("id", pa.string()), ("aspect_list", string_list), *[(c, string_list) for c in CATEGORIES], ("seed", pa.int64())]
    )
    write_parquet(pa.Table.from_pylist(rows, schema=schema), out)
    counts = {
        "n": len(rows),
        "unique_sets": len({frozenset(r["aspect_list"]) for r in rows}),
        "mean_tags": sum(len(r["aspect_list"]) for r in rows) / len(rows),
    }
    logger.info("vae sample: wrote %d sets (%d unique) to %s", counts["n"], counts["unique_sets"], out)
    return write_manifest(run, "vae_sample", args, inputs=inputs, counts=counts, started=started)
