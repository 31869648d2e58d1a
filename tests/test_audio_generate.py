"""`conceptcaps audio generate`: tiny MusicGen from a config, two CPU processes under
`accelerate launch`, FLAC shards that decode, seeding, and resume after `kill -9`."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conceptcaps_pipeline.audio.generate import (
    AudioArguments,
    batch_seed,
    codec_timing,
    decoding_steps,
    generate_audio,
    load_musicgen,
    synthesize,
)
from conceptcaps_pipeline.audio.shards import INDEX_COLUMNS, read_shards, shard_paths
from conceptcaps_pipeline.audio.verify import VerifyArguments, verify_audio
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import read_manifest
from conftest import launch_audio_generate


@pytest.fixture(scope="module")
def tiny(tiny_musicgen):
    import torch

    return load_musicgen(str(tiny_musicgen), torch.device("cpu"), torch.float32)


def caption_ids(run: Path) -> list[str]:
    return pq.read_table(run / "captions.parquet", columns=["id"]).column("id").to_pylist()


def test_tiny_musicgen_has_musicgens_layout(tiny_musicgen, tiny):
    from conceptcaps_pipeline.testing.tiny_musicgen import musicgen_large_config
    from transformers import AutoProcessor, MusicgenConfig

    config = MusicgenConfig.from_pretrained(tiny_musicgen)
    decoder, codec = config.decoder, config.audio_encoder
    # As in facebook/musicgen-*: pad = bos = vocab size = codebook size, one quantizer per codebook.
    assert decoder.pad_token_id == decoder.bos_token_id == decoder.vocab_size == codec.codebook_size
    assert codec.num_quantizers == decoder.num_codebooks == 4
    assert codec.frame_rate == 50
    model, processor = tiny
    assert model.generation_config.top_k == 250 and model.generation_config.do_sample
    assert model.generation_config.decoder_start_token_id == decoder.vocab_size
    processor = AutoProcessor.from_pretrained(tiny_musicgen)
    ids = processor(text=["A mellow jazz piano with a slow tempo"]).input_ids[0]
    assert ids[-1] == processor.tokenizer.eos_token_id
    assert processor.tokenizer.unk_token_id not in ids  # the vocabulary was learned from the captions
    large = musicgen_large_config()
    assert large.decoder.pad_token_id == large.decoder.vocab_size == large.audio_encoder.codebook_size == 2048
    assert large.audio_encoder.frame_rate == 50 and large.audio_encoder.num_quantizers == 4
    assert (large.decoder.num_hidden_layers, large.decoder.hidden_size) == (48, 2048)


def test_clip_length_seeding_and_stereo(tiny, distilled_run):
    import torch
    from conceptcaps_pipeline.testing.tiny_musicgen import make_audible, tiny_musicgen_config
    from transformers import MusicgenForConditionalGeneration

    model, processor = tiny
    prompts = pq.read_table(distilled_run / "distilled.parquet", columns=["caption"]).column("caption").to_pylist()[:3]
    timing = codec_timing(model.config)
    frames, steps = decoding_steps(0.3, timing)
    assert (frames, steps) == (15, 18)  # the delay pattern costs codebooks - 1 decoder steps
    first = synthesize(model, processor, prompts, seed=7, max_new_tokens=steps)
    assert first.shape == (3, 1, frames * timing["hop_length"])
    assert np.array_equal(first, synthesize(model, processor, prompts, seed=7, max_new_tokens=steps))
    assert not np.array_equal(first, synthesize(model, processor, prompts, seed=8, max_new_tokens=steps))
    assert not np.array_equal(first[0], first[1])  # different prompts, different clips

    torch.manual_seed(0)
    stereo = MusicgenForConditionalGeneration(tiny_musicgen_config(len(processor.tokenizer), stereo=True)).eval()
    make_audible(stereo)
    stereo_timing = codec_timing(stereo.config)
    frames, steps = decoding_steps(0.3, stereo_timing)
    audio = synthesize(stereo, processor, prompts[:2], seed=0, max_new_tokens=steps)
    assert audio.shape == (2, 2, frames * stereo_timing["hop_length"])

    assert batch_seed(0, "cc-000003") == batch_seed(0, "cc-000003") != batch_seed(1, "cc-000003")


def test_two_cpu_processes_write_one_decodable_clip_per_caption(audio_run, tiny_musicgen):
    from datasets import Audio, Dataset

    ids = caption_ids(audio_run)
    table = read_shards(audio_run / "audio")
    assert Counter(table.column("id").to_pylist()) == Counter(ids)
    assert {p.name[:10] for p in shard_paths(audio_run / "audio")} == {"shard-r000", "shard-r001"}
    manifest = read_manifest(audio_run, "audio")
    # 10 captions in 5 fixed batches of 2, split between the two processes.
    assert sorted(manifest["counts"]["per_rank"].values()) == [4, 6]
    assert manifest["counts"]["clips"] == len(ids) and manifest["counts"]["audio_seconds_total"] == 5.0
    assert manifest["sessions"][-1]["processes"] == 2

    for row in table.to_pylist():
        assert row["model"] == str(tiny_musicgen) and row["sampling_rate"] == 8000 and row["duration_s"] == 0.5
        audio, rate = sf.read(io.BytesIO(row["audio"]), dtype="float32")
        assert rate == 8000 and audio.shape == (4000,)
        assert sf.info(io.BytesIO(row["audio"])).format == "FLAC"
        assert 0.02 < np.sqrt(np.mean(audio**2)) < 0.5
    # Every row of a shard is one batch, seeded from its first id (in prompt-length order).
    for name in {r["shard"] for r in table.to_pylist()}:
        rows = [r for r in table.to_pylist() if r["shard"] == name]
        assert len({r["seed"] for r in rows}) == 1
        assert rows[0]["seed"] in {batch_seed(0, r["id"]) for r in rows}

    dataset = Dataset.from_dict({"audio": [{"bytes": b, "path": None} for b in table.column("audio").to_pylist()]})
    dataset = dataset.cast_column("audio", Audio())
    decoded = dataset[0]["audio"].get_all_samples()
    reference, _ = sf.read(io.BytesIO(table.column("audio")[0].as_py()), dtype="float32")
    assert decoded.sample_rate == 8000 and tuple(decoded.data.shape) == (1, 4000)
    assert np.allclose(decoded.data.numpy()[0], reference, atol=1e-4)

    assert verify_audio(VerifyArguments(run=str(audio_run)))["failing_ids"] == 0


def test_rerun_with_nothing_missing_generates_nothing(audio_run, copy_run, tiny_musicgen, single_process_state):
    run = copy_run(audio_run)
    before = {p.name: p.stat().st_mtime_ns for p in shard_paths(run / "audio")}
    manifest = generate_audio(AudioArguments(run=str(run), model=str(tiny_musicgen), duration=0.5))
    assert manifest == read_manifest(audio_run, "audio")  # the finished run's manifest, untouched
    assert {p.name: p.stat().st_mtime_ns for p in shard_paths(run / "audio")} == before


def test_kill_9_mid_run_then_resume_with_one_process(tmp_path, audio_captions_run, tiny_musicgen,
                                                   single_process_state):
    run = tmp_path / "run"
    shutil.copytree(audio_captions_run, run)
    ids = caption_ids(run)
    # One clip per batch, so shards appear one by one and the kill lands mid-run.
    process = launch_audio_generate(run, tiny_musicgen, "--duration", "1.0", "--batch-size", "1",
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not shard_paths(run / "audio") and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher; its workers (own sessions) must die with it
    process.wait()
    time.sleep(1.0)
    done = read_shards(run / "audio", columns=INDEX_COLUMNS).column("id").to_pylist()
    assert 0 < len(done) < len(ids), "the kill should land after the first shard and before the last"
    assert read_manifest(run, "audio") is None

    manifest = generate_audio(AudioArguments(run=str(run), model=str(tiny_musicgen), duration=1.0, batch_size=3))
    final = read_shards(run / "audio", columns=INDEX_COLUMNS).column("id").to_pylist()
    assert Counter(final) == Counter(ids)  # every caption exactly once
    assert manifest["counts"]["already_done"] == len(done)
    assert manifest["counts"]["generated"] == len(ids) - len(done)
    assert not list((run / "audio").glob(".*.tmp"))
    assert verify_audio(VerifyArguments(run=str(run)))["failing_ids"] == 0


def test_resume_refuses_another_model_or_settings(audio_run, copy_run, tiny_musicgen, tmp_path, single_process_state):
    run = copy_run(audio_run)
    (run / "audio" / shard_paths(run / "audio")[0].name).unlink()
    other = shutil.copytree(tiny_musicgen, tmp_path / "other-musicgen")
    before = sorted(p.name for p in shard_paths(run / "audio"))
    with pytest.raises(ConceptCapsError, match=r"model: .*other-musicgen.* now.*--force"):
        generate_audio(AudioArguments(run=str(run), model=str(other), duration=0.5))
    with pytest.raises(ConceptCapsError, match=r"top_k: 250 there, 50 now.*--force"):
        generate_audio(AudioArguments(run=str(run), model=str(tiny_musicgen), duration=0.5, top_k=50))
    assert sorted(p.name for p in shard_paths(run / "audio")) == before  # nothing was touched


def test_offline_hub_id_says_how_to_use_a_local_copy(audio_captions_run, copy_run, single_process_state):
    run = copy_run(audio_captions_run)
    with pytest.raises(ConceptCapsError, match="not in the local cache") as err:
        generate_audio(AudioArguments(run=str(run), model="facebook/musicgen-nonexistent", duration=0.5))
    assert "hf download facebook/musicgen-nonexistent --local-dir DIR" in str(err.value)


def test_missing_captions_names_the_stage_to_run(distilled_run, single_process_state):
    with pytest.raises(ConceptCapsError, match="conceptcaps captions generate"):
        generate_audio(AudioArguments(run=str(distilled_run), model="unused"))


def test_processes_with_different_free_memory_share_one_batch_plan(tmp_path, audio_captions_run, tiny_musicgen,
                                                                   monkeypatch):
    """--batch_size 0 with rank 0 told it holds 6 clips and rank 1 told 2: both use 2, each id is made once."""
    import json

    import torch
    from conceptcaps_pipeline.audio.generate import FREE_MEMORY_ENV, batch_size_from_memory, kv_bytes_per_clip
    from transformers import MusicgenConfig

    run = shutil.copytree(audio_captions_run, tmp_path / "run")
    config = MusicgenConfig.from_pretrained(tiny_musicgen)
    steps = decoding_steps(0.5, codec_timing(config))[1]
    weights = 4 * sum(p.numel() for p in load_musicgen(str(tiny_musicgen), torch.device("cpu"), torch.float32)[0]
                      .parameters())
    per_clip = kv_bytes_per_clip(config.decoder, steps, guidance=True, dtype_bytes=4)
    free = [weights + int((clips + 0.5) * per_clip / 0.85) for clips in (6, 2)]
    assert [batch_size_from_memory(f - weights, config.decoder, steps, True, 4) for f in free] == [6, 2]
    monkeypatch.setenv(FREE_MEMORY_ENV, ",".join(map(str, free)))  # the free-memory probe's per-rank answer
    process = launch_audio_generate(run, tiny_musicgen, "--duration", "0.5", "--batch_size", "0",
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    ids = read_shards(run / "audio").column("id").to_pylist()
    assert Counter(ids) == Counter(caption_ids(run))  # each id exactly once
    manifest = json.loads((run / "manifests" / "audio.json").read_text())
    assert manifest["sessions"][-1]["determinism"]["batch_size"] == 2
    assert sum(manifest["counts"]["per_rank"].values()) == 10 and len(manifest["counts"]["per_rank"]) == 2


def test_the_stage_raises_no_deprecation_from_its_own_calls(audio_captions_run, tmp_path, tiny_musicgen,
                                                            single_process_state):
    """Every FutureWarning/DeprecationWarning of a stage run (both decoders) is recorded: none comes from the
    project's code or from an argument it passes (past_key_values= is removed in transformers 5.40)."""
    import warnings

    import conceptcaps_pipeline

    project = str(Path(conceptcaps_pipeline.__file__).resolve().parent)
    for decoder in ("static", "generate"):
        run = shutil.copytree(audio_captions_run, tmp_path / decoder)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generate_audio(AudioArguments(run=str(run), model=str(tiny_musicgen), duration=0.3, batch_size=5,
                                          decoder=decoder))
        deprecations = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
        ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in deprecations
                if str(Path(w.filename).resolve()).startswith(project) or "past_key_values" in str(w.message)]
        assert not ours, ours


