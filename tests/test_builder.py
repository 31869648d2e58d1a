"""The `datasets` builder in conceptcaps.py (and the split and subset rules of release/splits.py) against a small real run (MusicCaps captions, tiny-MusicGen
clips), and the split assignment on the real distilled MusicCaps set."""

from __future__ import annotations

import random
import shutil
from collections import defaultdict

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conceptcaps_pipeline.audio.shards import decode_flac, read_shards
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.release.plan import run_fingerprint
from conceptcaps_pipeline.release.splits import SPLITS, assign_splits, nested_subsets, subset_min_positives
from conceptcaps_pipeline.taxonomy import Taxonomy

from conceptcaps import ConceptCaps, concept_sets, tag_categories


def prepare(run, config, cache):
    builder = ConceptCaps(config_name=config, data_dir=str(run), cache_dir=str(cache))
    builder.download_and_prepare()
    return builder, builder.as_dataset()


@pytest.fixture(scope="module")
def prepared(audio_run, tmp_path_factory):
    """Every config of audio_run prepared once: {config: DatasetDict}."""
    cache = tmp_path_factory.mktemp("builder_cache")
    return {name: prepare(audio_run, name, cache)[1]
            for name in ("default", "audio", "25pct", "25pct_audio", "10pct", "10pct_audio")}


def test_configs_are_declared():
    names = [c.name for c in ConceptCaps.BUILDER_CONFIGS]
    assert names == ["default", "audio", "25pct", "25pct_audio", "10pct", "10pct_audio"]
    assert ConceptCaps.DEFAULT_CONFIG_NAME == "default"
    by_name = {c.name: c for c in ConceptCaps.BUILDER_CONFIGS}
    assert by_name["audio"].with_audio and not by_name["default"].with_audio
    assert by_name["10pct_audio"].fraction == 0.10 and by_name["25pct"].fraction == 0.25
    assert {str(c.version) for c in ConceptCaps.BUILDER_CONFIGS} == {str(ConceptCaps.VERSION)} != {"0.0.0"}


def test_every_config_carries_the_version(prepared):
    for name, ds in prepared.items():
        assert {str(ds[split].info.version) for split in SPLITS} == {str(ConceptCaps.VERSION)}, name


def test_audio_config_rows_features_and_clips(audio_run, prepared):
    ds = prepared["audio"]
    captions = {r["id"]: r for r in pq.read_table(audio_run / "captions.parquet").to_pylist()}
    ids = [i for split in SPLITS for i in ds[split]["id"]]
    assert sorted(ids) == sorted(captions) and len(ids) == len(set(ids))

    taxonomy = Taxonomy.load(audio_run / "taxonomy.json")
    tags = taxonomy.tags
    clips = {r["id"]: r for r in read_shards(audio_run / "audio").to_pylist()}
    rate = next(iter(clips.values()))["sampling_rate"]
    features = ds["train"].features
    assert features["aspect_list"] == datasets.List(datasets.Value("string"))
    for category in ("genre", "mood", "instrument", "tempo"):
        # Typed per category: the tag -> category map is in the features.
        assert features[category] == datasets.List(datasets.ClassLabel(names=list(taxonomy.categories[category])))
    assert tag_categories(ds["train"]) == taxonomy.category_of
    assert features["labels"] == datasets.List(datasets.ClassLabel(names=tags))
    assert features["audio"] == datasets.Audio(sampling_rate=rate)
    assert features["duration_s"] == datasets.Value("float32")

    for row in ds["test"]:
        source = captions[row["id"]]
        assert isinstance(row["aspect_list"], list) and row["aspect_list"] == source["aspect_list"]
        assert row["caption"] == source["caption"]
        for category in ("genre", "mood", "instrument", "tempo"):
            assert features[category].feature.int2str(row[category]) == source[category]
        assert sorted(tags[i] for i in row["labels"]) == sorted(source["aspect_list"])
        expected, _ = decode_flac(clips[row["id"]]["audio"])
        decoded = row["audio"]  # a torchcodec AudioDecoder that behaves like {"array", "sampling_rate"}
        assert decoded["sampling_rate"] == rate
        np.testing.assert_allclose(np.asarray(decoded["array"]).reshape(expected.shape), expected, atol=1e-4)
        assert row["duration_s"] == pytest.approx(clips[row["id"]]["duration_s"], abs=1e-6)


def test_text_and_audio_configs_line_up(prepared):
    for text, audio in (("default", "audio"), ("25pct", "25pct_audio"), ("10pct", "10pct_audio")):
        for split in SPLITS:
            assert prepared[text][split]["id"] == prepared[audio][split]["id"]
            assert "audio" not in prepared[text][split].column_names
    for split in SPLITS:
        full, quarter, tenth = (set(prepared[c][split]["id"]) for c in ("default", "25pct", "10pct"))
        assert tenth <= quarter <= full
        assert len(quarter) == max(1, round(0.25 * len(full))) and len(tenth) == max(1, round(0.10 * len(full)))


def test_builder_split_invariants(audio_run, prepared):
    ds = prepared["default"]
    split_of_set = defaultdict(set)
    samples = defaultdict(int)
    present = defaultdict(set)
    for split in SPLITS:
        for tags in ds[split]["aspect_list"]:
            split_of_set[frozenset(tags)].add(split)
            for tag in tags:
                samples[tag] += 1
                present[tag].add(split)
    assert all(len(s) == 1 for s in split_of_set.values())  # no attribute set in two splits
    assert [t for t, n in samples.items() if n >= 3 and present[t] != set(SPLITS)] == []


