"""Fréchet Audio Distance (FAD) between two sets of embeddings, CLAP audio embeddings by default.

    import evaluate
    fad = evaluate.load("eval/fad")                    # path from the repository root
    generated = fad.embed_audio(generated_clips)       # CLAP (laion/larger_clap_music) embeddings
    reference = fad.embed_audio(reference_clips)
    fad.compute(predictions=generated, references=reference)   # fad, and fad_inf (FAD∞) beside it

`frechet_distance(mu1, sigma1, mu2, sigma2)` is the pure formula and `fad_infinity(predictions, references)`
the FAD∞ extrapolation, usable on their own.
"""

import logging

import datasets
import evaluate
import numpy as np

# CLAP audio embeddings exactly as eval/clap_score computes them: clap_windows.py here is a
# symlink to eval/clap_score/clap_windows.py, and evaluate.load copies it into its cache.
from .clap_windows import DEFAULT_MODEL, embed_audio_items, load_clap

logger = logging.getLogger(__name__)

_CITATION = """\
@inproceedings{kilgour2019fad,
  title={Fr{\\'e}chet Audio Distance: A Reference-Free Metric for Evaluating Music Enhancement Algorithms},
  author={Kilgour, Kevin and Zuluaga, Mauricio and Roblek, Dominik and Sharifi, Matthew},
  booktitle={Interspeech},
  year={2019}
}
@inproceedings{chong2020fidinf,
  title={Effectively Unbiased {FID} and Inception Score and Where to Find Them},
  author={Chong, Min Jin and Forsyth, David},
  booktitle={CVPR},
  year={2020}
}
@inproceedings{gui2024fadtk,
  title={Adapting Fr{\\'e}chet Audio Distance for Generative Music Evaluation},
  author={Gui, Azalea and Gamper, Hannes and Braun, Sebastian and Emmanouilidou, Dimitra},
  booktitle={ICASSP},
  year={2024}
}
@article{sienkiewicz2026conceptcaps,
  title={ConceptCaps -- a Distilled Concept Dataset for Interpretability in Music Models},
  author={Sienkiewicz, Bruno and Neumann, {\\L}ukasz and Modrzejewski, Mateusz},
  journal={arXiv preprint arXiv:2601.14157},
  year={2026}
}
"""

_DESCRIPTION = """\
Fréchet Audio Distance: fit a Gaussian (mean, covariance) to each of two sets of
embeddings and report the Fréchet distance between the Gaussians,

    FAD = |mu_p - mu_r|^2 + Tr(S_p + S_r - 2 (S_p S_r)^(1/2)).

Lower is better; 0 means the two sets have the same mean and covariance. The sets may
have different sizes. ConceptCaps uses CLAP audio embeddings (`embed_audio`, the same
windowing as `eval/clap_score`: consecutive model-length windows from the start, weighted
mean of the unit window embeddings); any precomputed embeddings work.

The trace of the matrix square root is computed as Tr((S_p^(1/2) S_r S_p^(1/2))^(1/2)),
the same value since the two products are similar matrices, from the eigenvalues of a
symmetric positive semi-definite matrix: always real, no iterative `sqrtm`, no complex
round-off, and defined for singular covariances.

A set needs at least 2 embeddings for a covariance (fewer is refused). With fewer
embeddings than dimensions (n <= d) the covariance is rank-deficient: the value is still
defined but biased upward and noisy, and a warning is logged; use well over d embeddings
(d = 512 for the LAION CLAPs) for numbers comparable across papers, and compare FADs only
between sets of similar sizes, or compare FAD∞.

FAD∞ (Chong & Forsyth 2020 for FID; Gui et al. 2024 and their fadtk for FAD): the expected FAD
of n embeddings is about FAD∞ + b / n, so the FADs of seeded random subsets of the predictions
(sizes from `inf_min_samples` to all of them) against the whole reference set are fitted with a
least-squares line in 1 / n, and its intercept is reported as `fad_inf` with the line's r²,
slope and points. It removes the evaluated set's size from the number; the reference set's own
finite-size bias stays (the same for every evaluated set scored against that reference) unless
`inf_subsample_references` extrapolates both sets.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (2-D array or `list` of `list` of `float`): embeddings of the evaluated set, one row each.
    references (2-D array or `list` of `list` of `float`): embeddings of the reference set
        (same dimension; any number of rows).
    min_samples (`int`): refuse a set with fewer rows than this (never below 2). Defaults to 2.
    inf_points (`int`): subset sizes for FAD∞ (one seeded random subset of the predictions each,
        sizes evenly spaced from `inf_min_samples` to all predictions). Defaults to 20; 0 turns FAD∞ off.
    inf_min_samples (`int`): the smallest subset for FAD∞. Defaults to fadtk's 500, or half the
        predictions when that is smaller (and never below `min_samples`).
    seed (`int`): seed of the FAD∞ subsets (the same seed gives the same value). Defaults to 0.
    inf_subsample_references (`bool`): also subsample the references, at the same fraction as the
        predictions, so FAD∞ extrapolates both set sizes to infinity (for a reference set that is not
        much larger than the predictions). Defaults to False: the whole reference set, as in fadtk.
Returns:
    fad (`float`): the Fréchet distance, >= 0.
    n_predictions (`int`), n_references (`int`): the set sizes.
    fad_inf (`float`): FAD∞, the intercept a of the least-squares line FAD = a + b / n through the
        subsets' FADs: the FAD of an infinite evaluated set, comparable across sample sizes. An
        extrapolation, so it can fall slightly below 0 for matching distributions. None when off or
        when fewer than 2 subset sizes fit.
    fad_inf_slope (`float`): b, the sample-size bias (FAD at n is about fad_inf + fad_inf_slope / n).
    fad_inf_r2 (`float`): r² of the line (near 1: FAD follows 1/n well and FAD∞ is trustworthy).
    fad_inf_curve (`list` of `[n, fad]`): the subsets' sizes and FADs the line was fitted to.
Examples:
    >>> import evaluate
    >>> import numpy as np
    >>> fad = evaluate.load("eval/fad")
    >>> rng = np.random.default_rng(0)
    >>> a = rng.normal(size=(500, 4))
    >>> round(fad.compute(predictions=a, references=a)["fad"], 4)
    0.0
    >>> shifted = fad.compute(predictions=a + 1.0, references=a)   # mean moved by 1 in each of 4 dims
    >>> round(shifted["fad"], 4)
    4.0
    >>> fad.compute(predictions=a[:50], references=a)["n_predictions"]
    50
    >>> generated = rng.normal(size=(400, 16))                # N(0, I)
    >>> reference = rng.normal(loc=0.25, size=(20000, 16))    # N(0.25, I): distance 16 * 0.25**2 = 1.0
    >>> small = fad.compute(predictions=generated[:40], references=reference, inf_points=20, seed=0)
    >>> round(small["fad"], 2), round(small["fad_inf"], 2)   # 40 embeddings: FAD biased upward, FAD∞ near 1
    (3.69, 1.21)
    >>> large = fad.compute(predictions=generated, references=reference, inf_min_samples=80)
    >>> round(large["fad"], 2), round(large["fad_inf"], 2), len(large["fad_inf_curve"])
    (1.15, 1.04, 20)
"""


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), for PSD covariances (>= 0)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}."
        )
    return _frechet(mu1, sigma1, _psd_sqrt(sigma1), mu2, sigma2)


