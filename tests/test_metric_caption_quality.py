"""eval/caption_quality on real MusicCaps captions, with a tiny BERT for BERTScore and MAUVE features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, captions):
    from conceptcaps_pipeline.testing.tiny_eval_models import build_tiny_bert

    return str(build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), captions))


@pytest.fixture(scope="module")
def quality():
    import evaluate

    return evaluate.load(str(ROOT / "eval" / "caption_quality"))


def test_identical_captions_score_perfectly(quality, tiny_bert, captions):
    texts = captions[:40]
    result = quality.compute(predictions=texts, references=texts, bertscore_model=tiny_bert,
                             mauve_featurize_model=tiny_bert, mauve_num_buckets=4)
    assert set(result) == {"bleu", "rougeL", "bertscore_precision", "bertscore_recall", "bertscore_f1", "mauve"}
    assert result["bleu"] == pytest.approx(100.0)
    assert result["rougeL"] == pytest.approx(1.0)
    for key in ("bertscore_precision", "bertscore_recall", "bertscore_f1"):
        assert result[key] == pytest.approx(1.0, abs=1e-5)
    assert result["mauve"] == pytest.approx(1.0, abs=1e-6)


def test_different_captions_score_lower(quality, tiny_bert, captions):
    predictions, references = captions[:40], captions[100:140]
    result = quality.compute(predictions=predictions, references=references, bertscore_model=tiny_bert,
                             mauve_featurize_model=tiny_bert, mauve_num_buckets=4)
    assert 0.0 <= result["bleu"] < 30.0
    assert 0.0 < result["rougeL"] < 0.6
    assert 0.0 < result["bertscore_f1"] < 1.0
    assert 0.0 <= result["mauve"] <= 1.0
    again = quality.compute(predictions=predictions, references=references, bertscore_model=tiny_bert,
                            mauve_featurize_model=tiny_bert, mauve_num_buckets=4)
    assert again == result  # deterministic (MAUVE's k-means is seeded)


def test_bleu_and_rouge_known_values(quality):
    # One shared word out of six and eight: ROUGE-L F = 2 * (1/6) * (1/8) / (1/6 + 1/8) = 1/7.
    result = quality.compute(predictions=["fast rock song with loud drums"],
                             references=["a slow jazz tune with a walking bass"], metrics=["bleu", "rougeL"])
    assert result["rougeL"] == pytest.approx(1 / 7)
    # BLEU by hand: unigram precision 1/6; no 2/3/4-gram matches, which sacrebleu's default "exp"
    # smoothing turns into 1/(2*5), 1/(4*4), 1/(8*3); brevity penalty exp(1 - 8/6).
    expected = 100 * np.exp(1 - 8 / 6) * (1 / 6 * 1 / 10 * 1 / 16 * 1 / 24) ** 0.25
    assert result["bleu"] == pytest.approx(expected, rel=1e-9)
    assert quality.compute(predictions=["x y z"], references=["a b c"], metrics="bleu")["bleu"] == 0.0
    # Stemming: "drums"/"drum" and "playing"/"plays" match.
    stemmed = quality.compute(predictions=["drums playing"], references=["drum plays"], metrics="rougeL")
    assert stemmed == {"rougeL": pytest.approx(1.0)}


def test_multiple_references_take_the_best_match(quality, tiny_bert, captions):
    predictions = captions[:10]
    single = quality.compute(predictions=predictions, references=captions[50:60], metrics=["bleu", "rougeL", "bertscore"],
                             bertscore_model=tiny_bert)
    multi = quality.compute(predictions=predictions, references=[[a, b] for a, b in zip(captions[50:60], predictions)],
                            metrics=["bleu", "rougeL", "bertscore"], bertscore_model=tiny_bert)
    assert multi["bleu"] == pytest.approx(100.0)
    assert multi["rougeL"] == pytest.approx(1.0)
    assert multi["bertscore_f1"] == pytest.approx(1.0, abs=1e-5) and single["bertscore_f1"] < 1.0


def test_num_layers_selects_the_bertscore_layer(quality, tiny_bert, captions):
    kwargs = {"predictions": captions[:10], "references": captions[20:30], "metrics": ["bertscore"], "bertscore_model": tiny_bert}
    last = quality.compute(**kwargs)  # a model bert-score does not know: its last layer (2)
    assert quality.compute(**kwargs, num_layers=2) == last
    assert quality.compute(**kwargs, num_layers=1)["bertscore_f1"] != pytest.approx(last["bertscore_f1"], abs=1e-6)


def test_mauve_pooling_options(quality, tiny_bert, captions):
    kwargs = {"predictions": captions[:30], "references": captions[200:230], "metrics": ["mauve"],
                  "mauve_featurize_model": tiny_bert, "mauve_num_buckets": 3}
    for pooling in ("last", "mean"):
        value = quality.compute(**kwargs, mauve_pooling=pooling)["mauve"]
        assert 0.0 <= value <= 1.0 and np.isfinite(value)
    with pytest.raises(ValueError, match="mauve_pooling 'max'"):
        quality.compute(**kwargs, mauve_pooling="max")


def test_clear_errors(quality, tiny_bert, captions, tmp_path):
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['cider'\]"):
        quality.compute(predictions=["a"], references=["a"], metrics=["bleu", "cider"])
    with pytest.raises(ValueError, match="MAUVE needs at least 5 non-empty texts per side"):
        quality.compute(predictions=captions[:3], references=captions[:3], metrics=["mauve"],
                        mauve_featurize_model=tiny_bert, mauve_num_buckets=5)
    with pytest.raises(ValueError, match="cannot load the BERTScore encoder"):
        quality.compute(predictions=["a"], references=["a"], metrics=["bertscore"], bertscore_model=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="cannot load the MAUVE encoder"):
        quality.compute(predictions=captions[:4], references=captions[:4], metrics=["mauve"],
                        mauve_featurize_model=str(tmp_path / "nope"))
