"""The paper's baselines as options of existing stages, scored by `conceptcaps evaluate --baseline`:
the captioner's base model without its adapter (zero-shot) and random tag sets under the same
rules (random control), on real MusicCaps data and tiny models."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.evaluate.run import EvaluateArguments, evaluate_run
from conceptcaps_pipeline.run_dir import read_manifest
from conceptcaps_pipeline.vae.sample import VaeSampleArguments, sample_attributes


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, distilled_run):
    from conceptcaps_pipeline.testing.tiny_eval_models import build_tiny_bert

    texts = pq.read_table(distilled_run / "distilled.parquet", columns=["caption"]).column("caption").to_pylist()
    return str(build_tiny_bert(tmp_path_factory.mktemp("tiny_bert") / "bert", texts))


def test_random_control_is_scored_beside_the_real_sets(sampled_run, copy_run):
    run = copy_run(sampled_run)
    with pytest.raises(ConceptCapsError, match=r"attributes_random\.parquet not found.*--random_control"):
        evaluate_run(EvaluateArguments(run=str(run), baseline="random_control"))
    sample_attributes(VaeSampleArguments(run=str(run), n=1000, seed=0, random_control=True))
    sample_attributes(VaeSampleArguments(run=str(run), n=1000, seed=0, force=True))
    evaluate_run(EvaluateArguments(run=str(run), baseline="random_control"))
    baseline = json.loads((run / "eval_random_control" / "metrics.json").read_text())
    assert not (run / "eval").exists() and read_manifest(run, "evaluate") is None
    assert read_manifest(run, "evaluate_random_control")["counts"]["rows"] == 4
    value = {r["metric"]: r["value"] for r in baseline["rows"]}
    assert value["Tags-per-set distance from the data, TVD (attributes_random.parquet)"] < 0.1
    assert set(baseline["skipped"]) == {"VAE", "caption quality", "attribute coverage", "CLAP", "FAD"}
    assert baseline["skipped"]["VAE"] == "not part of the random_control baseline"
    assert "Baseline `random_control`" in (run / "eval_random_control" / "report.md").read_text()
    # The real sets, scored the same way by the main evaluation, follow the data's tag pairs more closely.
    evaluate_run(EvaluateArguments(run=str(run), skip=["caption_quality"]))
    main = {r["metric"]: r["value"] for r in json.loads((run / "eval" / "metrics.json").read_text())["rows"]}
    assert main["Co-occurrence cosine (attributes.parquet)"] > value["Co-occurrence cosine (attributes_random.parquet)"]
    assert main["Co-occurrence cosine, random-tag control"] is not None  # from vae/metrics.json


def test_zero_shot_captions_are_scored_apart(captioner_run, tiny_bert, tmp_path):
    from conceptcaps_pipeline.captions.generate import CaptionsArguments, generate_captions

    run = tmp_path / "run"
    shutil.copytree(captioner_run, run)
    quick = {"max_new_tokens": 24, "require_end_of_turn": False, "max_failure_rate": 1.0, "seed": 1, "limit": 12}
    generate_captions(CaptionsArguments(run=str(run), zero_shot=True, **quick))
    options = {"bertscore_model": tiny_bert, "mauve_model": tiny_bert, "mauve_pooling": "mean",
               "max_reference_captions": 12, "mauve_num_buckets": "2"}
    manifest = evaluate_run(EvaluateArguments(run=str(run), baseline="zero_shot", **options))
    metrics = json.loads((run / "eval_zero_shot" / "metrics.json").read_text())
    value = {r["metric"]: r["value"] for r in metrics["rows"]}
    assert "Attribute coverage (captions_zero_shot.parquet)" in value
    assert 0 <= value["Recording-quality remarks (captions_zero_shot.parquet)"] <= 1
    assert "BLEU (sacreBLEU / 100)" in value and "Recording-quality remarks (validation captions)" in value
    captioner = metrics["details"]["caption_quality"]["captioner"]
    assert captioner["adapter"] is None and captioner["base_model"]  # the base model alone
    assert manifest["inputs"]["captions_zero_shot"] and not (run / "eval").exists()
    assert set(metrics["skipped"]) >= {"VAE", "sampled sets", "CLAP", "FAD"}


def test_unknown_baseline_is_a_clear_error(sampled_run):
    with pytest.raises(ConceptCapsError, match=r"--baseline fine_tuned: unknown baseline; choose from zero_shot"):
        evaluate_run(EvaluateArguments(run=str(sampled_run), baseline="fine_tuned"))
