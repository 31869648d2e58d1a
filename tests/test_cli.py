"""The `conceptcaps` console script: help texts and clear errors without tracebacks."""

import subprocess
import sys

from generation.cli import COMMANDS


def conceptcaps(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "generation.cli", *args], capture_output=True, text=True, timeout=300, check=False, **kwargs
    )


def test_help_lists_every_command():
    result = conceptcaps("--help")
    assert result.returncode == 0
    for words, entry in COMMANDS.items():
        assert " ".join(words) in result.stdout and entry[3] in result.stdout


def test_stage_help_explains_options():
    result = conceptcaps("vae", "sample", "--help")
    assert result.returncode == 0
    assert "conceptcaps vae sample --run runs/demo" in result.stdout  # docstring with the commands
    assert "--require" in result.stdout and "Tags every set must contain" in result.stdout


def test_missing_artifact_is_one_clear_error(tmp_path):
    result = conceptcaps("vae", "train", "--run", str(tmp_path))
    assert result.returncode == 2
    assert "distilled.parquet not found" in result.stderr and "conceptcaps distill" in result.stderr
    assert "Traceback" not in result.stderr


def test_yaml_config_with_override(tmp_path, musiccaps_csv):
    config = tmp_path / "distill.yaml"
    config.write_text(f"source: {musiccaps_csv}\nmin_categories: 4\n")
    result = conceptcaps("distill", "--config", str(config), "--out", str(tmp_path / "run"), "--min-categories", "2")
    assert result.returncode == 0, result.stderr
    import json

    manifest = json.loads((tmp_path / "run" / "manifests" / "distill.json").read_text())
    assert manifest["arguments"]["min_categories"] == 2
    assert manifest["arguments"]["source"] == str(musiccaps_csv)
