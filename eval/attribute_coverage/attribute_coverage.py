"""Attribute coverage of captions: does each caption mention the attributes it was asked
for, and which other taxonomy tags does it mention?

    import evaluate
    coverage = evaluate.load("eval/attribute_coverage")
    coverage.compute(predictions=["A slow jazz tune on piano."], references=[["jazz", "piano", "slow tempo"]])

The stage `conceptcaps captions generate` imports `caption_coverage` from this file, so the
numbers in RUN/captions.parquet and in this metric come from one implementation. The module
needs only `evaluate` (tag matching is in tag_mentions.py beside it, the recording-quality
patterns in recording_quality.py, both standard library only);
its default taxonomy is the one of an installed ConceptCaps, and any other is a
`taxonomy=` argument (a release's taxonomy.json, a YAML, or a dict).
"""

import datasets
import evaluate

from .recording_quality import mentions_recording_quality
from .tag_mentions import TagMentions

_CITATION = """\
@article{sienkiewicz2026conceptcaps,
  title={ConceptCaps -- a Distilled Concept Dataset for Interpretability in Music Models},
  author={Sienkiewicz, Bruno and Neumann, {\\L}ukasz and Modrzejewski, Mateusz},
  journal={arXiv preprint arXiv:2601.14157},
  year={2026}
}
"""

_DESCRIPTION = """\
Checks captions against the attribute lists they were written from, using a ConceptCaps
taxonomy (canonical tags with aliases): a caption mentions a tag when the tag, one of its
aliases, or their plural occurs in it on word boundaries ("grand piano" mentions `piano`,
"slow" mentions `slow tempo`).

- `coverage`: mean over captions of the fraction of requested attributes the caption
  mentions (1.0 for a caption asked for no attribute). Higher is better.
- `full_coverage_rate`: share of captions that mention every requested attribute.
- `coverage_<category>`: the same fraction restricted to genre, mood, instrument or tempo
  attributes (mean over captions that requested at least one of that category; None if
  no caption did).
- `unrequested_per_caption`: mean number of taxonomy tags a caption mentions that were not
  requested (hallucinated or filler concepts). Lower is better.
- `unrequested_rate`: share of captions that mention at least one unrequested tag.
- `recording_quality_rate`: share of captions that remark on the recording rather than the
  music ("low quality", "amateur recording", "noisy", "in mono", "poor audio", ...;
  the patterns of recording_quality.py). ConceptCaps captions should make none. Lower is better.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): captions.
    references (`list` of `list` of `str`): the canonical taxonomy tags each caption was
        asked to describe, aligned with predictions.
    taxonomy (`str` or `dict`, optional): the taxonomy: a taxonomy.json (every ConceptCaps
        release and run has one), a YAML like the repository's generation/data/taxonomy.yaml
        (the default, where ConceptCaps is installed), or a dict {category: {tag: [aliases]}}.
Returns:
    coverage (`float`), full_coverage_rate (`float`), coverage_genre, coverage_mood,
    coverage_instrument, coverage_tempo (`float`, or None when no caption requested that
    category), unrequested_per_caption (`float`),
    unrequested_rate (`float`), recording_quality_rate (`float`).
Examples:
    >>> import evaluate
    >>> metric = evaluate.load("eval/attribute_coverage")
    >>> result = metric.compute(
    ...     predictions=["A slow jazz tune led by a grand piano.", "An energetic rock song with drums."],
    ...     references=[["jazz", "piano", "slow tempo"], ["rock", "electric guitar"]])
    >>> print(result["coverage"], result["full_coverage_rate"], result["unrequested_per_caption"])
    0.75 0.5 1.0
    >>> result = metric.compute(
    ...     predictions=["A low quality recording of a jazz tune on piano.", "A slow jazz tune on piano."],
    ...     references=[["jazz", "piano"], ["jazz", "piano"]])
    >>> print(result["recording_quality_rate"])
    0.5
"""

CATEGORIES = ("genre", "mood", "instrument", "tempo")


def load_taxonomy(taxonomy=None):
    """A tag matcher (`find(text)`, `category_of`): as given, or from a path, a dict or the default."""
    if hasattr(taxonomy, "find") and hasattr(taxonomy, "category_of"):
        return taxonomy
    if hasattr(taxonomy, "mentions"):  # a conceptcaps_pipeline.taxonomy.Taxonomy
        return taxonomy.mentions
    return TagMentions.from_file(taxonomy)


def caption_coverage(caption, attributes, taxonomy):
    """(coverage, missing, unrequested) of one caption against its requested attributes.

    `taxonomy` is anything `load_taxonomy` takes (load it once for many captions). `coverage` is the fraction of
    `attributes` mentioned (1.0 when `attributes` is empty); `missing` lists the requested
    tags not mentioned, `unrequested` the mentioned tags that were not requested, both in order.
    """
    mentioned = load_taxonomy(taxonomy).find(caption or "")
    requested = list(dict.fromkeys(attributes))
    missing = [tag for tag in requested if tag not in mentioned]
    unrequested = [tag for tag in mentioned if tag not in requested]
    coverage = 1.0 if not requested else (len(requested) - len(missing)) / len(requested)
    return coverage, missing, unrequested


def summarize(predictions, references, taxonomy=None):
    """The flat dict of `_compute` (see _DESCRIPTION) for captions and their attribute lists."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: they must align.")
    taxonomy = load_taxonomy(taxonomy)
    coverages, unrequested_counts, remarks = [], [], 0
    per_category = {category: [] for category in CATEGORIES}
    for caption, attributes in zip(predictions, references):
        coverage, missing, unrequested = caption_coverage(caption, attributes, taxonomy)
        coverages.append(coverage)
        unrequested_counts.append(len(unrequested))
        remarks += mentions_recording_quality(caption or "")
        for category in CATEGORIES:
            asked = [t for t in attributes if taxonomy.category_of.get(t) == category]
            if asked:
                per_category[category].append(sum(t not in missing for t in asked) / len(asked))
    n = max(len(coverages), 1)
    result = {
        "coverage": sum(coverages) / n,
        "full_coverage_rate": sum(c == 1.0 for c in coverages) / n,
    }
    for category, values in per_category.items():
        result[f"coverage_{category}"] = sum(values) / len(values) if values else None
    result["unrequested_per_caption"] = sum(unrequested_counts) / n
    result["unrequested_rate"] = sum(c > 0 for c in unrequested_counts) / n
    result["recording_quality_rate"] = remarks / n
    return result


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AttributeCoverage(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2601.14157"],
        )

    def _compute(self, predictions, references, taxonomy=None):
        return summarize(predictions, references, taxonomy)
