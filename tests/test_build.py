"""`conceptcaps build`: the Parquet release of a small real run, loaded back with `load_dataset`."""

from __future__ import annotations

import re
from collections import defaultdict

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from conceptcaps_pipeline.audio.shards import decode_flac, read_shards
from conceptcaps_pipeline.cli import main
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.release.build import BuildArguments, build_release, release_files
from conceptcaps_pipeline.release.record import verify_release
from conceptcaps_pipeline.release.splits import SPLITS
from conceptcaps_pipeline.run_dir import read_manifest

from conceptcaps import ConceptCaps

CONFIGS = ["default", "audio", "25pct", "25pct_audio", "10pct", "10pct_audio"]
SHARD = re.compile(r"^(train|validation|test)-(\d{5})-of-(\d{5})\.parquet$")


@pytest.fixture(scope="module")
def loaded(release_run, tmp_path_factory):
    """load_dataset on the release folder, for the default and the audio config."""
    cache = tmp_path_factory.mktemp("load_cache")
    release = str(release_run / "release")
    return {"default": datasets.load_dataset(release, cache_dir=str(cache)),
            "audio": datasets.load_dataset(release, "audio", cache_dir=str(cache))}


def test_release_layout_and_bounded_shards(release_run):
    release = release_run / "release"
    files = [p.as_posix() for p in release_files(release)]
    assert "README.md" in files and "figures/tag_frequency.png" in files and "figures/tags_per_sample.png" in files
    by_config = defaultdict(list)
    for name in files:
        if name.startswith("data/"):
            _, config, shard = name.split("/")
            assert SHARD.match(shard), shard
            by_config[config].append(shard)
    assert sorted(by_config) == sorted(CONFIGS)
    for config, shards in by_config.items():
        for split in SPLITS:
            mine = sorted(s for s in shards if s.startswith(f"{split}-"))
            assert mine, (config, split)
            assert [int(SHARD.match(s).group(2)) for s in mine] == list(range(len(mine)))
            assert {int(SHARD.match(s).group(3)) for s in mine} == {len(mine)}
    # --max_shard_size 5KB with 2-row groups: the audio train split is cut into several shards,
    # each at most one row group past the limit.
    train = sorted((release / "data" / "audio").glob("train-*.parquet"))
    assert len(train) > 1
    for path in train:
        meta = pq.ParquetFile(path).metadata
        assert all(meta.row_group(i).num_rows <= 2 for i in range(meta.num_row_groups))


def test_load_dataset_matches_the_builder(release_run, loaded, tmp_path):
    captions = pq.read_table(release_run / "captions.parquet", columns=["id"]).column("id").to_pylist()
    for config in ("default", "audio"):
        ds = loaded[config]
        builder = ConceptCaps(config_name=config, data_dir=str(release_run), cache_dir=str(tmp_path))
        builder.download_and_prepare()
        reference = builder.as_dataset()
        assert set(ds) == set(SPLITS)
        assert sorted(i for s in SPLITS for i in ds[s]["id"]) == sorted(captions)
        for split in SPLITS:
            assert ds[split].features == reference[split].features
            assert ds[split].num_rows == reference[split].num_rows == read_manifest(release_run, "build")["counts"]["rows"][config][split]
            if config == "audio":  # compare the stored bytes, not decoder objects
                ours = ds[split].cast_column("audio", datasets.Audio(decode=False)).to_list()
                theirs = reference[split].cast_column("audio", datasets.Audio(decode=False)).to_list()
            else:
                ours, theirs = ds[split].to_list(), reference[split].to_list()
            assert ours == theirs


def test_loaded_rows_are_typed_and_audio_decodes(release_run, loaded):
    clips = {r["id"]: r for r in read_shards(release_run / "audio").to_pylist()}
    ds = loaded["audio"]["validation"]
    assert isinstance(ds.features["labels"].feature, datasets.ClassLabel)
    names = ds.features["labels"].feature.names
    for row in ds:
        for column in ("aspect_list", "genre", "mood", "instrument", "tempo", "labels"):
            assert isinstance(row[column], list)
        assert sorted(names[i] for i in row["labels"]) == sorted(row["aspect_list"])
        expected, rate = decode_flac(clips[row["id"]]["audio"])
        assert row["audio"]["sampling_rate"] == rate
        np.testing.assert_allclose(np.asarray(row["audio"]["array"]).reshape(expected.shape), expected, atol=1e-4)


