"""The dataset card's figures, drawn from the release and the run.

    from conceptcaps_pipeline.dataset_card.figures import FigureData, write_figures
    figures = write_figures("runs/demo/release/figures", FigureData(release_sets=..., source_sets=..., ...))

What is drawn (each only when its data is there; `write_figures` returns the drawn ones, with a
title and a one-line reading for the card):
- tag_frequency.png: the most frequent tags, release vs the distilled MusicCaps pairs;
- tags_per_sample.png: how many tags a sample carries, release vs MusicCaps;
- split_counts.png: positives per tag in each split (the concept sets a user can build);
- cooccurrence_<category>.png: how often two tags of one category share a row;
- clap_per_concept.png: mean CLAP score (clip vs its caption) of the clips holding each tag,
  from the per-clip scores in RUN/eval/metrics.json;
- vae_loss.png: the VAE's training and validation loss per epoch (RUN/vae/history.json).

PNGs are drawn with matplotlib's Agg backend (no display needed); paths in the card are relative
to the release folder.
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

TOP_TAGS = 40  # bars in a per-tag figure; more are unreadable at card width
HEATMAP_TAGS = 25  # tags per co-occurrence heatmap (the most frequent of the category)
SPLIT_COLOURS = {"train": "#4C72B0", "validation": "#DD8452", "test": "#55A868"}


@dataclass
class FigureData:
    """Everything the figures are drawn from; a field left empty skips its figure."""

    release_sets: list[list[str]]  # the label set of every row of the default config
    source_sets: list[list[str]] | None = None  # the distilled MusicCaps pairs (RUN/distilled.parquet)
    categories: dict[str, list[str]] = field(default_factory=dict)  # category -> its tags, taxonomy order
    split_counts: dict[str, Counter] = field(default_factory=dict)  # split -> tag -> rows holding it
    clap_by_tag: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # tag -> (mean, std, clips)
    clap_mean: float | None = None  # mean over every scored clip of the release
    vae_history: list[dict] = field(default_factory=list)  # RUN/vae/history.json


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


def clap_by_tag(scores: dict[str, float], tags_of: dict[str, list[str]]) -> dict[str, tuple[float, float, int]]:
    """tag -> (mean, std, number of clips) of the per-clip CLAP scores of the release's clips holding the tag."""
    per_tag: dict[str, list[float]] = {}
    for clip_id, score in scores.items():
        for tag in set(tags_of.get(clip_id, ())):
            per_tag.setdefault(tag, []).append(float(score))
    return {tag: (float(np.mean(v)), float(np.std(v)), len(v)) for tag, v in sorted(per_tag.items())}


def cooccurrence(sets: list[list[str]], tags: list[str]) -> np.ndarray:
    """counts[i, j]: rows holding both tags[i] and tags[j]; the diagonal: rows holding tags[i]."""
    index = {t: i for i, t in enumerate(tags)}
    counts = np.zeros((len(tags), len(tags)), dtype=int)
    for row in sets:
        present = sorted({index[t] for t in row if t in index})
        for i in present:
            counts[i, i] += 1
        for i, j in combinations(present, 2):
            counts[i, j] += 1
            counts[j, i] += 1
    return counts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def fonts_read_once():
    """Draw PNG figures with each font file read once.

    Why: matplotlib's FT2Font reads glyphs from the font file through Python read() calls, again as each text
    is drawn: 280-340 MB of reads of the 0.76 MB DejaVuSans.ttf for one card's figures, more than the audio of a
    release of short clips (docs/performance.md, "Scale"). Inside this block fonts are opened from their bytes
    in memory. FT2Font cannot be subclassed, so font_manager's reference to the ft2font module is swapped for the
    block and its font cache cleared on the way in and out. Only for raster output: a font opened from bytes
    has no file name, which PDF and PS embedding read.
    """
    import io
    import types

    from matplotlib import font_manager, ft2font

    real, data = ft2font.FT2Font, {}

    def from_bytes(path, *args, **kwargs):
        if isinstance(path, (str, bytes, os.PathLike)):
            key = os.fsdecode(path)
            if key not in data:
                with open(key, "rb") as f:
                    data[key] = f.read()
            path = io.BytesIO(data[key])
        return real(path, *args, **kwargs)

    shim = types.SimpleNamespace(**{name: getattr(ft2font, name) for name in dir(ft2font) if not name.startswith("__")})
    shim.FT2Font = from_bytes
    font_manager._get_font.cache_clear()
    font_manager.ft2font = shim
    try:
        yield
    finally:
        font_manager.ft2font = ft2font
        font_manager._get_font.cache_clear()


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    _save(fig, path)


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
    _save(fig, path)


