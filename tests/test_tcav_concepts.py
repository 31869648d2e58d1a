"""Concept sets are one function: `concept_sets()` and `conceptcaps concepts export` give the same sets for
the same seed; random sets avoid the tags, each other and repeats; shared positives are listed; captum
`Concept`s come out ready for `TCAV.interpret`. On a tones-world release (generation/testing/tcav_world.py)."""

from __future__ import annotations

import json
import logging
import tempfile

import pytest
from conceptcaps_pipeline.cli import main
from conceptcaps_pipeline.errors import ConceptCapsError
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


# -- positives by evidence (--min_evidence) -------------------------------------------------------
class BandScorer:
    """A stand-in CLAP for the tones world: a clip's similarity to a tone tag rises with the energy at its
    tone, every other tag sits at 0.5, so a label whose tone sounds ranks top of its category and one whose
    tone is absent ranks last."""

    name = "band-scorer"

    def __init__(self, tags):
        self.tags = tags

    def embed_audio(self, clips):
        import numpy as np
        from conceptcaps_pipeline.audio.shards import decode_flac
        from conceptcaps_pipeline.testing.tcav_world import RATE, TONES_HZ

        out = []
        for data in clips:
            wave, _ = decode_flac(data)
            spectrum = np.abs(np.fft.rfft(wave.reshape(-1).astype(np.float64)))
            floor = np.median(spectrum)
            vector = np.full(len(self.tags), 0.5)
            for j, tag in enumerate(self.tags):
                if tag in TONES_HZ:
                    ratio = spectrum[round(TONES_HZ[tag] * len(wave.reshape(-1)) / RATE)] / floor
                    vector[j] = ratio / (ratio + 10.0)
            out.append(vector / np.linalg.norm(vector))
        return np.stack(out)

    def embed_text(self, texts):
        import numpy as np

        out = []
        for text in texts:
            vector = np.zeros(len(self.tags))
            vector[self.tags.index(max((t for t in self.tags if t in text), key=len))] = 1.0
            out.append(vector)
        return np.stack(out)


def mislabelled_rows(n: int, seed: int) -> tuple[list[dict], set[str]]:
    """Tones-world rows where every third clip without a piano tone is labelled piano all the same; and the ids of
    the clips that do sound it."""
    rows = tone_rows(n, seed)
    sounded = {r["id"] for r in rows if "piano" in r["aspect_list"]}
    for k, row in enumerate(r for r in rows if r["id"] not in sounded):
        if k % 3 == 0:
            row["aspect_list"].append("piano")
    return rows, sounded


def score_rows(run, rows) -> None:
    """RUN/taxonomy.json, captions.parquet and audio/ of `rows`, scored by `conceptcaps audio score`'s code with the
    BandScorer: RUN/audio_evidence/evidence.parquet as the stage writes it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.audio.score import ScoreArguments, score_audio
    from conceptcaps_pipeline.audio.shards import caption_sha256, encode_flac, shard_schema
    from conceptcaps_pipeline.taxonomy import CATEGORIES, Taxonomy
    from conceptcaps_pipeline.testing.tcav_world import RATE

    taxonomy = Taxonomy.load()
    (run / "audio").mkdir(parents=True)
    (run / "taxonomy.json").write_text(json.dumps(taxonomy.to_json()))
    captions = [{"id": r["id"], "caption": ", ".join(r["aspect_list"]),
                 **{c: [t for t in r["aspect_list"] if taxonomy.category_of[t] == c] for c in CATEGORIES}}
                for r in rows]
    strings = pa.list_(pa.string())
    schema = pa.schema([("id", pa.string()), ("caption", pa.string()), *[(c, strings) for c in CATEGORIES]])
    pq.write_table(pa.Table.from_pylist(captions, schema=schema), run / "captions.parquet")
    shard = [{"id": r["id"], "audio": encode_flac(r["audio"][None], RATE), "duration_s": len(r["audio"]) / RATE,
              "sampling_rate": RATE, "seed": 0, "model": "tones", "settings": "{}",
              "caption_sha256": caption_sha256(c["caption"])} for r, c in zip(rows, captions)]
    pq.write_table(pa.Table.from_pylist(shard, schema=shard_schema()), run / "audio" / "shard-r000-00000000-000000.parquet")
    tags = [t for c in CATEGORIES for t in taxonomy.categories[c]]
    score_audio(ScoreArguments(run=str(run), batch_size=64, n_bootstrap=0), scorer=BandScorer(tags))


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(run, sounded ids): a tones-world run whose train clips are scored, with its release in RUN/release."""
    run = tmp_path_factory.mktemp("scored")
    rows, sounded = mislabelled_rows(120, 0)
    write_release(run / "release", {"train": rows, "test": tone_rows(20, 1)})
    score_rows(run, rows)
    return run, sounded


