"""The attribute-regularised VAE on the real MusicCaps distill: the attributes and the mood table,
the AR-VAE loss, interpretability and the plain twin in metrics.json, steering with --set, and
the explorer's grid."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conceptcaps_pipeline.cli import main
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.taxonomy import Taxonomy
from conceptcaps_pipeline.vae.lsr import (
    ATTRIBUTES,
    attribute_matrix,
    attribute_spec,
    decode_grid,
    load_lsr,
    pairwise_order_loss,
    regularised_dims,
)
from conceptcaps_pipeline.vae.sample import VaeSampleArguments, sample_attributes
from conceptcaps_pipeline.vae.train import VaeTrainArguments, check_arguments

REGULARISED = ["tempo", "instrument_count", "vocal", "arousal"]  # the lsr_run fixture's; valence is left out


def test_every_mood_tag_has_an_arousal_and_valence():
    taxonomy = Taxonomy.load()
    spec = attribute_spec(taxonomy)  # raises for a missing or out-of-range entry
    assert set(spec.mood_affect) == set(taxonomy.categories["mood"])
    for arousal, valence in spec.mood_affect.values():
        assert 0 <= arousal <= 1 and 0 <= valence <= 1
    affect = spec.mood_affect
    assert affect["calming"][0] < affect["relaxing"][0] < affect["energetic"][0] < affect["aggressive"][0]
    assert affect["melancholic"][1] < affect["mellow"][1] < affect["happy"][1]
    assert taxonomy.version == "1.1.0"


def test_a_missing_mood_entry_is_a_clear_error():
    taxonomy = Taxonomy.load()
    taxonomy.attributes = {**taxonomy.attributes, "mood_affect": {
        k: v for k, v in taxonomy.attributes["mood_affect"].items() if k != "groovy"}}
    with pytest.raises(ConceptCapsError, match=r"no \[arousal, valence\] for mood tag\(s\) \['groovy'\]"):
        attribute_spec(taxonomy)


def test_attributes_of_the_distilled_sets(distilled_run):
    taxonomy = Taxonomy.load(distilled_run / "taxonomy.json")
    frame = pd.read_parquet(distilled_run / "distilled.parquet")
    sets = [list(s) for s in frame["aspect_list"]]
    values = attribute_matrix(sets, list(ATTRIBUTES), attribute_spec(taxonomy))
    tempo, count, vocal, arousal, valence = values.T
    has_tempo = np.array([len(t) > 0 for t in frame["tempo"]])
    assert np.array_equal(~np.isnan(tempo), has_tempo)  # no tempo tag: undefined, left out of the loss
    assert set(np.unique(tempo[has_tempo])) == {0, 1 / 3, 2 / 3, 1}
    fast = np.array(["fast tempo" in t for t in frame["tempo"]])
    assert (tempo[fast] == 1).all()
    instrumental = np.array(["instrumental" in s for s in sets])
    assert (vocal[instrumental] == 0).all() and (vocal == 1).sum() > 1000
    assert np.nanmin(count) == 0 and np.nanmax(count) >= 5
    assert np.array_equal(np.isnan(arousal), np.array([len(m) == 0 for m in frame["mood"]]))
    assert np.nanmin(valence) >= 0 and np.nanmax(valence) <= 1
    calm = np.array(["calming" in m and len(m) == 1 for m in frame["mood"]])
    assert (arousal[calm] == 0.10).all()


def test_pairwise_order_loss_rewards_the_attribute_order():
    a = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    ordered = pairwise_order_loss(torch.tensor([-3.0, -1.0, 1.0, 3.0]), a, delta=10.0)
    reversed_ = pairwise_order_loss(torch.tensor([3.0, 1.0, -1.0, -3.0]), a, delta=10.0)
    assert ordered < 0.01 and reversed_ > 1.4  # 12 of 16 pairs differ: 12 * 2 / 16 = 1.5 at the limit
    # equal attributes pull their latents together
    tied = torch.tensor([0.0, 0.0])
    assert pairwise_order_loss(torch.tensor([0.0, 0.0]), tied, 10.0) < pairwise_order_loss(torch.tensor([0.0, 1.0]),
                                                                                           tied, 10.0)


def test_lsr_metrics_interpretability_and_plain_twin(lsr_run):
    metrics = json.loads((lsr_run / "vae" / "metrics.json").read_text())
    interp = metrics["interpretability"]
    assert interp["split"] == "validation"
    for k, name in enumerate(REGULARISED):
        assert interp[name]["regularised_dim"] == k
        assert interp[name]["dim"] == k and interp[name]["score"] > 0.75, (name, interp[name])
    assert interp["valence"]["score"] is not None and "regularised_dim" not in interp["valence"]
    comparison = metrics["lsr"]["comparison"]
    plain = metrics["lsr"]["plain"]
    assert comparison["jaccard"]["plain"] == plain["validation"]["jaccard"]
    assert comparison["jaccard"]["regularised"] == metrics["validation"]["jaccard"]
    assert math.isclose(comparison["jaccard"]["cost"], plain["validation"]["jaccard"] - metrics["validation"]["jaccard"])
    for name in REGULARISED:  # the plain model keeps the attributes spread over many dimensions
        assert comparison["interpretability"][name]["plain"] < comparison["interpretability"][name]["regularised"]
    assert comparison["target"] == {"interpretability_min": 0.8, "jaccard_cost_max": 0.02,
                                    "met": comparison["target"]["met"]}
    history = json.loads((lsr_run / "vae" / "history.json").read_text())
    assert history[-1]["lsr_loss"] < history[0]["lsr_loss"]


def test_lsr_json_maps_are_monotone(lsr_run):
    record = load_lsr(lsr_run)
    assert regularised_dims(lsr_run) == {name: k for k, name in enumerate(REGULARISED)}
    for name in REGULARISED:
        latent = record["attributes"][name]["map"]["latent"]
        assert latent == sorted(latent) and latent[-1] - latent[0] > 0.2
        assert record["attributes"][name]["map"]["spearman"] > 0.75
    assert record["attributes"]["tempo"]["map"]["range"] == [0.0, 1.0]


def test_setting_tempo_moves_the_sampled_tempo(lsr_run, copy_run):
    run = copy_run(lsr_run)
    shares = []
    for tempo in (0.0, 1 / 3, 2 / 3, 1.0):
        sample_attributes(VaeSampleArguments(run=str(run), n=100, seed=0, set=[f"tempo={tempo}"], force=True))
        frame = pd.read_parquet(run / "attributes.parquet")
        tempos = [t[0] for t in frame["tempo"] if len(t)]  # set sizes come from the data: about half have a tempo
        assert len(tempos) > 20
        shares.append((np.mean([t == "fast tempo" for t in tempos]), np.mean([t == "slow tempo" for t in tempos])))
    fast, slow = zip(*shares)
    assert list(fast) == sorted(fast) and fast[-1] - fast[0] > 0.5, shares
    assert list(slow) == sorted(slow, reverse=True) and slow[0] - slow[-1] > 0.5, shares


def test_fast_and_calm_from_the_command_line(lsr_run, copy_run):
    run = copy_run(lsr_run)
    assert main(["vae", "sample", "--run", str(run), "--n", "60", "--set", "tempo=0.9", "--set", "arousal=0.2"]) == 0
    frame = pd.read_parquet(run / "attributes.parquet")
    spec = attribute_spec(Taxonomy.load(run / "taxonomy.json"))
    values = attribute_matrix([list(s) for s in frame["aspect_list"]], ["tempo", "arousal"], spec)
    assert np.nanmean(values[:, 0]) > 0.7 and np.nanmean(values[:, 1]) < 0.45
    default = attribute_matrix([list(s) for s in pd.read_parquet(run / "distilled.parquet")["aspect_list"]],
                               ["arousal"], spec)
    assert np.nanmean(values[:, 1]) < np.nanmean(default)


@pytest.mark.parametrize(
    "settings, message",
    [
        (["valence=0.8"], r"not regularised on 'valence'.*--lsr tempo instrument_count vocal arousal valence"),
        (["energy=0.5"], r"'energy' is not a latent attribute"),
        (["tempo0.9"], r"write ATTRIBUTE=VALUE"),
        (["tempo=fast"], r"'fast' is not a number"),
        (["tempo=1.5"], r"outside the values seen in training, \[0, 1\]"),
        (["tempo=0.2", "tempo=0.4"], r"tempo is given twice"),
    ],
)
def test_bad_settings(lsr_run, copy_run, settings, message):
    run = copy_run(lsr_run)
    with pytest.raises(ConceptCapsError, match=message):
        sample_attributes(VaeSampleArguments(run=str(run), n=4, set=settings, force=True))


def test_set_on_a_plain_vae_is_a_clear_error(lsr_run, copy_run, capsys):
    run = copy_run(lsr_run)
    (run / "vae" / "lsr.json").unlink()  # what a VAE trained without --lsr leaves
    assert main(["vae", "sample", "--run", str(run), "--n", "4", "--set", "tempo=0.9"]) == 2
    assert "--set needs a VAE trained with latent attributes" in capsys.readouterr().err


def test_unknown_lsr_attribute():
    with pytest.raises(ConceptCapsError, match=r"--lsr 'tempi' is not a latent attribute \(did you mean 'tempo'\?\)"):
        check_arguments(VaeTrainArguments(run="x", lsr=["tempi"]))


def test_decode_grid_over_tempo_and_vocals(lsr_run):
    dims = regularised_dims(lsr_run)
    record = load_lsr(lsr_run)
    tempo_values = [record["attributes"]["tempo"]["map"]["latent"][i] for i in (0, -1)]
    vocal_values = [record["attributes"]["vocal"]["map"]["latent"][i] for i in (0, -1)]
    grid = decode_grid(lsr_run, dims["tempo"], dims["vocal"], tempo_values, vocal_values)
    assert len(grid) == 2 and all(len(row) == 2 for row in grid)
    assert "fast tempo" not in grid[0][0] and "fast tempo" in grid[1][0] and "fast tempo" in grid[1][1]
    assert "instrumental" in grid[0][0] and not {"male vocal", "female vocal"} & set(grid[0][0])
    assert "instrumental" not in grid[0][1] and "instrumental" not in grid[1][1]  # the vocal axis drops it
    with pytest.raises(ConceptCapsError, match=r"latent dimension 99 does not exist"):
        decode_grid(lsr_run, 99, 0, [0.0], [0.0])
