"""The dataset card's figures: tag frequency against MusicCaps, and tags per sample.

    from dataset_card.figures import write_figures
    figures = write_figures("runs/demo/release/figures", release_sets, musiccaps_sets, taxonomy_tags)

`release_sets` and `musiccaps_sets` are lists of attribute lists (one per sample): the release's
rows and the distilled MusicCaps pairs (RUN/distilled.parquet) the VAE learned from. PNGs are
drawn with matplotlib's Agg backend (no display needed) and their paths, relative to the
release folder, go into the card.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

TOP_TAGS = 40  # bars in the frequency figure; more are unreadable at card width


def tag_shares(sets: list[list[str]]) -> Counter:
    """tag -> share of the samples that carry it."""
    counts = Counter(tag for tags in sets for tag in set(tags))
    return Counter({tag: n / max(len(sets), 1) for tag, n in counts.items()})


def frequency_correlation(release_sets, source_sets, tags: list[str]) -> float | None:
    """Pearson correlation of per-tag shares, release vs source, over the taxonomy."""
    if not release_sets or not source_sets:
        return None
    ours, theirs = tag_shares(release_sets), tag_shares(source_sets)
    a = np.array([ours[t] for t in tags])
    b = np.array([theirs[t] for t in tags])
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_tag_frequency(path: Path, release_sets, source_sets, top: int = TOP_TAGS) -> None:
    """Horizontal bars: the `top` most frequent release tags, release share vs MusicCaps share."""
    plt = _pyplot()
    ours, theirs = tag_shares(release_sets), tag_shares(source_sets or [])
    tags = [t for t, _ in sorted(ours.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
    y = np.arange(len(tags))
    height = 0.4 if source_sets else 0.8
    fig, ax = plt.subplots(figsize=(7, 0.22 * len(tags) + 1.4))
    ax.barh(y - (height / 2 if source_sets else 0), [100 * ours[t] for t in tags], height, label="ConceptCaps (this release)")
    if source_sets:
        ax.barh(y + height / 2, [100 * theirs[t] for t in tags], height, label="MusicCaps (distilled)")
    ax.set_yticks(y, tags, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% of samples with the tag")
    ax.set_title(f"Tag frequency: the {len(tags)} most frequent tags")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tags_per_sample(path: Path, release_sets, source_sets) -> None:
    """Histogram of how many tags a sample carries, release vs MusicCaps."""
    plt = _pyplot()
    ours = [len(set(t)) for t in release_sets]
    theirs = [len(set(t)) for t in source_sets or []]
    top = max(ours + theirs + [1])
    bins = np.arange(0.5, top + 1.5)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    weights = [np.full(len(ours), 100 / max(len(ours), 1))]
    data, labels = [ours], ["ConceptCaps (this release)"]
    if theirs:
        data.append(theirs)
        weights.append(np.full(len(theirs), 100 / len(theirs)))
        labels.append("MusicCaps (distilled)")
    ax.hist(data, bins=bins, weights=weights, label=labels)
    ax.set_xlabel("tags per sample")
    ax.set_ylabel("% of samples")
    ax.set_xticks(range(1, top + 1))
    ax.set_title("Tags per sample")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_figures(out_dir: str | Path, release_sets, source_sets=None) -> list[dict]:
    """Write both PNGs into out_dir; returns [{"file": name, "title": ...}] for the card."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    versus = " vs MusicCaps" if source_sets else ""
    figures = [
        {"file": "tag_frequency.png", "title": f"Tag frequency{versus}"},
        {"file": "tags_per_sample.png", "title": f"Tags per sample{versus}"},
    ]
    plot_tag_frequency(out_dir / figures[0]["file"], release_sets, source_sets)
    plot_tags_per_sample(out_dir / figures[1]["file"], release_sets, source_sets)
    return figures
