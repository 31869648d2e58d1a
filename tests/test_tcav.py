"""`conceptcaps tcav` and the Python API on synthetic worlds whose concepts are known
(generation/testing/tcav_world.py): a planted concept is found after the correction at the
documented recipe's size, a silent tag is not, a null model gives nothing, a result that cannot
pass says so, activations are computed once per clip, and any torch model (a factory module, a
torch.export file, a transformers checkpoint with custom code) runs end to end."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from conceptcaps_pipeline.cli import main
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import read_manifest
from conceptcaps_pipeline.tcav import TcavSettings, run
from conceptcaps_pipeline.testing.tcav_world import (
    PLANTED,
    SILENT,
    ToneClassifier,
    tone_rows,
    write_release,
)

FACTORY = "conceptcaps_pipeline.testing.tcav_world:tone_classifier"
LAYERS = ["conv", "mix"]  # conv: (batch, channels, time); mix: (batch, time, features)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tones-world release: 300 + 60 one-second clips."""
    import torch

    torch.set_num_threads(1)  # two shared cores: more threads only slow a tiny model down
    root = tmp_path_factory.mktemp("tones")
    write_release(root / "release", {"train": tone_rows(300, 0), "test": tone_rows(60, 1)})
    return root


def cli(root, *flags: str, run_dir: str = "run") -> int:
    return main(["tcav", "--run", str(root / run_dir), "--dataset", str(root / "release"), "--model", FACTORY,
                 "--layers", *LAYERS, "--concepts", PLANTED, SILENT, "--targets", "jazz", "--n", "20",
                 "--n_cavs", "10", "--batch_size", "32", "--num_threads", "1", *flags])


