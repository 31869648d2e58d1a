"""RUN/tcav/report.md and RUN/tcav/tcav.png from the results of `conceptcaps tcav` (scores.json).

    from conceptcaps_pipeline.tcav.report import write_report
    write_report(Path("runs/demo/tcav"), json.loads(Path("runs/demo/tcav/scores.json").read_text()))

The figure follows Figure 6 of the ConceptCaps paper: one panel per layer, targets along the
axis, one bar per concept (mean TCAV score over its CAVs, error bar one standard deviation),
the random concepts' mean as a dashed line per target, `*` over significant results and hatching
where the concept is not linearly separable at that layer (so not tested).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIGURE = "tcav.png"


def plot(path: Path, document: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    settings, results = document["settings"], document["results"]
    layers, concepts, targets = settings["layers"], settings["concepts"], settings["targets"]
    by_key = {(r["layer"], r["concept"], r["target"]): r for r in results}
    width = 0.8 / max(len(concepts), 1)
    width_in = max(5.0, 1.6 + 1.3 * len(targets) * max(1, len(concepts) / 3))
    fig, axes = plt.subplots(len(layers), 1, figsize=(width_in, 2.6 * len(layers) + 0.8), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, layer in zip(axes[:, 0], layers):
        x = np.arange(len(targets))
        for c, concept in enumerate(concepts):
            rows = [by_key[(layer, concept, t)] for t in targets]
            offset = x - 0.4 + width * (c + 0.5)
            bars = ax.bar(offset, [r["tcav_score"] for r in rows], width, yerr=[r["tcav_score_std"] for r in rows],
                          capsize=2, color=colours(c % 10), label=concept, error_kw={"linewidth": 0.8})
            for bar, r in zip(bars, rows):
                if not r["separable"]:
                    bar.set_hatch("///")
                    bar.set_alpha(0.35)
                elif r["significant"]:
                    ax.text(bar.get_x() + bar.get_width() / 2, min(1.02, r["tcav_score"] + r["tcav_score_std"] + 0.02),
                            "*", ha="center", va="bottom", fontsize=11)
        for t, target in enumerate(targets):
            random_mean = by_key[(layer, concepts[0], target)]["random_score"]
            ax.hlines(random_mean, t - 0.42, t + 0.42, colors="grey", linestyles="dashed", linewidth=1)
        ax.set_xticks(x, targets)
        ax.set_ylim(0, 1.12)
        ax.set_ylabel("TCAV score")
        ax.set_title(f"layer {layer}", fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=min(len(concepts), 4), loc="upper right")
    fig.suptitle("TCAV score per concept and target\ndashed: random concepts' mean; *: significant after correction; "
                 "hatched: not separable", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and value != 0 and abs(value) < 10 ** -digits:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def markdown(document: dict) -> str:
    """The report: what was run, one table row per (concept, target, layer), and how to read it."""
    s, results = document["settings"], document["results"]
    lines = [
        "# TCAV report",
        "",
        (f"Model `{s['model']}`; layers {', '.join(f'`{x}`' for x in s['layers'])}; concepts from split "
        f"`{s['concept_split']}` ({document['clips']['concept_split']} clips), target inputs from split "
        f"`{s['input_split']}` ({document['clips']['input_split']} clips, up to {s['n_inputs']} per target, "
        f"chosen by `{s['inputs']}`)."),
        "",
        f"Each concept: {s['n_cavs']} CAVs, each trained on a fresh subset of {s['n']} clips holding it against a "
        f"fresh random set of {s['n']} clips without it. The null: {s['n_random']} random concepts per concept "
        f"(random pools as large as its positives), each with {s['n_cavs']} CAVs drawn the same way. "
        + ("Test: the concept's mean TCAV score against the random concepts' means (two-sided prediction-interval "
           "t-test), " if s["test"] == "pooled" else
           f"Test: two-sided {'Welch t-test' if s['test'] == 'ttest' else 'Mann-Whitney U test'} of the concept's CAV "
           f"scores against the random concepts' CAV scores (the TCAV paper's test; anti-conservative with few "
           f"positives), ")
        + f"{s['correction']} correction over all {document['tests']} (concept, target, layer) tests, level "
        f"{s['alpha']}. A concept whose CAVs reach a mean held-out accuracy below {s['min_cav_accuracy']} at a layer "
        f"is not separable there and is not tested for significance.",
        "",
        f"**{document['significant']} of {document['tests']} results are significant.**",
        "",
        "| layer | concept | target | TCAV score | random concepts | effect size | p | p adjusted | CAV accuracy | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| `{r['layer']}` | {r['concept']} | {r['target']} | {_number(r['tcav_score'])} ± "
            f"{_number(r['tcav_score_std'], 2)} | {_number(r['random_score'])} ± {_number(r['random_score_std'], 2)} | "
            f"{_number(r['effect_size'], 2)} | {_number(r['p_value'])} | {_number(r['p_adjusted'])} | "
            f"{_number(r['cav_accuracy'], 2)} | {'**' + r['verdict'] + '**' if r['significant'] else r['verdict']} |"
        )
    lines += [
        "",
        f"![TCAV scores]({FIGURE})",
        "",
        ("How to read it: a TCAV score is the share of the target's inputs whose target logit rises when the "
        "activation moves along the concept's direction. A single score means little: only a difference from the "
        "random concepts, surviving the correction, says the model's decision for the target is sensitive to the "
        "concept (above random: the concept pushes towards the target; below random: away from it). The effect "
        "size is the concept's distance from the random concepts' mean score in units of their spread. Every "
        "score, p-value and CAV accuracy is in scores.json."),
        "",
    ]
    return "\n".join(lines)


def write_report(out: Path, document: dict) -> str:
    """Write report.md and the figure into `out`; returns the figure's file name."""
    from conceptcaps_pipeline.run_dir import atomic_path

    with atomic_path(out / FIGURE) as tmp:
        plot(tmp, document)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown(document), encoding="utf-8")
    return FIGURE
