"""The ConceptCaps `evaluate` metric modules, installed with the package as `conceptcaps_eval`.

Each metric is a folder `<name>/<name>.py` + README.md (+ app.py and requirements.txt for a
Space), loadable by path from a checkout or from an installed copy:

    import evaluate
    evaluate.load("eval/fad")                                    # from the repository root

    from conceptcaps_eval import load_metric, metric_path
    fad = load_metric("fad")                                     # from anywhere, after `pip install conceptcaps`
    evaluate.load(metric_path("clap_score"))
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
METRICS = ("attribute_coverage", "caption_quality", "clap_score", "fad", "vae_metrics")


def metric_path(name: str) -> str:
    """The folder of metric `name` (what `evaluate.load` takes)."""
    if name not in METRICS:
        raise ValueError(f"unknown ConceptCaps metric {name!r}: choose one of {', '.join(METRICS)}.")
    return str(METRICS_DIR / name)


def load_metric(name: str, **kwargs):
    """`evaluate.load` of a ConceptCaps metric by name, wherever the package is installed."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
