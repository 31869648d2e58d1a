"""Removing recording-quality remarks from captions: hand-made sentences with known answers, and the
real distilled MusicCaps captions (how many change, none keeps a remark, the music stays)."""

from __future__ import annotations

import pandas as pd
import pytest
from conceptcaps_eval.attribute_coverage.recording_quality import (
    mentions_recording_quality,
    recording_quality_mentions,
)
from conceptcaps_pipeline.run_dir import read_manifest
from conceptcaps_pipeline.taxonomy import Taxonomy
from conceptcaps_pipeline.taxonomy.cleaning import clean_caption


@pytest.mark.parametrize(
    "caption, cleaned",
    [
        ("The recording quality is poor.", ""),
        ("This is a low quality recording of a jazz song.", "This is a recording of a jazz song."),
        ("This is an amateur recording of an Irish folk music piece.", "This is a recording of an Irish folk music piece."),
        ("The low quality recording features a rock song with a punchy snare.",
         "The recording features a rock song with a punchy snare."),
        ("The song is a pop song with poor audio quality.", "The song is a pop song."),
        ("The song is a Konkani wedding song and has a poor audio quality.", "The song is a Konkani wedding song."),
        ("It sounds groovy and the recording is in mono and noisy.", "It sounds groovy."),
        ("It sounds soulful, passionate and the recording is noisy and in mono.", "It sounds soulful and passionate."),
        ("The recording is noisy and in mono, but it sounds passionate and upbeat.", "It sounds passionate and upbeat."),
        ("It is noisy, in mono and it sounds vintage and warm.", "It sounds vintage and warm."),
        ("It sounds fun and emotional, but also noisy and kind of chaotic.",
         "It sounds fun and emotional, but also kind of chaotic."),
        ("It is very noisy, uptempo, energetic and dynamic.", "It is uptempo, energetic and dynamic."),
        ("Even though the recording is noisy, it sounds emotional and passionate.", "It sounds emotional and passionate."),
        ("It sounds muddy and messy, since the frequencies are clashing and since it is probably recorded with a phone.",
         "It sounds muddy and messy, since the frequencies are clashing."),
        ("The audio quality is inferior and the music is muffled.", "The music is muffled."),
        # several sentences: only the remarks go
        ("A slow jazz tune on a grand piano. This is an amateur recording. The bass walks.",
         "A slow jazz tune on a grand piano. The bass walks."),
        # no remark: untouched, byte for byte
        ("A distorted electric guitar over white noise , and a clean   mix.",
         "A distorted electric guitar over white noise , and a clean   mix."),
    ],
)
def test_known_sentences(caption, cleaned):
    assert clean_caption(caption) == cleaned
    assert not mentions_recording_quality(clean_caption(caption))


def test_detector_names_what_it_found():
    assert recording_quality_mentions("A low quality recording of a jazz song, noisy and in mono.") == [
        "low quality", "noisy", "mono"]
    assert recording_quality_mentions("The audio is very poor. It was recorded with a phone.") == [
        "the audio is very poor", "recorded with a phone"]
    # Sounds in the music are not remarks on the recording.
    for text in ("A distorted electric guitar and a muffled kick.", "White noise sweeps in.", "A lo-fi hip hop beat.",
                 "The guitar sound is distorted.", "A monophonic synth line."):
        assert not mentions_recording_quality(text), text


def test_real_captions_are_cleaned(distilled_run):
    frame = pd.read_parquet(distilled_run / "distilled.parquet")
    changed = frame["caption"] != frame["caption_original"]
    flagged_before = frame["caption_original"].map(mentions_recording_quality)
    flagged_after = frame["caption"].map(mentions_recording_quality)
    # About 30% of the MusicCaps captions remark on the recording; exactly those change.
    assert 0.25 < changed.mean() < 0.38
    assert (changed == flagged_before).all()
    assert flagged_after.mean() < 0.01
    # Musical content stays: almost every taxonomy tag a changed caption mentioned is still mentioned.
    taxonomy = Taxonomy.load(distilled_run / "taxonomy.json")
    before = [set(taxonomy.find_mentions(t)) for t in frame.loc[changed, "caption_original"]]
    after = [set(taxonomy.find_mentions(t)) for t in frame.loc[changed, "caption"]]
    lost = sum(len(a - b) for a, b in zip(before, after))
    assert lost / sum(map(len, before)) < 0.02
    assert all(len(c.split()) >= 8 for c in frame["caption"])
    counts = read_manifest(distilled_run, "distill")["counts"]["caption_cleaning"]
    assert counts["captions_changed"] == changed.sum() and counts["captions_still_flagged"] == flagged_after.sum()
    assert counts["captions_with_remark_by_kind"]["quality"] > 500


def test_cleaning_can_be_switched_off(tmp_path, musiccaps_csv):
    from conceptcaps_pipeline.cli import run_command

    manifest = run_command(["distill", "--out", str(tmp_path / "run"), "--source", str(musiccaps_csv),
                            "--clean_captions", "false"])
    frame = pd.read_parquet(tmp_path / "run" / "distilled.parquet")
    assert (frame["caption"] == frame["caption_original"]).all()
    assert manifest["counts"]["caption_cleaning"]["captions_changed"] == 0
    assert manifest["counts"]["caption_cleaning"]["captions_still_flagged"] > 1000
