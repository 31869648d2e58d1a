"""`conceptcaps tcav` on synthetic releases whose concepts are known (generation/testing/tcav_world.py):
a planted concept is found, an unrelated one is not, noise is called significant near the nominal
rate, and activations are computed once per clip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conceptcaps_pipeline.cli import main
from conceptcaps_pipeline.run_dir import read_manifest
from conceptcaps_pipeline.tcav.stage import TcavArguments, experiment, prepare, run_tcav
from conceptcaps_pipeline.testing.tcav_world import (
    NOISE_CONCEPTS,
    PLANTED,
    UNRELATED,
    noise_rows,
    planted_rows,
    train_planted_classifier,
    write_release,
)
from conceptcaps_pipeline.testing.tiny_eval_models import build_tiny_audio_classifier

LAYERS = ["hubert.encoder.layers.0", "hubert.encoder.layers.1"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A planted-world release (400 + 60 one-second clips) and a tiny classifier trained on it."""
    import torch

    torch.set_num_threads(1)  # two shared cores: more threads only slow a tiny model down
    root = tmp_path_factory.mktemp("planted")
    rows = planted_rows(400, 0)
    write_release(root / "release", {"train": rows, "test": planted_rows(60, 1)})
    accuracy = train_planted_classifier(root / "model", rows)
    return root, accuracy


def planted_args(root, **overrides) -> TcavArguments:
    options = {"layers": LAYERS, "concepts": [PLANTED, UNRELATED], "targets": ["jazz"], "n": 10, "n_inputs": 30,
               "batch_size": 32, "max_duration": 1.0, "num_threads": 1, **overrides}
    return TcavArguments(run=str(root / "run"), dataset=str(root / "release"), model=str(root / "model"), **options)


def test_planted_concept_is_found_and_unrelated_one_is_not(planted):
    root, accuracy = planted
    assert accuracy > 0.9  # the classifier demonstrably uses the tones, the jazz tone (= piano) included
    run_tcav(planted_args(root))
    out = root / "run" / "tcav"
    document = json.loads((out / "scores.json").read_text())
    by = {(r["concept"], r["layer"]): r for r in document["results"]}
    found = by[(PLANTED, LAYERS[1])]
    assert found["significant"] and found["verdict"] == "uses it (above random)"
    assert found["tcav_score"] >= 0.9 and found["cav_accuracy"] >= 0.9 and found["p_adjusted"] < 0.05
    for layer in LAYERS:
        unrelated = by[(UNRELATED, layer)]
        assert not unrelated["significant"] and unrelated["cav_accuracy"] < 0.7 and unrelated["verdict"] == "not separable"
    assert document["tests"] == 4 and len(found["scores"]) == 30 and len(found["random_concept_means"]) == 20
    assert (out / "report.md").read_text().count("| `hubert.encoder.layers.") == 4
    assert (out / "tcav.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_manifest(root / "run", "tcav")["counts"]["forwarded_clips"] == 460


def test_a_second_target_needs_no_forward_pass_and_reruns_are_identical(planted):
    root, _ = planted
    first = json.loads((root / "run" / "tcav" / "scores.json").read_text())
    run_tcav(planted_args(root, targets=["jazz", "rock"], force=True))
    assert read_manifest(root / "run", "tcav")["counts"]["forwarded_clips"] == 0  # every activation was cached
    second = json.loads((root / "run" / "tcav" / "scores.json").read_text())
    again = {(r["concept"], r["layer"]): r for r in second["results"] if r["target"] == "jazz"}
    for row in first["results"]:
        same = again[(row["concept"], row["layer"])]
        assert same["scores"] == row["scores"] and same["cav_accuracies"] == row["cav_accuracies"]


def test_noise_is_called_significant_near_the_nominal_rate(tmp_path):
    """Noise clips, concept tags at random, an untrained classifier: every p < 0.05 is a false positive.

    Eight seeds x 4 concepts x 2 targets = 64 tests, with the accuracy gate off and no correction,
    so the share measures the test itself; benchmarks/tcav_calibration.py measures it on more runs.
    """
    write_release(tmp_path / "release", {"train": noise_rows(400, 0, share=0.06), "test": noise_rows(60, 1)})
    build_tiny_audio_classifier(tmp_path / "model")
    args = TcavArguments(run=str(tmp_path), dataset=str(tmp_path / "release"), model=str(tmp_path / "model"),
                         layers=[LAYERS[1]], concepts=list(NOISE_CONCEPTS), targets=["jazz", "rock"], n=10, n_cavs=10,
                         n_random=10, n_inputs=30, batch_size=32, max_duration=1.0, num_threads=1,
                         min_cav_accuracy=0.0, correction="none")
    prepared = prepare(args, tmp_path)
    p_values, gated = [], []
    for seed in range(8):
        work = tmp_path / f"work{seed}"
        work.mkdir()
        results = experiment(prepared, dataclasses.replace(args, seed=seed), work)["results"]
        p_values += [r["p_value"] for r in results]
        if seed == 0:  # the same results under the default gate and correction: nothing is separable
            gated = experiment(prepared, dataclasses.replace(args, min_cav_accuracy=0.7, correction="holm"),
                               tmp_path / "work0")["results"]
    share = sum(p < 0.05 for p in p_values) / len(p_values)
    assert len(p_values) == 64 and share <= 0.125, share
    assert not any(r["significant"] for r in gated) and all(not r["separable"] for r in gated)


@pytest.mark.parametrize("flags, message", [
    (["--targets", "bebop"], r"--targets \['bebop'\] are not classes of .*jazz"),
    (["--layers", "hubert.encoder.layer.1"], r"--layers 'hubert.encoder.layer.1' is not a module.*hubert.encoder.layers.1"),
    (["--concepts", "pianoo"], r"'pianoo' is not a ConceptCaps tag of this dataset \(closest: 'piano'"),
    (["--n_random", "5"], r"--n_random 5: use at least 10 random concepts"),
    (["--test", "z"], r"--test 'z': use one of pooled, ttest, mannwhitney"),
    (["--n", "500"], r"--concepts 'piano' in split 'train' has only \d+ positive row\(s\), fewer than n=500"),
])
def test_bad_input_is_one_line(planted, flags, message, capsys):
    import re

    root, _ = planted
    base = {"--run": str(root / "bad"), "--dataset": str(root / "release"), "--model": str(root / "model"),
            "--layers": LAYERS[1], "--concepts": PLANTED, "--targets": "jazz", "--max_duration": "1"}
    for flag, value in zip(flags[::2], flags[1::2]):
        base[flag] = value
    code = main(["tcav", *[part for pair in base.items() for part in pair]])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("conceptcaps:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err and re.search(message, errors[0]), err
