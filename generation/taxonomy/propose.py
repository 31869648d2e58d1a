"""Print candidate taxonomy tags per category with their counts on a source.

    conceptcaps taxonomy propose --source ../shared/data/musiccaps/musiccaps-public.csv --top 60

For each category: the canonical tags of the current taxonomy with the number of source
rows that carry them (after alias mapping), then the most frequent raw tags that map to
nothing, so that a maintainer can add them as tags or aliases, or to `excluded`.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field

from conceptcaps_pipeline.taxonomy import CATEGORIES, DEFAULT_TAXONOMY, Taxonomy
from conceptcaps_pipeline.taxonomy.source import HUB_DEFAULT, read_source


@dataclass
class ProposeArguments:
    source: str = field(default=HUB_DEFAULT, metadata={"help": "Local CSV path or Hub dataset id."})
    taxonomy: str = field(default=str(DEFAULT_TAXONOMY), metadata={"help": "Taxonomy YAML to compare against."})
    top: int = field(default=50, metadata={"help": "How many unmapped tags to list."})
    min_count: int = field(default=5, metadata={"help": "Hide unmapped tags rarer than this."})


def proposal(args: ProposeArguments) -> dict:
    """Counts per canonical tag and the most frequent unmapped raw tags."""
    taxonomy = Taxonomy.load(args.taxonomy)
    rows, _ = read_source(args.source)
    canonical: Counter = Counter()
    unmapped: Counter = Counter()
    for row in rows:
        canonical.update(taxonomy.canonicalize(row.aspect_list))
        for raw in row.aspect_list:
            if not taxonomy.match_tag(raw) and not taxonomy.is_excluded(raw):
                unmapped[raw.lower()] += 1
    return {
        "categories": {c: [(t, canonical[t]) for t in taxonomy.categories[c]] for c in CATEGORIES},
        "unmapped": [(t, n) for t, n in unmapped.most_common(args.top) if n >= args.min_count],
        "rows": len(rows),
    }


def propose(args: ProposeArguments) -> dict:
    """CLI entry: print the proposal as a readable table (this is a report command)."""
    result = proposal(args)
    out = sys.stdout
    out.write(f"# taxonomy {args.taxonomy} on {args.source} ({result['rows']} rows)\n")
    for category, tags in result["categories"].items():
        out.write(f"\n## {category} ({len(tags)} tags)\n")
        for tag, count in sorted(tags, key=lambda x: -x[1]):
            out.write(f"  {count:6d}  {tag}\n")
    out.write("\n## frequent tags that map to nothing (add as tag, alias, or to `excluded`)\n")
    for tag, count in result["unmapped"]:
        out.write(f"  {count:6d}  {tag}\n")
    return result