def test_split_on_distilled_musiccaps(distilled_run):
    """The real distilled set (3.7k pairs): 70/15/15, no set in two splits, every tag of >= 3 samples everywhere."""
    rows = pq.read_table(distilled_run / "distilled.parquet", columns=["id", "aspect_list"]).to_pylist()
    result = assign_splits(rows)
    counts = {s: sum(1 for v in result.split_of.values() if v == s) for s in SPLITS}
    for split, share in zip(SPLITS, (0.70, 0.15, 0.15)):
        assert abs(counts[split] / len(rows) - share) < 0.01
    sets = defaultdict(set)
    present = defaultdict(set)
    samples = defaultdict(int)
    for row in rows:
        split = result.split_of[row["id"]]
        sets[frozenset(row["aspect_list"])].add(split)
        for tag in row["aspect_list"]:
            present[tag].add(split)
            samples[tag] += 1
    assert all(len(s) == 1 for s in sets.values())
    assert result.unsatisfiable == {}
    assert all(present[t] == set(SPLITS) for t, n in samples.items() if n >= 3)
    # Deterministic whatever the row order.
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert assign_splits(shuffled).split_of == result.split_of


def test_split_reports_a_tag_it_cannot_spread():
    # "oud" has 4 samples but only one attribute set: it can be in one split only.
    rows = [{"id": f"a{i}", "aspect_list": ["oud", "mellow", "slow tempo"]} for i in range(4)]
    rows += [{"id": f"b{i}", "aspect_list": ["piano", f"mood{i}"]} for i in range(6)]
    result = assign_splits(rows)
    assert result.unsatisfiable["oud"] == 1
    assert len({result.split_of[f"a{i}"] for i in range(4)}) == 1
    assert "piano" not in result.unsatisfiable  # 6 sets: spread over the three splits
    assert {result.split_of[f"b{i}"] for i in range(6)} == set(SPLITS)


def test_subsets_are_nested_stratified_and_deterministic(distilled_run):
    """On the real distilled set's train split: sizes, nesting, and the tag rule of the card."""
    rows = pq.read_table(distilled_run / "distilled.parquet", columns=["id", "aspect_list"]).to_pylist()
    split_of = assign_splits(rows).split_of
    members = {r["id"]: r["aspect_list"] for r in rows if split_of[r["id"]] == "train"}
    counts = defaultdict(int)
    for tags in members.values():
        for tag in set(tags):
            counts[tag] += 1
    subsets = nested_subsets(members)
    assert subsets[0.10] <= subsets[0.25]
    for fraction, keep in subsets.items():
        assert len(keep) == round(fraction * len(members))
        need = subset_min_positives(fraction)
        kept = {t for i in keep for t in members[i]}
        assert [t for t, n in counts.items() if n >= need and t not in kept] == []
    shuffled = dict(reversed(list(members.items())))
    assert nested_subsets(shuffled) == subsets
    assert subset_min_positives(0.25) == 4 and subset_min_positives(0.10) == 10
    one = dict(list(members.items())[:1])
    assert nested_subsets(one) == {0.10: set(one), 0.25: set(one)} and nested_subsets({})[0.10] == set()


def test_concept_sets_helper(prepared):
    train = prepared["default"]["train"]
    tag = max(label_counts(train), key=label_counts(train).get)
    positives, randoms = concept_sets(train, tag, n=1, n_random=3, seed=0)
    assert len(positives) == 1 and tag in positives[0]["aspect_list"] and len(randoms) == 3
    assert all(tag not in tags for r in randoms for tags in r["aspect_list"])
    with pytest.raises(ConceptCapsError, match=r"'no such tag' is not a ConceptCaps tag"):
        concept_sets(train, "no such tag")


def label_counts(split) -> dict:
    counts = defaultdict(int)
    for tags in split["aspect_list"]:
        for tag in tags:
            counts[tag] += 1
    return counts


def test_cache_follows_the_run(audio_run, copy_run, tmp_path):
    run = copy_run(audio_run)
    before = run_fingerprint(run)
    table = pq.read_table(run / "captions.parquet")
    pq.write_table(table.slice(0, 9), run / "captions.parquet")
    assert run_fingerprint(run) != before
    # The edited run is prepared afresh (9 rows), not served from the cache of the first one.
    _, first = prepare(audio_run, "default", tmp_path / "cache")
    _, second = prepare(run, "default", tmp_path / "cache")
    assert sum(first.num_rows.values()) == 10 and sum(second.num_rows.values()) == 9


def test_clear_errors(audio_run, audio_captions_run, copy_run, tmp_path):
    with pytest.raises(ConceptCapsError, match="audio generate"):
        ConceptCaps(config_name="audio", data_dir=str(audio_captions_run), cache_dir=str(tmp_path / "c0"))
    with pytest.raises(ConceptCapsError, match="data_dir"):
        ConceptCaps(config_name="default")

    run = copy_run(audio_run)
    shard = min((run / "audio").glob("shard-*.parquet"))
    lost = pq.read_table(shard, columns=["id"]).column("id").to_pylist()
    shard.unlink()
    with pytest.raises(ConceptCapsError, match=f"have no clip.*{lost[0]}"):
        prepare(run, "audio", tmp_path / "c1")

    other = min((run / "audio").glob("shard-*.parquet"))
    shutil.copy(other, run / "audio" / "shard-r007-000000.parquet")  # the same clips twice
    with pytest.raises(ConceptCapsError, match="more than one clip.*audio verify"):
        prepare(run, "audio", tmp_path / "c2")

    rows = pq.read_table(run / "captions.parquet").to_pylist()
    rows[0]["aspect_list"] = ["not-a-tag"]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(run / "captions.parquet")), run / "captions.parquet")
    with pytest.raises(ConceptCapsError, match="not-a-tag.*not in the taxonomy"):
        prepare(run, "default", tmp_path / "c3")
