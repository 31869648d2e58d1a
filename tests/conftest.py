"""Shared fixtures: the real MusicCaps CSV and run directories built by the real stages.

The CSV path comes from $MUSICCAPS_CSV, else ../shared/data/musiccaps/musiccaps-public.csv
beside the project. Session fixtures build each stage once and hand out read-only runs;
a test that changes a run copies it first (`copy_run`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = ROOT.parent / "shared" / "data" / "musiccaps" / "musiccaps-public.csv"

# Tests never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def musiccaps_csv() -> Path:
    path = Path(os.environ.get("MUSICCAPS_CSV", DEFAULT_CSV))
    if not path.is_file():
        pytest.fail(f"MusicCaps CSV not found at {path}: set MUSICCAPS_CSV or place ../shared beside the project.")
    return path


@pytest.fixture(scope="session")
def distilled_run(tmp_path_factory, musiccaps_csv) -> Path:
    """A run directory after `distill` on the real CSV."""
    from generation.distill import DistillArguments, distill

    run = tmp_path_factory.mktemp("distilled")
    distill(DistillArguments(out=str(run), source=str(musiccaps_csv)))
    return run


@pytest.fixture(scope="session")
def vae_run(tmp_path_factory, distilled_run) -> Path:
    """distilled_run plus a small VAE trained for a few epochs (fast, not converged)."""
    from generation.vae_train import VaeTrainArguments, train_vae

    run = tmp_path_factory.mktemp("vae") / "run"
    shutil.copytree(distilled_run, run)
    train_vae(VaeTrainArguments(run=str(run), epochs=15, hidden_dim=256, latent_dim=32, lr=1e-3, diversity_samples=200))
    return run


@pytest.fixture(scope="session")
def sampled_run(tmp_path_factory, vae_run) -> Path:
    """vae_run plus RUN/attributes.parquet with 48 sampled attribute sets."""
    from generation.vae_sample import VaeSampleArguments, sample_attributes

    run = tmp_path_factory.mktemp("sampled") / "run"
    shutil.copytree(vae_run, run)
    sample_attributes(VaeSampleArguments(run=str(run), n=48, seed=0))
    return run


@pytest.fixture
def copy_run(tmp_path):
    """Copy a session run into this test's tmp_path so the test may change it."""

    def _copy(run: Path) -> Path:
        target = tmp_path / "run"
        shutil.copytree(run, target)
        return target

    return _copy
