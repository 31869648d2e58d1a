"""RUN/eval/report.md and its figures: the metrics table beside the paper's, notes, models, skipped metrics.

    from conceptcaps_pipeline.evaluate.report import metrics_table, write_report
    print(metrics_table(json.loads(Path("runs/demo/eval/metrics.json").read_text())))

The figures themselves are drawn by figures.py; `draw_figures` gathers their data from the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from conceptcaps_pipeline.evaluate.metrics import BASELINES, PAPER, first_genre, latent_means, read_rows
from conceptcaps_pipeline.models import run_relative, tiny_models

if TYPE_CHECKING:  # annotations only: run.py imports this module
    from conceptcaps_pipeline.evaluate.run import EvaluateArguments


def fmt(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def metrics_table(metrics: dict) -> str:
    """The rows of a metrics.json as a markdown table, ours beside the paper's."""
    lines = ["| stage | metric | ConceptCaps (this run) | paper | better |", "| --- | --- | --- | --- | --- |"]
    for r in metrics.get("rows", []):
        arrow = {"higher": "higher ↑", "lower": "lower ↓"}.get(r.get("better"), r.get("better") or "")
        lines.append(f"| {r['stage']} | {r['metric']} | {fmt(r.get('value'))} | {fmt(r.get('paper'))} | {arrow} |")
    return "\n".join(lines)


# -- figures -----------------------------------------------------------------------
def draw_figures(run: Path, out: Path, args: EvaluateArguments, details: dict) -> tuple[dict, dict]:
    """({name: relative path}, {name: reason not drawn}) of the PNGs written under out/figures/."""
    from conceptcaps_pipeline.evaluate import figures

    drawn, missing = {}, {}
    folder = out / "figures"
    distilled = read_rows(run / "distilled.parquet", ["aspect_list", "genre"])
    reference_sets = [r["aspect_list"] for r in distilled]
    clap = details.get("audio", {}).get("clap")
    if clap:
        drawn["CLAP score histogram"] = figures.clap_histogram(
            list(clap["clap_scores"].values()), folder / "clap_scores.png", paper_mean=PAPER["clap_score"])
    else:
        missing["CLAP score histogram"] = "no CLAP scores"
    names = [BASELINES[args.baseline].get(k) for k in ("captions", "attributes")] if args.baseline else \
        ["captions.parquet", "attributes.parquet"]
    source = next((n for n in names if n and (run / n).exists()), None)
    if source:
        run_sets = [r["aspect_list"] for r in read_rows(run / source, ["aspect_list"])]
        labels = (f"this run ({source})", "MusicCaps (distilled)")
        drawn["Tag frequency vs MusicCaps"] = figures.tag_frequency(
            run_sets, reference_sets, folder / "tag_frequency.png", top=args.top_tags, labels=labels)
        drawn["Tags per sample"] = figures.tags_per_sample(run_sets, reference_sets, folder / "tags_per_sample.png",
                                                           labels=labels)
    else:
        missing["Tag frequency vs MusicCaps"] = missing["Tags per sample"] = \
            "no RUN/captions.parquet or RUN/attributes.parquet"
    latent = "VAE latent space (PCA of posterior means)"
    if not (run / "vae" / "model.safetensors").exists():
        missing[latent] = "no RUN/vae/model.safetensors"
    else:
        try:
            means = latent_means(run, reference_sets)
        except KeyError as err:  # the VAE was trained on another taxonomy than distilled.parquet uses
            missing[latent] = f"tag {err} of distilled.parquet is not in the VAE's vocabulary: retrain the VAE"
        else:
            drawn[latent] = figures.latent_space(
                figures.pca_2d(means), [first_genre(r) for r in distilled], folder / "vae_latent_pca.png",
                title="VAE posterior means of the distilled sets (PCA), by first genre")
    return {k: str(Path(p).relative_to(out)) for k, p in drawn.items()}, missing


REPORT_NOTES = (
    "The paper column is Table 1 of Sienkiewicz et al. (arXiv 2601.14157). The paper's VAE Jaccard thresholds the "
    "decoder's probabilities at 0.5 and pools intersections and unions over all sets: its row is computed that way; "
    "the decoding-rule row (the pipeline's rule, mean Jaccard per set) has no paper value. BLEU is sacreBLEU's 0-100 corpus score "
    "divided by 100, the paper's 0-1 scale. The CLAP score is the raw cosine (not 100 x cos). Hamming loss is per "
    "tag over this run's vocabulary, so it depends on its size. FAD depends on the reference set and on the number "
    "of clips; compare it only between sets of similar sizes. FAD∞ is FAD extrapolated to infinitely many clips "
    "(the intercept of FAD = a + b / n over random subsets of the run's clips, as fadtk computes it): it is "
    "comparable across sample sizes, against the same reference set and CLAP model."
)
CAPTION_NOTE = (
    "Caption quality: {usable_captions} usable captions of {validation_sets} validation attribute sets, written by "
    "the run's captioner and compared with the MusicCaps experts' captions of the same clips "
    "(`validation_captions.parquet`); outputs the captions stage would refuse are not scored."
)


FAD_NOTE = (
    "FAD∞: the line FAD = {fad_inf:.4g} + {fad_inf_slope:.4g} / n (r² {fad_inf_r2:.3f}) fitted to the FADs of "
    "{points} random subsets of {smallest} to {n_predictions} of the run's clips against the {n_references} "
    "reference clips ({reference}); `details.audio.fad.fad_inf_curve` in metrics.json holds the points."
)


def write_report(path: Path, run: Path, metrics: dict) -> None:
    details = metrics["details"]
    lines = [f"# ConceptCaps evaluation of `{run.name}`", "",
             f"Run directory `{run}`, evaluated {details['finished_at']}.", "",
             metrics_table(metrics), "", REPORT_NOTES, ""]
    if details.get("baseline"):
        made = details["baseline"].get("captions") or details["baseline"].get("attributes")
        lines[2:2] = [(f"**Baseline `{details['baseline']['name']}`**: `{made}`, made by "
                      f"`{details['baseline']['made_by']}`; compare with `eval/report.md` of the same run."), ""]
    if details.get("caption_quality"):
        lines += [CAPTION_NOTE.format(**details["caption_quality"]), ""]
    fad = details.get("audio", {}).get("fad", {})
    if fad.get("fad_inf") is not None:
        curve = fad["fad_inf_curve"]
        lines += [FAD_NOTE.format(**fad, points=len(curve), smallest=curve[0][0]), ""]
    tiny = sorted(set(tiny_models(run, list(details["models"].values()))))
    if tiny:
        warning = (f"**These models are tiny random-weight models built from configs ({', '.join(tiny)}): "
                   "the captions and audio are noise and these figures say nothing about the method.**")
        lines += [warning, ""]
    lines += ["## Models", ""] + [f"- {k}: `{run_relative(v, run)}`" for k, v in details["models"].items()] + [""]
    lines += ["## Figures", ""]
    for title, relative in details["figures"].items():
        lines += [f"### {title}", "", f"![{title}]({relative})", ""]
    not_drawn = [f"- {title}: not drawn ({reason})" for title, reason in details.get("figures_not_drawn", {}).items()]
    lines += not_drawn + ([""] if not_drawn else []) + ["## Skipped", ""]
    lines += [f"- {name}: {reason}" for name, reason in metrics["skipped"].items()] or ["Nothing was skipped."]
    path.write_text("\n".join(lines).rstrip() + "\n")
