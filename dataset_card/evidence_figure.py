"""The dataset card's evidence figure: per concept, how well CLAP tells its labelled clips from the rest.

    from conceptcaps_pipeline.dataset_card.evidence_figure import plot_agreement, figure_entry
    from conceptcaps_pipeline.release.evidence import read_agreement
    plot_agreement(read_agreement("runs/demo"), "runs/demo/release/figures/evidence_auc.png")
    figure_entry()   # {"file", "title", "about"} for the card's figure list

One panel per category; in each, the concepts with an AUC sorted by it, a dot at the AUC and a
line over its bootstrap interval, and a dashed line at 0.5 (the model cannot tell labelled clips
from the others). Drawn with matplotlib's Agg backend (files only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FILE = "evidence_auc.png"
MAX_PER_PANEL = 50  # a category's tags (the taxonomy allows at most 50)


def figure_entry(name: str = FILE) -> dict:
    """The card's entry for the figure (relative file name, title, one-line reading)."""
    return {"file": name, "title": "Label-audio agreement per concept (CLAP)",
            "about": "ROC-AUC of each tag's CLAP similarity, clips labelled with it vs the rest (line: 95% bootstrap "
                     "interval); 0.5 means CLAP cannot tell them apart. A model's opinion, not ground truth: CLAP hears "
                     "instruments and genres better than moods and tempo (docs/evidence.md)."}


def plot_agreement(agreement: dict, path: str | Path) -> Path | None:
    """Draw the per-concept AUC figure of `agreement` (agreement.json) into `path`; None when no concept has an AUC."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    by_category: dict[str, list[tuple[str, dict]]] = {}
    for tag, entry in agreement.get("concepts", {}).items():
        if entry.get("auc") is not None:
            by_category.setdefault(entry["category"], []).append((tag, entry))
    if not by_category:
        return None
    panels = [(c, sorted(rows, key=lambda r: (r[1]["auc"], r[0]))[-MAX_PER_PANEL:]) for c, rows in by_category.items()]
    heights = [max(len(rows), 2) * 0.2 + 0.9 for _, rows in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (category, rows) in zip(axes[:, 0], panels):
        y = np.arange(len(rows))
        aucs = np.array([r[1]["auc"] for r in rows])
        low = np.array([(r[1].get("auc_interval") or [r[1]["auc"]] * 2)[0] for r in rows])
        high = np.array([(r[1].get("auc_interval") or [r[1]["auc"]] * 2)[1] for r in rows])
        ax.hlines(y, low, high, color="#4C72B0", linewidth=1.2)
        ax.plot(aucs, y, "o", color="#4C72B0", markersize=3.5)
        ax.axvline(0.5, color="black", linestyle="--", linewidth=0.8)
        ax.set_yticks(y, [f"{tag} (n={entry['positives']})" for tag, entry in rows], fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_title(f"{category}: {len(rows)} concept(s), median AUC {np.median(aucs):.2f}", fontsize=9)
    axes[-1, 0].set_xlabel("ROC-AUC of the tag's CLAP similarity, labelled clips vs the rest (line: bootstrap interval)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_evidence_figure(run: str | Path, folder: str | Path, figures: list[dict]) -> None:
    """Draw the figure into the card's figure `folder` and add its entry to `figures` when the run was scored
    (`conceptcaps audio score` wrote RUN/audio_evidence/agreement.json); otherwise do nothing."""
    from conceptcaps_pipeline.release.evidence import FOLDER, read_agreement

    if (Path(run) / FOLDER / "agreement.json").is_file() and plot_agreement(read_agreement(run), Path(folder) / FILE):
        figures.append(figure_entry())
