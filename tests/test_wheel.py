"""A regular install works: build the wheel, install it into a fresh venv, run the smoke preset
from another folder, and use the metric modules without the repository on the path.

The fresh venv gets no packages from the registry (CI may only reach it for the install
step): a .pth file points it at this venv's site-packages for the dependencies, whose own
.pth files (this checkout's editable install) Python does not process from there, so
`conceptcaps_pipeline`, `conceptcaps_eval` and `conceptcaps` come from the wheel alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                            check=False)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: build with this venv's setuptools, no registry needed.
    _run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
         cwd=out)
    (path,) = out.glob("conceptcaps-*.whl")
    return path


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=venv).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_wheel_holds_every_stage_resource(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("attribute_coverage", "caption_quality", "clap_score", "fad", "vae_metrics"):
        assert f"conceptcaps_eval/{name}/{name}.py" in names and f"conceptcaps_eval/{name}/README.md" in names
    assert "conceptcaps_eval/attribute_coverage/tag_mentions.py" in names
    assert {"conceptcaps_pipeline/data/taxonomy.yaml", "conceptcaps_pipeline/presets/smoke.yaml",
            "conceptcaps_pipeline/presets/paper.yaml", "conceptcaps_pipeline/configs/captioner.yaml",
            "conceptcaps_pipeline/dataset_card/template.md", "conceptcaps_pipeline/explore/static/app.js",
            "conceptcaps.py"} <= names


def test_wheel_installs_only_the_projects_own_top_level_names(wheel):
    """No generic import name (`generation`, `dataset_card`, `tests`) lands in site-packages: only the project's."""
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0].removesuffix(".py") for name in names if ".dist-info/" not in name}
    assert top == {"conceptcaps", "conceptcaps_pipeline", "conceptcaps_eval"}, top


def test_metric_module_runs_without_the_pipeline(fresh_venv, tmp_path):
    """attribute_coverage loaded by path needs `evaluate` only: no `conceptcaps_pipeline` on the path."""
    taxonomy = tmp_path / "taxonomy.json"
    taxonomy.write_text(json.dumps({"categories": {
        "genre": {"jazz": {"aliases": ["jazzy"]}, "rock": {"aliases": []}},
        "mood": {"mellow": {"aliases": []}},
        "instrument": {"piano": {"aliases": ["grand piano"]}},
        "tempo": {"slow tempo": {"aliases": ["slow"]}},
    }}))
    script = (
        "import importlib.util, json, evaluate\n"
        "assert importlib.util.find_spec('conceptcaps_pipeline') is None\n"
        f"m = evaluate.load({str(ROOT / 'eval' / 'attribute_coverage')!r})\n"
        "print(json.dumps(m.compute(predictions=['A slow jazzy tune on a grand piano.', 'A rock song.'],\n"
        f"    references=[['jazz', 'piano', 'slow tempo'], ['rock', 'mellow']], taxonomy={str(taxonomy)!r})))\n"
    )
    result = json.loads(_run([str(fresh_venv / "bin" / "python"), "-c", script], cwd=tmp_path))
    assert result["coverage"] == pytest.approx(0.75) and result["full_coverage_rate"] == 0.5


@pytest.mark.slow
def test_installed_wheel_runs_the_smoke_preset_from_another_folder(wheel, fresh_venv, tmp_path, musiccaps_csv):
    python = fresh_venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         cwd=tmp_path)
    where = _run([str(python), "-c", ("import conceptcaps_pipeline, conceptcaps_eval, conceptcaps; "
                  "print(conceptcaps_pipeline.__file__, conceptcaps_eval.__file__, conceptcaps.__file__)")], cwd=tmp_path)
    assert str(ROOT) not in where and where.count(str(fresh_venv)) == 3
    env = {**os.environ, "PYTHONPATH": ""}
    _run([str(fresh_venv / "bin" / "conceptcaps"), "run", "--preset", "smoke", "--source", str(Path(musiccaps_csv).resolve()),
          "--run", "smoke"], cwd=tmp_path, env=env, timeout=900)
    run = tmp_path / "smoke"
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert {row["stage"] for row in metrics["rows"]} >= {"VAE", "LLM", "audio"}
    assert (run / "release" / "README.md").is_file() and (run / "tcav" / "scores.json").is_file()
    coverage = json.loads((run / "manifests" / "captions_generate.json").read_text())["counts"]
    assert coverage["captions"] > 0
