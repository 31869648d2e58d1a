"""benchmarks/gpu_check.py --dry_run runs every step of the GPU check at toy sizes on a CPU; the dependency pins agree."""

from __future__ import annotations

import importlib.util
import json
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
BOUNDED = ("torch", "transformers", "datasets", "trl", "peft", "accelerate")


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pyproject_bounds_and_the_constraints_file_agree():
    """Each fast-moving dependency has an upper bound in pyproject.toml, a pin in scripts/constraints-cpu.txt that
    the bound admits, and the pinned version is the one installed here (the one the suite runs on)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    specs = {Requirement(line).name: Requirement(line).specifier for line in project}
    pins = {}
    for line in (ROOT / "scripts" / "constraints-cpu.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (pin,) = requirement.specifier
            assert pin.operator == "==", line
            pins[requirement.name] = pin.version
    for name in BOUNDED:
        assert any(s.operator in ("<", "<=") for s in specs[name]), f"{name}: no upper bound in pyproject.toml"
        assert name in pins, f"{name}: not pinned in scripts/constraints-cpu.txt"
        assert specs[name].contains(pins[name]), f"{name}: pin {pins[name]} outside pyproject's {specs[name]}"
        installed = metadata.version(name).split("+")[0]
        assert installed == pins[name], f"{name}: {installed} installed, {pins[name]} pinned"
    for name, version in pins.items():  # every pin is admitted by pyproject where pyproject names the package
        if name in specs:
            assert specs[name].contains(version), f"{name}: pin {version} outside {specs[name]}"


def test_dry_run_runs_every_step(tmp_path, musiccaps_csv):
    gpu_check = load_gpu_check()
    report = gpu_check.main(["--dry_run", "--out", str(tmp_path), "--captions", str(musiccaps_csv)])
    steps = report["steps"]
    assert list(steps) == [name for name, _ in gpu_check.STEPS]
    for name, step in steps.items():
        expected = "skipped" if name == "multi_gpu" else "ok"
        assert step["status"] == expected, (name, step.get("error") or step)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"].keys() == steps.keys()
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| throughput | ok |" in markdown and "dry run" in markdown

    assert steps["environment"]["packages"]["transformers"]["matches"]
    assert steps["equivalence"]["toy"]["fp32"]["identical"]
    compiled = steps["compiled_step"]
    assert compiled["graphs"] == compiled["expected_graphs"] and compiled["recompiles_after_warm_up"] == 0
    assert compiled["calls_timed"] == compiled["timed_steps"] and compiled["graph_breaks"] == 0
    assert compiled["compiled_vs_eager_max_over_std"] == 0.0  # the counting backend runs the graph eagerly here
    assert compiled["compiled_vs_eager_best_code_agreement"] == 1.0
    rows = steps["throughput"]["rows"]
    assert [r["batch"] for r in rows] == [4, 8, 1] and rows[0]["memory_derived"]
    assert all(r["ms_per_step"] > 0 and r["projected_paper_hours"] > 0 and r["recompiles_after_warm_up"] == 0
               for r in rows)
    # The captions stage's choice, measured: merging into the de-quantised base is the adapter over the quantised
    # base up to float rounding; merging into the original weights is off by the quantisation error.
    forms = steps["captioner"]["adapter_forms"]
    assert forms["merged_dequantized"]["max_over_std"] < 1e-4
    assert forms["merged_original"]["max_over_std"] > 100 * forms["merged_dequantized"]["max_over_std"]
    assert steps["captioner"]["generate_tokens_per_s"] > 0
    assert steps["clap_fad"]["fad"] >= 0 and steps["clap_fad"]["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_a_gpu_only_the_dry_run_runs(tmp_path):
    with pytest.raises(SystemExit, match="--dry_run"):
        load_gpu_check().main(["--out", str(tmp_path)])
