"""The beta-VAE stages on a run distilled from the real CSV: training, save/load,
metrics, and sampling rules, determinism and conditioning."""

import json
import shutil

import pandas as pd
import pytest
import torch
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import read_manifest
from conceptcaps_pipeline.taxonomy import CATEGORIES, Taxonomy
from conceptcaps_pipeline.vae.model import BetaVAE, multi_hot
from conceptcaps_pipeline.vae.sample import VaeSampleArguments, sample_attributes


def test_training_lowers_the_loss(vae_run):
    history = json.loads((vae_run / "vae" / "history.json").read_text())
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert history[-1]["validation_loss"] < history[0]["validation_loss"]


def test_metrics_json(vae_run):
    metrics = json.loads((vae_run / "vae" / "metrics.json").read_text())
    for split in ("train", "validation"):
        assert 0 <= metrics[split]["jaccard"] <= 1 and 0 <= metrics[split]["hamming_loss"] <= 1
    assert metrics["samples"]["n"] == 200 and 0 < metrics["samples"]["diversity"] <= 100
    assert 0 < metrics["samples"]["cooccurrence_cosine"] <= 1
    assert metrics["paper"]["jaccard"] == 0.716
    # A few epochs already beat chance: reconstructions share tags with the truth.
    assert metrics["validation"]["jaccard"] > 0.2


def test_save_load_round_trip_gives_identical_outputs(vae_run):
    model = BetaVAE.from_pretrained(str(vae_run / "vae"))
    again = BetaVAE.from_pretrained(str(vae_run / "vae"))
    frame = pd.read_parquet(vae_run / "distilled.parquet").head(16)
    x = multi_hot([list(s) for s in frame["aspect_list"]], model.tags)
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(x)[0]), again.decode(again.encode(x)[0]))
    assert model.tags == Taxonomy.load(vae_run / "taxonomy.json").tags
    assert (vae_run / "vae" / "model.safetensors").exists() and (vae_run / "vae" / "config.json").exists()


def test_sampled_sets_follow_the_rules(sampled_run):
    taxonomy = Taxonomy.load(sampled_run / "taxonomy.json")
    frame = pd.read_parquet(sampled_run / "attributes.parquet")
    assert len(frame) == 48 and frame["id"].is_unique and (frame["seed"] == 0).all()
    for row in frame.itertuples():
        tags = list(row.aspect_list)
        assert set(tags) <= set(taxonomy.tags)
        assert sum(1 for c in CATEGORIES if len(getattr(row, c))) >= 3
        assert len(row.tempo) <= 1
        assert taxonomy.contradiction_in(set(tags)) is None
    assert read_manifest(sampled_run, "vae_sample")["counts"]["n"] == 48


def test_same_seed_same_file_other_seed_other_sets(sampled_run, copy_run):
    run = copy_run(sampled_run)
    first = pd.read_parquet(sampled_run / "attributes.parquet")
    sample_attributes(VaeSampleArguments(run=str(run), n=48, seed=0, force=True))
    assert pd.read_parquet(run / "attributes.parquet").equals(first)
    sample_attributes(VaeSampleArguments(run=str(run), n=48, seed=1, force=True))
    other = pd.read_parquet(run / "attributes.parquet")
    assert [list(x) for x in other["aspect_list"]] != [list(x) for x in first["aspect_list"]]


def test_conditional_sampling_honours_require_and_exclude(sampled_run, copy_run):
    run = copy_run(sampled_run)
    sample_attributes(
        VaeSampleArguments(run=str(run), n=40, seed=3, require=["jazz", "piano"], exclude=["male vocal", "rock"], force=True)
    )
    frame = pd.read_parquet(run / "attributes.parquet")
    for tags in frame["aspect_list"]:
        assert {"jazz", "piano"} <= set(tags)
        assert not {"male vocal", "rock"} & set(tags)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"require": ["jaz"]}, r"unknown --require tag 'jaz'.*'jazz'"),
        ({"exclude": ["male vocals"]}, r"alias of 'male vocal'"),
        ({"require": ["slow tempo", "fast tempo"]}, r"contradict"),
        ({"require": ["rock"], "exclude": ["rock"]}, r"both required and excluded"),
    ],
)
def test_bad_requests(sampled_run, copy_run, kwargs, message):
    run = copy_run(sampled_run)
    with pytest.raises(ConceptCapsError, match=message):
        sample_attributes(VaeSampleArguments(run=str(run), n=4, force=True, **kwargs))