def _frechet(mu1, sigma1, sqrt_sigma1, mu2, sigma2) -> float:
    """frechet_distance with the square root of sigma1 given (FAD∞ reuses the reference's for every subset)."""
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    # eigvalsh needs exact symmetry; round-off may leave tiny negative eigenvalues, which are 0.
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(value, 0.0))  # >= 0 in exact arithmetic; clip round-off below 0


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def gaussian_stats(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ddof=1) covariance of the rows."""
    embeddings = np.asarray(embeddings, np.float64)
    return embeddings.mean(axis=0), np.cov(embeddings, rowvar=False, ddof=1).reshape(embeddings.shape[1], -1)


def default_inf_min_samples(n: int) -> int:
    """Smallest subset of FAD∞ when none is given: fadtk's 500, or half the set when that is smaller."""
    return max(2, min(500, n // 2))


def fad_infinity(predictions, references, points: int = 20, min_samples: int | None = None, seed: int = 0,
                 subsample_references: bool = False) -> dict:
    """FAD extrapolated to an infinite evaluated set (FAD∞, Chong & Forsyth 2020; Gui et al. 2024, fadtk).

    FAD of `points` random subsets of the predictions (sizes evenly spaced from `min_samples`
    to all of them, one draw each from a generator seeded with `seed`) against the whole
    reference set, then the least-squares line FAD = a + b / n: FAD∞ = a. With
    `subsample_references` the references are subsampled at the same fraction as the
    predictions, so the line extrapolates both sets to infinity.

    Returns {"fad_inf": a, "fad_inf_slope": b, "fad_inf_r2": r² of the line, "fad_inf_curve":
    [[n, fad], ...]}; `fad_inf` and `fad_inf_r2` are None when fewer than 2 distinct sizes fit.
    """
    predictions, references = np.asarray(predictions, np.float64), np.asarray(references, np.float64)
    n = predictions.shape[0]
    low = default_inf_min_samples(n) if min_samples is None else max(2, int(min_samples))
    if low > n:
        raise ValueError(f"FAD∞: the smallest subset ({low}) is larger than the {n} predictions; "
                         f"pass inf_min_samples <= {n}.")
    sizes = np.unique(np.linspace(low, n, max(int(points), 1)).round().astype(int))
    rng = np.random.default_rng(seed)
    mu_r, sigma_r = gaussian_stats(references)
    sqrt_r = _psd_sqrt(sigma_r)
    curve = []
    for size in sizes:
        mu_p, sigma_p = gaussian_stats(predictions[rng.choice(n, size=size, replace=False)])
        if subsample_references:
            n_ref = max(2, round(references.shape[0] * size / n))
            mu_r, sigma_r = gaussian_stats(references[rng.choice(references.shape[0], size=n_ref, replace=False)])
            sqrt_r = _psd_sqrt(sigma_r)
        # The reference first: its square root is computed once, not once per subset.
        curve.append([int(size), _frechet(mu_r, sigma_r, sqrt_r, mu_p, sigma_p)])
    result = {"fad_inf": None, "fad_inf_slope": None, "fad_inf_r2": None, "fad_inf_curve": curve}
    if len(curve) < 2:
        logger.warning("FAD∞: %d prediction(s) give a single subset size; no line to extrapolate.", n)
        return result
    x, y = 1.0 / sizes, np.array([value for _, value in curve])
    slope, intercept = np.polyfit(x, y, 1)
    total = float(np.sum((y - y.mean()) ** 2))
    residual = float(np.sum((y - (intercept + slope * x)) ** 2))
    result.update(fad_inf=float(intercept), fad_inf_slope=float(slope),
                  fad_inf_r2=1.0 - residual / total if total > 0 else 1.0)
    return result


def _as_matrix(values, name: str) -> np.ndarray:
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim == 1 and matrix.size == 0:
        matrix = matrix.reshape(0, 0)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of embeddings (one row each), got shape {matrix.shape}.")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name} holds NaN or infinite values; check the embedding model's output.")
    return matrix


# ---- the metric --------------------------------------------------------------------------

@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FAD(evaluate.Metric):
    def _info(self):
        # One row holds a whole set (a list of embeddings): evaluate stores inputs as table
        # rows, which would force both sets to the same size; FAD compares sets of any sizes.
        embedding_set = datasets.Sequence(datasets.Sequence(datasets.Value("float32")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": embedding_set, "references": embedding_set}),
            codebase_urls=["https://github.com/google-research/google-research/tree/master/frechet_audio_distance"],
            reference_urls=["https://arxiv.org/abs/1812.08466"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of embeddings to each set (the two batches may differ in size).\n"""
        predictions = None if predictions is None else [_as_matrix(predictions, "predictions").tolist()]
        references = None if references is None else [_as_matrix(references, "references").tolist()]
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one embedding to each set.\n"""
        return self.add_batch(
            predictions=None if prediction is None else [prediction],
            references=None if reference is None else [reference],
            **kwargs,
        )

    def embed_audio(self, audio, model=DEFAULT_MODEL, sampling_rate=None, batch_size=8, device=None) -> np.ndarray:
        """CLAP audio embeddings (n, d) of clips (paths, encoded or decoded audio dicts, or arrays with
        `sampling_rate`), to pass as `predictions` / `references`. The model is loaded once per metric object."""
        cache = self.__dict__.setdefault("_clap_cache", {})
        if (model, device) not in cache:
            cache[(model, device)] = load_clap(model, device)
        clap, processor, loaded_device = cache[(model, device)]
        return embed_audio_items(clap, processor, audio, sampling_rate, batch_size, loaded_device)

    def _compute(self, predictions, references, min_samples=2, inf_points=20, inf_min_samples=None, seed=0,
                 inf_subsample_references=False):
        sets = {}
        for name, rows in (("predictions", predictions), ("references", references)):
            sets[name] = _as_matrix([vector for batch in rows for vector in batch], name)
        dims = {name: matrix.shape[1] for name, matrix in sets.items() if matrix.size}
        if len(set(dims.values())) > 1:
            raise ValueError(f"embedding sizes differ: predictions {dims['predictions']}, references {dims['references']}.")
        needed = max(2, int(min_samples))
        for name, matrix in sets.items():
            n, dim = matrix.shape[0], matrix.shape[1] if matrix.size else 0
            if n < needed:
                raise ValueError(
                    f"FAD: `{name}` has {n} embedding(s), fewer than the {needed} its covariance needs "
                    f"(min_samples={min_samples}). Pass at least {needed} {name}; FAD is only reliable with well over "
                    f"one embedding per dimension ({dim} here)."
                )
            if n <= dim:
                logger.warning(
                    "FAD: `%s` has %d embeddings for %d dimensions: its covariance is rank-deficient, so the "
                    "distance is biased upward and noisy. Use well over %d embeddings for comparable numbers.",
                    name, n, dim, dim,
                )
        mu_p, sigma_p = gaussian_stats(sets["predictions"])
        mu_r, sigma_r = gaussian_stats(sets["references"])
        result = {
            "fad": frechet_distance(mu_p, sigma_p, mu_r, sigma_r),
            "n_predictions": int(sets["predictions"].shape[0]),
            "n_references": int(sets["references"].shape[0]),
        }
        if int(inf_points) <= 0:  # FAD∞ off: the keys stay, empty
            return {**result, "fad_inf": None, "fad_inf_slope": None, "fad_inf_r2": None, "fad_inf_curve": []}
        low = max(needed, default_inf_min_samples(result["n_predictions"]) if inf_min_samples is None
                  else int(inf_min_samples))
        result.update(fad_infinity(sets["predictions"], sets["references"], points=inf_points, min_samples=low,
                                   seed=seed, subsample_references=inf_subsample_references))
        return result
