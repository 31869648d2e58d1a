"""`conceptcaps run`: the smoke preset end to end on the real CSV, and its errors.

The end-to-end run (the conftest `smoke_run` fixture, shared with tests/test_docs.py and tests/test_quiet.py)
takes about a minute or two on 2 cores; CI runs it."""

import json

import pytest
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_all import RunArguments, load_preset, run_pipeline

from conceptcaps import load_release


@pytest.mark.slow
def test_smoke_run_ends_with_a_loadable_release(smoke_run):
    import datasets

    run, manifest = smoke_run
    assert manifest["counts"]["stages"] == list(load_preset("smoke"))
    for model in ("llm", "musicgen", "clap", "bert", "classifier"):
        assert (run / "models" / model / "config.json").exists()
    attributes = datasets.load_dataset("parquet", data_files=str(run / "attributes.parquet"), split="train")
    release = load_release(run / "release", "audio")
    # The concept quota of the preset: each of its tags in at least 12 sets, topped up conditionally.
    quota = load_preset("smoke")["vae_sample"]
    for tag in quota["tags"]:
        assert sum(tag in tags for tags in attributes["aspect_list"]) >= quota["min_per_tag"]
    assert {s for s in attributes["source"] if s != "prior"} <= {f"conditional:{t}" for t in quota["tags"]}
    rows = sum(len(split) for split in release.values())
    captions = json.loads((run / "manifests" / "captions_generate.json").read_text())["counts"]
    # Every caption that was written has exactly one row in the release; failures are reported.
    assert rows == captions["captions"] and captions["captions"] + captions["failed"] == len(attributes)
    first = release["train"][0]
    assert isinstance(first["aspect_list"], list) and first["audio"]["array"].size > 0
    assert (run / "eval" / "metrics.json").exists() and (run / "eval" / "report.md").exists()
    card = (run / "release" / "README.md").read_text()
    # The card says what the run was: tiny random models, so noise; and it carries the metrics.
    assert "pipeline check, not data" in card and "`RUN/models/llm`" in card and str(run / "models") not in card
    assert "## Evaluation" in card and "CLAP score" in card
    report = (run / "eval" / "report.md").read_text()
    assert "tiny random-weight models" in report and str(run / "models") not in report
    # The tcav stage ran on the release with the tiny classifier: every (concept, target, layer) scored.
    scores = json.loads((run / "tcav" / "scores.json").read_text())
    tcav = load_preset("smoke")["tcav"]
    assert scores["tests"] == len(tcav["concepts"]) * len(tcav["targets"]) * len(tcav["layers"])
    assert (run / "tcav" / "tcav.png").exists() and "RUN/models/classifier" in (run / "tcav" / "report.md").read_text()
    # The explorer page was written last, over the release and the VAE.
    assert (run / "explorer" / "index.html").is_file() and any((run / "explorer" / "audio").glob("*.flac"))
    # Concept evidence (audio score; a tiny CLAP, so noise): per-concept agreement in concepts.json, a card figure.
    concepts = json.loads((run / "release" / "concepts.json").read_text())
    assert set(concepts["evidence"]["concepts"]) == {t for tags in concepts["categories"].values() for t in tags}
    assert "figures/evidence_auc.png" in card and (run / "release" / "figures" / "evidence_auc.png").is_file()
    assert all(set(e) >= {"auc", "auc_interval", "top_k_share"} for e in concepts["evidence"]["concepts"].values())
    assert any(e["auc"] is not None for e in concepts["evidence"]["concepts"].values())
    # ... and the per-label evidence in every audio config: a float32 list aligned with `labels`.
    assert release["train"].features["evidence"] == datasets.List(datasets.Value("float32"))
    for config in ("audio", "25pct_audio", "10pct_audio"):
        for split in load_release(run / "release", config).values():
            for row in split.remove_columns("audio"):
                assert len(row["evidence"]) == len(row["labels"]) > 0
                assert all(e is None or 0.0 <= e <= 1.0 for e in row["evidence"])
    assert "| `evidence` |" in card and "not scored" not in card


