"""VAE metrics for attribute sets: reconstruction Jaccard (mean per set and pooled) and Hamming
loss, sample diversity, tag co-occurrence similarity to a reference set, and how far the
sizes of the sampled sets are from the reference sets' (in total and per category).

    import evaluate
    vae_metrics = evaluate.load("eval/vae_metrics")
    vae_metrics.compute(predictions=[["rock", "slow tempo"]], references=[["rock"]],
                        labels=["rock", "pop", "slow tempo"])
"""

import datasets
import evaluate
import numpy as np

_CITATION = """\
@article{sienkiewicz2026conceptcaps,
  title={ConceptCaps -- a Distilled Concept Dataset for Interpretability in Music Models},
  author={Sienkiewicz, Bruno and Neumann, {\\L}ukasz and Modrzejewski, Mateusz},
  journal={arXiv preprint arXiv:2601.14157},
  year={2026}
}
"""

_DESCRIPTION = """\
Scores a model that reconstructs and samples sets of labels (the ConceptCaps beta-VAE).

- `jaccard`: mean over examples of |P & R| / |P | R| between a reconstructed set P and the
  true set R (1.0 when both are empty). Higher is better.
- `jaccard_micro`: pooled (micro) Jaccard, sum |P & R| / sum |P | R| over all examples: large
  sets weigh more, and an empty reconstruction counts as a miss rather than as 1.0 when its
  true set is empty too. The ConceptCaps paper's 0.716 is this definition (with a plain 0.5
  threshold on the decoder's probabilities).
- `hamming_loss`: share of (example, label) cells where P and R disagree, over the whole
  label vocabulary. Lower is better; with sparse sets it is small by construction.
- `diversity`: percentage of distinct sets among `samples` (order inside a set ignored).
- `cooccurrence_cosine`: cosine similarity between the flattened label co-occurrence
  matrices (X^T X, diagonal included, so label frequencies count too) of `samples` and
  of `reference_sets`; `cooccurrence_cosine_offdiag` ignores the diagonal, measuring
  pairs alone.
- `size_tvd`: total variation distance (half the L1 distance, 0 = same, 1 = disjoint)
  between the tags-per-set histograms of `samples` and `reference_sets`;
  `mean_size_samples`, `mean_size_reference`: the mean tags per set. With `categories`
  (the category of each label), `size_tvd_<category>` is the same distance for the number of
  tags of that category per set, and `mean_size_<category>_samples` / `_reference` its means.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `str`): reconstructed label sets.
    references (`list` of `list` of `str`): true label sets, aligned with predictions.
    labels (`list` of `str`): the label vocabulary (needed for Hamming loss and co-occurrence).
    samples (`list` of `list` of `str`, optional): sets drawn from the model, for diversity
        and co-occurrence.
    reference_sets (`list` of `list` of `str`, optional): sets of the training data whose
        co-occurrence and sizes the samples should match; defaults to `references`.
    categories (`list` of `str`, optional): the category of each label (aligned with `labels`),
        for the per-category size distances.
Returns:
    jaccard (`float`), jaccard_micro (`float`), hamming_loss (`float`), and, when `samples` is
    given, diversity (`float`, percent), cooccurrence_cosine (`float`),
    cooccurrence_cosine_offdiag (`float`), size_tvd (`float`), mean_size_samples,
    mean_size_reference (`float`), and with `categories` size_tvd_<category>,
    mean_size_<category>_samples, mean_size_<category>_reference (`float`).
Examples:
    >>> import evaluate
    >>> metric = evaluate.load("eval/vae_metrics")
    >>> result = metric.compute(
    ...     predictions=[["rock", "fast tempo"], ["jazz"]],
    ...     references=[["rock", "slow tempo"], ["jazz"]],
    ...     labels=["rock", "jazz", "slow tempo", "fast tempo"],
    ...     samples=[["rock"], ["rock"], ["jazz", "slow tempo"], ["jazz"]])
    >>> print(round(result["jaccard"], 4), round(result["hamming_loss"], 4), result["diversity"])
    0.6667 0.25 75.0
    >>> print(round(result["jaccard_micro"], 4), result["size_tvd"], result["mean_size_samples"])
    0.5 0.25 1.25
"""


