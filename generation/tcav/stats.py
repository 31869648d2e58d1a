"""The statistics of `conceptcaps tcav`: the CAV classifier, the tests against random concepts, the correction.

    from conceptcaps_pipeline.tcav.stats import adjust, auto_random, compare, pass_threshold, smallest_p

TCAV (Kim et al., 2018) scores a concept for a class by the share of the class's inputs whose
score rises along the concept activation vector (CAV). One CAV is noise: it depends on which
positives and which random examples trained it. So `conceptcaps tcav` trains many CAVs per
concept, each on a fresh subset of the concept's positives against a fresh random set, and
asks whether their mean score is unusual. What it is compared with matters:

- The CAVs of one concept share its positives. With few positives (the usual case) they share
  the chance quirks of those clips too, so their scores are not independent draws, and the
  textbook t-test of concept scores against random-vs-random CAV scores calls noise
  "significant" too often.
- The concept is therefore compared with random concepts built the same way: K random pools as
  large as the concept's positive pool, each with as many CAVs. Under the null hypothesis the
  concept is one more random concept. The default test (`compare_empirical`) ranks it among
  them: exact, whatever the distribution, with a smallest p of 1/(K+1), so `auto_random` picks
  K for the correction's hardest threshold. `compare_pooled` (a prediction interval) is kept.
- `adjust` corrects over the family (Benjamini-Hochberg by default; Holm and Bonferroni for the
  family-wise rate); `pass_threshold` says how small each p had to be, and `smallest_p` how
  small the design lets it be, so a result that could never pass is reported as underpowered.

Also here: `HeldOutLinearClassifier`, a captum `Classifier` (ridge-regularised linear classifier,
seeded stratified held-out third) for captum's own TCAV (`to_captum_concepts`); the stage fits
the same classifier for thousands of CAVs at once (`tcav.api.fit_cavs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from captum.concept import Classifier

TESTS = ("empirical", "pooled", "ttest", "mannwhitney")
CORRECTIONS = ("fdr_bh", "holm", "bonferroni", "none")


class HeldOutLinearClassifier(Classifier):
    """captum `Classifier`: a ridge classifier on a stratified split; `accs` is the held-out accuracy.

    The fit is the closed-form ridge regression of the labels (coded -1 / +1, as sklearn's
    RidgeClassifier codes them) on the centred activations, solved in whichever of the primal or
    dual form is smaller, so thousands of CAVs take seconds and more units than clips is fine.
    The split is seeded per call (seed, call number), so a rerun trains the same CAVs.
    """

    def __init__(self, seed: int = 0, test_fraction: float = 1 / 3, regularization: float = 1.0):
        self.seed, self.test_fraction, self.regularization = seed, test_fraction, regularization
        self.calls = 0
        self.labels: list[int] = []
        self.direction: np.ndarray | None = None

    def train_and_eval(self, dataloader, **kwargs) -> dict:
        xs, ys = zip(*((x, y) for x, y in dataloader))
        x = torch.cat(xs).detach().cpu().double().numpy()
        y = torch.cat(ys).detach().cpu().numpy()
        self.labels = sorted(int(c) for c in np.unique(y))
        if len(self.labels) != 2:
            raise ValueError(f"a CAV separates two sets; got labels {self.labels}")
        rng = np.random.default_rng([self.seed, self.calls])
        self.calls += 1
        test = np.zeros(len(y), dtype=bool)
        for label in self.labels:
            members = rng.permutation(np.flatnonzero(y == label))
            test[members[: max(1, round(self.test_fraction * len(members)))]] = True
        target = np.where(y == self.labels[1], 1.0, -1.0)
        # Why one scale for all units: layers differ in scale by orders of magnitude, which would change
        # what the regularisation means; a per-unit scale would instead blow up units that barely vary.
        train_x = x[~test]
        scale = float(train_x.std()) + 1e-12
        mean = train_x.mean(axis=0)
        centred = (train_x - mean) / scale
        t = target[~test] - target[~test].mean()
        alpha = self.regularization
        if centred.shape[0] < centred.shape[1]:
            w = centred.T @ np.linalg.solve(centred @ centred.T + alpha * np.eye(len(centred)), t)
        else:
            w = np.linalg.solve(centred.T @ centred + alpha * np.eye(centred.shape[1]), centred.T @ t)
        bias = target[~test].mean() - (mean / scale) @ w
        predicted = np.where((x[test] / scale) @ w + bias > 0, 1.0, -1.0)
        self.direction = w / scale  # in the raw activation space, where captum's gradients live
        return {"accs": torch.tensor(float((predicted == target[test]).mean()))}

    def weights(self) -> torch.Tensor:
        w = torch.tensor(self.direction, dtype=torch.float32)
        return torch.stack([-w, w])  # one row per class of classes(): each class's direction

    def classes(self) -> list[int]:
        # Plain ints: captum saves CAVs with torch.save and loads them with weights_only=True,
        # which refuses numpy integer arrays.
        return list(self.labels)


@dataclass
class Comparison:
    p_value: float
    effect_size: float | None  # standardised distance from the random concepts (None: no spread to measure it by)
    mean_difference: float  # concept's mean TCAV score minus the random concepts' mean


def compare_pooled(concept: list[float], null: list[list[float]]) -> Comparison:
    """Is the concept's mean TCAV score unusual among random concepts of the same size? (two-sided)

    `concept` holds the scores of the concept's CAVs; `null[j]` those of random concept j (the
    same number of CAVs, each on a subset of a random pool as large as the concept's positives).
    Under the null hypothesis the concept is one more random concept, so its mean score M_c is
    one more draw from the distribution of the random means M_j: t = (M_c - mean M) /
    (sd M * sqrt(1 + 1/K)) with K - 1 degrees of freedom (a prediction interval). The effect size
    is (M_c - mean M) / sd M. When the random means do not vary, the p-value is the Monte Carlo
    rank (1 + #{j: |M_j - mean| >= |M_c - mean|}) / (K + 1).

    >>> round(compare_pooled([0.9] * 10, [[0.5, 0.6], [0.4, 0.5], [0.5, 0.5], [0.6, 0.5]]).p_value, 4)
    0.0054
    >>> compare_pooled([0.5, 0.6], [[0.5, 0.6], [0.4, 0.5], [0.6, 0.7]]).p_value > 0.5
    True
    """
    from scipy import stats

    means = np.asarray([np.mean(scores) for scores in null], dtype=float)
    mc, centre, k = float(np.mean(concept)), float(means.mean()), len(means)
    spread = float(means.std(ddof=1)) if k > 1 else 0.0
    if spread > 0:
        t = (mc - centre) / (spread * math.sqrt(1 + 1 / k))
        return Comparison(float(2 * stats.t.sf(abs(t), k - 1)), (mc - centre) / spread, mc - centre)
    extreme = int(np.sum(np.abs(means - centre) >= abs(mc - centre) - 1e-12))
    return Comparison((1 + extreme) / (k + 1), None, mc - centre)


def compare_ttest(concept: list[float], random: list[float], test: str = "ttest") -> Comparison:
    """The TCAV paper's test: Welch's t-test (or Mann-Whitney U) of concept CAV scores against random CAV scores.

    Anti-conservative when the concept has few positives: its CAVs share them, so their scores
    are not independent draws (see docs/tcav.md). The effect size is Cohen's d.

    >>> compare_ttest([0.9, 0.95, 0.85, 0.9], [0.5, 0.4, 0.6, 0.5]).p_value < 0.001
    True
    >>> compare_ttest([0.5, 0.5], [0.5, 0.5]).p_value
    1.0
    """
    from scipy import stats

    a, b = np.asarray(concept, dtype=float), np.asarray(random, dtype=float)
    difference = float(a.mean() - b.mean())
    pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / max(len(a) + len(b) - 2, 1))
    effect = difference / pooled if pooled > 0 else None
    if pooled == 0:
        # Constant scores on both sides: no evidence if equal; if not, only the rank test is defined.
        if difference == 0:
            return Comparison(1.0, None, 0.0)
        test = "mannwhitney"
    if test == "ttest":
        p = stats.ttest_ind(a, b, equal_var=False).pvalue
    else:
        p = stats.mannwhitneyu(a, b, alternative="two-sided").pvalue
    return Comparison(float(p) if np.isfinite(p) else 1.0, effect, difference)


def compare_empirical(concept: list[float], null: list[list[float]]) -> Comparison:
    """The concept's mean TCAV score ranked among random concepts' means: an exact permutation-style p (two-sided).

    Under the null hypothesis the concept is one more random concept (its positives are as good
    as a random pool of their size), so the concept and the K random concepts are exchangeable and
    p = (1 + #{j: |M_j - centre| >= |M_c - centre|}) / (K + 1), centre the random concepts' mean,
    is a valid p-value whatever the distribution of the means (no normality, no degrees of
    freedom). Its smallest value is 1 / (K + 1): `conceptcaps tcav` draws enough random concepts
    (`auto_random`) for that to pass the corrected threshold. The effect size is (M_c - centre) / sd M.

    >>> round(compare_empirical([1.0] * 5, [[0.5, 0.4]] * 9 + [[0.6, 0.5]] * 10).p_value, 3)
    0.05
    >>> compare_empirical([0.5, 0.55], [[0.5, 0.6], [0.4, 0.5], [0.6, 0.7]]).p_value
    0.75
    """
    means = np.asarray([np.mean(scores) for scores in null], dtype=float)
    mc, centre, k = float(np.mean(concept)), float(means.mean()), len(means)
    spread = float(means.std(ddof=1)) if k > 1 else 0.0
    # Why the tolerance: means of the same CAV count are multiples of 1/(CAVs x inputs); a tie is a tie.
    extreme = int(np.sum(np.abs(means - centre) >= abs(mc - centre) - 1e-9))
    return Comparison((1 + extreme) / (k + 1), (mc - centre) / spread if spread > 0 else None, mc - centre)


def smallest_p(test: str, n_random: int, n_cavs: int) -> float:
    """The smallest p-value a design can give (a concept beyond every random concept).

    empirical: 1 / (K + 1). pooled: the prediction-interval t-test has no floor in theory, but the
    random concepts' means spread by about 0.15 (measured), so a perfect score (1.0 against 0.5)
    sits about 3.3 spreads out: its p with K - 1 degrees of freedom is the practical floor.
    ttest / mannwhitney: no floor worth stating (0).

    >>> smallest_p("empirical", 999, 30)
    0.001
    """
    from scipy import stats

    if test == "empirical":
        return 1 / (n_random + 1)
    if test == "pooled":
        return float(2 * stats.t.sf(0.5 / (0.15 * math.sqrt(1 + 1 / n_random)), n_random - 1))
    return 0.0


def auto_random(tests: int, alpha: float) -> int:
    """Random concepts for the empirical test: enough that a concept beyond all of them passes alone.

    The hardest threshold any correction sets is alpha / m (Holm's and Benjamini-Hochberg's first
    step, Bonferroni's only one). 1 / (K + 1) <= alpha / (2 m) leaves room for one random concept
    that ties the concept. K grows with the number of tests: `--primary` keeps the family small.

    >>> auto_random(24, 0.05)
    959
    """
    return max(math.ceil(2 * tests / alpha) - 1, 19)


def pass_threshold(p_values: list[float], i: int, method: str, alpha: float) -> float:
    """The largest raw p-value test i could have had and still passed the correction, the others unchanged."""
    if method == "none":
        return alpha
    low, high = 0.0, 1.0
    trial = list(p_values)
    for _ in range(40):  # bisection: adjusted p_i rises with p_i under every correction here
        trial[i] = (low + high) / 2
        if adjust(trial, method)[i] < alpha:
            low = trial[i]
        else:
            high = trial[i]
    return low


def compare(concept: list[float], null: list[list[float]], test: str = "empirical") -> Comparison:
    """The test named by `conceptcaps tcav --test`: empirical (default), pooled, ttest or mannwhitney."""
    if test == "empirical":
        return compare_empirical(concept, null)
    if test == "pooled":
        return compare_pooled(concept, null)
    if test in ("ttest", "mannwhitney"):
        return compare_ttest(concept, [score for scores in null for score in scores], test)
    raise ValueError(f"test {test!r} is not one of {TESTS}")


def adjust(p_values: list[float], method: str = "holm") -> list[float]:
    """Adjusted p-values over a family of tests (Holm, Bonferroni, Benjamini-Hochberg, or none).

    >>> [round(p, 3) for p in adjust([0.01, 0.04, 0.03], "holm")]
    [0.03, 0.06, 0.06]
    >>> [round(p, 3) for p in adjust([0.01, 0.04, 0.03], "fdr_bh")]
    [0.03, 0.04, 0.04]
    """
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    if m == 0 or method == "none":
        return p.tolist()
    if method == "bonferroni":
        return np.minimum(p * m, 1.0).tolist()
    if method == "holm":
        order = np.argsort(p, kind="stable")
        adjusted = np.empty(m)
        running = 0.0
        for rank, i in enumerate(order):
            running = max(running, min((m - rank) * p[i], 1.0))
            adjusted[i] = running
        return adjusted.tolist()
    if method == "fdr_bh":
        from scipy import stats

        return stats.false_discovery_control(p, method="bh").tolist()
    raise ValueError(f"correction {method!r} is not one of {CORRECTIONS}")
