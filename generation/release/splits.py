"""Split and subset assignment of a release: which clip goes to train, validation or test, and which
rows the 25% and 10% subsets keep.

    from conceptcaps_pipeline.release.splits import assign_splits, nested_subsets
    split_of = assign_splits(rows).split_of                 # rows: [{"id": ..., "aspect_list": [...]}, ...]
    subsets = nested_subsets({i: tags for i, tags in train.items()})   # {0.10: ids, 0.25: ids}

Both are deterministic functions of the rows (not of their order): a rebuild of the same run gives
the same splits, and `conceptcaps build` and the `datasets` builder (conceptcaps.py) agree.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

from conceptcaps_pipeline.run_dir import stable_hash

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"train": 0.70, "validation": 0.15, "test": 0.15}
MIN_TAG_SAMPLES = 3  # a tag with at least this many samples must appear in every split
SUBSETS = {"25pct": 0.25, "10pct": 0.10}


@dataclass
class SplitAssignment:
    split_of: dict[str, str]  # id -> train / validation / test
    unsatisfiable: dict[str, int]  # tag -> distinct attribute sets, for tags with >= 3 samples not in every split


class _Placement:
    """Groups placed in splits so far, and how many placed groups of each rare tag every split holds."""

    def __init__(self, tag_groups, rare, splits):
        self.tag_groups, self.rare, self.splits = tag_groups, set(rare), list(splits)
        self.split_of: dict[tuple[str, ...], str] = {}
        self.coverage = {tag: Counter() for tag in self.rare}

    def move(self, key, split) -> None:
        """Place group `key` in `split` (None: take it out again)."""
        old = self.split_of.get(key)
        for tag in (u for u in key if u in self.rare):
            if old is not None:
                self.coverage[tag][old] -= 1
            if split is not None:
                self.coverage[tag][split] += 1
        if split is None:
            self.split_of.pop(key, None)
        else:
            self.split_of[key] = split

    def satisfied(self, tag) -> bool:
        return all(self.coverage[tag][s] > 0 for s in self.splits)

    def lacking(self, tag) -> list[str]:
        return [s for s in self.splits if not self.coverage[tag][s]]

    def gain(self, key, split) -> int:
        """How many more of the group's rare tags would be in every split after moving it to `split`."""
        before = sum(self.satisfied(u) for u in key if u in self.rare)
        origin = self.split_of.get(key)
        self.move(key, split)
        after = sum(self.satisfied(u) for u in key if u in self.rare)
        self.move(key, origin)
        return after - before


def _seed_splits(groups, tag_groups, rare_first, fractions, salt: int) -> dict:
    """Steps 2 to 4 of `assign_splits` with one tie-breaking salt: {group: split} for the seeded groups."""
    rank = {key: stable_hash(f"{salt}|" + "|".join(key)) for key in groups}
    seed_order = sorted(fractions, key=lambda s: (fractions[s], s))  # the small splits first
    placed = _Placement(tag_groups, rare_first, seed_order)
    coverage = placed.coverage

    def waste(key, split, tag):
        # Tags of the group that are already in `split` would spend one of their few groups there.
        return sum(1 / len(tag_groups[u]) for u in key if u in placed.rare and u != tag and coverage[u][split] > 0)

    for tag in rare_first:
        for split in placed.lacking(tag):
            free = [k for k in tag_groups[tag] if k not in placed.split_of]
            if not free:
                break
            placed.move(min(free, key=lambda k: (waste(k, split, tag), len(groups[k]), rank[k])), split)

    # Hill climbing: move a group of a tag that misses a split into it when that raises the number
    # of the group's seeded tags that are in every split (so it ends: the count only grows).
    improved = True
    while improved:
        improved = False
        for tag in (t for t in rare_first if not placed.satisfied(t)):
            for split in placed.lacking(tag):
                for key in sorted(tag_groups[tag], key=lambda k: (len(groups[k]), rank[k])):
                    if placed.gain(key, split) > 0:
                        placed.move(key, split)
                        improved = True
                        break
    _random_walk(placed, [t for t in rare_first if len(tag_groups[t]) >= len(fractions)], random.Random(salt))
    return placed.split_of


