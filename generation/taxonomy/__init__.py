"""The ConceptCaps taxonomy: four categories of canonical tags with their aliases.

The reviewed data file is `generation/data/taxonomy.yaml` (its header documents the
mapping rule). This module loads it, maps raw MusicCaps tags and free caption text to
canonical tags, suggests the closest tags for a typo, and implements
`conceptcaps taxonomy propose`:

    conceptcaps taxonomy propose --source ../shared/data/musiccaps/musiccaps-public.csv
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from conceptcaps_eval.attribute_coverage.tag_mentions import CATEGORIES, TagMentions, normalize
from conceptcaps_pipeline.errors import ConceptCapsError

DEFAULT_TAXONOMY = Path(__file__).parent.parent / "data" / "taxonomy.yaml"
NEGATIONS = ("no ", "without ", "lack of ", "not ", "absence of ")
# The text-matching rule lives beside the attribute_coverage metric, which must run without
# this package; the pipeline and the metric share it.
__all__ = ["CATEGORIES", "DEFAULT_TAXONOMY", "Taxonomy", "normalize"]


@dataclass
class Taxonomy:
    """Canonical tags per category, aliases, contradictions and excluded tags."""

    categories: dict[str, dict[str, list[str]]]
    contradictions: list[tuple[list[str], list[str]]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    version: str = "unversioned"
    path: str | None = None
    # Latent attributes of a tag set (tempo order, vocal tags, mood affect): read by the
    # attribute-regularised VAE (generation/vae/lsr.py), which checks them.
    attributes: dict = field(default_factory=dict)

    # -- loading ----------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None) -> Taxonomy:
        """Load the YAML data file, or a `taxonomy.json` written by `distill`."""
        path = Path(path) if path else DEFAULT_TAXONOMY
        if not path.exists():
            raise ConceptCapsError(f"taxonomy file {path} not found: pass an existing YAML or taxonomy.json.")
        try:
            if path.suffix == ".json":
                raw = json.loads(path.read_text(encoding="utf-8"))
                categories = {
                    cat: {tag: info["aliases"] for tag, info in tags.items()}
                    for cat, tags in raw["categories"].items()
                }
            else:
                import yaml

                raw = yaml.safe_load(path.read_text(encoding="utf-8"))
                categories = {
                    cat: {str(tag): [str(a) for a in (aliases or [])] for tag, aliases in tags.items()}
                    for cat, tags in raw["categories"].items()
                }
        except Exception as err:  # noqa: BLE001 - invalid JSON/YAML, or the wrong shape: one message
            reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            fix = ("re-run `conceptcaps distill --force` to write it again" if path.suffix == ".json" else
                   "fix the file (generation/data/taxonomy.yaml shows the layout)")
            raise ConceptCapsError(f"taxonomy file {path} cannot be read ({type(err).__name__}: {reason}): {fix}.") from None
        pairs = []
        for pair in raw.get("contradictions", []):
            left, right = ([side] if isinstance(side, str) else list(side) for side in pair)
            pairs.append((left, right))
        taxonomy = cls(
            categories=categories,
            contradictions=pairs,
            excluded=list(raw.get("excluded", [])),
            version=str(raw.get("version", "unversioned")),
            path=str(path),
            attributes=dict(raw.get("attributes") or {}),
        )
        taxonomy.validate()
        return taxonomy

    def validate(self) -> None:
        """Refuse a taxonomy that breaks its invariants, naming the offending tag."""
        if set(self.categories) != set(CATEGORIES):
            raise ConceptCapsError(
                f"taxonomy {self.path}: categories must be exactly {list(CATEGORIES)}, got {list(self.categories)}."
            )
        seen: dict[str, str] = {}
        for category, tags in self.categories.items():
            if len(tags) > 50:
                raise ConceptCapsError(f"taxonomy {self.path}: category {category!r} has {len(tags)} tags; at most 50.")
            for tag, aliases in tags.items():
                for phrase in [tag, *aliases]:
                    key = normalize(phrase)
                    owner = seen.get(key)
                    if owner is not None and owner != tag:
                        raise ConceptCapsError(
                            f"taxonomy {self.path}: {phrase!r} is listed under both {owner!r} and {tag!r}; keep it under one."
                        )
                    seen[key] = tag
        for left, right in self.contradictions:
            self.check_known(left + right, what="contradiction")

    # -- lookups ----------------------------------------------------------------
    @cached_property
    def tags(self) -> list[str]:
        """All canonical tags, category by category, in file order (the vector order)."""
        return [tag for category in CATEGORIES for tag in self.categories[category]]

    @cached_property
    def category_of(self) -> dict[str, str]:
        return {tag: category for category in CATEGORIES for tag in self.categories[category]}

    @cached_property
    def index(self) -> dict[str, int]:
        return {tag: i for i, tag in enumerate(self.tags)}

    @cached_property
    def mentions(self) -> TagMentions:
        """The tag matcher for free text (shared with the attribute_coverage metric)."""
        return TagMentions(self.categories)

    @property
    def _phrases(self) -> dict[str, str]:
        """Normalised phrase (canonical, alias, and their plurals) -> canonical tag."""
        return self.mentions.phrases

    @cached_property
    def _excluded(self) -> set[str]:
        return {normalize(tag) for tag in self.excluded}

    def is_excluded(self, raw: str) -> bool:
        """Whether a raw tag is listed under `excluded` (after normalisation)."""
        return normalize(raw) in self._excluded

    def match_tag(self, raw: str) -> list[str]:
        """Canonical tags that one raw `aspect_list` tag stands for (see the YAML header)."""
        key = normalize(raw)
        if not key or key in self._excluded:
            return []
        if key in self._phrases:
            return [self._phrases[key]]
        if key.startswith(NEGATIONS):
            return []
        return self.find_mentions(key)

    def find_mentions(self, text: str) -> list[str]:
        """Canonical tags mentioned anywhere in free text (captions), in order, unique."""
        return self.mentions.find(text)

    def canonicalize(self, raw_tags: list[str]) -> list[str]:
        """Map a raw tag list to unique canonical tags, in taxonomy order."""
        hits = {tag for raw in raw_tags for tag in self.match_tag(raw)}
        return [tag for tag in self.tags if tag in hits]

    def split_by_category(self, tags: list[str]) -> dict[str, list[str]]:
        return {category: [t for t in tags if self.category_of.get(t) == category] for category in CATEGORIES}

    def suggest(self, word: str, n: int = 3) -> list[str]:
        key = normalize(word)
        by_alias = difflib.get_close_matches(key, list(self._phrases), n=n * 3, cutoff=0.5)
        suggestions = list(dict.fromkeys(self._phrases[a] for a in by_alias))
        return suggestions[:n] or difflib.get_close_matches(key, self.tags, n=n, cutoff=0.0)

    def check_known(self, tags: list[str], what: str = "tag") -> None:
        """Raise a clear error for a tag that is not canonical, with the closest tags."""
        for tag in tags:
            if tag not in self.index:
                hint = ""
                if normalize(tag) in self._phrases:
                    hint = f" It is an alias of {self._phrases[normalize(tag)]!r}: use that."
                else:
                    hint = f" Closest taxonomy tags: {', '.join(map(repr, self.suggest(tag)))}."
                raise ConceptCapsError(f"unknown {what} {tag!r}: not in taxonomy {self.path}.{hint}")

    def contradiction_in(self, tags: set[str]) -> tuple[str, str] | None:
        """The first contradictory pair inside a set of canonical tags, if any."""
        for left, right in self.contradictions:
            a = next((t for t in left if t in tags), None)
            b = next((t for t in right if t in tags), None)
            if a and b:
                return a, b
        tempos = [t for t in tags if self.category_of.get(t) == "tempo"]
        if len(tempos) > 1:
            return tempos[0], tempos[1]
        return None

    def to_json(self, tag_counts: Counter | None = None, alias_counts: dict[str, Counter] | None = None) -> dict:
        """Serializable form: every tag with its aliases and counts on the source."""
        tag_counts = tag_counts or Counter()
        alias_counts = alias_counts or {}
        return {
            "version": self.version,
            "source_file": self.path,
            "categories": {
                category: {
                    tag: {
                        "aliases": self.categories[category][tag],
                        "count": tag_counts.get(tag, 0),
                        "matched_source_tags": dict(alias_counts.get(tag, Counter()).most_common()),
                    }
                    for tag in self.categories[category]
                }
                for category in CATEGORIES
            },
            "contradictions": [[left, right] for left, right in self.contradictions],
            "excluded": self.excluded,
            "attributes": self.attributes,
        }
