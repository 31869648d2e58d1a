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
    from conceptcaps_pipeline.taxonomy.distill import DistillArguments, distill

    run = tmp_path_factory.mktemp("distilled")
    distill(DistillArguments(run=str(run), source=str(musiccaps_csv)))
    return run


@pytest.fixture(scope="session")
def vae_run(tmp_path_factory, distilled_run) -> Path:
    """distilled_run plus a small VAE trained for a few epochs (fast, not converged)."""
    from conceptcaps_pipeline.vae.train import VaeTrainArguments, train_vae

    run = tmp_path_factory.mktemp("vae") / "run"
    shutil.copytree(distilled_run, run)
    train_vae(VaeTrainArguments(run=str(run), epochs=15, hidden_dim=256, latent_dim=32, lr=1e-3, diversity_samples=200,
                                num_threads=1))
    return run


@pytest.fixture(scope="session")
def sampled_run(tmp_path_factory, vae_run) -> Path:
    """vae_run plus RUN/attributes.parquet with 48 sampled attribute sets."""
    from conceptcaps_pipeline.vae.sample import VaeSampleArguments, sample_attributes

    run = tmp_path_factory.mktemp("sampled") / "run"
    shutil.copytree(vae_run, run)
    sample_attributes(VaeSampleArguments(run=str(run), n=48, seed=0))
    return run


@pytest.fixture(scope="session")
def lsr_run(tmp_path_factory, distilled_run) -> Path:
    """distilled_run plus a small attribute-regularised VAE (tempo, instrument count, vocals, arousal; not valence)
    and the plain twin's figures in its metrics.json (a few epochs: fast, not converged)."""
    from conceptcaps_pipeline.vae.train import VaeTrainArguments, train_vae

    run = tmp_path_factory.mktemp("lsr") / "run"
    shutil.copytree(distilled_run, run)
    train_vae(VaeTrainArguments(run=str(run), epochs=6, hidden_dim=128, latent_dim=16, lr=3e-3, diversity_samples=50,
                                num_threads=1, lsr=["tempo", "instrument_count", "vocal", "arousal"]))
    return run


@pytest.fixture
def copy_run(tmp_path):
    """Copy a session run into this test's tmp_path so the test may change it."""

    def _copy(run: Path) -> Path:
        target = tmp_path / "run"
        shutil.copytree(run, target)
        return target

    return _copy


@pytest.fixture(scope="session")
def tiny_musicgen(tmp_path_factory, distilled_run) -> Path:
    """A tiny random MusicGen checkpoint + processor (T5 tokenizer trained on the distilled captions)."""
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.testing.tiny_musicgen import build_tiny_musicgen

    captions = pq.read_table(distilled_run / "distilled.parquet", columns=["caption"]).column("caption").to_pylist()
    return build_tiny_musicgen(tmp_path_factory.mktemp("tiny_musicgen") / "model", captions)


