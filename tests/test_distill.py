"""The distill stage on the real MusicCaps CSV, and its errors on bad input."""

import json

import pandas as pd
import pytest
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import read_manifest
from conceptcaps_pipeline.taxonomy import CATEGORIES, Taxonomy
from conceptcaps_pipeline.taxonomy.distill import DistillArguments, distill, split_of

HEADER = "ytid,start_s,end_s,audioset_positive_labels,aspect_list,caption,author_id,is_balanced_subset,is_audioset_eval\n"
GOOD = '"abc",30,40,"","[\'rock\', \'happy\', \'piano\', \'fast tempo\']","A happy rock song with a piano at a fast tempo and more words.",1,False,False\n'


def test_distilled_count_and_coverage(distilled_run):
    frame = pd.read_parquet(distilled_run / "distilled.parquet")
    manifest = read_manifest(distilled_run, "distill")
    counts = manifest["counts"]
    assert counts["source_rows"] == 5521 and counts["bad_rows"] == 0
    # Every row is accounted for: kept or dropped for a named reason.
    assert counts["kept"] + sum(counts["dropped"].values()) == 5521
    assert counts["kept"] == len(frame) and 1500 <= len(frame) <= 5521
    assert frame["id"].is_unique
    taxonomy = Taxonomy.load(distilled_run / "taxonomy.json")
    for row in frame.itertuples():
        covered = sum(1 for c in CATEGORIES if len(getattr(row, c)) > 0)
        assert covered >= 3
        assert set(row.aspect_list) <= set(taxonomy.tags)
        assert taxonomy.contradiction_in(set(row.aspect_list)) is None
        assert sorted(row.aspect_list) == sorted([t for c in CATEGORIES for t in getattr(row, c)])
    assert set(frame["split"]) == {"train", "validation"}
    assert 0.05 < (frame["split"] == "validation").mean() < 0.15
    assert all(split_of(i, 0.1) == s for i, s in zip(frame["id"], frame["split"]))


def test_lists_are_lists_and_taxonomy_json(distilled_run):
    import pyarrow.parquet as pq

    schema = pq.read_schema(distilled_run / "distilled.parquet")
    for column in ("aspect_list", *CATEGORIES, "source_aspect_list"):
        assert str(schema.field(column).type) == "list<element: string>"
    taxonomy = json.loads((distilled_run / "taxonomy.json").read_text())
    assert taxonomy["version"]
    rock = taxonomy["categories"]["genre"]["rock"]
    assert rock["count"] > 0 and "rock music" in rock["aliases"]
    assert rock["matched_source_tags"]["rock"] > 100


def test_rerun_skips_and_force_redoes(distilled_run, copy_run, musiccaps_csv):
    run = copy_run(distilled_run)
    before = (run / "distilled.parquet").stat().st_mtime_ns
    distill(DistillArguments(run=str(run), source=str(musiccaps_csv)))
    assert (run / "distilled.parquet").stat().st_mtime_ns == before
    distill(DistillArguments(run=str(run), source=str(musiccaps_csv), force=True))
    assert (run / "distilled.parquet").stat().st_mtime_ns != before
    assert pd.read_parquet(run / "distilled.parquet").equals(pd.read_parquet(distilled_run / "distilled.parquet"))


def _distill(tmp_path, text, **kwargs):
    source = tmp_path / "source.csv"
    source.write_text(text)
    return distill(DistillArguments(run=str(tmp_path / "run"), source=str(source), **kwargs))


def test_missing_file(tmp_path):
    with pytest.raises(ConceptCapsError, match=r"nope\.csv not found.*--source"):
        distill(DistillArguments(run=str(tmp_path / "run"), source=str(tmp_path / "nope.csv")))


def test_empty_file(tmp_path):
    with pytest.raises(ConceptCapsError, match="is empty"):
        _distill(tmp_path, "")


def test_header_only(tmp_path):
    with pytest.raises(ConceptCapsError, match="no data rows"):
        _distill(tmp_path, HEADER)


def test_missing_column(tmp_path):
    with pytest.raises(ConceptCapsError, match=r"lacks column\(s\) \['aspect_list'\]"):
        _distill(tmp_path, "ytid,caption\nabc,some caption\n")


def test_unparsable_aspect_list_names_row_and_fix(tmp_path):
    bad = '"zzz",30,40,"","[\'rock\', \'happy\'","A caption.",1,False,False\n'
    with pytest.raises(ConceptCapsError, match=r"(?s)line 3 \(ytid 'zzz'\): field 'aspect_list'.*--max_bad_rows 1"):
        _distill(tmp_path, HEADER + GOOD + bad)
    manifest = _distill(tmp_path, HEADER + GOOD + bad, max_bad_rows=1)
    assert manifest["counts"]["bad_rows"] == 1 and manifest["bad_rows"][0]["ytid"] == "zzz"
    assert manifest["counts"]["kept"] == 1


def test_no_row_kept_is_an_error(tmp_path):
    only_quality = '"q",30,40,"","[\'low quality\', \'noisy\']","A noisy low quality recording of something.",1,False,False\n'
    with pytest.raises(ConceptCapsError, match="no row .* covers 3 taxonomy categories"):
        _distill(tmp_path, HEADER + only_quality)


def test_hub_source_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConceptCapsError, match="could not load the Hub dataset 'google/MusicCaps'.*--source PATH"):
        distill(DistillArguments(run=str(tmp_path / "run"), source="google/MusicCaps"))
