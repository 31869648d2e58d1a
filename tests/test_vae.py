"""The beta-VAE stages on a run distilled from the real CSV: training, save/load,
metrics, and sampling rules, determinism and conditioning."""

import json

import pandas as pd
import pytest
import torch

from generation.errors import ConceptCapsError
from generation.run_dir import read_manifest
from generation.taxonomy import CATEGORIES, Taxonomy
from generation.vae_model import BetaVAE, multi_hot
from generation.vae_sample import VaeSampleArguments, sample_attributes


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
