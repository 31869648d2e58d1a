"""eval/clap_score with a tiny CLAP: range, determinism, batch-order symmetry, windowing, input forms."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
RATE = 22_050  # not the tiny CLAP's 16 kHz, so every call resamples


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory, captions):
    from conceptcaps_pipeline.testing.tiny_eval_models import build_tiny_clap

    return str(build_tiny_clap(tmp_path_factory.mktemp("tiny-clap"), captions))


@pytest.fixture(scope="module")
def clap():
    import evaluate

    return evaluate.load(str(ROOT / "eval" / "clap_score"))


@pytest.fixture(scope="module")
def clips():
    """Six tone-plus-noise clips of 0.5 to 5 s: shorter than, equal to and longer than the 2 s window."""
    rng = np.random.default_rng(0)
    out = []
    for seconds in (0.5, 2.0, 2.5, 3.0, 4.2, 5.0):
        t = np.arange(int(RATE * seconds)) / RATE
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t)
        out.append((tone + 0.05 * rng.normal(size=t.size)).astype(np.float32))
    return out


def test_scores_are_cosines_with_mean_and_std(clap, tiny_clap, captions, clips):
    texts = captions[:6]
    result = clap.compute(predictions=texts, references=clips, sampling_rate=RATE, model=tiny_clap, batch_size=4)
    scores = np.array(result["clap_scores"])
    assert set(result) == {"clap_score", "clap_score_std", "clap_scores"}
    assert len(scores) == 6 and np.all((scores >= -1.0) & (scores <= 1.0))
    assert result["clap_score"] == pytest.approx(scores.mean())
    assert result["clap_score_std"] == pytest.approx(scores.std())
    # The per-pair value is the dot product of the unit text and audio embeddings.
    text = clap.embed_text(texts, model=tiny_clap)
    audio = clap.embed_audio(clips, model=tiny_clap, sampling_rate=RATE)
    np.testing.assert_allclose(scores, np.sum(text * audio, axis=1), atol=1e-6)


def test_deterministic_and_symmetric_in_batch_order(clap, tiny_clap, captions, clips):
    import evaluate

    texts = captions[10:16]
    first = clap.compute(predictions=texts, references=clips, sampling_rate=RATE, model=tiny_clap, batch_size=4)
    # A fresh module object (model loaded again) gives exactly the same scores.
    fresh = evaluate.load(str(ROOT / "eval" / "clap_score"))
    again = fresh.compute(predictions=texts, references=clips, sampling_rate=RATE, model=tiny_clap, batch_size=4)
    assert again == first
    order = [3, 0, 5, 1, 4, 2]
    for batch_size in (1, 4):
        permuted = clap.compute(
            predictions=[texts[i] for i in order], references=[clips[i] for i in order],
            sampling_rate=RATE, model=tiny_clap, batch_size=batch_size,
        )
        np.testing.assert_allclose(permuted["clap_scores"], [first["clap_scores"][i] for i in order], atol=1e-5)
        assert permuted["clap_score"] == pytest.approx(first["clap_score"], abs=1e-6)


def test_long_clips_are_a_weighted_mean_of_fixed_windows(clap, tiny_clap, clips):
    clip = clips[-1]  # 5 s: windows of 2 s, 2 s and 1 s from the start
    window = 2 * RATE
    pieces = [clip[:window], clip[window : 2 * window], clip[2 * window :]]
    whole = clap.embed_audio([clip], model=tiny_clap, sampling_rate=RATE)[0]
    parts = clap.embed_audio(pieces, model=tiny_clap, sampling_rate=RATE)
    expected = parts[0] + parts[1] + 0.5 * parts[2]
    np.testing.assert_allclose(whole, expected / np.linalg.norm(expected), atol=2e-3)
    # Not a crop: the embedding depends on every window, and the windows differ.
    assert np.linalg.norm(parts[0] - parts[2]) > 1e-3
    np.testing.assert_array_equal(whole, clap.embed_audio([clip], model=tiny_clap, sampling_rate=RATE)[0])


def test_every_audio_input_form_gives_the_same_scores(clap, tiny_clap, captions, clips, tmp_path):
    import datasets

    texts = captions[20:23]
    chosen = clips[1:4]
    paths = []
    for i, clip in enumerate(chosen):
        paths.append(str(tmp_path / f"clip{i}.wav"))
        sf.write(paths[-1], clip, RATE, subtype="FLOAT")  # lossless float WAV: bit-exact samples
    encoded = []
    for clip in chosen:
        buffer = io.BytesIO()
        sf.write(buffer, clip, RATE, format="WAV", subtype="FLOAT")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    decoded = datasets.Dataset.from_dict({"audio": paths}).cast_column("audio", datasets.Audio())["audio"]
    stereo = [np.stack([clip, clip]) for clip in chosen]  # (channels, samples): averaged to mono
    forms = {
        "array": {"references": chosen, "sampling_rate": RATE},
        "dict": {"references": [{"array": clip, "sampling_rate": RATE} for clip in chosen]},
        "path": {"references": paths},
        "bytes": {"references": encoded},
        "datasets Audio": {"references": list(decoded)},
        "stereo": {"references": stereo, "sampling_rate": RATE},
    }
    results = {name: clap.compute(predictions=texts, model=tiny_clap, **kw)["clap_scores"] for name, kw in forms.items()}
    for name, scores in results.items():
        np.testing.assert_allclose(scores, results["array"], atol=1e-5, err_msg=name)
    # FLAC bytes, as RUN/audio shards store clips: 16-bit samples, so equal up to quantisation.
    flac = []
    for clip in chosen:
        buffer = io.BytesIO()
        sf.write(buffer, clip, RATE, format="FLAC")
        flac.append({"bytes": buffer.getvalue(), "path": "clip.flac"})
    scores = clap.compute(predictions=texts, references=flac, model=tiny_clap)["clap_scores"]
    np.testing.assert_allclose(scores, results["array"], atol=1e-3)


def test_resampling_keeps_the_sound(clap, tiny_clap):
    # The same 3 s chord rendered at 16, 32 and 44.1 kHz embeds (almost) identically after resampling.
    def chord(rate):
        t = np.arange(3 * rate) / rate
        return (0.2 * sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6))).astype(np.float32)

    native = clap.embed_audio([chord(16_000)], model=tiny_clap, sampling_rate=16_000)[0]
    for rate in (32_000, 44_100):
        resampled = clap.embed_audio([chord(rate)], model=tiny_clap, sampling_rate=rate)[0]
        assert float(native @ resampled) > 0.999


def test_bare_arrays_need_a_sampling_rate(clap, tiny_clap, clips):
    with pytest.raises(ValueError, match=r"clip 0 is a bare array: pass `sampling_rate=`"):
        clap.compute(predictions=["a"], references=clips[:1], model=tiny_clap)


def test_undecodable_file_and_empty_clip_are_clear_errors(clap, tiny_clap, tmp_path):
    bad = tmp_path / "not-audio.wav"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not-audio.wav.*cannot be decoded as audio"):
        clap.compute(predictions=["a"], references=[str(bad)], model=tiny_clap)
    with pytest.raises(ValueError, match="clip 1 has no samples"):
        clap.compute(predictions=["a", "b"], references=[np.ones(100), np.zeros(0)], sampling_rate=RATE, model=tiny_clap)


def test_unloadable_model_is_a_clear_error(clap, tmp_path, clips):
    with pytest.raises(ValueError, match="cannot load the CLAP model .*missing"):
        clap.compute(predictions=["a"], references=clips[:1], sampling_rate=RATE, model=str(tmp_path / "missing"))


def test_relative_path_load_from_repo_root(monkeypatch):
    import evaluate

    monkeypatch.chdir(ROOT)
    metric = evaluate.load("eval/clap_score")
    assert sys.modules[type(metric).__module__].DEFAULT_MODEL == "laion/larger_clap_music"
