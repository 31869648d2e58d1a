"""How many tags of each category a set holds: the empirical distribution of the training sets.

`conceptcaps vae train` writes it to RUN/vae/set_sizes.json; `conceptcaps vae sample` draws,
for every sample, the per-category sizes (genre, mood, instrument, tempo counts) of a training
set at random and decodes the VAE's probabilities into exactly that many tags per category
(`generation/vae/model.py`, `decode_sets(..., sizes=...)`).

Why sizes come from the data and not from a threshold on the decoder's probabilities: decoded
from the prior, the probabilities are flatter than for a real set (z ~ N(0, I) is not where
the encoder puts the data), so a 0.5 threshold, and the category caps it needed, gave sets of
4.3 tags against 8.2 in the data. Drawing the joint size pattern of a real set keeps the
tags-per-set and per-category distributions of the data (and their correlation: sets with
many instruments name fewer moods), while the decoder still chooses which tags. With required
tags (conditional sampling, the concept quota), the pattern is drawn among the training sets
that hold the rarest required tag, so a "lullaby" set is as long as lullaby sets are.

    from conceptcaps_pipeline.vae.sizes import SetSizes
    sizes = SetSizes.from_sets(train_sets, taxonomy)
    sizes.draw(4, torch.Generator().manual_seed(0))   # [{'genre': 1, 'mood': 2, 'instrument': 3, 'tempo': 0}, ...]
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.taxonomy import CATEGORIES

FILENAME = "set_sizes.json"


@dataclass
class SetSizes:
    """Joint per-category sizes of the training sets (`patterns` with their `counts`), and which
    patterns the sets holding each tag have (`by_tag`: {tag: {pattern index: count}})."""

    patterns: list[tuple[int, ...]]
    counts: list[int]
    by_tag: dict[str, dict[int, int]] = field(default_factory=dict)
    categories: tuple[str, ...] = CATEGORIES

    @classmethod
    def from_sets(cls, sets: list[list[str]], taxonomy) -> SetSizes:
        if not sets:
            raise ConceptCapsError("no training sets to take set sizes from: distill more rows.")
        per_set = [tuple(sum(taxonomy.category_of[t] == c for t in tags) for c in CATEGORIES) for tags in sets]
        frequency = Counter(per_set)
        patterns = sorted(frequency)
        index = {pattern: i for i, pattern in enumerate(patterns)}
        by_tag: dict[str, Counter] = {}
        for tags, pattern in zip(sets, per_set):
            for tag in set(tags):
                by_tag.setdefault(tag, Counter())[index[pattern]] += 1
        return cls(patterns, [frequency[p] for p in patterns],
                   {tag: dict(sorted(c.items())) for tag, c in sorted(by_tag.items())})

    # -- storage: RUN/vae/set_sizes.json ---------------------------------------------------
    def to_json(self) -> dict:
        return {
            "categories": list(self.categories),
            "patterns": [[*p, n] for p, n in zip(self.patterns, self.counts)],
            "by_tag": {tag: [[i, n] for i, n in counts.items()] for tag, counts in self.by_tag.items()},
            "summary": self.summary(),
        }

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILENAME
        path.write_text(json.dumps(self.to_json()) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> SetSizes:
        path = Path(folder) / FILENAME
        if not path.is_file():
            raise ConceptCapsError(
                f"{path} not found: this VAE was trained before set sizes were recorded. Re-run "
                f"`conceptcaps vae train --run RUN --force`, or pass --sizes threshold for the threshold rule."
            )
        try:
            raw = json.loads(path.read_text())
            if tuple(raw["categories"]) != CATEGORIES:
                raise ValueError(f"categories {raw['categories']}")
            patterns = [tuple(int(v) for v in row[:-1]) for row in raw["patterns"]]
            counts = [int(row[-1]) for row in raw["patterns"]]
            by_tag = {tag: {int(i): int(n) for i, n in rows} for tag, rows in raw["by_tag"].items()}
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ConceptCapsError(f"{path} cannot be read ({err}): re-run `conceptcaps vae train --run RUN --force`.") \
                from None
        return cls(patterns, counts, by_tag)

    # -- drawing -----------------------------------------------------------------------------
    def draw(self, n: int, generator, require: list[str] = (), taxonomy=None) -> list[dict[str, int]]:
        """n per-category size dicts drawn with `generator` (a torch.Generator). With `require`,
        among the training sets holding the rarest required tag (all sets if none holds it), and
        never fewer tags of a category than are required of it."""
        import torch

        weights = dict(enumerate(self.counts))
        known = [tag for tag in require if tag in self.by_tag]
        if known:
            weights = self.by_tag[min(known, key=lambda t: (sum(self.by_tag[t].values()), t))]
        indices = list(weights)
        picked = torch.multinomial(torch.tensor([float(weights[i]) for i in indices]), n, replacement=True,
                                   generator=generator).tolist()
        floor = Counter(taxonomy.category_of[t] for t in require) if taxonomy is not None else Counter()
        return [{c: max(self.patterns[indices[i]][k], floor[c]) for k, c in enumerate(self.categories)} for i in picked]

    # -- description -------------------------------------------------------------------------
    def summary(self) -> dict:
        total = sum(self.counts)
        sizes = Counter()
        per_category = {c: Counter() for c in self.categories}
        for pattern, n in zip(self.patterns, self.counts):
            sizes[sum(pattern)] += n
            for k, c in enumerate(self.categories):
                per_category[c][pattern[k]] += n
        return {
            "sets": total,
            "mean_tags": sum(s * n for s, n in sizes.items()) / total,
            "tags_per_set": {str(k): v for k, v in sorted(sizes.items())},
            "per_category": {c: {str(k): v for k, v in sorted(h.items())} for c, h in per_category.items()},
            "max_per_category": {c: max(h) for c, h in per_category.items()},
        }


def random_sets(taxonomy, n: int, seed: int, sizes: SetSizes, *, require: list[str] = (), exclude: list[str] = (),
                min_categories: int = 3) -> list[list[str]]:
    """The random-tag control: n sets whose per-category sizes are drawn from the data like the
    VAE's, filled with tags drawn uniformly at random under the same rules (no contradictory
    pair, required tags kept, excluded tags never). What a model adds is what it beats this by."""
    import torch
    from conceptcaps_pipeline.vae.model import decode_sets

    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand((n, len(taxonomy.tags)), generator=generator)  # a random order of the tags per set
    drawn = sizes.draw(n, generator, require=list(require), taxonomy=taxonomy)
    categories = [taxonomy.category_of[t] for t in taxonomy.tags]
    return decode_sets(scores, taxonomy.tags, categories, taxonomy, min_categories=min_categories,
                       require=list(require), exclude=list(exclude), sizes=drawn)
