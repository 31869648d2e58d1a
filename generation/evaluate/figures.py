"""The figures of `conceptcaps evaluate`, drawn with matplotlib (Agg backend, no display needed).

    from conceptcaps_pipeline.evaluate.figures import clap_histogram, tag_frequency, tags_per_sample, latent_space
    clap_histogram([0.41, 0.52, 0.47], "runs/demo/eval/figures/clap_scores.png", paper_mean=0.4745)

Each function takes plain Python/numpy data (scores, tag lists, 2-D points), writes one PNG
and returns its path; `conceptcaps evaluate` (generation/evaluate/run.py) gathers the data
from the run directory and calls them. `pca_2d` projects rows onto their first two
principal components with numpy's SVD.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

OURS, THEIRS = "#1f77b4", "#ff7f0e"  # matplotlib's first two default colours, fixed for every figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # why: evaluation runs on headless machines; never open a window
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def clap_histogram(scores, path: str | Path, paper_mean: float | None = None, bins: int = 30) -> Path:
    """Histogram of per-clip CLAP cosines, with our mean and the paper's mean as vertical lines."""
    plt = _pyplot()
    scores = np.asarray(scores, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(scores, bins=bins, color=OURS, alpha=0.8, label=f"this run (n={len(scores)})")
    ax.axvline(scores.mean(), color=OURS, linestyle="--", label=f"mean {scores.mean():.3f}")
    if paper_mean is not None:
        ax.axvline(paper_mean, color=THEIRS, linestyle=":", linewidth=2, label=f"paper mean {paper_mean:.4f}")
    ax.yaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("CLAP cosine (caption, clip)")
    ax.set_ylabel("clips")
    ax.set_title("CLAP text-audio similarity")
    ax.legend(fontsize=8)
    return _save(fig, path)


def tag_shares(sets: list[list[str]]) -> dict[str, float]:
    """Share of samples whose tag set contains each tag (a tag counts once per sample)."""
    counts = Counter(tag for tags in sets for tag in set(tags))
    return {tag: count / max(len(sets), 1) for tag, count in counts.items()}


def tag_frequency(
    run_sets: list[list[str]], reference_sets: list[list[str]], path: str | Path, top: int = 25,
    labels: tuple[str, str] = ("this run", "MusicCaps (distilled)"),
) -> Path:
    """Horizontal bars: share of samples per tag in the run vs the reference, for the `top` tags
    with the largest share in either set."""
    plt = _pyplot()
    ours, theirs = tag_shares(run_sets), tag_shares(reference_sets)
    tags = sorted(set(ours) | set(theirs), key=lambda t: (-max(ours.get(t, 0), theirs.get(t, 0)), t))[:top]
    tags = tags[::-1]  # largest at the top of a horizontal bar chart
    y = np.arange(len(tags))
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(tags) + 1.4))
    ax.barh(y + 0.2, [ours.get(t, 0) for t in tags], height=0.4, color=OURS, label=f"{labels[0]} (n={len(run_sets)})")
    ax.barh(y - 0.2, [theirs.get(t, 0) for t in tags], height=0.4, color=THEIRS,
            label=f"{labels[1]} (n={len(reference_sets)})")
    ax.set_yticks(y, tags, fontsize=8)
    ax.set_xlabel("share of samples with the tag")
    ax.set_title(f"Tag frequency, top {len(tags)} tags")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def tags_per_sample(
    run_sets: list[list[str]], reference_sets: list[list[str]], path: str | Path,
    labels: tuple[str, str] = ("this run", "MusicCaps (distilled)"),
) -> Path:
    """Side-by-side histogram of the number of tags per sample, as shares of each set."""
    plt = _pyplot()
    ours = np.array([len(set(s)) for s in run_sets])
    theirs = np.array([len(set(s)) for s in reference_sets])
    top = int(max(ours.max(initial=0), theirs.max(initial=0)))
    sizes = np.arange(0, top + 1)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for values, offset, colour, label in ((ours, 0.2, OURS, labels[0]), (theirs, -0.2, THEIRS, labels[1])):
        shares = np.array([(values == k).mean() if len(values) else 0.0 for k in sizes])
        ax.bar(sizes + offset, shares, width=0.4, color=colour,
               label=f"{label} (n={len(values)}, mean {values.mean() if len(values) else 0:.2f})")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("tags per sample")
    ax.set_ylabel("share of samples")
    ax.set_title("Tags per sample")
    ax.legend(fontsize=8)
    return _save(fig, path)


def pca_2d(x) -> np.ndarray:
    """(n, 2) coordinates of the rows of x on their first two principal components (numpy SVD)."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    if coords.shape[1] < 2:  # a 1-D latent space: pad so the scatter still has two axes
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords


def latent_space(points, groups: list[str], path: str | Path, top: int = 8, title: str = "VAE latent space") -> Path:
    """Scatter of 2-D points coloured by group; the `top` most frequent groups get a colour each,
    the rest are grey 'other'."""
    plt = _pyplot()
    points = np.asarray(points, dtype=np.float64)
    frequent = [g for g, _ in Counter(groups).most_common() if g != "other"][:top]
    labels = np.array([g if g in frequent else "other" for g in groups])
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(6.4, 5))
    if (labels == "other").any():
        mask = labels == "other"
        ax.scatter(points[mask, 0], points[mask, 1], s=6, c="lightgrey", label=f"other ({mask.sum()})")
    for i, group in enumerate(frequent):
        mask = labels == group
        ax.scatter(points[mask, 0], points[mask, 1], s=8, color=colours(i % 10), label=f"{group} ({mask.sum()})")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    ax.legend(fontsize=7, markerscale=2, loc="best")
    return _save(fig, path)