def test_streaming_the_audio_config(release_run):
    stream = datasets.load_dataset(str(release_run / "release"), "audio", split="train", streaming=True)
    rows = list(stream)
    assert len(rows) == read_manifest(release_run, "build")["counts"]["rows"]["audio"]["train"]
    assert rows[0]["audio"]["array"].size > 0 and isinstance(rows[0]["aspect_list"], list)


def test_release_split_invariants(release_run):
    release = release_run / "release"
    split_of_set = defaultdict(set)
    present, samples, seen = defaultdict(set), defaultdict(int), []
    for split in SPLITS:
        for path in sorted((release / "data" / "default").glob(f"{split}-*.parquet")):
            for row in pq.read_table(path, columns=["id", "aspect_list"]).to_pylist():
                seen.append(row["id"])
                split_of_set[frozenset(row["aspect_list"])].add(split)
                for tag in row["aspect_list"]:
                    present[tag].add(split)
                    samples[tag] += 1
    assert len(seen) == len(set(seen))
    assert all(len(splits) == 1 for splits in split_of_set.values())
    assert [t for t, n in samples.items() if n >= 3 and present[t] != set(SPLITS)] == []


def test_rebuild_reuses_the_shards(release_run, copy_run):
    run = copy_run(release_run)
    shard = min((run / "release" / "data" / "audio").glob("*.parquet"))
    before = shard.stat().st_mtime_ns
    manifest = build_release(BuildArguments(run=str(run), max_shard_size="5KB", rows_per_group=2))
    assert shard.stat().st_mtime_ns == before  # the data was up to date: only the card was rendered
    assert manifest["counts"]["rows"] == read_manifest(release_run, "build")["counts"]["rows"]
    build_release(BuildArguments(run=str(run), max_shard_size="5KB", rows_per_group=2, force=True))
    assert not shard.exists() or shard.stat().st_mtime_ns != before


def test_text_only_build_of_a_run_without_audio(audio_captions_run, copy_run, tmp_path):
    run = copy_run(audio_captions_run)
    with pytest.raises(ConceptCapsError, match="audio not found.*audio generate"):
        build_release(BuildArguments(run=str(run)))
    assert main(["build", "--run", str(run), "--audio", "false"]) == 0
    configs = sorted(p.name for p in (run / "release" / "data").iterdir())
    assert configs == ["10pct", "25pct", "default"]
    ds = datasets.load_dataset(str(run / "release"), cache_dir=str(tmp_path / "cache"))
    assert sum(ds.num_rows.values()) == 10 and "audio" not in ds["train"].column_names
    card = (run / "release" / "README.md").read_text()
    assert "config_name: audio" not in card


def test_incomplete_audio_is_refused(audio_run, copy_run):
    run = copy_run(audio_run)
    max((run / "audio").glob("shard-*.parquet")).unlink()
    with pytest.raises(ConceptCapsError, match="have no clip.*audio generate"):
        build_release(BuildArguments(run=str(run)))
    assert not (run / "release" / "data").exists()  # nothing half-written


def test_build_draws_one_progress_bar_and_restores_datasets_bars(audio_captions_run, copy_run, capsys):
    from datasets.utils import logging as datasets_logging

    run = copy_run(audio_captions_run)
    assert datasets_logging.is_progress_bar_enabled()
    build_release(BuildArguments(run=str(run), audio=False))
    err = capsys.readouterr().err
    assert "build: 100%" in err and "10/10" in err  # one bar over the rows of the one pass
    assert "Generating" not in err and "examples/s" not in err  # no bar of datasets' own under the build's
    assert datasets_logging.is_progress_bar_enabled()  # and datasets' bars are back afterwards
    datasets_logging.disable_progress_bar()
    try:
        build_release(BuildArguments(run=str(run), audio=False, force=True))
        assert not datasets_logging.is_progress_bar_enabled()  # a caller's choice is kept
    finally:
        datasets_logging.enable_progress_bar()


