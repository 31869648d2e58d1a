"""`conceptcaps audio verify`: passes a generated run, catches planted faults, repairs them."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conceptcaps_pipeline.audio.shards import Batch, ShardWriter, encode_flac, read_shards, shard_paths
from conceptcaps_pipeline.audio.verify import VerifyArguments, check_clip, verify_audio
from conceptcaps_pipeline.cli import main
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import read_manifest

RATE = 8000


LIMITS = {"target_s": 0.5, "tolerance_s": 0.02, "min_rms": 1e-3, "clip_level": 0.999, "max_clipped_fraction": 1e-3}


def tone(seconds: float = 0.5, amplitude: float = 0.3, offset: float = 0.0) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (offset + amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]


def test_check_clip_thresholds():
    assert check_clip(encode_flac(tone(), RATE), RATE, **LIMITS) == []
    assert check_clip(encode_flac(tone(0.51), RATE), RATE, **LIMITS) == []  # within one 20 ms frame
    assert check_clip(encode_flac(tone(0.56), RATE), RATE, **LIMITS)[0].startswith("duration")
    assert check_clip(encode_flac(tone(amplitude=0.0), RATE), RATE, **LIMITS)[0].startswith("silent")
    # A constant offset is loud by plain RMS but silent to the ear.
    assert check_clip(encode_flac(tone(amplitude=0.0, offset=0.4), RATE), RATE, **LIMITS)[0].startswith("silent")
    assert check_clip(encode_flac(tone(amplitude=2.0), RATE), RATE, **LIMITS)[0].startswith("clipped")
    assert check_clip(b"not a flac file", RATE, **LIMITS)[0].startswith("undecodable")
    assert check_clip(encode_flac(tone(), RATE), 16000, **LIMITS)[0].startswith("undecodable")


def test_writer_refuses_non_finite_audio(tmp_path):
    audio = np.stack([tone(), tone()])
    audio[1, 0, 10] = np.nan
    writer = ShardWriter(tmp_path, rank=3, sampling_rate=RATE, model_id="m")
    writer.put(Batch(ids=["a", "b"], audio=audio, seed=1, caption_sha256=["x", "y"]))
    stats = writer.close()
    assert stats.failed == {"b": "non-finite samples"} and stats.clips == 1
    # Every writer names its shards with a token of its own: no process can overwrite another's file.
    assert [p.name for p in shard_paths(tmp_path)] == [f"shard-r003-{writer.token}-000000.parquet"]
    assert read_shards(tmp_path).column("id").to_pylist() == ["a"]
    assert read_shards(tmp_path).column("caption_sha256").to_pylist() == ["x"]


def test_verify_passes_a_generated_run(audio_run, capsys):
    summary = verify_audio(VerifyArguments(run=str(audio_run)))
    assert summary["failing_ids"] == 0 and summary["clips"] == summary["captions"] == 10
    assert "audio verify" in capsys.readouterr().out


def test_verify_catches_silent_duplicate_and_missing_then_repairs(audio_run, copy_run, tiny_musicgen, capsys,
                                                                  single_process_state):
    run = copy_run(audio_run)
    shards = shard_paths(run / "audio")
    # Plant a silent clip: rewrite the first row of one shard with digital silence.
    silent_shard = pq.read_table(shards[0])
    silent_id = silent_shard.column("id")[0].as_py()
    audio = silent_shard.column("audio").to_pylist()
    audio[0] = encode_flac(np.zeros((1, 4000), np.float32), RATE)
    pq.write_table(silent_shard.set_column(1, "audio", pa.array(audio, pa.binary())), shards[0])
    # Plant duplicates: a second copy of another shard under a new rank's name.
    duplicate_ids = pq.read_table(shards[1], columns=["id"]).column("id").to_pylist()
    shutil.copy(shards[1], run / "audio" / "shard-r007-000000.parquet")
    # Remove an id: drop the last shard.
    missing_ids = pq.read_table(shards[-1], columns=["id"]).column("id").to_pylist()
    shards[-1].unlink()

    with pytest.raises(ConceptCapsError) as err:
        verify_audio(VerifyArguments(run=str(run)))
    message = str(err.value)
    assert "\n" not in message and "5 caption id(s) fail audio verification" in message
    assert "missing 2, duplicate 2, silent 1" in message and "audio_verify.json" in message
    out = capsys.readouterr().out
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  ") and ": " in line}
    assert f"{silent_id}" in lines and "silent" in lines[silent_id]
    for clip_id in duplicate_ids:
        assert "duplicate (2 clips)" in lines[clip_id]
    for clip_id in missing_ids:
        assert "missing" in lines[clip_id]
    assert "silent                   1" in out and f"duplicate                {len(duplicate_ids)}" in out
    failing = read_manifest(run, "audio_verify")["failing"]
    assert set(failing) == {silent_id, *duplicate_ids, *missing_ids}  # and nothing else

    assert main(["audio", "verify", "--run", str(run)]) == 2  # the CLI exits 2 on failure

    # --repair would set aside 3 of 10 clips: more than 5% needs --confirm_repair; --dry_run changes nothing.
    before = sorted(p.name for p in shard_paths(run / "audio"))
    with pytest.raises(ConceptCapsError, match=r"set aside 3 of 10 clips \(30.0%\).*--confirm_repair"):
        verify_audio(VerifyArguments(run=str(run), repair=True))
    with pytest.raises(ConceptCapsError):
        verify_audio(VerifyArguments(run=str(run), repair=True, dry_run=True))
    assert "--repair would set aside 3 of 10 clips" in capsys.readouterr().out
    assert sorted(p.name for p in shard_paths(run / "audio")) == before
    # Confirmed: the silent clip and the second copies are set aside, recoverably; generate fills every gap.
    with pytest.raises(ConceptCapsError, match="were set aside"):
        verify_audio(VerifyArguments(run=str(run), repair=True, confirm_repair=True))
    ids = read_shards(run / "audio", columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) and silent_id not in ids
    kept = read_shards(run / ".set-aside" / "audio_verify" / next((run / ".set-aside" / "audio_verify").iterdir()).name
                       / "audio").column("id").to_pylist()
    assert silent_id in kept  # nothing destroyed: the moved shards are all there
    assert main(["audio", "generate", "--run", str(run), "--model", str(tiny_musicgen), "--duration", "0.5",
                 "--batch-size", "2"]) == 0
    assert verify_audio(VerifyArguments(run=str(run)))["failing_ids"] == 0
    assert not (run / ".set-aside").exists()  # a passing verify drops the old repair


def test_repair_with_a_wrong_duration_destroys_nothing(audio_run, copy_run, capsys):
    """--duration 20 on 0.5 s clips fails every clip: --repair refuses instead of emptying the run."""
    run = copy_run(audio_run)
    before = {p.name: p.read_bytes() for p in shard_paths(run / "audio")}
    code = main(["audio", "verify", "--run", str(run), "--repair", "--duration", "20"])
    err = capsys.readouterr().err
    assert code == 2 and "set aside 10 of 10 clips (100.0%)" in err and "--confirm_repair" in err
    assert {p.name: p.read_bytes() for p in shard_paths(run / "audio")} == before


def test_verify_without_audio_says_what_to_run(audio_captions_run):
    with pytest.raises(ConceptCapsError, match="conceptcaps audio generate"):
        verify_audio(VerifyArguments(run=str(audio_captions_run)))