@pytest.mark.slow
def test_rerun_resumes_without_redoing_work(smoke_run, musiccaps_csv):
    run, first = smoke_run
    stamps = {p: p.stat().st_mtime_ns for p in (run / "distilled.parquet", run / "captions.parquet", run / "vae" / "model.safetensors")}
    again = run_pipeline(RunArguments(run=str(run), preset="smoke", source=str(musiccaps_csv)))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert sum(again["counts"]["stage_wall_time_s"].values()) < sum(first["counts"]["stage_wall_time_s"].values())


def test_unknown_preset_and_stage(tmp_path):
    with pytest.raises(ConceptCapsError, match=r"preset 'nope' not found.*\['paper', 'paper_lsr', 'smoke'\]"):
        run_pipeline(RunArguments(run=str(tmp_path), preset="nope"))
    with pytest.raises(ConceptCapsError, match=r"unknown stage\(s\) \['dance'\]"):
        run_pipeline(RunArguments(run=str(tmp_path), preset="smoke", stages=["dance"]))


def test_paper_preset_holds_the_paper_settings():
    paper = load_preset("paper")
    assert paper["captioner_train"]["model"]["lora_r"] == 32
    assert paper["captioner_train"]["model"]["lora_alpha"] == 8
    assert paper["captioner_train"]["model"]["lora_dropout"] == 0.26
    assert paper["captioner_train"]["model"]["load_in_4bit"] is True
    # The batch size is not pinned: on a GPU the stage takes the largest batch its memory holds.
    assert paper["audio_generate"] == {"model": "facebook/musicgen-large", "duration": 30.0, "guidance_scale": 3.3,
                                       "top_k": 250}
    assert paper["vae_sample"]["n"] == 20600 and paper["vae_sample"]["min_per_tag"] == 75
    assert paper["tcav"]["concepts"] == ["fast tempo", "slow tempo", "piano", "acoustic guitar"]
    assert paper["tcav"]["targets"] == ["jazz", "metal", "rock"] and paper["tcav"]["n"] == 50


def test_paper_lsr_extends_paper_with_latent_attributes():
    paper, lsr = load_preset("paper"), load_preset("paper_lsr")
    assert lsr["vae_train"]["lsr"] == ["tempo", "instrument_count", "vocal", "arousal", "valence"]
    assert lsr["vae_train"]["lsr_compare"] is True and "vae_explain" in lsr
    assert {k: v for k, v in lsr.items() if k not in ("vae_train", "vae_explain")} == {
        k: v for k, v in paper.items() if k != "vae_train"}


def test_extends_merges_sections_and_refuses_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: smoke\nvae_sample:\n  n: 7\ncaptioner_train:\n  sft:\n    num_train_epochs: 2\n")
    preset = load_preset(str(tmp_path / "a.yaml"))
    smoke = load_preset("smoke")
    assert preset["vae_sample"] == {**smoke["vae_sample"], "n": 7}
    assert preset["captioner_train"]["sft"] == {**smoke["captioner_train"]["sft"], "num_train_epochs": 2}
    assert preset["captioner_train"]["captioner"] == smoke["captioner_train"]["captioner"]
    (tmp_path / "b.yaml").write_text("extends: c.yaml\n")
    (tmp_path / "c.yaml").write_text("extends: b.yaml\n")
    with pytest.raises(ConceptCapsError, match=r"must name another preset \(no cycles\)"):
        load_preset(str(tmp_path / "b.yaml"))


@pytest.mark.parametrize("preset", ["smoke", "paper", "paper_lsr"])
def test_every_preset_section_is_valid_options(preset, tmp_path):
    """Each section of the shipped presets builds its stage's dataclasses (tiny models left unbuilt)."""
    import importlib

    from conceptcaps_pipeline.stages import by_name

    for stage, section in load_preset(preset).items():
        entry = by_name(stage)
        module = importlib.import_module(entry.module)
        for sub, class_name in zip(entry.sections, entry.arguments):
            options = dict((section or {}).get(sub) or {}) if sub else dict(section or {})
            if class_name not in ("SFTConfig", "ModelConfig"):
                options["run"] = str(tmp_path)
            getattr(module, class_name)(**options)