def _rchar() -> int:
    """Bytes this process has read through read() calls so far (/proc/self/io: page-cache hits included)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_build_reads_the_audio_once(distilled_run, tmp_path):
    """The whole `build` stage (plan once, every config, split and subset in one pass, statistics, figures, card,
    example clips, concepts and the build record) reads at most 1.2x the source audio's bytes for each byte of audio
    added (the builder-per-config build read them about ten times; re-hashing the written shards for the record
    added ~1x). Measured as the difference between builds of 24 and 72 clips in one warm process, which leaves out
    what does not grow with the run: imports, and the fonts matplotlib reads while it draws the card's figures
    (~190 MB per build here, the same at any N), the licence's read of the source CSV, and the card's six example
    clips (one row group each: --rows_per_group 1 here, so that they are the same bytes at both sizes; a row group
    of the default 100 clips each at paper size). docs/performance.md "Scale" gives the absolute figures.
    Synthetic 16-s clips at 32 kHz written through the shard writer (conceptcaps_pipeline.testing.synthetic_run)."""
    import shutil

    from conceptcaps_pipeline.run_dir import file_sha256
    from conceptcaps_pipeline.testing.synthetic_run import write_audio, write_captions

    reads, audio, manifests = {}, {}, {}
    for n in (24, 24, 72):  # the first build only warms the process (imports, caches)
        run = tmp_path / f"run-{n}"
        if run.exists():
            shutil.rmtree(run)
        shutil.copytree(distilled_run, run)
        write_captions(run, n)
        audio[n] = write_audio(run, seconds=16.0, batch=8)
        before = _rchar()
        manifests[n] = build_release(BuildArguments(run=str(run), max_shard_size="2MB", rows_per_group=1))
        reads[n] = _rchar() - before
    marginal = (reads[72] - reads[24]) / (audio[72] - audio[24])
    print(f"build read {reads[24]} B for {audio[24]} B of audio (24 clips), {reads[72]} B for {audio[72]} B "
          f"(72 clips): {marginal:.2f} B read per added audio byte")
    assert marginal <= 1.2
    manifest = manifests[72]
    infos = manifest["dataset_info"]
    assert sorted(infos) == sorted(CONFIGS)
    assert sum(s["num_examples"] for s in infos["audio"]["splits"]) == 72
    # The record's sizes, hashes and row counts (taken as the bytes were written) are those of the files on disk.
    record = manifest["release_record"]
    shards = [key for key in record if key.startswith("data/audio/")]
    assert len(shards) > 3 and sum(record[k]["rows"] for k in shards) == 72
    for key, entry in record.items():
        path = tmp_path / "run-72" / "release" / key
        assert entry["bytes"] == path.stat().st_size and entry["sha256"] == file_sha256(path), key
    assert not verify_release(tmp_path / "run-72" / "release", sorted(CONFIGS))



def test_row_groups_are_cut_by_rows_or_audio_bytes(distilled_run, tmp_path, monkeypatch):
    """A row group is written at rows_per_group rows or once its encoded audio reaches the byte budget, whichever
    comes first: with 4-s clips and a budget of about three clips, the audio configs' groups hold a few clips each
    (never more than one clip past the budget), the text configs keep their row-count groups, and load_release
    still reads every row. Synthetic clips through the shard writer (conceptcaps_pipeline.testing.synthetic_run)."""
    import shutil

    from conceptcaps_pipeline.release import write
    from conceptcaps_pipeline.release.concepts import load_release
    from conceptcaps_pipeline.testing.synthetic_run import write_audio, write_captions

    run = tmp_path / "run"
    shutil.copytree(distilled_run, run)
    write_captions(run, 24)
    audio_bytes = write_audio(run, seconds=4.0, batch=8)
    budget = 3 * audio_bytes // 24  # about three clips of encoded audio
    monkeypatch.setattr(write, "MAX_GROUP_BYTES", budget)
    build_release(BuildArguments(run=str(run), rows_per_group=100))
    release = run / "release"
    assert not (release / ".example_clips.parquet").exists()  # the card's clips kept by the pass, removed once used
    assert len(list((release / "examples").glob("*.wav"))) == 6
    ids, groups = [], []
    for path in sorted((release / "data" / "audio").glob("*.parquet")):
        file = pq.ParquetFile(path)
        for i in range(file.metadata.num_row_groups):
            table = file.read_row_group(i, columns=["id", "audio"])
            clips = [len(a["bytes"]) for a in table.column("audio").to_pylist()]
            groups.append(clips)
            ids += table.column("id").to_pylist()
    assert len(groups) > 3 and max(len(g) for g in groups) < 24
    for clips in groups:
        # Flushed as soon as the buffered audio reaches the budget: all but the last clip are under it.
        assert sum(clips[:-1]) < budget, (clips, budget)
    # Every group but each split's last was cut by bytes, not by the 100-row count.
    assert sum(1 for g in groups if sum(g) >= budget) >= len(groups) - 3
    # The text configs have no audio: their groups are cut by rows alone (one group per file here).
    for path in (release / "data" / "default").glob("*.parquet"):
        assert pq.ParquetFile(path).metadata.num_row_groups == 1
    ds = load_release(release, "audio", cache_dir=str(tmp_path / "cache"))
    assert sum(ds.num_rows.values()) == 24
    assert sorted(i for split in ds.values() for i in split["id"]) == sorted(ids) and len(set(ids)) == 24