def _random_walk(placed: _Placement, spreadable: list[str], rng: random.Random, steps: int = 20_000) -> None:
    """Step 4 of `assign_splits`: a WalkSAT-style search for the tags the greedy steps left out.

    Each step takes a tag that misses a split and moves one of its groups there: the move that
    leaves the fewest tags unsatisfied, or (one step in five) a random one, which gets the search
    out of local optima. The best placement seen is kept.
    """
    def unsatisfied():
        return [t for t in spreadable if not placed.satisfied(t)]

    best = (len(unsatisfied()), dict(placed.split_of))
    for _ in range(steps if best[0] else 0):
        open_tags = unsatisfied()
        if not open_tags:
            break
        tag = rng.choice(open_tags)
        split = rng.choice(placed.lacking(tag))
        keys = placed.tag_groups[tag]
        if rng.random() < 0.2:
            key = rng.choice(keys)
        else:
            key = max(keys, key=lambda k: (placed.gain(k, split), -len(k), rng.random()))
        placed.move(key, split)
        left = len(unsatisfied())
        if left < best[0]:
            best = (left, dict(placed.split_of))
    for key in list(placed.split_of):
        placed.move(key, None)
    for key, split in best[1].items():
        placed.move(key, split)


def assign_splits(rows: list[dict], fractions: dict[str, float] | None = None,
                  min_samples: int = MIN_TAG_SAMPLES, attempts: int = 16) -> SplitAssignment:
    """Deterministic train/validation/test split by attribute set.

    1. Rows with the same attribute set (aspect_list as a set) form a group; a group goes to one
       split, so no attribute set is in two splits.
    2. Seeding: tags with at least `min_samples` samples, rarest first (fewest groups, then fewest
       samples, then name); for each split that lacks the tag yet (test, validation, train) one
       unassigned group holding it goes there: the group whose other rare tags are least often in
       that split already (weighted by 1 / their group count), then the smallest, then by hash.
    3. Repair: while a tag misses a split, one of its groups moves there if that raises the number
       of the group's tags that are in every split.
    4. Search: if a tag with groups in at least three splits' worth still misses a split, a seeded
       random walk over group moves (`_random_walk`) looks for a placement that satisfies it.
    5. Filling: every other group goes where its tags are most wanted, by iterative stratification
       (`_stratified_fill`), so that each tag's samples, and the rows, end near 70/15/15.
    Steps 2-4 run with up to `attempts` fixed salts for the ties, stopping at the first that
    satisfies every tag it can; the best one is kept, so the result is deterministic. A tag whose
    samples lie in fewer groups than splits cannot be in every split; such tags, and any the
    search did not satisfy, are returned in `unsatisfiable` with their group count.
    """
    fractions = fractions or SPLIT_FRACTIONS
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for row in rows:
        groups[tuple(sorted(set(row["aspect_list"])))].append(row["id"])
    tag_groups: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    tag_samples: dict[str, int] = defaultdict(int)
    for key, ids in groups.items():
        for tag in key:
            tag_groups[tag].append(key)
            tag_samples[tag] += len(ids)
    rare_first = sorted((t for t in tag_groups if tag_samples[t] >= min_samples),
                        key=lambda t: (len(tag_groups[t]), tag_samples[t], t))

    def missing(seeded):
        return [t for t in rare_first if {seeded[k] for k in tag_groups[t] if k in seeded} != set(fractions)]

    best = None
    for salt in range(max(1, attempts)):
        seeded = _seed_splits(groups, tag_groups, rare_first, fractions, salt)
        score = len(missing(seeded))
        if best is None or score < best[0]:
            best = (score, seeded)
        if not any(len(tag_groups[t]) >= len(fractions) for t in missing(seeded)):
            break  # every tag that can be in every split is
    split_of_group = best[1]

    _stratified_fill(split_of_group, groups, tag_groups, tag_samples, fractions)
    split_of = {clip_id: split_of_group[key] for key, ids in groups.items() for clip_id in ids}
    return SplitAssignment(split_of, {t: len(tag_groups[t]) for t in missing(split_of_group)})


