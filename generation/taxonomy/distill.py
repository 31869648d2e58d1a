"""Distil (attribute list, caption) pairs from a tagged caption source such as MusicCaps.

    conceptcaps distill --source ../shared/data/musiccaps/musiccaps-public.csv --run runs/demo
    conceptcaps distill --source google/MusicCaps --run runs/demo     # needs the Hub

Every raw `aspect_list` tag is mapped to canonical taxonomy tags (generation/taxonomy/__init__.py);
a row is kept when its tags cover at least `min_categories` of genre/mood/instrument/tempo,
its tag set holds no contradiction (two tempos, "instrumental" with a vocal, ...), and its
caption has at least `min_caption_words` words.

Captions are cleaned of remarks on recording quality ("The low quality recording features
...", "It is noisy and in mono."), which the taxonomy excludes and the captioner's prompt
forbids: about a third of the MusicCaps captions make one (generation/taxonomy/cleaning.py).
`caption` is the cleaned text (what the captioner learns from) and `caption_original` the
source's; `--clean_captions false` keeps the source text in both. The manifest counts the
changed captions (`counts.caption_cleaning`). Writes RUN/taxonomy.json,
RUN/distilled.parquet and RUN/manifests/distill.json.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import finished, stage, write_json, write_manifest, write_parquet
from conceptcaps_pipeline.taxonomy import CATEGORIES, DEFAULT_TAXONOMY, Taxonomy
from conceptcaps_pipeline.taxonomy.source import HUB_DEFAULT, read_source

logger = logging.getLogger(__name__)


@dataclass
class DistillArguments:
    run: str = field(metadata={"aliases": ["--out"], "help": "Run directory to write (created if missing); --out is an alias."})
    source: str = field(
        default=HUB_DEFAULT,
        metadata={"help": "MusicCaps-style source: a local CSV path or a Hub dataset id."},
    )
    taxonomy: str = field(default=str(DEFAULT_TAXONOMY), metadata={"help": "Taxonomy YAML file."})
    min_categories: int = field(
        default=3, metadata={"help": "Keep rows whose canonical tags cover at least this many categories."}
    )
    min_caption_words: int = field(
        default=8, metadata={"help": "Drop rows whose caption (after cleaning) is shorter (not a clear caption)."}
    )
    clean_captions: bool = field(
        default=True,
        metadata={"help": "Remove remarks on recording quality ('low quality', 'noisy', 'in mono', ...) from the "
                          "captions; the source text stays in `caption_original`."},
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Share of rows in the validation split (chosen by a hash of the id)."}
    )
    max_bad_rows: int = field(
        default=0,
        metadata={"help": "Unparsable rows tolerated (skipped, listed in the manifest); more is an error."},
    )
    force: bool = field(default=False, metadata={"help": "Redo the stage even if its outputs are up to date."})


def split_of(ytid: str, validation_fraction: float) -> str:
    """Deterministic split by id hash: stable across runs, machines and row order."""
    bucket = int(hashlib.sha256(ytid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "validation" if bucket < validation_fraction else "train"


def check_arguments(args: DistillArguments) -> None:
    """One clear error for an option out of range, before anything is read or written."""
    if not 0 <= args.validation_fraction < 1:
        raise ConceptCapsError(f"--validation_fraction {args.validation_fraction}: give a share in [0, 1).")
    if not 1 <= args.min_categories <= len(CATEGORIES):
        raise ConceptCapsError(f"--min_categories {args.min_categories}: give 1 to {len(CATEGORIES)}.")
    if args.min_caption_words < 0 or args.max_bad_rows < 0:
        raise ConceptCapsError("--min_caption_words and --max_bad_rows must be 0 or more.")


@stage("distill", check=check_arguments)
def distill(args: DistillArguments) -> dict:
    """Run the stage and return its manifest."""
    started = time.time()
    run = Path(args.run)
    outputs = [run / "taxonomy.json", run / "distilled.parquet"]
    source_path = Path(args.source).expanduser()
    inputs = {"source": source_path if source_path.is_file() else args.source, "taxonomy": args.taxonomy}
    done = finished(run, "distill", args, inputs, outputs)
    if done and not args.force:
        logger.info("distill: %s is up to date (%d pairs); --force redoes it", run, done["counts"]["kept"])
        return done
    taxonomy = Taxonomy.load(args.taxonomy)
    rows, bad = read_source(args.source)
    if len(bad) > args.max_bad_rows:
        listed = "; ".join(b.describe() for b in bad[:5]) + ("; ..." if len(bad) > 5 else "")
        raise ConceptCapsError(
            f"{len(bad)} row(s) of {args.source} cannot be parsed ({listed}): "
            f"Fix those rows (aspect_list must be a Python-literal list such as ['rock', 'slow tempo']), "
            f"or pass --max_bad_rows {len(bad)} to skip them; skipped rows are listed in the manifest."
        )
    for b in bad:
        logger.warning("distill: skipping %s", b.describe())

    # Map every row, counting why rows are left out so that nothing disappears unexplained.
    from conceptcaps_pipeline.taxonomy.cleaning import CleaningCounts, clean_caption_with_counts

    reasons: Counter = Counter()
    cleaning = CleaningCounts()
    coverage_histogram: Counter = Counter()
    source_tag_counts: Counter = Counter()
    alias_counts: dict[str, Counter] = {tag: Counter() for tag in taxonomy.tags}
    kept = []
    seen_ids = set()
    for row in rows:
        if row.ytid in seen_ids:
            reasons["duplicate_id"] += 1
            continue
        seen_ids.add(row.ytid)
        for raw in row.aspect_list:
            for tag in taxonomy.match_tag(raw):
                alias_counts[tag][raw.lower()] += 1
        tags = taxonomy.canonicalize(row.aspect_list)
        source_tag_counts.update(tags)
        by_category = taxonomy.split_by_category(tags)
        covered = sum(1 for c in CATEGORIES if by_category[c])
        coverage_histogram[covered] += 1
        if covered < args.min_categories:
            reasons["too_few_categories"] += 1
        elif taxonomy.contradiction_in(set(tags)):
            reasons["contradictory_tags"] += 1
        elif len(row.caption.split()) < args.min_caption_words:
            reasons["short_caption"] += 1
        else:
            caption, dropped, edited = (clean_caption_with_counts(row.caption) if args.clean_captions
                                        else (row.caption, 0, 0))
            if len(caption.split()) < args.min_caption_words:
                # Nothing but remarks on the recording (or too little beside them) is no caption to learn from.
                reasons["short_caption_after_cleaning"] += 1
                continue
            cleaning.add(row.caption, caption, dropped, edited)
            kept.append({
                "id": row.ytid,
                "caption": caption,
                "caption_original": row.caption,
                "aspect_list": tags,
                **by_category,
                "source_aspect_list": row.aspect_list,
                "split": split_of(row.ytid, args.validation_fraction),
            })
    if not kept:
        raise ConceptCapsError(
            f"no row of {args.source} covers {args.min_categories} taxonomy categories: check the taxonomy "
            f"({args.taxonomy}) against `conceptcaps taxonomy propose`, or lower --min_categories."
        )

    import pyarrow as pa

    string_list = pa.list_(pa.string())
    schema = pa.schema([
        ("id", pa.string()), ("caption", pa.string()), ("caption_original", pa.string()), ("aspect_list", string_list),
        *[(c, string_list) for c in CATEGORIES],
        ("source_aspect_list", string_list), ("split", pa.string()),
    ])
    kept.sort(key=lambda r: r["id"])  # deterministic order whatever the source order
    write_parquet(pa.Table.from_pylist(kept, schema=schema), run / "distilled.parquet")
    distilled_counts = Counter(t for r in kept for t in r["aspect_list"])
    taxonomy_json = taxonomy.to_json(distilled_counts, alias_counts)
    taxonomy_json["source_counts"] = dict(source_tag_counts)
    write_json(run / "taxonomy.json", taxonomy_json)

    splits = Counter(r["split"] for r in kept)
    counts = {
        "source_rows": len(rows) + len(bad),
        "parsed_rows": len(rows),
        "bad_rows": len(bad),
        "kept": len(kept),
        "train": splits["train"],
        "validation": splits["validation"],
        "dropped": dict(reasons),
        "categories_covered_histogram": {str(k): v for k, v in sorted(coverage_histogram.items())},
        "tags_used": sum(1 for t in taxonomy.tags if distilled_counts[t]),
        "caption_cleaning": {
            "enabled": args.clean_captions,
            "captions_changed": cleaning.changed,
            "share_changed": round(cleaning.changed / len(kept), 4),
            "sentences_dropped": cleaning.sentences_dropped,
            "sentences_edited": cleaning.sentences_edited,
            "captions_still_flagged": cleaning.remaining,
            "captions_with_remark_by_kind": dict(sorted(cleaning.kinds.items(), key=lambda kv: -kv[1])),
        },
        "taxonomy_version": taxonomy.version,
    }
    logger.info("distill: kept %d of %d rows (%s)", len(kept), counts["source_rows"], dict(reasons))
    logger.info("distill: %s: %d of %d captions changed (%d sentences dropped, %d edited); %d still flagged",
                "removed recording-quality remarks" if args.clean_captions else "caption cleaning off",
                cleaning.changed, len(kept), cleaning.sentences_dropped, cleaning.sentences_edited, cleaning.remaining)
    return write_manifest(
        run, "distill", args, inputs=inputs, counts=counts, started=started,
        extra={"bad_rows": [b.__dict__ for b in bad]},
    )