def test_sample_without_model_is_a_clear_error(distilled_run):
    with pytest.raises(ConceptCapsError, match=r"vae not found.*conceptcaps vae train"):
        sample_attributes(VaeSampleArguments(run=str(distilled_run), n=4))


# -- set sizes: sampled sets are as long as the data's, per category too ----------------------
def _size_scores(sets, reference, taxonomy):
    import evaluate
    from conftest import ROOT

    metric = evaluate.load(str(ROOT / "eval" / "vae_metrics"))
    return metric.compute(predictions=sets[:1], references=sets[:1], labels=taxonomy.tags, samples=sets,
                          reference_sets=reference, categories=[taxonomy.category_of[t] for t in taxonomy.tags])


@pytest.fixture(scope="module")
def sized_run(sampled_run, tmp_path_factory):
    """sampled_run with 1,000 prior sets drawn with the default (data) sizes."""
    import shutil

    run = tmp_path_factory.mktemp("sized") / "run"
    shutil.copytree(sampled_run, run)
    sample_attributes(VaeSampleArguments(run=str(run), n=1000, seed=0, force=True))
    return run


def _train_sets(run):
    frame = pd.read_parquet(run / "distilled.parquet")
    return [list(s) for s in frame.loc[frame["split"] == "train", "aspect_list"]]


def test_sampled_sizes_match_the_data(sized_run):
    taxonomy = Taxonomy.load(sized_run / "taxonomy.json")
    sets = [list(s) for s in pd.read_parquet(sized_run / "attributes.parquet")["aspect_list"]]
    scores = _size_scores(sets, _train_sets(sized_run), taxonomy)
    assert scores["size_tvd"] < 0.1, scores
    for category in CATEGORIES:
        assert scores[f"size_tvd_{category}"] < 0.1, (category, scores)
        data, drawn = scores[f"mean_size_{category}_reference"], scores[f"mean_size_{category}_samples"]
        assert abs(drawn - data) <= 0.1 * data, (category, drawn, data)
    assert abs(scores["mean_size_samples"] - scores["mean_size_reference"]) <= 0.1 * scores["mean_size_reference"]
    assert scores["diversity"] >= 96
    for tags in sets:
        assert tags and taxonomy.contradiction_in(set(tags)) is None
        assert sum(1 for c in CATEGORIES if any(taxonomy.category_of[t] == c for t in tags)) >= 3


def test_threshold_sizes_are_the_short_sets_of_before(sized_run, copy_run):
    run = copy_run(sized_run)
    sample_attributes(VaeSampleArguments(run=str(run), n=300, seed=0, sizes="threshold", force=True))
    short = read_manifest(run, "vae_sample")["counts"]["mean_tags"]
    sample_attributes(VaeSampleArguments(run=str(run), n=300, seed=0, force=True))
    assert short < 0.8 * read_manifest(run, "vae_sample")["counts"]["mean_tags"]


def test_conditional_quota_with_data_sizes(sized_run, copy_run):
    run = copy_run(sized_run)
    sample_attributes(VaeSampleArguments(run=str(run), n=60, seed=2, require=["jazz"], min_per_tag=12,
                                         tags=["piano", "slow tempo"], force=True))
    frame = pd.read_parquet(run / "attributes.parquet")
    assert all("jazz" in tags for tags in frame["aspect_list"])
    for tag in ("piano", "slow tempo"):
        assert sum(tag in tags for tags in frame["aspect_list"]) >= 12
    assert (frame["source"] == "prior").sum() == 60
    # Conditional sets take the sizes of the training sets that hold the tag (jazz sets are long ones).
    assert 0.6 * 8 < frame["aspect_list"].map(len).mean() < 1.6 * 8


def test_random_control(sized_run, copy_run):
    run = copy_run(sized_run)
    before = (run / "attributes.parquet").read_bytes()
    manifest = sample_attributes(VaeSampleArguments(run=str(run), n=1000, seed=0, random_control=True))
    assert (run / "attributes.parquet").read_bytes() == before  # the real sets stay
    assert read_manifest(run, "vae_sample_random") == manifest and read_manifest(run, "vae_sample")["counts"]["n"] == 1000
    taxonomy = Taxonomy.load(run / "taxonomy.json")
    frame = pd.read_parquet(run / "attributes_random.parquet")
    sets = [list(s) for s in frame["aspect_list"]]
    assert (frame["source"] == "random").all() and len(sets) == 1000
    for tags in sets:
        assert taxonomy.contradiction_in(set(tags)) is None and len(set(tags)) == len(tags)
    random_scores = _size_scores(sets, _train_sets(run), taxonomy)
    assert random_scores["size_tvd"] < 0.1  # same sizes as the data ...
    vae_sets = [list(s) for s in pd.read_parquet(run / "attributes.parquet")["aspect_list"]]
    vae_scores = _size_scores(vae_sets, _train_sets(run), taxonomy)
    # ... but tags that go together less often than the VAE's do.
    assert random_scores["cooccurrence_cosine_offdiag"] < vae_scores["cooccurrence_cosine_offdiag"]
    # The same seed gives the same file.
    sample_attributes(VaeSampleArguments(run=str(run), n=1000, seed=0, random_control=True, force=True))
    assert pd.read_parquet(run / "attributes_random.parquet").equals(frame)