# -- best of K (`--candidates`) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory, captions):
    from conceptcaps_pipeline.testing.tiny_eval_models import build_tiny_clap

    return build_tiny_clap(tmp_path_factory.mktemp("tiny_clap") / "model", captions[:500])


def audio_by_id(folder: Path) -> dict[str, bytes]:
    table = read_shards(folder)
    return dict(zip(table.column("id").to_pylist(), table.column("audio").to_pylist()))


def check_best_of(run: Path, k: int) -> dict:
    """Each id once, with a record whose kept candidate has the highest mean evidence and whose seed is the row's."""
    from conceptcaps_pipeline.audio.best_of import candidate_seeds, read_candidate_records

    ids = caption_ids(run)
    index = read_shards(run / "audio", columns=INDEX_COLUMNS).to_pylist()
    assert Counter(r["id"] for r in index) == Counter(ids)  # each id exactly once
    records = read_candidate_records(run / "audio")
    assert sorted(records) == sorted(ids)
    for row in index:
        record = records[row["id"]]
        means = record["candidate_means"]
        assert len(means) == len(record["candidate_seeds"]) == len(record["evidence"]) == k
        assert means[record["kept"]] == max(m for m in means if m is not None)
        assert record["kept"] == min(c for c, m in enumerate(means) if m == means[record["kept"]])  # ties: lowest
        assert row["seed"] == record["seed"] == record["candidate_seeds"][record["kept"]]
        # The batch's seeds: candidate 0 is the plain run's batch seed.
        assert record["candidate_seeds"][0] in {batch_seed(0, i) for i in ids}
        assert candidate_seeds(0, next(i for i in ids if batch_seed(0, i) == record["candidate_seeds"][0]), k) == \
            record["candidate_seeds"]
        assert all(len(e) == len(record["labels"]) for e in record["evidence"]) and record["labels"]
    return records