def test_planted_concept_is_found_through_the_cli(world):
    assert cli(world) == 0
    out = world / "run" / "tcav"
    document = json.loads((out / "scores.json").read_text())
    by = {(r["concept"], r["layer"]): r for r in document["results"]}
    # The time axis was found from each layer's output shape: channels-first conv, time-second mix.
    assert document["settings"]["pool_dims"] == {"conv": [2], "mix": [1]}
    assert document["settings"]["max_duration"] == 1.0  # the clips' own length, not 30 s of padding
    # 4 tests, FDR: 2 x 4 / 0.05 - 1 = 159 random concepts, so a concept beyond all of them reaches p = 1/160.
    assert document["settings"]["n_random"] == 159 and document["family"]["tests"] == 4
    for layer in LAYERS:
        found = by[(PLANTED, layer)]
        assert found["significant"] and found["verdict"] == "uses it (above random)", found["verdict"]
        assert found["tcav_score"] >= 0.9 and found["p_value"] <= found["p_threshold"]
        assert found["p_min"] == pytest.approx(1 / 160)
        silent = by[(SILENT, layer)]
        assert not silent["significant"] and silent["verdict"] == "not separable"
    report = (out / "report.md").read_text()
    assert report.count("| `conv` |") == 2 and "log-probability rises" in report and "smallest reachable p" in report
    assert (out / "tcav.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_manifest(world / "run", "tcav")["counts"]["forwarded_clips"] == 360  # every clip once


def test_a_second_target_needs_no_forward_pass_and_reruns_are_identical(world):
    first = json.loads((world / "run" / "tcav" / "scores.json").read_text())
    assert cli(world, "--targets", "jazz", "rock", "--primary", f"{PLANTED}:jazz", "--force") == 0
    assert read_manifest(world / "run", "tcav")["counts"]["forwarded_clips"] == 0  # every activation was cached
    second = json.loads((world / "run" / "tcav" / "scores.json").read_text())
    again = {(r["concept"], r["layer"]): r for r in second["results"] if r["target"] == "jazz"}
    for row in first["results"]:
        assert again[(row["concept"], row["layer"])]["cav_accuracies"] == row["cav_accuracies"]
    # --primary: piano -> jazz at both layers is the family; the rest is exploratory, with its own correction.
    assert second["family"]["tests"] == 2 and second["settings"]["n_random"] == 79
    families = {(r["concept"], r["target"]): r["family"] for r in second["results"]}
    assert families[(PLANTED, "jazz")] == "primary" and families[(PLANTED, "rock")] == "exploratory"
    rock = [r for r in second["results"] if r["target"] == "rock" and r["concept"] == PLANTED]
    assert all(r["verdict"].startswith("exploratory: ") for r in rock)
    assert second["shared_inputs"], "targets drawing inputs from one split share clips, and the report says so"
    assert "Targets share input clips" in (world / "run" / "tcav" / "report.md").read_text()


def recipe_world(planted: bool, seed: int):
    rows = tone_rows(300, seed)
    inputs = tone_rows(40, seed + 1000)
    concepts = ["piano", "organ", "flute", SILENT]  # the recipe's size: 4 concepts x 3 targets x 2 layers = 24
    sets = {c: np.array([c in r["aspect_list"] for r in rows]) for c in concepts}
    clips = [r["audio"] for r in inputs]
    return ToneClassifier(planted), sets, {"jazz": clips, "rock": clips, "metal": clips}, [r["audio"] for r in rows]


def test_power_and_level_at_the_recipe_size_through_the_api():
    """24 tests under the default FDR correction: the planted concept passes; a null model gives nothing.

    30 CAVs per concept (the default): with fewer, a random concept's CAVs all scoring 1 is common
    enough (the random pool's own quirks are shared by its CAVs) to cost the perfect concept its rank.
    """
    settings = TcavSettings(n=20, batch_size=50)
    model, sets, inputs, pool = recipe_world(True, 0)
    document = run(model, LAYERS, sets, inputs, pool=pool, settings=settings)
    assert document["tests"] == 24 and document["settings"]["n_random"] == 959
    significant = {(r["concept"], r["target"], r["layer"]) for r in document["results"] if r["significant"]}
    assert {(PLANTED, "jazz", layer) for layer in LAYERS} <= significant
    assert not {s for s in significant if s[0] != PLANTED}, significant  # organ, flute, banjo: unrelated to all
    assert document["cost_s"]["per_cav_ms"] < 5

    # The null twin (jazz reads a band no tag sounds in), jazz only: 8 tests, 319 random concepts.
    model, sets, inputs, pool = recipe_world(False, 0)
    document = run(model, LAYERS, sets, {"jazz": inputs["jazz"]}, pool=pool, settings=settings)
    assert document["settings"]["n_random"] == 319 and not any(r["significant"] for r in document["results"])
    assert all(r["verdict"] in ("no evidence", "not separable") for r in document["results"])


def test_a_result_that_could_not_pass_says_underpowered(world, caplog):
    model, sets, inputs, pool = recipe_world(True, 0)
    with caplog.at_level("WARNING"):  # 1-s clips heard as 2.5 s: most of each clip is padding, and it says so
        document = run(model, ["conv"], sets, {"jazz": inputs["jazz"]}, pool=pool,
                       settings=TcavSettings(n=20, n_cavs=10, n_random=10, correction="holm", max_duration=2.5))
    assert "100% of the clips are more than half zero padding at --max_duration 2.5 s" in caplog.text
    piano = next(r for r in document["results"] if r["concept"] == PLANTED)
    # 1/11 is the best rank among 10 random concepts; Holm over 4 tests needs 0.0125 at best.
    assert piano["tcav_score"] >= 0.9 and piano["p_min"] == pytest.approx(1 / 11) and not piano["significant"]
    assert re.match(r"underpowered \(smallest reachable p 0\.0909 > threshold 0\.0125; rerun with --n_random 159",
                    piano["verdict"]), piano["verdict"]


class FixedLength:
    """A model that crops or pads its input to one length: its layers' shapes never tell the time axis."""

    @staticmethod
    def make():
        import torch

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv1d(1, 3, 64, stride=32)
                self.head = torch.nn.Linear(3, 2)

            def forward(self, x):
                x = torch.nn.functional.pad(x, (0, max(0, 16000 - x.shape[1])))[:, :16000]
                return self.head(self.conv(x[:, None]).mean(-1))

        torch.manual_seed(0)
        return Model()


def test_an_ambiguous_time_axis_asks_for_pool_dims_and_checks_come_before_any_forward_pass():
    rows = tone_rows(60, 3)
    sets = {PLANTED: np.array([PLANTED in r["aspect_list"] for r in rows])}
    pool = [r["audio"] for r in rows]
    settings = TcavSettings(n=10, n_cavs=10, n_random=10)
    with pytest.raises(ConceptCapsError, match=r"outputs shape \[1, 3, 499\] whatever the clip length.*--pool_dims 2"):
        run(FixedLength.make(), ["conv"], sets, {0: pool[:5]}, pool=pool, settings=settings)
    document = run(FixedLength.make(), ["conv"], sets, {0: pool[:5]}, pool=pool,
                   settings=dataclasses.replace(settings, pool_dims=[2]))
    assert document["settings"]["pool_dims"] == {"conv": [2]} and document["tests"] == 1

    class Exploding(type(FixedLength.make())):
        def forward(self, x):
            raise AssertionError("no forward pass may run before the cheap checks")

    model = Exploding()
    for kwargs, message in [
        ({"settings": dataclasses.replace(settings, n=500)}, r"'piano' has only \d+ positive row\(s\), fewer than n=500"),
        ({"layers": ["conv2"]}, r"--layers 'conv2' is not a module of Exploding; closest: \['conv'\]"),
        ({"inputs": {"bebop": pool[:2]}}, r"inputs target 'bebop' is neither a class index"),
        ({"settings": dataclasses.replace(settings, primary=["piano:rock"])}, r"--primary 'piano:rock'"),
    ]:
        options = {"layers": ["conv"], "inputs": {0: pool[:5]}, "settings": settings, **kwargs}
        with pytest.raises(ConceptCapsError, match=message):
            run(model, options["layers"], sets, options["inputs"], pool=pool, settings=options["settings"])


CUSTOM_CODE = '''
import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class ToneNetConfig(PretrainedConfig):
    model_type = "tonenet-test"


class ToneNetForAudioClassification(PreTrainedModel):
    config_class = ToneNetConfig
    main_input_name = "input_values"

    def __init__(self, config):
        super().__init__(config)
        self.encoder = torch.nn.Conv1d(1, 8, 400, stride=160)  # (batch, channels, time): channels first
        self.classifier = torch.nn.Linear(8, config.num_labels)
        self.post_init()

    def forward(self, input_values, **kwargs):
        hidden = torch.relu(self.encoder(input_values[:, None]))
        return SequenceClassifierOutput(logits=self.classifier(hidden.mean(-1)))
'''


def test_a_transformers_model_with_custom_code_runs_with_trust_remote_code(world, tmp_path, monkeypatch, capsys):
    import sys

    import torch
    from transformers import Wav2Vec2FeatureExtractor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "tonenet_test.py").write_text(CUSTOM_CODE)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    import tonenet_test

    tonenet_test.ToneNetConfig.register_for_auto_class()
    tonenet_test.ToneNetForAudioClassification.register_for_auto_class("AutoModelForAudioClassification")
    torch.manual_seed(0)
    labels = ["blues", "jazz", "rock", "metal"]
    model = tonenet_test.ToneNetForAudioClassification(tonenet_test.ToneNetConfig(
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}))
    folder = tmp_path / "tonenet"
    model.save_pretrained(folder)
    sys.modules.pop("tonenet_test")
    flags = ["tcav", "--run", str(tmp_path / "run"), "--dataset", str(world / "release"), "--model", str(folder),
             "--layers", "encoder", "--concepts", PLANTED, "--targets", "jazz", "--n", "20", "--n_cavs", "10",
             "--n_random", "20", "--batch_size", "32"]
    # No feature extractor beside the weights: a message that says to save it.
    assert main(flags) == 2
    assert "has no preprocessor_config.json: save the feature extractor beside the model" in capsys.readouterr().err
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=False).save_pretrained(folder)
    # Custom code without --trust_remote_code: one line that names the flag, never a prompt.
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "holds custom code (auto_map in its config.json): read it, then pass --trust_remote_code" in err
    assert "[y/N]" not in err
    assert main([*flags, "--trust_remote_code"]) == 0
    document = json.loads((tmp_path / "run" / "tcav" / "scores.json").read_text())
    assert document["settings"]["pool_dims"] == {"encoder": [2]} and document["tests"] == 1