def test_metrics_json_has_both_jaccards_and_sizes(vae_run):
    metrics = json.loads((vae_run / "vae" / "metrics.json").read_text())
    for split in ("train", "validation"):
        for definition in ("decoding_rule", "threshold_0.5"):
            scores = metrics[split][definition]
            assert 0 <= scores["jaccard"] <= 1 and 0 <= scores["jaccard_micro"] <= 1
        assert metrics[split]["jaccard"] == metrics[split]["decoding_rule"]["jaccard"]
    assert set(metrics["jaccard_definitions"]) == {"decoding_rule", "threshold_0.5"}
    for name in ("samples", "random_control"):
        assert 0 <= metrics[name]["size_tvd"] <= 1 and metrics[name]["n"] == 200
    assert metrics["set_sizes"]["mean_tags"] > 7
    assert json.loads((vae_run / "vae" / "set_sizes.json").read_text())["summary"] == metrics["set_sizes"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sizes": "quantile"}, r"--sizes 'quantile': choose data"),
        ({"output": "../elsewhere.parquet"}, r"--output .*ending in \.parquet"),
        ({"output": "sets.csv"}, r"--output 'sets.csv'"),
    ],
)
def test_bad_size_options(sampled_run, copy_run, kwargs, message):
    run = copy_run(sampled_run)
    with pytest.raises(ConceptCapsError, match=message):
        sample_attributes(VaeSampleArguments(run=str(run), n=4, force=True, **kwargs))


def test_missing_set_sizes_is_a_clear_error(sampled_run, copy_run):
    run = copy_run(sampled_run)
    (run / "vae" / "set_sizes.json").unlink()
    with pytest.raises(ConceptCapsError, match=r"set_sizes\.json not found.*--sizes threshold"):
        sample_attributes(VaeSampleArguments(run=str(run), n=4, force=True))
    sample_attributes(VaeSampleArguments(run=str(run), n=4, sizes="threshold", force=True))


KILLED_AT_EPOCH = r'''
import os, signal, sys
from conceptcaps_pipeline.vae import train

save = train.save_checkpoint

def save_then_die(path, state):
    save(path, state)
    if len(state["history"]) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)

train.save_checkpoint = save_then_die
train.train_vae(train.VaeTrainArguments(run=sys.argv[1], **eval(sys.argv[3])))
'''


def test_a_training_killed_mid_way_resumes_to_the_same_model(distilled_run, tmp_path, caplog):
    """kill -9 after epoch 3 of 6, then the same command: it resumes at epoch 4 and ends with the bytes of an
    uninterrupted run (weights, Adam state and both random generators are in the checkpoint)."""
    import logging
    import os
    import subprocess
    import sys

    from conceptcaps_pipeline.vae.train import CHECKPOINT, VaeTrainArguments, train_vae

    options = {"epochs": 6, "hidden_dim": 64, "latent_dim": 8, "lr": 1e-3, "diversity_samples": 50, "num_threads": 1}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for run in (whole, killed):
        shutil.copytree(distilled_run, run)
    train_vae(VaeTrainArguments(run=str(whole), **options))
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AT_EPOCH)
    done = subprocess.run([sys.executable, str(script), str(killed), "3", repr(options)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert done.returncode == -9, done.stderr[-2000:]
    assert (killed / CHECKPOINT).is_file() and not (killed / "vae").exists()
    with caplog.at_level(logging.INFO, logger="conceptcaps_pipeline.vae.train"):
        train_vae(VaeTrainArguments(run=str(killed), **options))
    assert "resuming after epoch 3 of 6" in caplog.text
    for name in ("model.safetensors", "history.json", "metrics.json"):
        assert (killed / "vae" / name).read_bytes() == (whole / "vae" / name).read_bytes(), name
    assert not (killed / CHECKPOINT).exists() and not (whole / CHECKPOINT).exists()
