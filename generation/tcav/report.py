"""RUN/tcav/report.md and RUN/tcav/tcav.png from the results of `conceptcaps tcav` (scores.json).

    from conceptcaps_pipeline.tcav.report import write_report
    write_report(Path("runs/demo/tcav"), json.loads(Path("runs/demo/tcav/scores.json").read_text()))

The figure follows Figure 6 of the ConceptCaps paper, drawn so that it reads right: one panel
per layer, targets along the axis, one bar per concept (its mean TCAV score), and behind each
bar the distribution of its own random concepts' mean scores (a violin: the null that bar is
tested against). The whiskers are the 2.5-97.5% range of the concept's CAV scores (inside
[0, 1] by construction); `*` marks a result significant after the correction, at a fixed
height above the panel so that it never floats over an empty bar; hatching marks a concept
that is not separable at that layer. The legend sits below the panels, clear of the data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIGURE = "tcav.png"


def output_name(settings: dict) -> str:
    return "log-probability" if settings.get("output", "log_softmax") == "log_softmax" else "logit"


def plot(path: Path, document: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    settings, results = document["settings"], document["results"]
    layers, concepts, targets = settings["layers"], settings["concepts"], settings["targets"]
    by_key = {(r["layer"], r["concept"], r["target"]): r for r in results}
    width = 0.8 / max(len(concepts), 1)
    width_in = max(6.0, 1.6 + 1.3 * len(targets) * max(1, len(concepts) / 3))
    fig, axes = plt.subplots(len(layers), 1, figsize=(width_in, 2.7 * len(layers) + 1.4), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, layer in zip(axes[:, 0], layers):
        x = np.arange(len(targets))
        for c, concept in enumerate(concepts):
            rows = [by_key[(layer, concept, t)] for t in targets]
            offset = x - 0.4 + width * (c + 0.5)
            nulls = [r["random_concept_means"] for r in rows]
            violins = ax.violinplot(nulls, positions=offset, widths=width * 0.95, showextrema=False)
            for body in violins["bodies"]:
                body.set_facecolor("0.75")
                body.set_edgecolor("0.55")
                body.set_alpha(0.6)
                body.set_zorder(1)
            heights = [r["tcav_score"] for r in rows]
            low = [max(0.0, h - float(np.quantile(r["scores"], 0.025))) for h, r in zip(heights, rows)]
            high = [max(0.0, float(np.quantile(r["scores"], 0.975)) - h) for h, r in zip(heights, rows)]
            bars = ax.bar(offset, heights, width * 0.55, yerr=[low, high], capsize=2, color=colours(c % 10),
                          label=concept, error_kw={"linewidth": 0.8}, zorder=2)
            for bar, r in zip(bars, rows):
                if not r["separable"]:
                    bar.set_hatch("///")
                    bar.set_alpha(0.35)
                elif r["significant"]:
                    ax.text(bar.get_x() + bar.get_width() / 2, 1.02, "*", ha="center", va="bottom", fontsize=11)
                elif "underpowered" in r["verdict"]:  # could not have passed: not the same as no evidence
                    ax.text(bar.get_x() + bar.get_width() / 2, 1.02, "u", ha="center", va="bottom", fontsize=7,
                            color="0.4")
        ax.set_xticks(x, targets)
        ax.set_xlim(-0.5, len(targets) - 0.5)
        ax.set_ylim(0, 1.12)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_ylabel("TCAV score")
        ax.set_title(f"layer {layer}", fontsize=9)
    handles = [Patch(color=colours(c % 10), label=concept) for c, concept in enumerate(concepts)]
    handles.append(Patch(facecolor="0.75", edgecolor="0.55", label="its random concepts' mean scores"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=7, frameon=False)
    family = document.get("family", {})
    fig.suptitle(
        f"TCAV score: share of a target's inputs whose {output_name(settings)} rises along the concept\n"
        f"bar: mean over {settings['n_cavs']} CAVs; whiskers: their 2.5-97.5% range; grey violin: its "
        f"{settings['n_random']} random concepts' means\n*: significant after "
        f"{family.get('correction', settings.get('correction'))} at {family.get('alpha', settings.get('alpha'))} "
        f"(thresholds in report.md); u: underpowered; hatched: not separable", fontsize=7)
    fig.tight_layout(rect=(0, 0.07 + 0.02 * (len(handles) > 4), 1, 1))
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
    clips = document.get("clips", {})
    family = document.get("family", {"tests": document["tests"], "correction": s["correction"], "alpha": s["alpha"]})
    where = (f"concepts from split `{s['concept_split']}` ({clips.get('concept_split')} clips), target inputs from "
             f"split `{s['input_split']}` ({clips.get('input_split')} clips, up to {s['n_inputs']} per target, chosen "
             f"by `{s['inputs']}`)" if "concept_split" in s else f"{clips.get('pool')} clips in the concept pool")
    test = {
        "empirical": "the concept's mean TCAV score ranked among its random concepts' means (two-sided; exact under "
                     "the null hypothesis that the concept is one more random pool; smallest possible p = "
                     "1 / (random concepts + 1))",
        "pooled": "the concept's mean TCAV score against the random concepts' means (two-sided prediction-interval "
                  "t-test)",
    }.get(s["test"], f"two-sided {'Welch t-test' if s['test'] == 'ttest' else 'Mann-Whitney U test'} of the "
                     f"concept's CAV scores against the random concepts' CAV scores (the TCAV paper's test; "
                     f"anti-conservative with few positives)")
    primary = family.get("primary", "all")
    dims = s.get("pool_dims") or {}
    layer_text = ", ".join(f"`{x}` (axes {dims.get(x)})" for x in s["layers"])
    lines = [
        "# TCAV report",
        "",
        (f"Model `{s['model']}`; layers {layer_text} (the time axis averaged); {where}; clips cut or padded to "
         f"{s.get('max_duration')} s."),
        "",
        f"Each concept: {s['n_cavs']} CAVs, each trained on a fresh subset of {s['n']} clips holding it against a "
        f"fresh random set of {s['n']} clips without it. The null: {s['n_random']} random concepts per concept "
        f"(random pools as large as its positives), each with {s['n_cavs']} CAVs drawn the same way. Test: {test}. "
        f"Correction: {family['correction']} over "
        + (f"all {family['tests']} (concept, target, layer) tests" if primary == "all" else
           f"the {family['tests']} declared primary tests ({', '.join(primary)}); the others are exploratory, "
           f"corrected among themselves")
        + f", level {family['alpha']}. A concept is separable at a layer when its CAVs' mean held-out accuracy "
        f"reaches {s['min_cav_accuracy']} and beats the 95th percentile of its random concepts' (at small --n a "
        f"single CAV's held-out accuracy takes few values, so a fixed bar alone means little); a concept that is "
        f"not separable is not tested.",
        "",
        (f"**{document['significant']} of {document['tests']} results are significant.**" if primary == "all" else
         f"**{sum(r['significant'] for r in results if r.get('family') == 'primary')} of {family['tests']} primary "
         f"results are significant** ({sum(r['significant'] for r in results if r.get('family') != 'primary')} of "
         f"{document['tests'] - family['tests']} exploratory ones)."),
        "",
    ]
    evidence = document.get("evidence")
    if evidence:  # tcav --min_evidence: how many positives remained
        lines += [f"Positives drawn only from clips with evidence >= {evidence['min_evidence']:g} ({evidence['source']}): "
                  + "; ".join(f"{c}: {e['kept']} of {e['positives']}" for c, e in evidence["concepts"].items()) + ".", ""]
    shared = document.get("shared_inputs") or {}
    if shared:
        lines += ["Targets share input clips (their results are not independent): "
                  + "; ".join(f"{pair}: {n} clips" for pair, n in shared.items()) + ".", ""]
    lines += [
        ("| layer | concept | target | TCAV score | random concepts | effect size | p | smallest reachable p | "
         "threshold | p adjusted | CAV accuracy (gate) | verdict |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| `{r['layer']}` | {r['concept']} | {r['target']} | {_number(r['tcav_score'])} ± "
            f"{_number(r['tcav_score_std'], 2)} | {_number(r['random_score'])} ± {_number(r['random_score_std'], 2)} | "
            f"{_number(r['effect_size'], 2)} | {_number(r['p_value'])} | {_number(r['p_min'])} | "
            f"{_number(r['p_threshold'])} | {_number(r['p_adjusted'])} | {_number(r['cav_accuracy'], 2)} "
            f"({_number(r['cav_accuracy_gate'], 2)}) | {'**' + r['verdict'] + '**' if r['significant'] else r['verdict']} |"
        )
    lines += [
        "",
        f"![TCAV scores]({FIGURE})",
        "",
        (f"How to read it: a TCAV score is the share of the target's inputs whose {output_name(s)} rises when the "
         f"activation moves along the concept's direction. A single score means little: only a difference from the "
         f"random concepts, surviving the correction, says the model's output for the target is sensitive to the "
         f"concept (above random: the concept pushes towards the target; below random: away from it). "
         f"\"a ± b\": mean ± standard deviation, over the concept's CAVs for its score and over the random concepts "
         f"for theirs. The effect size is the concept's distance from the random concepts' mean score in units of "
         f"their spread. *Threshold* is the largest p-value that test could have had and still passed the "
         f"correction (the others unchanged); *smallest reachable p* is the best its design allows. A verdict of "
         f"*underpowered* means even a perfect concept could not have passed: it is not evidence of absence, and "
         f"the verdict names the rerun that fixes it. *No evidence* means the test could have found an effect and "
         f"did not. Every score, p-value and CAV accuracy is in scores.json."),
        "",
    ]
    return "\n".join(lines)


def write_report(out: Path, document: dict) -> str:
    """Write report.md and the figure into `out`; returns the figure's file name."""
    from conceptcaps_pipeline.run_dir import atomic_path

    Path(out).mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(out) / FIGURE) as tmp:
        plot(tmp, document)
    with atomic_path(Path(out) / "report.md") as tmp:
        tmp.write_text(markdown(document), encoding="utf-8")
    return FIGURE