def test_torch_export_and_torchscript_files(world, tmp_path, capsys):
    import torch

    model = ToneClassifier(True).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(model, (torch.zeros(2, 16000),), dynamic_shapes=({0: batch},)),
                      str(tmp_path / "tone.pt2"))
    base = ["tcav", "--run", str(tmp_path / "run"), "--dataset", str(world / "release"), "--concepts", PLANTED,
            "--targets", "1", "--n", "20", "--n_cavs", "10", "--n_random", "20", "--batch_size", "32"]
    # An exported program takes one clip length: its time axis cannot be seen, so --pool_dims says it.
    assert main([*base, "--model", str(tmp_path / "tone.pt2"), "--layers", "conv"]) == 2
    assert "give --pool_dims" in capsys.readouterr().err
    assert main([*base, "--model", str(tmp_path / "tone.pt2"), "--layers", "conv", "--pool_dims", "2"]) == 0
    document = json.loads((tmp_path / "run" / "tcav" / "scores.json").read_text())
    assert document["results"][0]["tcav_score"] >= 0.9  # target 1 is jazz: the planted tone is found
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 16000)), str(tmp_path / "tone.pt"))
    assert main([*base, "--model", str(tmp_path / "tone.pt"), "--layers", "conv"]) == 2
    assert "TorchScript, which takes no hooks" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--targets", "bebop"], r"--targets \['bebop'\] are not classes of .*jazz"),
    (["--layers", "cnv"], r"--layers 'cnv' is not a module of .*'conv'"),
    (["--concepts", "pianoo"], r"'pianoo' is not a ConceptCaps tag of this dataset \(closest: 'piano'"),
    (["--n_random", "5"], r"--n_random 5: use at least 10 random concepts"),
    (["--test", "z"], r"--test 'z': use one of empirical, pooled, ttest, mannwhitney"),
    (["--n", "500"], r"--concepts 'piano' in split 'train' has only \d+ positive row\(s\), fewer than n=500"),
    (["--primary", "piano:rock"], r"--primary 'piano:rock': give CONCEPT:TARGET"),
    (["--model", "no_such_module:make"], r"cannot import 'make' from 'no_such_module'"),
])
def test_bad_input_is_one_line(world, flags, message, capsys):
    base = {"--run": str(world / "bad"), "--dataset": str(world / "release"), "--model": FACTORY,
            "--layers": "conv", "--concepts": PLANTED, "--targets": "jazz"}
    for flag, value in zip(flags[::2], flags[1::2]):
        base[flag] = value
    code = main(["tcav", *[part for pair in base.items() for part in pair]])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("conceptcaps:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err and re.search(message, errors[0]), err
    assert not (world / "bad" / "tcav" / "activations").exists()  # every check ran before a forward pass


def test_the_api_streams_a_loaded_release(world):
    """pool and inputs as datasets splits with `audio`: clips are streamed, the clip length read from duration_s."""
    from conceptcaps import load_release, tag_mask

    train, test = (load_release(world / "release", "audio", split) for split in ("train", "test"))
    document = run(ToneClassifier(True), ["conv"], {PLANTED: tag_mask(train, PLANTED)}, {"jazz": test}, pool=train,
                   settings=TcavSettings(n=20, n_cavs=10, n_random=19, batch_size=32))
    (row,) = document["results"]
    assert document["settings"]["max_duration"] == 1.0 and document["clips"]["pool"] == 300
    assert row["tcav_score"] >= 0.9 and row["p_value"] == pytest.approx(1 / 20)


def test_the_cav_accuracy_gate_means_something_at_small_n():
    """At n = 4 one CAV's held-out accuracy is 0, 0.5 or 1, and random concepts reach 0.7 by chance:
    the gate also asks a concept to beat 95% of its random concepts' accuracy."""
    rows = tone_rows(120, 7)
    pool = [r["audio"] for r in rows]
    sets = {c: np.array([c in r["aspect_list"] for r in rows]) for c in (PLANTED, SILENT)}
    gates = []
    for seed in range(3):
        document = run(ToneClassifier(True), ["conv"], sets, {"jazz": pool[:10]}, pool=pool,
                       settings=TcavSettings(n=4, n_cavs=10, n_random=19, seed=seed))
        by = {r["concept"]: r for r in document["results"]}
        assert by[PLANTED]["separable"] and not by[SILENT]["separable"]
        gates.append(by[SILENT]["cav_accuracy_gate"])
    assert max(gates) >= 0.65  # a fixed bar of 0.7 alone is within reach of random concepts here