def _stratified_fill(split_of_group: dict, groups: dict, tag_groups: dict, tag_samples: dict, fractions: dict) -> None:
    """Step 5 of `assign_splits`: iterative stratification (Sechidis et al., 2011) over label-set groups.

    The tag with the fewest unplaced samples goes first; each of its unplaced groups (in hash
    order) goes to the split that most wants that tag (share of the tag's samples not yet there),
    then the split furthest below its share of rows. Every tag thus ends near 70/15/15.
    """
    order = list(fractions)
    total = sum(len(ids) for ids in groups.values())
    want_rows = {s: fractions[s] * total for s in order}
    want_tag = {t: {s: fractions[s] * n for s in order} for t, n in tag_samples.items()}
    left = dict(tag_samples)

    def place(key, split):
        split_of_group[key] = split
        size = len(groups[key])
        want_rows[split] -= size
        for tag in key:
            want_tag[tag][split] -= size
            left[tag] -= size

    for key, split in list(split_of_group.items()):
        del split_of_group[key]
        place(key, split)
    key_hash = {key: stable_hash("|".join(key)) for key in groups}
    while len(split_of_group) < len(groups):
        tag = min((t for t in left if left[t] > 0), key=lambda t: (left[t], t))
        for key in sorted((k for k in tag_groups[tag] if k not in split_of_group), key=lambda k: (key_hash[k], k)):
            split = max(order, key=lambda s: (want_tag[tag][s], want_rows[s], -order.index(s)))
            place(key, split)


def subset_min_positives(fraction: float) -> int:
    """Positives a tag needs in a split for a `fraction` subset to keep it: those whose expected
    count in a uniform subset is at least one (4 for 25%, 10 for 10%)."""
    return math.ceil(1 / fraction - 1e-9)


def subset_ids(rows: dict[str, list[str]], fraction: float, within: set[str] = frozenset()) -> set[str]:
    """The ids of one split that a `fraction` subset keeps, stratified by tag.

    `rows` maps the split's ids to their tags. The subset holds `within` (a smaller subset it must
    contain), then covers every tag with at least `subset_min_positives(fraction)` positives in the
    split: rarest uncovered tag first, the row holding it that covers the most uncovered such tags
    (ties: the smallest hash of the id). Then rows with the smallest hash fill it up to
    max(1, round(fraction * len(rows))) rows (it is larger only when covering needs more rows).
    Deterministic: the result does not depend on the order of `rows`.
    """
    if fraction >= 1.0:
        return set(rows)
    if not rows:
        return set()
    keep = set(within)
    need = subset_min_positives(fraction)
    by_hash = sorted(rows, key=lambda i: (stable_hash(i), i))
    rank = {clip_id: position for position, clip_id in enumerate(by_hash)}
    holders: dict[str, list[str]] = defaultdict(list)
    for clip_id in by_hash:
        for tag in set(rows[clip_id]):
            holders[tag].append(clip_id)
    uncovered = {t for t, ids in holders.items() if len(ids) >= need} - {t for i in keep for t in rows[i]}
    while uncovered:
        tag = min(uncovered, key=lambda t: (len(holders[t]), t))
        best = max(holders[tag], key=lambda i: (len(uncovered & set(rows[i])), -rank[i]))
        keep.add(best)
        uncovered -= set(rows[best])
    size = max(1, round(fraction * len(rows)))
    for clip_id in by_hash:
        if len(keep) >= size:
            break
        keep.add(clip_id)
    return keep


def nested_subsets(rows: dict[str, list[str]], fractions=None) -> dict[float, set[str]]:
    """`subset_ids` for every fraction (default: the configs' 25% and 10%), smallest first, each inside the next."""
    subsets, within = {}, set()
    for fraction in sorted(fractions or SUBSETS.values()):
        within = subsets[fraction] = subset_ids(rows, fraction, within)
    return subsets