def evidence_of(run, tag: str) -> dict[str, float]:
    import pyarrow.parquet as pq

    table = pq.read_table(run / "audio_evidence" / "evidence.parquet").to_pylist()
    return {r["id"]: dict(zip(r["labels"], r["evidence"]))[tag] for r in table if tag in r["labels"]}


def test_min_evidence_keeps_exactly_the_positives_that_reach_it(scored, caplog):
    run, sounded = scored
    train = load_release(run / "release", "default", "train")
    piano = evidence_of(run, "piano")
    reaching = {i for i, e in piano.items() if e >= 0.5}
    assert reaching == sounded and len(piano) > len(sounded)  # the stand-in hears exactly the sounded tones
    with caplog.at_level(logging.INFO):
        sets = concept_sets(train, "piano", n=len(reaching), n_random=3, seed=1, min_evidence=0.5, evidence=run)
    assert set(sets.positives["id"]) == reaching  # every positive reaching q, none below
    assert sets.evidence == {"min_evidence": 0.5, "source": str(run / "audio_evidence" / "evidence.parquet"),
                             "positives": len(piano), "kept": len(reaching), "unscored": 0}
    assert f"{len(reaching)} of {len(piano)} positives (" in caplog.text and "have evidence >= 0.5" in caplog.text
    # Random sets avoid every clip labelled piano, heard or not.
    assert not {i for r in sets.randoms for i in r["id"]} & set(piano)
    # A smaller set draws from the same clips; asking for more than remain names both counts.
    assert set(concept_sets(train, "piano", n=5, n_random=0, min_evidence=0.5, evidence=run).positives["id"]) <= reaching
    with pytest.raises(ConceptCapsError, match=rf"only {len(reaching)} positive row\(s\) with evidence >= 0.5 \(of "
                                               rf"{len(piano)} labelled\), fewer than n={len(reaching) + 1}"):
        concept_sets(train, "piano", n=len(reaching) + 1, min_evidence=0.5, evidence=run)
    # q = 0 reads no evidence: today's sets, on a dataset without any.
    today = concept_sets(train, ["piano", "organ"], n=10, n_random=4, seed=3)
    zero = concept_sets(train, ["piano", "organ"], n=10, n_random=4, seed=3, min_evidence=0.0)
    assert all(zero[t].positives["id"] == today[t].positives["id"] and zero[t].evidence is None for t in today)
    assert [r["id"] for r in zero["piano"].randoms] == [r["id"] for r in today["piano"].randoms]


def test_min_evidence_reads_the_release_column_and_says_when_there_is_none(scored):
    run, _ = scored
    train = load_release(run / "release", "default", "train")
    with pytest.raises(ConceptCapsError, match=r"no `evidence` column: run `conceptcaps audio score --run RUN`"):
        concept_sets(train, "piano", n=5, min_evidence=0.5)
    with pytest.raises(ConceptCapsError, match="--min_evidence 1.5"):
        concept_sets(train, "piano", n=5, min_evidence=1.5, evidence=run)
    # An `evidence` column aligned with `labels` (what an evidence-carrying release holds) gives the same sets.
    names = train.features["labels"].feature.names
    by_id = {i: {} for i in train["id"]}
    import pyarrow.parquet as pq

    for r in pq.read_table(run / "audio_evidence" / "evidence.parquet").to_pylist():
        by_id[r["id"]] = dict(zip(r["labels"], r["evidence"]))
    column = [[by_id[i][names[label]] for label in labels] for i, labels in zip(train["id"], train["labels"])]
    carrying = train.add_column("evidence", column)
    from_column = concept_sets(carrying, "piano", n=8, n_random=2, seed=5, min_evidence=0.5)
    from_run = concept_sets(train, "piano", n=8, n_random=2, seed=5, min_evidence=0.5, evidence=run)
    assert from_column.positives["id"] == from_run.positives["id"] and from_column.evidence["kept"] == \
        from_run.evidence["kept"] and from_column.evidence["source"] == "the release's evidence column"


