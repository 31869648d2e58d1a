"""The attribute_coverage metric module on hand-made captions with known answers."""

from __future__ import annotations

import pytest
from conftest import ROOT

PREDICTIONS = [
    "A slow jazz tune led by a grand piano and a double bass.",  # aliases: slow, grand piano
    "An energetic rock song with drums.",  # misses the guitar, adds a mood and drums
    "Beautiful.",  # asked for nothing
    "Two electric guitars and a male singer, at a fast pace.",  # plural and aliases; misses metal
]
REFERENCES = [
    ["jazz", "piano", "slow tempo", "double bass"],
    ["rock", "electric guitar"],
    [],
    ["metal", "electric guitar", "male vocal", "fast tempo"],
]


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(str(ROOT / "eval" / "attribute_coverage"))


def test_known_answers(metric):
    result = metric.compute(predictions=PREDICTIONS, references=REFERENCES)
    assert result == pytest.approx({
        "coverage": (1 + 0.5 + 1 + 0.75) / 4,
        "full_coverage_rate": 0.5,
        "coverage_genre": 2 / 3,
        "coverage_mood": None,
        "coverage_instrument": 2 / 3,
        "coverage_tempo": 1.0,
        "unrequested_per_caption": 0.5,
        "unrequested_rate": 0.25,
        "recording_quality_rate": 0.0,
    })


def test_recording_quality_rate(metric):
    predictions = ["A low quality recording of a slow jazz tune on piano.", "A slow jazz tune on piano.",
                   "It is noisy and in mono, but the piano sounds warm.", "A distorted guitar over white noise."]
    result = metric.compute(predictions=predictions, references=[["jazz"]] * 4)
    assert result["recording_quality_rate"] == 0.5


def test_per_caption_function():
    from conceptcaps_pipeline.captions.generate import load_coverage_module

    module = load_coverage_module()  # the very file evaluate.load reads
    taxonomy = module.load_taxonomy()
    assert module.caption_coverage(PREDICTIONS[1], REFERENCES[1], taxonomy) == (
        0.5, ["electric guitar"], ["energetic", "acoustic drums"])
    assert module.caption_coverage(PREDICTIONS[3], REFERENCES[3], taxonomy) == (0.75, ["metal"], [])
    assert module.caption_coverage("", ["rock"], taxonomy) == (0.0, ["rock"], [])


def test_taxonomy_is_an_argument(metric, tmp_path):
    custom = tmp_path / "taxonomy.yaml"
    custom.write_text(
        "version: test\ncategories:\n  genre:\n    rock: []\n  mood:\n    calm: [peaceful]\n"
        "  instrument:\n    kazoo: [buzzing pipe]\n  tempo:\n    slow tempo: [slow]\n"
    )
    predictions, references = ["A peaceful buzzing pipe solo with a piano."], [["kazoo", "calm"]]
    result = metric.compute(predictions=predictions, references=references, taxonomy=str(custom))
    assert result["coverage"] == 1.0 and result["unrequested_per_caption"] == 0.0  # piano is not in this taxonomy
    default = metric.compute(predictions=predictions, references=references)
    assert default["coverage"] == 0.0 and default["unrequested_per_caption"] == 2.0  # piano and calming are its tags


def test_misaligned_inputs_are_refused():
    from conceptcaps_pipeline.captions.generate import load_coverage_module

    with pytest.raises(ValueError, match="must align"):
        load_coverage_module().summarize(["a caption"], [], None)
