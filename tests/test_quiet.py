"""A quiet run: the log of `conceptcaps run` holds the project's lines and progress bars, not library chatter.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_quiet.py

The stage sequence runs as the user runs it, in a child process through the CLI (in this process pytest would
catch the warnings before they reach the log), on a copy of the conftest smoke run with `--force` and without
its tiny MusicGen, so every model is built or loaded again: the tiny MusicGen (its pad/bos ids; a save and
loads), the LLM (transformers' loading bars), the VAE (huggingface_hub's local-load print), the LoRA
fine-tune (peft's and the DataLoader's warnings). What is prevented and what is filtered, and why: generation/quiet.py.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
from conceptcaps_pipeline.quiet import _not_musicgen_special_token

STAGES = ["vae_sample", "captioner_train", "captions_generate", "audio_generate"]  # a consistent chain: each reads the last
NOISE = [
    r"FutureWarning", r"DeprecationWarning", r"UserWarning",  # Python warnings, from any library
    r"Loading weights",                                        # transformers' bar, huggingface_hub's print
    r"Writing model shards",                                   # transformers' bar when a model is saved
    r"Model config: \w+_token_id must be",                     # transformers' special-token check on MusicGen
]


@pytest.mark.slow
def test_a_stage_sequence_logs_no_library_warnings_or_loading_bars(smoke_run, tmp_path, musiccaps_csv):
    run = tmp_path / "run"
    shutil.copytree(smoke_run[0], run)
    shutil.rmtree(run / "models" / "musicgen")  # built again: the build loads and saves a MusicGen config
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONCEPTCAPS_LOG_LEVEL": "INFO"}
    env.pop("PYTHONWARNINGS", None)
    result = subprocess.run(
        [sys.executable, "-m", "conceptcaps_pipeline.cli", "run", "--preset", "smoke", "--source", str(musiccaps_csv),
         "--run", str(run), "--stages", *STAGES, "--force"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    for stage in STAGES:  # the sequence really ran, every stage
        assert f"run: stage {stage} done" in log, stage
    assert "building tiny musicgen model" in log
    lines = re.split(r"[\r\n]", log)
    noisy = [line for line in lines if any(re.search(pattern, line) for pattern in NOISE)]
    assert not noisy, "\n".join(noisy[:10])


# transformers' text (configuration_utils.validate_token_ids)
TOKEN_WARNING = ("Model config: {name}_token_id must be `None` or an integer within the vocabulary (between 0 and {top}), "
                 "got {got}. This may result in unexpected behavior.")


@pytest.mark.parametrize(("message", "kept"), [
    (TOKEN_WARNING.format(name="pad", top=63, got=64), False),   # MusicGen: the id is the codebook size, by design
    (TOKEN_WARNING.format(name="bos", top=2047, got=2048), False),
    (TOKEN_WARNING.format(name="pad", top=63, got=-1), True),    # a broken config still warns
    (TOKEN_WARNING.format(name="eos", top=63, got=200), True),
    ("Some weights of the model checkpoint were not used", True),
])
def test_the_musicgen_token_filter_drops_only_that_warning(message, kept):
    record = logging.LogRecord("transformers.configuration_utils", logging.WARNING, __file__, 1, message, None, None)
    assert _not_musicgen_special_token(record) is kept