def write_captions_parquet(run: Path, n: int) -> Path:
    """RUN/captions.parquet in the captions stage's schema, from the first n real distilled captions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    strings = pa.list_(pa.string())
    schema = pa.schema([
        ("id", pa.string()), ("caption", pa.string()), ("aspect_list", strings), ("genre", strings),
        ("mood", strings), ("instrument", strings), ("tempo", strings), ("coverage", pa.float64()),
        ("unrequested_tags", strings), ("seed", pa.int64()), ("attempts", pa.int64()),
    ])
    source = pq.read_table(run / "distilled.parquet").to_pylist()[:n]
    rows = [{"id": f"cc-{i:06d}", **{k: r[k] for k in ("caption", "aspect_list", "genre", "mood", "instrument", "tempo")},
             "coverage": 1.0, "unrequested_tags": [], "seed": 0, "attempts": 1} for i, r in enumerate(source)]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), run / "captions.parquet")
    return run / "captions.parquet"


@pytest.fixture(scope="session")
def audio_captions_run(tmp_path_factory, distilled_run) -> Path:
    """distilled_run plus RUN/captions.parquet with 10 real MusicCaps captions (ids cc-000000 ...)."""
    run = tmp_path_factory.mktemp("audio_captions") / "run"
    shutil.copytree(distilled_run, run)
    write_captions_parquet(run, 10)
    return run


def launch_audio_generate(run: Path, model: Path, *options: str, processes: int = 2, **popen):
    """Start `conceptcaps audio generate` under `accelerate launch` with accelerate_configs/cpu.yaml."""
    import subprocess
    import sys

    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"),
        "--num_processes", str(processes), "-m", "conceptcaps_pipeline.cli", "audio", "generate",
        "--run", str(run), "--model", str(model), *options,
    ]
    # One thread per process: the test machine has two cores shared with other jobs.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONCEPTCAPS_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(command, cwd=ROOT, env=env, **popen)


@pytest.fixture(scope="session")
def audio_run(tmp_path_factory, audio_captions_run, tiny_musicgen) -> Path:
    """audio_captions_run plus RUN/audio/: 0.5 s tiny-MusicGen clips from two CPU processes."""
    import subprocess

    run = tmp_path_factory.mktemp("audio") / "run"
    shutil.copytree(audio_captions_run, run)
    process = launch_audio_generate(run, tiny_musicgen, "--duration", "0.5", "--batch-size", "2",
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=600)
    if process.returncode != 0:
        pytest.fail(f"accelerate launch ... audio generate failed ({process.returncode}):\n{output[-4000:]}")
    return run


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory, musiccaps_csv) -> Path:
    """A random-weight tiny Llama whose BPE tokenizer is trained on the MusicCaps captions (output is noise)."""
    from conceptcaps_pipeline.testing.tiny_llm import TinyLlmConfig, build_tiny_llm, captions_from_source

    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm") / "model", captions_from_source(musiccaps_csv),
                          TinyLlmConfig(vocab_size=1024))


def tiny_captioner_configs(run: Path, model: Path, **sft_overrides):
    """(CaptionerArguments, SFTConfig, ModelConfig) for a few-step LoRA fine-tune of a tiny model on CPU."""
    from conceptcaps_pipeline.captions.train import CaptionerArguments, ModelConfig, SFTConfig

    sft = {"num_train_epochs": 1, "learning_rate": 5e-3, "logging_steps": 1, "disable_tqdm": True, **sft_overrides}
    return (CaptionerArguments(run=str(run), model=str(model), max_train_samples=16, max_eval_samples=8),
            SFTConfig(**sft), ModelConfig())


@pytest.fixture(scope="session")
def captioner_run(tmp_path_factory, sampled_run, tiny_llm) -> Path:
    """sampled_run plus RUN/captioner: a LoRA adapter (paper settings) on tiny_llm after 4 SFT steps."""
    from conceptcaps_pipeline.captions.train import train_captioner

    run = tmp_path_factory.mktemp("captioner") / "run"
    shutil.copytree(sampled_run, run)
    train_captioner(*tiny_captioner_configs(run, tiny_llm))
    return run


@pytest.fixture(scope="session")
def release_run(tmp_path_factory, audio_run) -> Path:
    """audio_run plus RUN/release/ from `conceptcaps build`; tiny shards, so the audio config has several."""
    from conceptcaps_pipeline.release.build import BuildArguments, build_release

    run = tmp_path_factory.mktemp("release") / "run"
    shutil.copytree(audio_run, run)
    build_release(BuildArguments(run=str(run), max_shard_size="5KB", rows_per_group=2))
    return run


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, musiccaps_csv):
    """(run, manifest): `conceptcaps run --preset smoke` on the real CSV, every stage (about 1.5 min on 2 cores).
    Read-only: tests/test_run_all.py checks it, tests/test_docs.py runs the docs on a copy."""
    from conceptcaps_pipeline.run_all import RunArguments, run_pipeline

    run = tmp_path_factory.mktemp("smoke") / "run"
    manifest = run_pipeline(RunArguments(run=str(run), preset="smoke", source=str(musiccaps_csv)))
    return run, manifest


@pytest.fixture(scope="session")
def captions(musiccaps_csv) -> list[str]:
    """Every caption of the real MusicCaps CSV (tokenizers of tiny models are trained on them)."""
    from conceptcaps_pipeline.taxonomy.source import read_source

    rows, _ = read_source(str(musiccaps_csv))
    return [row.caption for row in rows]


@pytest.fixture
def single_process_state():
    """Let a test run a stage that uses Accelerate in this process; drop the PartialState it created afterwards."""
    from accelerate import PartialState

    existed = PartialState._shared_state != {}
    yield
    if not existed:
        PartialState._reset_state()
