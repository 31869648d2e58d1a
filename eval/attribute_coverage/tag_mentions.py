"""Which taxonomy tags a piece of text mentions: the matching rule of ConceptCaps, standalone.

    from conceptcaps_eval.attribute_coverage.tag_mentions import TagMentions
    tags = TagMentions.from_file("taxonomy.json")            # a run's or a release's taxonomy.json, or a YAML
    tags.find("A slow jazz tune led by a grand piano.")      # ['jazz', 'piano', 'slow tempo']

A text mentions a tag when the tag, one of its aliases, or their plural occurs in it on word
boundaries, after normalisation (lower case; '-', '_', '/' become spaces; punctuation but
'&' and "'" dropped). The longest phrase wins ("bass drum" over "bass").

This file needs only the standard library (and PyYAML for a YAML taxonomy), so the
`attribute_coverage` metric runs in any environment that has `evaluate`. The pipeline's
`conceptcaps_pipeline.taxonomy.Taxonomy` uses the same functions, so the numbers in a run's
captions.parquet and this metric come from one implementation.
"""

from __future__ import annotations

import json
import re
from importlib.util import find_spec
from pathlib import Path

CATEGORIES = ("genre", "mood", "instrument", "tempo")
_PUNCT = re.compile(r"[^\w\s&']")
_SEPARATORS = re.compile(r"[-_/]")


def normalize(text: str) -> str:
    """Lower-case; '-', '_', '/' to spaces; drop punctuation but '&' and "'"; one space."""
    text = text.lower().replace("’", "'")
    text = _SEPARATORS.sub(" ", text)
    text = _PUNCT.sub(" ", text)
    return " ".join(text.split())


def plural(phrase: str) -> str:
    """English plural of a phrase's last word ("bass drum" -> "bass drums", "melody" -> "melodies")."""
    head, _, last = phrase.rpartition(" ")
    if last.endswith(("s", "x", "ch", "sh")):
        last = last + "es"
    elif last.endswith("y") and len(last) > 2 and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last = last + "s"
    return f"{head} {last}".strip()


def installed_taxonomy() -> Path | None:
    """The taxonomy YAML of an installed ConceptCaps (found without importing its code), if any."""
    try:
        spec = find_spec("conceptcaps_pipeline")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "taxonomy.yaml"
        if path.is_file():
            return path
    return None


def read_categories(taxonomy=None) -> dict[str, dict[str, list[str]]]:
    """{category: {tag: [aliases]}} from a dict of that shape, a taxonomy YAML, or a taxonomy.json.

    With no taxonomy, the one of an installed ConceptCaps; without that, a clear error."""
    if isinstance(taxonomy, dict):
        raw = taxonomy
    else:
        path = Path(taxonomy) if taxonomy else installed_taxonomy()
        if path is None:
            raise ValueError(
                "no taxonomy given and no ConceptCaps installed to take the default from: pass `taxonomy=` a "
                "taxonomy.json (every ConceptCaps release has one: hf_hub_download(REPO, 'taxonomy.json', "
                "repo_type='dataset')), a taxonomy YAML, or a dict {category: {tag: [aliases]}}."
            )
        if not path.is_file():
            raise ValueError(f"taxonomy file {path} not found: pass an existing taxonomy.json or YAML.")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    categories = raw.get("categories", raw) if isinstance(raw, dict) else None
    if not isinstance(categories, dict) or set(categories) != set(CATEGORIES):
        found = sorted(categories) if isinstance(categories, dict) else type(raw).__name__
        raise ValueError(f"taxonomy {taxonomy or 'default'}: categories must be exactly {list(CATEGORIES)}, got {found}.")
    # A taxonomy.json holds {tag: {"aliases": [...], "count": ...}}; a YAML {tag: [aliases]}.
    return {
        category: {
            str(tag): [str(a) for a in ((info or {}).get("aliases", []) if isinstance(info, dict) else (info or []))]
            for tag, info in tags.items()
        }
        for category, tags in categories.items()
    }


class TagMentions:
    """Finds canonical tags in free text from {category: {tag: [aliases]}}."""

    def __init__(self, categories: dict[str, dict[str, list[str]]]):
        self.categories = categories
        self.tags = [tag for category in CATEGORIES for tag in categories.get(category, {})]
        self.category_of = {tag: category for category in CATEGORIES for tag in categories.get(category, {})}
        self.phrases: dict[str, str] = {}  # normalised phrase (tag, alias, their plurals) -> tag
        for tag in self.tags:
            for phrase in [tag, *categories[self.category_of[tag]][tag]]:
                key = normalize(phrase)
                self.phrases.setdefault(key, tag)
                self.phrases.setdefault(plural(key), tag)
        # Longest phrases first so that "bass drum" wins over "bass" inside a tag.
        alternatives = sorted(self.phrases, key=len, reverse=True)
        self.pattern = re.compile(r"(?<![\w&'])(" + "|".join(map(re.escape, alternatives)) + r")(?![\w&'])")

    @classmethod
    def from_file(cls, taxonomy=None) -> TagMentions:
        """From a taxonomy.json, a YAML, a dict, or (None) the installed ConceptCaps taxonomy."""
        return cls(read_categories(taxonomy))

    def find(self, text: str) -> list[str]:
        """Canonical tags mentioned anywhere in `text`, in order of first mention, unique."""
        found = []
        for match in self.pattern.finditer(normalize(text)):
            tag = self.phrases[match.group(1)]
            if tag not in found:
                found.append(tag)
        return found