def multi_hot(sets, labels):
    """(n, len(labels)) 0/1 matrix; a label outside the vocabulary is an error."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(sets), len(labels)), dtype=np.float64)
    for row, label_set in enumerate(sets):
        for label in label_set:
            if label not in index:
                raise ValueError(f"label {label!r} is not in `labels`; pass the full vocabulary.")
            matrix[row, index[label]] = 1.0
    return matrix


def jaccard(pred, true):
    """Mean Jaccard index of two multi-hot matrices (empty vs empty counts as 1)."""
    intersection = np.logical_and(pred > 0, true > 0).sum(axis=1)
    union = np.logical_or(pred > 0, true > 0).sum(axis=1)
    return float(np.mean(np.where(union == 0, 1.0, intersection / np.maximum(union, 1))))


def jaccard_micro(pred, true):
    """Pooled Jaccard: all intersections over all unions (0.0 when every set is empty on both sides)."""
    union = np.logical_or(pred > 0, true > 0).sum()
    return float(np.logical_and(pred > 0, true > 0).sum() / union) if union else 0.0


def size_histogram(sizes):
    values, counts = np.unique(np.asarray(sizes, dtype=np.int64), return_counts=True)
    return dict(zip(values.tolist(), (counts / max(counts.sum(), 1)).tolist()))


def total_variation(a, b):
    """Half the L1 distance between two histograms {value: share}."""
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def size_distances(sample_matrix, reference_matrix, categories=None):
    """size_tvd and mean sizes of the two sets of sets, in total and (with categories) per category."""
    result = {}
    groups = [("", np.ones(sample_matrix.shape[1], dtype=bool))]
    if categories is not None:
        groups += [(f"_{c}", np.asarray(categories) == c) for c in dict.fromkeys(categories)]
    for suffix, columns in groups:
        sample_sizes = sample_matrix[:, columns].sum(axis=1)
        reference_sizes = reference_matrix[:, columns].sum(axis=1)
        result[f"size_tvd{suffix}"] = total_variation(size_histogram(sample_sizes), size_histogram(reference_sizes))
        result[f"mean_size{suffix}_samples"] = float(sample_sizes.mean()) if len(sample_sizes) else 0.0
        result[f"mean_size{suffix}_reference"] = float(reference_sizes.mean()) if len(reference_sizes) else 0.0
    return result


def hamming_loss(pred, true):
    return float(np.mean((pred > 0) != (true > 0)))


def diversity(sets):
    """Percent of distinct sets (order inside a set ignored)."""
    if not sets:
        return 0.0
    return 100.0 * len({frozenset(s) for s in sets}) / len(sets)


def cooccurrence_cosine(sample_matrix, reference_matrix, diagonal=True):
    a = sample_matrix.T @ sample_matrix
    b = reference_matrix.T @ reference_matrix
    if not diagonal:
        mask = ~np.eye(a.shape[0], dtype=bool)
        a, b = a[mask], b[mask]
    a, b = a.ravel(), b.ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denominator) if denominator > 0 else 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VaeMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2601.14157"],
        )

    def _compute(self, predictions, references, labels, samples=None, reference_sets=None, categories=None):
        labels = list(labels)
        if categories is not None and len(categories) != len(labels):
            raise ValueError(f"`categories` has {len(categories)} entries for {len(labels)} labels: give one per label.")
        pred, true = multi_hot(predictions, labels), multi_hot(references, labels)
        result = {"jaccard": jaccard(pred, true), "jaccard_micro": jaccard_micro(pred, true),
                  "hamming_loss": hamming_loss(pred, true)}
        if samples is not None:
            sample_matrix = multi_hot(samples, labels)
            reference_matrix = multi_hot(reference_sets if reference_sets is not None else references, labels)
            result["diversity"] = diversity(samples)
            result["cooccurrence_cosine"] = cooccurrence_cosine(sample_matrix, reference_matrix)
            result["cooccurrence_cosine_offdiag"] = cooccurrence_cosine(sample_matrix, reference_matrix, diagonal=False)
            result.update(size_distances(sample_matrix, reference_matrix, categories))
        return result