def test_export_min_evidence_matches_the_api(scored, tmp_path, capsys):
    run, sounded = scored
    train = load_release(run / "release", "default", "train")
    assert main(["concepts", "export", "--run", str(run), "--dest", str(tmp_path / "a"), "--format", "ids",
                 "--tags", "piano", "organ", "--n", "10", "--n_random", "3", "--seed", "2", "--min_evidence", "0.5"]) == 0
    listing = json.loads((tmp_path / "a" / "concept_sets.json").read_text())
    sets = concept_sets(train, ["piano", "organ"], n=10, n_random=3, seed=2, min_evidence=0.5, evidence=run)
    for tag in ("piano", "organ"):
        assert sorted(sets[tag].positives["id"]) == sorted(listing["concepts"][tag])
        counts = {k: sets[tag].evidence[k] for k in ("positives", "kept", "unscored")}
        assert listing["evidence"]["concepts"][tag] == counts
    assert set(listing["concepts"]["piano"]) <= sounded and listing["evidence"]["min_evidence"] == 0.5
    assert [sorted(r["id"]) for r in sets["piano"].randoms] == [sorted(v) for v in listing["random"].values()]
    # --min_evidence 0 gives today's export (no evidence read).
    assert export(run / "release", tmp_path / "b", "--tags", "piano", "--n", "10", "--n_random", "3", "--seed", "2",
                  "--min_evidence", "0") == 0
    plain = concept_sets(train, "piano", n=10, n_random=3, seed=2)
    zero = json.loads((tmp_path / "b" / "concept_sets.json").read_text())
    assert sorted(zero["concepts"]["piano"]) == sorted(plain.positives["id"]) and zero["evidence"] is None
    # A release that is not RUN/release, without an evidence column: one line, exit 2, nothing written.
    capsys.readouterr()
    code = main(["concepts", "export", "--run", str(tmp_path / "probe"), "--dataset", str(run / "release"), "--dest",
                 str(tmp_path / "c"), "--format", "ids", "--tags", "piano", "--n", "5", "--min_evidence", "0.5"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("conceptcaps:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err and not (tmp_path / "c").exists()
    assert "--min_evidence 0.5 needs per-label evidence" in lines[0] and "conceptcaps audio score" in lines[0]


def test_tcav_min_evidence_draws_heard_positives(scored):
    """`tcav --min_evidence`: the report says how many positives remained, and piano's CAVs, drawn from clips that
    sound it, separate better than CAVs drawn from every clip labelled piano."""
    import torch

    torch.set_num_threads(1)
    run, sounded = scored
    flags = ["--model", "conceptcaps_pipeline.testing.tcav_world:tone_classifier", "--layers", "conv",
             "--concepts", "piano", "--targets", "jazz", "--n", "20", "--n_cavs", "10", "--n_random", "10",
             "--batch_size", "32", "--num_threads", "1"]
    assert main(["tcav", "--run", str(run), *flags]) == 0
    plain = json.loads((run / "tcav" / "scores.json").read_text())
    assert main(["tcav", "--run", str(run), *flags, "--min_evidence", "0.5"]) == 0
    heard = json.loads((run / "tcav" / "scores.json").read_text())
    piano = evidence_of(run, "piano")
    assert "evidence" not in plain and heard["evidence"]["concepts"]["piano"] == {
        "positives": len(piano), "kept": len(sounded), "unscored": 0}
    assert heard["settings"]["min_evidence"] == 0.5
    (before,), (after,) = plain["results"], heard["results"]
    assert after["cav_accuracy"] > before["cav_accuracy"] + 0.1, (before["cav_accuracy"], after["cav_accuracy"])
    report = (run / "tcav" / "report.md").read_text()
    assert f"piano: {len(sounded)} of {len(piano)}" in report
    # The Python API with the same masks (positives by evidence, labelled rows kept out of random sets) fits the
    # same CAVs as the command.
    import numpy as np
    from conceptcaps_pipeline.release.concepts import select_by_evidence, tag_mask
    from conceptcaps_pipeline.tcav import TcavSettings
    from conceptcaps_pipeline.tcav import run as tcav_run

    train, test = (load_release(run / "release", "audio", split) for split in ("train", "test"))
    labelled = {"piano": tag_mask(train, "piano")}
    eligible, _ = select_by_evidence(train, labelled, 0.5, run)
    document = tcav_run(ToneClassifier(True), ["conv"], eligible, {"jazz": test}, pool=train, labelled=labelled,
                        settings=TcavSettings(n=20, n_cavs=10, n_random=10, batch_size=32))
    np.testing.assert_allclose(document["results"][0]["cav_accuracies"], after["cav_accuracies"])


def test_tcav_min_evidence_without_evidence_is_one_line(scored, tmp_path, capsys):
    run, _ = scored
    code = main(["tcav", "--run", str(tmp_path / "probe"), "--dataset", str(run / "release"), "--model",
                 "conceptcaps_pipeline.testing.tcav_world:tone_classifier", "--layers", "conv", "--concepts", "piano",
                 "--targets", "jazz", "--n", "5", "--min_evidence", "0.5"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("conceptcaps:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "--min_evidence 0.5 needs per-label evidence" in lines[0] and "conceptcaps audio score" in lines[0]
    assert not (tmp_path / "probe" / "tcav" / "activations").exists()  # refused before any forward pass
