"""The `conceptcaps` console script: help texts and clear errors without tracebacks."""

import subprocess
import sys

from conceptcaps_pipeline.stages import STAGES


def conceptcaps(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "conceptcaps_pipeline.cli", *args], capture_output=True, text=True, timeout=300, check=False, **kwargs
    )


def test_help_lists_every_command():
    result = conceptcaps("--help")
    assert result.returncode == 0
    for entry in STAGES:
        assert f"  {' '.join(entry.words)} " in result.stdout and entry.help in result.stdout


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


def test_out_is_an_alias_of_run_in_flags_and_config_files(tmp_path, musiccaps_csv):
    config = tmp_path / "distill.yaml"
    config.write_text(f"source: {musiccaps_csv}\nout: {tmp_path / 'from_yaml'}\n")
    assert conceptcaps("distill", "--config", str(config)).returncode == 0
    assert (tmp_path / "from_yaml" / "distilled.parquet").is_file()
    help_text = conceptcaps("run", "--help").stdout
    assert "--run RUN, --out RUN" in help_text


def test_version_and_group_listing():
    from conceptcaps_pipeline import __version__

    result = conceptcaps("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"conceptcaps {__version__}"
    for group in ("vae", "audio", "captions", "captioner", "concepts", "taxonomy"):
        result = conceptcaps(group)
        verbs = [" ".join(s.words) for s in STAGES if s.words[0] == group]
        assert result.returncode == 0 and verbs and all(verb in result.stdout for verb in verbs), result.stderr
        others = [" ".join(s.words) for s in STAGES if s.words[0] != group]
        assert not any(f"  {other} " in result.stdout for other in others)
    assert conceptcaps("vae", "shuffle").returncode == 2  # an unknown verb is still an error


def test_env_reports_versions_devices_and_paths():
    import json

    import torch

    report = json.loads(conceptcaps("env", "--json").stdout)
    assert report["packages"]["torch"] == torch.__version__
    assert report["devices"]["cpu_cores"] >= 1 and len(report["devices"]["gpus"]) == torch.cuda.device_count()
    assert report["paths"]["taxonomy"].endswith("taxonomy.yaml")
    text = conceptcaps("env").stdout
    assert "- packages:" in text and "transformers:" in text and "- ffmpeg:" in text


def test_no_flag_help_says_what_it_does():
    result = conceptcaps("build", "--help")
    assert "Same as --audio false." in result.stdout


def test_debug_logging_is_the_projects_own(tmp_path, musiccaps_csv):
    """CONCEPTCAPS_LOG_LEVEL=DEBUG shows this project's debug lines, not third-party libraries' (matplotlib, ...)."""
    import os

    env = {**os.environ, "CONCEPTCAPS_LOG_LEVEL": "DEBUG", "MPLCONFIGDIR": str(tmp_path / "mpl")}
    script = ("import logging, matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt\n"
              "from conceptcaps_pipeline.cli import configure_logging\n"
              "configure_logging()\n"
              "logging.getLogger('conceptcaps_pipeline.demo').debug('project detail')\n"
              f"plt.figure(); plt.text(0.5, 0.5, 'font lookup'); plt.savefig({str(tmp_path / 'x.png')!r})\n"
              "logging.getLogger('matplotlib').warning('third-party warning')\n"
              "logging.basicConfig(level=logging.INFO)\n"  # as some libraries do: must not print lines twice
              "logging.getLogger('conceptcaps_pipeline.demo').info('once')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                            check=False)
    lines = result.stderr.splitlines()
    assert any("DEBUG conceptcaps_pipeline.demo: project detail" in line for line in lines), result.stderr
    assert not any("DEBUG" in line and "matplotlib" in line for line in lines), result.stderr
    assert any("third-party warning" in line for line in lines)  # warnings still reach stderr
    assert sum(line.endswith(": once") for line in lines) == 1, result.stderr  # "conceptcaps" holds "once" too


def test_docs_spell_every_flag_with_underscores():
    """The docs use one spelling, the underscore flags (as TRL and the YAML keys do)."""
    import re
    from pathlib import Path

    from conceptcaps_pipeline.options import make_parser

    root = Path(__file__).resolve().parents[1]
    flags = {o for s in STAGES for a in make_parser(s.words)._actions for o in a.option_strings if "_" in o}
    dashed = {flag.replace("_", "-") for flag in flags}
    pattern = re.compile(r"(?<![\w-])--[a-z0-9]+(?:-[a-z0-9]+)+(?![\w-])")
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "generation" / "presets").glob("*"))]
    found = [(page.name, m) for page in pages for m in pattern.findall(page.read_text()) if m in dashed]
    assert not found, found


def test_help_shows_each_options_default():
    """Every optional flag's help says what happens without it: `(default: ...)`, as the flag would take it."""
    import argparse

    from conceptcaps_pipeline.options import make_parser

    text = conceptcaps("vae", "sample", "--help").stdout
    assert "Number of attribute sets to sample. (default: 1000)" in " ".join(text.split())
    assert "(default: none)" in text and "(default: false)" in text  # an empty list, a bool
    for entry in STAGES:
        for action in make_parser(entry.words)._actions:
            if action.option_strings and action.default is not argparse.SUPPRESS and not action.required:
                assert "default:" in (action.help or "").lower() or action.help.startswith("Same as --"), \
                    (entry.command, action.option_strings)
