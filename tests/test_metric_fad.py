"""eval/fad: known values of the Fréchet distance, FAD∞ against the analytic distance, the small-set refusal,
and CLAP audio embeddings."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fad(tmp_path_factory):
    import evaluate

    return evaluate.load(str(ROOT / "eval" / "fad"))  # an absolute path works as well as "eval/fad"


@pytest.fixture(scope="module")
def fad_module(fad):
    return sys.modules[type(fad).__module__]


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory, musiccaps_csv):
    from conceptcaps_pipeline.taxonomy.source import read_source
    from conceptcaps_pipeline.testing.tiny_eval_models import build_tiny_clap

    rows, _ = read_source(str(musiccaps_csv))
    return str(build_tiny_clap(tmp_path_factory.mktemp("tiny-clap"), [row.caption for row in rows]))


def _random_spd(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T + 0.1 * np.eye(dim)


def _closed_form(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) with scipy's general matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_relative_path_load_from_repo_root(monkeypatch):
    import evaluate

    monkeypatch.chdir(ROOT)
    result = evaluate.load("eval/fad").compute(predictions=[[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]],
                                               references=[[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    assert {k: result[k] for k in ("fad", "n_predictions", "n_references")} == {
        "fad": pytest.approx(0.0, abs=1e-9), "n_predictions": 3, "n_references": 3}
    assert [n for n, _ in result["fad_inf_curve"]] == [2, 3]  # default smallest subset: half the set, at least 2


def test_set_with_itself_is_zero(fad):
    embeddings = np.random.default_rng(0).normal(size=(300, 16))
    assert fad.compute(predictions=embeddings, references=embeddings)["fad"] == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_closed_form(fad_module):
    rng = np.random.default_rng(1)
    for dim in (1, 3, 8):
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
        value = fad_module.frechet_distance(mu1, s1, mu2, s2)
        assert value == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)
        assert fad_module.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_diagonal_gaussians(fad_module):
    # For diagonal covariances the square root is elementwise: sum (sd1 - sd2)^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    sd1, sd2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 2.0, 1.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((sd1 - sd2) ** 2)  # 5 + 5
    assert fad_module.frechet_distance(mu1, np.diag(sd1**2), mu2, np.diag(sd2**2)) == pytest.approx(expected, rel=1e-12)
    assert expected == 10.0


def test_sampled_gaussians_match_closed_form(fad):
    rng = np.random.default_rng(2)
    dim, n = 3, 40_000
    mu1, mu2 = np.zeros(dim), np.array([1.0, -0.5, 0.25])
    s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
    a = rng.multivariate_normal(mu1, s1, size=n)
    b = rng.multivariate_normal(mu2, s2, size=n // 2)  # sets of different sizes
    result = fad.compute(predictions=a, references=b)
    assert result["n_predictions"] == n and result["n_references"] == n // 2
    assert result["fad"] == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=0.03)


def test_batches_accumulate_into_sets(fad):
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(60, 4)), rng.normal(loc=0.5, size=(45, 4))
    whole = fad.compute(predictions=a, references=b)["fad"]
    fad.add_batch(predictions=a[:25], references=b[:40])
    fad.add_batch(predictions=a[25:], references=b[40:])
    assert fad.compute()["fad"] == pytest.approx(whole, rel=1e-5)


def test_singular_covariances_give_a_real_finite_value(fad, fad_module):
    rng = np.random.default_rng(4)
    # Embeddings on a 2-D plane of a 6-D space: both covariances are singular.
    basis = rng.normal(size=(2, 6))
    a, b = rng.normal(size=(200, 2)) @ basis, rng.normal(size=(200, 2)) @ basis + 0.1
    value = fad.compute(predictions=a, references=b)["fad"]
    assert np.isfinite(value) and value >= 0.0 and isinstance(value, float)
    s = np.zeros((4, 4))
    assert fad_module.frechet_distance(np.zeros(4), s, np.ones(4), s) == pytest.approx(4.0)


def test_too_small_set_is_refused_with_a_clear_message(fad):
    embeddings = np.random.default_rng(5).normal(size=(20, 8))
    with pytest.raises(ValueError, match=r"`references` has 1 embedding\(s\).*Pass at least 2 references"):
        fad.compute(predictions=embeddings, references=embeddings[:1])
    with pytest.raises(ValueError, match=r"`predictions` has 5 embedding\(s\).*min_samples=10"):
        fad.compute(predictions=embeddings[:5], references=embeddings, min_samples=10)


def test_rank_deficient_set_warns(fad, caplog):
    embeddings = np.random.default_rng(6).normal(size=(40, 16))
    with caplog.at_level(logging.WARNING):
        value = fad.compute(predictions=embeddings[:8], references=embeddings)["fad"]
    assert np.isfinite(value)
    assert "8 embeddings for 16 dimensions" in caplog.text


def test_mismatched_dimensions_are_refused(fad):
    rng = np.random.default_rng(7)
    with pytest.raises(ValueError, match="embedding sizes differ: predictions 4, references 5"):
        fad.compute(predictions=rng.normal(size=(10, 4)), references=rng.normal(size=(10, 5)))


def test_nan_embeddings_are_refused(fad):
    a = np.random.default_rng(8).normal(size=(10, 3))
    a[2, 1] = np.nan
    with pytest.raises(ValueError, match="predictions holds NaN"):
        fad.compute(predictions=a, references=a)


def _clips(seed: int, n: int, rate: int) -> list[np.ndarray]:
    """Tone-plus-noise clips of 1 to 5 s (so some span several 2 s windows of the tiny CLAP)."""
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        t = np.arange(int(rate * (1 + 4 * rng.random()))) / rate
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t)
        clips.append((tone + 0.05 * rng.normal(size=t.size)).astype(np.float32))
    return clips


def test_clap_embeddings_and_fad_from_audio(fad, tiny_clap, monkeypatch):
    import evaluate

    clips = _clips(0, 12, 22_050)
    embeddings = fad.embed_audio(clips, model=tiny_clap, sampling_rate=22_050, batch_size=4)
    assert embeddings.shape == (12, 16)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    # Deterministic, and the same procedure as eval/clap_score: eval/fad/clap_windows.py is a byte-identical
    # copy of eval/clap_score/clap_windows.py (tests/test_metric_spaces.py keeps them equal).
    np.testing.assert_array_equal(embeddings, fad.embed_audio(clips, model=tiny_clap, sampling_rate=22_050, batch_size=4))
    monkeypatch.chdir(ROOT)
    clap = evaluate.load("eval/clap_score")
    np.testing.assert_allclose(
        embeddings, clap.embed_audio(clips, model=tiny_clap, sampling_rate=22_050, batch_size=4), atol=1e-6
    )
    assert fad.compute(predictions=embeddings, references=embeddings)["fad"] == pytest.approx(0.0, abs=1e-6)
    other = fad.embed_audio(_clips(1, 12, 22_050), model=tiny_clap, sampling_rate=22_050)
    assert fad.compute(predictions=other, references=embeddings)["fad"] > 0.0


def test_unloadable_clap_model_is_a_clear_error(fad, tmp_path):
    with pytest.raises(ValueError, match="cannot load the CLAP model"):
        fad.embed_audio([np.zeros(100, np.float32)], model=str(tmp_path / "missing"), sampling_rate=16_000)


# ---- FAD∞ -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_gaussians():
    """Two fixed 32-D Gaussians, their analytic Fréchet distance, 1000 draws of one and 50000 of the other."""
    rng = np.random.default_rng(10)
    dim = 32
    a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    s1, s2 = a @ a.T / dim + 0.5 * np.eye(dim), b @ b.T / dim + 0.5 * np.eye(dim)
    mu1, mu2 = np.zeros(dim), np.full(dim, 0.2)
    generated = rng.multivariate_normal(mu1, s1, size=1000)
    reference = rng.multivariate_normal(mu2, s2, size=50_000)  # large: its own finite-size bias is small
    return {"true": _closed_form(mu1, s1, mu2, s2), "generated": generated, "reference": reference}


def test_fad_inf_removes_the_sample_size_bias(fad, two_gaussians):
    true, generated, reference = two_gaussians["true"], two_gaussians["generated"], two_gaussians["reference"]
    result = fad.compute(predictions=generated, references=reference, inf_min_samples=100, inf_points=20, seed=0)
    curve = np.array(result["fad_inf_curve"])
    assert curve[0, 0] == 100 and curve[-1, 0] == 1000 and len(curve) == 20
    smallest = curve[0, 1]
    # FAD of 100 embeddings is visibly biased upward; FAD of all 1000 less so; FAD∞ is the closest.
    assert smallest > 1.2 * true
    assert abs(result["fad"] - true) < abs(smallest - true)
    assert abs(result["fad_inf"] - true) < abs(result["fad"] - true) < abs(smallest - true)
    assert abs(result["fad_inf"] - true) < 0.05 * true
    assert result["fad_inf_slope"] > 0 and result["fad_inf_r2"] > 0.8
    # The last point is the whole set: the plain FAD itself.
    assert curve[-1, 1] == pytest.approx(result["fad"], rel=1e-9)
    # The line is the least-squares fit of those points in 1/n.
    slope, intercept = np.polyfit(1 / curve[:, 0], curve[:, 1], 1)
    assert (result["fad_inf"], result["fad_inf_slope"]) == (pytest.approx(intercept), pytest.approx(slope))


def test_fad_inf_is_comparable_across_sample_sizes(fad, two_gaussians):
    """The same generator scored on 300 and on 1000 clips: FAD moves with n, FAD∞ less, and both FAD∞
    are nearer the analytic distance than the FADs they come from (FAD∞ of a small set is noisier)."""
    true, generated, reference = two_gaussians["true"], two_gaussians["generated"], two_gaussians["reference"]
    few = fad.compute(predictions=generated[:300], references=reference, inf_min_samples=60)
    many = fad.compute(predictions=generated, references=reference, inf_min_samples=200)
    assert few["fad"] - many["fad"] > 0.5
    assert abs(few["fad_inf"] - many["fad_inf"]) < few["fad"] - many["fad"]
    for result in (few, many):
        assert abs(result["fad_inf"] - true) < abs(result["fad"] - true)


def test_fad_inf_is_seeded(fad, two_gaussians):
    generated, reference = two_gaussians["generated"][:400], two_gaussians["reference"][:5000]
    first = fad.compute(predictions=generated, references=reference, seed=3)
    assert fad.compute(predictions=generated, references=reference, seed=3) == first
    other = fad.compute(predictions=generated, references=reference, seed=4)
    assert other["fad_inf_curve"] != first["fad_inf_curve"] and other["fad"] == first["fad"]
    # Defaults: 20 subsets from 200 (half of 400; fadtk's 500 is more than the set) to 400.
    assert [n for n, _ in first["fad_inf_curve"]][::19] == [200, 400] and len(first["fad_inf_curve"]) == 20


def test_fad_inf_with_subsampled_references_extrapolates_both_sets(fad_module):
    """A reference set as small as the evaluated one biases FAD∞ of the predictions alone; subsampling
    both sets at the same fraction removes that bias too (mean error over 16 fixed draws)."""
    rng = np.random.default_rng(123)
    dim = 16
    a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    s1, s2 = a @ a.T / dim + 0.5 * np.eye(dim), b @ b.T / dim + 0.5 * np.eye(dim)
    mu1, mu2 = np.zeros(dim), np.full(dim, 0.2)
    true = _closed_form(mu1, s1, mu2, s2)
    errors = {"fad": [], "predictions only": [], "both": []}
    for seed in range(16):
        draw = np.random.default_rng(seed)
        p, r = draw.multivariate_normal(mu1, s1, size=400), draw.multivariate_normal(mu2, s2, size=400)
        errors["fad"].append(fad_module.frechet_distance(*fad_module.gaussian_stats(p), *fad_module.gaussian_stats(r)))
        for key, both in (("predictions only", False), ("both", True)):
            errors[key].append(fad_module.fad_infinity(p, r, min_samples=50, seed=seed, subsample_references=both)
                               ["fad_inf"])
    bias = {key: np.mean(values) - true for key, values in errors.items()}
    assert bias["fad"] > bias["predictions only"] > 0.1
    assert abs(bias["both"]) < 0.5 * bias["predictions only"]


def test_fad_inf_options_and_errors(fad, fad_module):
    embeddings = np.random.default_rng(11).normal(size=(30, 3))
    off = fad.compute(predictions=embeddings, references=embeddings, inf_points=0)
    assert off["fad_inf"] is None and off["fad_inf_r2"] is None and off["fad_inf_curve"] == []
    with pytest.raises(ValueError, match=r"smallest subset \(40\) is larger than the 30 predictions"):
        fad.compute(predictions=embeddings, references=embeddings, inf_min_samples=40)
    # min_samples is a floor for the subsets too.
    result = fad.compute(predictions=embeddings, references=embeddings, min_samples=20, inf_points=3)
    assert [n for n, _ in result["fad_inf_curve"]] == [20, 25, 30]
    single = fad_module.fad_infinity(embeddings[:2], embeddings, points=5)
    assert single["fad_inf"] is None and len(single["fad_inf_curve"]) == 1