def plot_split_counts(path: Path, split_counts: dict[str, Counter], top: int = TOP_TAGS) -> None:
    """Stacked horizontal bars: rows holding each tag, per split, for the `top` tags with most rows."""
    plt = _pyplot()
    totals = Counter()
    for counts in split_counts.values():
        totals.update(counts)
    tags = [t for t, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
    y = np.arange(len(tags))
    fig, ax = plt.subplots(figsize=(7, 0.22 * len(tags) + 1.4))
    left = np.zeros(len(tags))
    for split, counts in split_counts.items():
        values = np.array([counts.get(t, 0) for t in tags], dtype=float)
        ax.barh(y, values, 0.8, left=left, label=split, color=SPLIT_COLOURS.get(split))
        left += values
    ax.set_yticks(y, tags, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("rows holding the tag (positives)")
    shown = f"the {len(tags)} tags with most rows" if len(totals) > len(tags) else f"all {len(tags)} tags in the release"
    ax.set_title(f"Positives per tag and split: {shown}")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def plot_cooccurrence(path: Path, category: str, tags: list[str], sets, top: int = HEATMAP_TAGS) -> None:
    """Heatmap over the most frequent tags of one category: % of the rows holding the row's tag that hold the column's."""
    plt = _pyplot()
    counts = cooccurrence(sets, tags)
    order = sorted(range(len(tags)), key=lambda i: (-counts[i, i], tags[i]))[:top]
    counts = counts[np.ix_(order, order)]
    names = [tags[i] for i in order]
    share = 100 * counts / np.maximum(np.diag(counts)[:, None], 1)
    np.fill_diagonal(share, np.nan)  # a tag with itself says nothing
    size = max(4.5, 0.32 * len(names) + 2.2)  # a category of two or three tags still gets a readable square
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(share, cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), [f"{n} ({counts[i, i]})" for i, n in enumerate(names)], fontsize=7)
    if len(names) <= 12:
        for i in range(len(names)):
            for j in range(len(names)):
                if i != j and counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="black" if share[i, j] > 60 else "white")  # readable on viridis' yellow end
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the row tag's samples")
    ax.set_title(f"{category.capitalize()}: tags sharing a sample")
    _save(fig, path)


def plot_clap_per_concept(path: Path, by_tag: dict[str, tuple[float, float, int]], overall: float | None,
                          top: int = TOP_TAGS) -> None:
    """Horizontal bars: mean CLAP score of the clips holding each tag, with its standard error (all tags, or the
    top and bottom halves of `top` when there are more)."""
    plt = _pyplot()
    ranked = sorted(by_tag, key=lambda t: (-by_tag[t][0], t))
    shown = ranked if len(ranked) <= top else ranked[: top // 2] + ranked[-(top // 2):]
    means = np.array([by_tag[t][0] for t in shown])
    errors = np.array([by_tag[t][1] / np.sqrt(by_tag[t][2]) for t in shown])
    y = np.arange(len(shown))
    fig, ax = plt.subplots(figsize=(7, 0.22 * len(shown) + 1.6))
    ax.barh(y, means, 0.8, xerr=errors, color="#4C72B0", error_kw={"elinewidth": 0.8})
    ax.set_yticks(y, [f"{t} (n={by_tag[t][2]})" for t in shown], fontsize=7)
    ax.invert_yaxis()
    if overall is not None:
        ax.axvline(overall, color="black", linestyle="--", linewidth=1, label=f"all clips: {overall:.3f}")
        ax.legend(fontsize=8, loc="lower right")
    low, high = float(np.min(means - errors)), float(np.max(means + errors))
    pad = max(0.02, 0.1 * (high - low))
    ax.set_xlim(low - pad, high + pad)  # CLAP cosines sit in a narrow band: start the axis near it
    ax.set_xlabel("mean CLAP score of the tag's clips (cosine, clip vs caption; bar: standard error)")
    which = "every tag" if len(shown) == len(ranked) else f"the {top // 2} highest and {top // 2} lowest of {len(ranked)} tags"
    ax.set_title(f"CLAP score per concept: {which}")
    _save(fig, path)


def plot_vae_history(path: Path, history: list[dict]) -> None:
    """The VAE's loss per epoch: training and validation (and any other numeric curve history.json holds)."""
    plt = _pyplot()
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    keys = [k for k in history[0] if k != "epoch" and all(isinstance(h.get(k), int | float) for h in history)]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for key in keys:
        ax.plot(epochs, [h[key] for h in history], label=key.replace("_", " "), marker="." if len(epochs) < 40 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Attribute VAE: loss per epoch")
    ax.legend(fontsize=8)
    _save(fig, path)


def write_figures(out_dir: str | Path, data: FigureData) -> list[dict]:
    """Draw every figure that `data` allows into out_dir; returns [{"file", "title", "about"}] for the card."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []

    def add(name, title, about, draw, *args):
        draw(out_dir / name, *args)
        figures.append({"file": name, "title": title, "about": about})

    versus = " vs MusicCaps" if data.source_sets else ""
    add("tag_frequency.png", f"Tag frequency{versus}", "Share of the samples holding each of the most frequent tags.",
        plot_tag_frequency, data.release_sets, data.source_sets)
    add("tags_per_sample.png", f"Tags per sample{versus}", "How many tags one sample carries.",
        plot_tags_per_sample, data.release_sets, data.source_sets)
    if any(data.split_counts.values()):
        add("split_counts.png", "Positives per tag and split",
            "How many rows hold each tag in train, validation and test: the size of each concept set.",
            plot_split_counts, data.split_counts)
    present = Counter(t for row in data.release_sets for t in set(row))
    for category, tags in data.categories.items():
        held = [t for t in tags if present[t]]
        if len(held) >= 2:
            add(f"cooccurrence_{category}.png", f"Co-occurrence of {category} tags",
                f"Of the samples holding the row's {category} tag (count in brackets), the share that also hold the "
                f"column's; numbers in cells are samples.", plot_cooccurrence, category, held, data.release_sets)
    if data.clap_by_tag:
        add("clap_per_concept.png", "CLAP score per concept",
            "Mean CLAP score (cosine between a clip and its caption) of the clips holding each tag: which concepts "
            "the audio model renders best by this measure.", plot_clap_per_concept, data.clap_by_tag, data.clap_mean)
    if data.vae_history:
        add("vae_loss.png", "Attribute VAE training", "Training and validation loss per epoch of the run's attribute VAE "
            "(RUN/vae/history.json).",
            plot_vae_history, data.vae_history)
    return figures