def test_best_of_two_keeps_the_higher_evidence_and_is_reproducible(audio_run, audio_captions_run, tiny_musicgen,
                                                                   tiny_clap, tmp_path, single_process_state):
    """--candidates 2 --keep_candidates on 10 real captions (batches of 2, as audio_run): each id once, the kept
    candidate has the highest mean evidence, candidate 0 is the plain run's clip, the same seed gives the same
    bytes; the manifest counts the winners; a plain resume of a best-of-2 run is refused."""
    first = shutil.copytree(audio_captions_run, tmp_path / "first")
    manifest = generate_audio(AudioArguments(run=str(first), model=str(tiny_musicgen), duration=0.5, batch_size=2,
                                             candidates=2, clap_model=str(tiny_clap), keep_candidates=True))
    records = check_best_of(first, 2)

    # Candidate 0 is the clip of a run without --candidates (audio_run: two processes, the same batches).
    plain, kept, others = audio_by_id(audio_run / "audio"), audio_by_id(first / "audio"), \
        read_shards(first / "audio" / "candidates").to_pylist()
    assert Counter(r["id"] for r in others) == Counter(caption_ids(first))  # the other candidate of each id
    for clip_id, record in records.items():
        other = next(r for r in others if r["id"] == clip_id)
        assert other["seed"] == record["candidate_seeds"][1 - record["kept"]]
        assert plain[clip_id] == (kept[clip_id] if record["kept"] == 0 else other["audio"])
    assert {records[i]["kept"] for i in records} == {0, 1}  # both candidates win somewhere (the scores are noise)

    counts = manifest["counts"]
    assert counts["candidate_clips_generated"] == 20 and counts["generated"] == counts["clips"] == 10
    best = counts["best_of"]
    assert best["clips_with_record"] == 10 and sum(best["kept_candidate"].values()) == 10
    assert best["mean_evidence_kept"] >= best["mean_evidence_candidate_0"]
    assert best["scorers"] == [str(tiny_clap)]
    assert manifest["sessions"][-1]["per_rank"][0]["score_seconds"] >= 0
    # The run passes audio verify, and `audio score` with the same CLAP reports the evidence the choice was made on.
    from conceptcaps_pipeline.audio.score import ScoreArguments, score_audio

    assert verify_audio(VerifyArguments(run=str(first)))["failing_ids"] == 0
    score_audio(ScoreArguments(run=str(first), model=str(tiny_clap), batch_size=4, n_bootstrap=10))
    for row in pq.read_table(first / "audio_evidence" / "evidence.parquet").to_pylist():
        record = records[row["id"]]
        assert row["evidence"] == pytest.approx(record["evidence"][record["kept"]])
        assert row["mean_evidence"] == pytest.approx(max(record["candidate_means"]))

    # The same seed: the same choice and the same bytes, on two processes under `accelerate launch` too (and
    # without --keep_candidates).
    second = shutil.copytree(audio_captions_run, tmp_path / "second")
    process = launch_audio_generate(second, tiny_musicgen, "--duration", "0.5", "--batch_size", "2", "--candidates",
                                    "2", "--clap_model", str(tiny_clap), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    assert {p.name[:10] for p in shard_paths(second / "audio")} == {"shard-r000", "shard-r001"}
    assert audio_by_id(second / "audio") == kept and read_candidate_records(second / "audio") == records
    assert not (second / "audio" / "candidates").exists()

    # Clips of best of 2 are not mixed with plain ones (nor with another K).
    (second / "audio" / shard_paths(second / "audio")[0].name).unlink()
    with pytest.raises(ConceptCapsError, match=r"candidates: 2 there, None now.*--force"):
        generate_audio(AudioArguments(run=str(second), model=str(tiny_musicgen), duration=0.5, batch_size=2))
    with pytest.raises(ConceptCapsError, match="--keep_candidates needs --candidates"):
        generate_audio(AudioArguments(run=str(second), model=str(tiny_musicgen), keep_candidates=True))
    fresh = shutil.copytree(audio_captions_run, tmp_path / "fresh")
    with pytest.raises(ConceptCapsError, match=r"--clap_model .*no-such-clap"):
        generate_audio(AudioArguments(run=str(fresh), model=str(tiny_musicgen), duration=0.5, candidates=2,
                                      clap_model=str(tmp_path / "no-such-clap")))
    assert not (fresh / "audio").exists()


def read_candidate_records(audio_dir):
    from conceptcaps_pipeline.audio.best_of import read_candidate_records as read

    return read(audio_dir)


def test_kill_9_mid_best_of_run_then_resume(tmp_path, audio_captions_run, tiny_musicgen, tiny_clap,
                                           single_process_state):
    """`kill -9` of `accelerate launch ... audio generate --candidates 2 --keep_candidates` (two processes), then a
    resume: each id once, every clip with its record, each other candidate once; the batches done before the kill
    keep their clips and choices."""
    run = shutil.copytree(audio_captions_run, tmp_path / "run")
    ids = caption_ids(run)
    process = launch_audio_generate(run, tiny_musicgen, "--duration", "1.0", "--batch_size", "1",
                                    "--candidates", "2", "--clap_model", str(tiny_clap), "--keep_candidates",
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not shard_paths(run / "audio") and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(1.0)
    before = audio_by_id(run / "audio")
    assert 0 < len(before) < len(ids), "the kill should land after the first shard and before the last"
    records_before = read_candidate_records(run / "audio")
    assert sorted(records_before) == sorted(before)  # a clip and its record are written together

    manifest = generate_audio(AudioArguments(run=str(run), model=str(tiny_musicgen), duration=1.0, batch_size=1,
                                             candidates=2, clap_model=str(tiny_clap), keep_candidates=True))
    records = check_best_of(run, 2)
    others = read_shards(run / "audio" / "candidates", columns=["id", "seed"]).to_pylist()
    assert Counter(r["id"] for r in others) == Counter(ids)  # the other candidate of each id, once
    assert all(r["seed"] == records[r["id"]]["candidate_seeds"][1 - records[r["id"]]["kept"]] for r in others)
    after = audio_by_id(run / "audio")
    assert {i: after[i] for i in before} == before and {i: records[i] for i in before} == records_before
    assert manifest["counts"]["already_done"] == len(before)
    assert manifest["counts"]["generated"] == len(ids) - len(before)
    assert manifest["counts"]["best_of"]["clips_with_record"] == len(ids)
    assert not list((run / "audio").glob(".*.tmp"))


def test_prune_candidates_drops_the_other_candidates_of_batches_made_again(tmp_path):
    """A kill after a batch's other candidates are written and before its kept clips: the resume drops those
    candidates (their batch is made again and writes them again), so each stays once."""
    import pyarrow as pa
    from conceptcaps_pipeline.audio.generate import prune_candidates
    from conceptcaps_pipeline.audio.shards import shard_schema

    folder = tmp_path / "audio" / "candidates"
    folder.mkdir(parents=True)
    row = {"audio": b"", "duration_s": 0.5, "sampling_rate": 8000, "seed": 1, "model": "m", "caption_sha256": "c",
           "settings": "{}"}
    for n, ids in enumerate((["cc-000000", "cc-000001"], ["cc-000002"], ["cc-000003"])):
        pq.write_table(pa.Table.from_pylist([{"id": i, **row} for i in ids], schema=shard_schema()),
                       folder / f"shard-r000-0000000{n}-000000.parquet")
    assert prune_candidates(folder, {"cc-000000", "cc-000003"}) == 2
    assert sorted(read_shards(folder).column("id").to_pylist()) == ["cc-000000", "cc-000003"]
    assert len(shard_paths(folder)) == 2 and not list(folder.glob(".*.tmp"))
    assert prune_candidates(folder, {"cc-000000", "cc-000003"}) == 0
