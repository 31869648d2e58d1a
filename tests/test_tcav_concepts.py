"""Concept sets are one function: `concept_sets()` and `conceptcaps concepts export` give the same sets for
the same seed; random sets avoid the tags, each other and repeats; shared positives are listed; captum
`Concept`s come out ready for `TCAV.interpret`. On a tones-world release (generation/testing/tcav_world.py)."""

from __future__ import annotations

import json
import logging
import tempfile

import pytest
from conceptcaps_pipeline.cli import main
from conceptcaps_pipeline.release.concepts import to_captum_concepts
from conceptcaps_pipeline.testing.tcav_world import CLASSES, ToneClassifier, tone_rows, write_release

from conceptcaps import concept_sets, load_release


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return write_release(root / "release", {"train": tone_rows(120, 0), "test": tone_rows(20, 1)})


def export(release, out, *flags):
    return main(["concepts", "export", "--run", str(release.parent), "--dataset", str(release), "--out", str(out),
                 "--format", "ids", *flags])


def test_export_and_api_give_the_same_sets(release, tmp_path):
    train = load_release(release, "default", "train")
    assert export(release, tmp_path / "a", "--tags", "piano", "organ", "--n", "10", "--n_random", "4",
                  "--seed", "3") == 0
    listing = json.loads((tmp_path / "a" / "concept_sets.json").read_text())
    sets = concept_sets(train, ["piano", "organ"], n=10, n_random=4, seed=3)
    for tag in ("piano", "organ"):
        assert sorted(sets[tag].positives["id"]) == sorted(listing["concepts"][tag])
        assert all(tag in tags for tags in sets[tag].positives["aspect_list"])
    assert [sorted(r["id"]) for r in sets["piano"].randoms] == [sorted(v) for v in listing["random"].values()]
    # Random sets hold none of the exported tags, and with 4 x 10 rows from a larger pool they are disjoint.
    ids = [i for r in sets["piano"].randoms for i in r["id"]]
    assert len(ids) == len(set(ids)) == 40 and listing["random_excludes"] == ["piano", "organ"]
    assert not any({"piano", "organ"} & set(tags) for r in sets["piano"].randoms for tags in r["aspect_list"])
    # A tag's positives depend on the seed and the tag alone: the same whether asked alone or with others.
    assert sorted(concept_sets(train, "piano", n=10, n_random=0, seed=3).positives["id"]) == sorted(
        listing["concepts"]["piano"])
    # Clips that are positives of both concepts are listed.
    both = set(listing["concepts"]["piano"]) & set(listing["concepts"]["organ"])
    assert set(listing["shared_positives"].get("piano & organ", [])) == both


def test_small_pools_overlap_with_a_warning_and_never_repeat(release, caplog):
    train = load_release(release, "default", "train")
    pool = sum(not {"piano", "organ", "flute", "harp"} & set(t) for t in train["aspect_list"])
    with caplog.at_level(logging.WARNING):
        sets = concept_sets(train, ["piano", "organ", "flute", "harp"], n=5, n_random=pool, seed=0, random_size=3)
    assert f"random sets of 3 rows from a pool of {pool} rows" in caplog.text and "overlap" in caplog.text
    randoms = [tuple(sorted(r["id"])) for r in sets["piano"].randoms]
    assert len(randoms) == pool and len(set(randoms)) == pool  # overlapping, but no set twice


def test_captum_concepts_are_ready_for_tcav_interpret(release):
    import torch
    from captum.concept import TCAV, Concept
    from conceptcaps_pipeline.tcav.stats import HeldOutLinearClassifier

    torch.set_num_threads(1)
    train = load_release(release, "audio", "train")
    concepts = to_captum_concepts(concept_sets(train, "piano", n=12, n_random=2, seed=0), batch_size=6)
    assert [c.name for c in concepts] == ["piano", "random_0", "random_1"] and [c.id for c in concepts] == [0, 1, 2]
    assert all(isinstance(c, Concept) for c in concepts)
    batch = next(iter(concepts[0].data_iter))
    assert tuple(batch.shape) == (6, 16000) and batch.dtype == torch.float32
    inputs = torch.stack([torch.from_numpy(r["audio"]) for r in tone_rows(8, 5)])
    model = ToneClassifier(planted=True)
    with tempfile.TemporaryDirectory() as work:
        tcav = TCAV(model, ["conv"], classifier=HeldOutLinearClassifier(), save_path=work)
        scores = tcav.interpret(inputs, [[concepts[0], concepts[1]]], target=CLASSES.index("jazz"))
    assert scores["0-1"]["conv"]["sign_count"].shape == (2,)
