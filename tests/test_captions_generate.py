"""Caption generation: real attributes.parquet from the VAE stage, a tiny LoRA captioner, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conceptcaps_pipeline.captions.generate import CaptionsArguments, clean_caption, degeneracy, generate_captions
from conceptcaps_pipeline.errors import ConceptCapsError
from conftest import ROOT

# A tiny model trained for 4 steps never learns to end its turn: accept unfinished outputs,
# keep them short. The other degeneracy checks stay on.
QUICK = {"max_new_tokens": 24, "require_end_of_turn": False, "batch_size": 16}


def _captions(run):
    return pq.read_table(run / "captions.parquet").to_pylist()


def test_clean_caption_strips_chat_artefacts():
    assert clean_caption("assistant\n\nA calm piano piece.") == "A calm piano piece."
    assert clean_caption('Caption: "A calm   piano\npiece."') == "A calm piano piece."
    assert clean_caption("**A loud** rock song\ufffd.") == "A loud rock song."
    assert clean_caption("   ") == ""


@pytest.mark.parametrize(
    ("text", "ended", "expected"),
    [
        ("", True, "empty"),
        ("  ... !! ", True, "empty"),
        ("A slow jazz song with a soft piano melody and brushed drums.", False, "runaway"),
        ("the drums play the beat and the drums play the beat and the drums play the beat", True, "repetition"),
        ("A slow jazz song.", True, "too_short"),
        ("A slow jazz song with a soft piano melody and brushed drums.", True, None),
        # two occurrences of a 4-gram are fine; three are not
        ("a soft piano melody over strings, then a soft piano melody over drums", True, None),
    ],
)
def test_degeneracy_on_hand_made_outputs(text, ended, expected):
    assert degeneracy(text, ended) == expected


def test_degeneracy_thresholds_are_arguments():
    text = "a b c a b c"
    assert degeneracy(text, True, ngram_size=3, max_ngram_repeats=2, min_words=1) == "repetition"
    assert degeneracy(text, True, ngram_size=3, max_ngram_repeats=3, min_words=1) is None
    assert degeneracy("no end yet but fine", False, require_end_of_turn=False) is None


def test_generate_from_sampled_attributes(captioner_run, copy_run):
    run = copy_run(captioner_run)
    manifest = generate_captions(CaptionsArguments(run=str(run), seed=1, **QUICK))
    attributes = pq.read_table(run / "attributes.parquet").to_pylist()
    table = pq.read_table(run / "captions.parquet")
    assert table.schema.field("aspect_list").type == table.schema.field("unrequested_tags").type  # real lists
    rows = table.to_pylist()
    failed = {f["id"] for f in manifest["failed"]}
    assert len(attributes) == 48 and len(rows) + len(failed) == 48
    assert len(rows) >= 40  # noise, but non-empty, unrepetitive noise
    assert sorted(r["id"] for r in rows) == sorted(a["id"] for a in attributes if a["id"] not in failed)
    by_id = {a["id"]: a for a in attributes}
    coverage = _load_coverage()
    from conceptcaps_pipeline.taxonomy import Taxonomy

    taxonomy = Taxonomy.load(run / "taxonomy.json")
    for row in rows:
        source = by_id[row["id"]]
        assert row["aspect_list"] == source["aspect_list"] and row["instrument"] == source["instrument"]
        assert row["caption"] and "<|" not in row["caption"] and 1 <= row["attempts"] <= 3
        assert degeneracy(row["caption"], True) is None
        score, _, unrequested = coverage.caption_coverage(row["caption"], row["aspect_list"], taxonomy)
        assert row["coverage"] == score and row["unrequested_tags"] == unrequested
    assert manifest["counts"]["captions"] == len(rows) and manifest["counts"]["batches"] == 3
    assert 0 <= manifest["coverage"]["coverage"] <= 1 and "unrequested_per_caption" in manifest["coverage"]
    assert manifest["inputs"]["adapter"]  # the adapter from RUN/captioner was used
    # A finished run is skipped.
    again = generate_captions(CaptionsArguments(run=str(run), seed=1, **QUICK))
    assert again["finished_at"] == manifest["finished_at"]


def _load_coverage():
    from conceptcaps_pipeline.captions.generate import load_coverage_module

    return load_coverage_module()


def _launch(run, *options):
    command = [sys.executable, "-m", "conceptcaps_pipeline.cli", "captions", "generate", "--run", str(run), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONCEPTCAPS_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill_and_resume_gives_each_id_once_and_the_same_captions(captioner_run, tmp_path):
    import shutil

    options = ["--batch_size", "2", "--limit", "24", "--max_new_tokens", "24", "--require_end_of_turn", "false",
               "--seed", "7"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    shutil.copytree(captioner_run, killed)
    shutil.copytree(captioner_run, whole)

    process = _launch(killed, *options)
    shards = killed / "captions"
    deadline = time.time() + 300
    while not list(shards.glob("shard-*.parquet")):
        assert process.poll() is None, f"captions generate exited early: {process.stderr.read()[-2000:]}"
        assert time.time() < deadline, "no shard after 300 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    written = len(list(shards.glob("shard-*.parquet")))
    assert 1 <= written < 12 and not (killed / "captions.parquet").exists()

    # Settings that do not match the shards on disk are refused rather than mixed in.
    with pytest.raises(ConceptCapsError, match="other settings.*--force"):
        generate_captions(CaptionsArguments(run=str(killed), batch_size=8, limit=24, max_new_tokens=24,
                                            require_end_of_turn=False, seed=7))
    from conceptcaps_pipeline.cli import main

    assert main(["captions", "generate", "--run", str(killed), *options]) == 0
    manifest = json.loads((killed / "manifests" / "captions_generate.json").read_text())
    assert manifest["counts"]["resumed_batches"] >= written and manifest["counts"]["batches"] == 12
    ids = [r["id"] for r in _captions(killed)] + [f["id"] for f in manifest["failed"]]
    expected = [r["id"] for r in pq.read_table(killed / "attributes.parquet").to_pylist()[:24]]
    assert sorted(ids) == sorted(expected) and len(set(ids)) == len(ids)

    # The same adapter reloaded with the same seed writes the same captions, killed or not.
    assert main(["captions", "generate", "--run", str(whole), *options]) == 0
    assert _captions(whole) == _captions(killed)
    # ... and another seed writes other ones.
    assert main(["captions", "generate", "--run", str(whole), *options[:-1], "8", "--force"]) == 0
    assert [r["caption"] for r in _captions(whole)] != [r["caption"] for r in _captions(killed)]


def test_degenerate_outputs_are_retried_then_reported(captioner_run, copy_run):
    run = copy_run(captioner_run)
    # 6 new tokens can never reach the end of the turn: every output is a runaway.
    strict = {"max_new_tokens": 6, "require_end_of_turn": True, "max_attempts": 2, "limit": 8, "batch_size": 8}
    with pytest.raises(ConceptCapsError, match="8 of 8 ids .* no usable caption after 2 attempts"):
        generate_captions(CaptionsArguments(run=str(run), **strict))
    assert not (run / "captions.parquet").exists()
    manifest = generate_captions(CaptionsArguments(run=str(run), max_failure_rate=1.0, **strict))
    assert _captions(run) == []
    assert manifest["counts"]["failed"] == 8 and manifest["counts"]["captions"] == 0
    assert {f["attempts"] for f in manifest["failed"]} == {2}
    assert set(manifest["counts"]["failure_reasons"]) <= {"runaway", "too_short", "empty"}
    assert all(f["output"] is not None for f in manifest["failed"])  # the rejected text is kept for inspection


def test_missing_attributes_or_adapter_are_clear_errors(captioner_run, distilled_run, copy_run, tmp_path, tiny_llm):
    with pytest.raises(ConceptCapsError, match=r"attributes.parquet.*conceptcaps vae sample"):
        generate_captions(CaptionsArguments(run=str(distilled_run)))
    with pytest.raises(ConceptCapsError, match=r"adapter folder .*no_adapter.*captioner train"):
        generate_captions(CaptionsArguments(run=str(captioner_run), adapter=str(tmp_path / "no_adapter")))
    run = copy_run(captioner_run)
    import shutil

    shutil.rmtree(run / "captioner")
    with pytest.raises(ConceptCapsError, match=r"captioner not found.*--adapter none"):
        generate_captions(CaptionsArguments(run=str(run)))
    with pytest.raises(ConceptCapsError, match=r"hf download"):
        generate_captions(CaptionsArguments(run=str(run), model="nobody/no-such-model", adapter="none"))
    # The base model alone works when asked for.
    manifest = generate_captions(CaptionsArguments(run=str(run), model=str(tiny_llm), adapter="none", limit=4, **QUICK))
    assert "adapter" not in manifest["inputs"] and manifest["counts"]["attributes"] == 4


def test_two_processes_write_the_captions_of_one(captioner_run, tmp_path):
    """Under `accelerate launch` the batches are shared out; the captions are those of a single process."""
    import shutil

    options = ["--batch_size", "4", "--limit", "16", "--max_new_tokens", "24", "--require_end_of_turn", "false",
               "--seed", "5"]
    one, two = shutil.copytree(captioner_run, tmp_path / "one"), shutil.copytree(captioner_run, tmp_path / "two")
    from conceptcaps_pipeline.cli import main

    assert main(["captions", "generate", "--run", str(one), *options]) == 0
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "cpu.yaml"), "--num_processes", "2", "-m", "conceptcaps_pipeline.cli",
               "captions", "generate", "--run", str(two), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONCEPTCAPS_LOG_LEVEL": "WARNING"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((two / "manifests" / "captions_generate.json").read_text())
    assert manifest["counts"]["processes"] == 2 and manifest["counts"]["batches"] == 4
    assert _captions(two) == _captions(one)


def test_merged_adapter_writes_the_captions_of_the_unmerged_one(captioner_run, tiny_llm):
    """merge_and_unload folds LoRA into the weights: the same logits (float32) and the same greedy captions."""
    import torch
    from conceptcaps_pipeline.captions.generate import generate_batch, load_captioner

    adapter = str(captioner_run / "captioner")
    rows = pq.read_table(captioner_run / "attributes.parquet").to_pylist()[:6]
    args = CaptionsArguments(run=str(captioner_run), max_new_tokens=20, do_sample=False)
    outputs, logits = {}, {}
    for merge in (False, True):
        model, tokenizer, stop = load_captioner(str(tiny_llm), adapter, "float32", merge=merge, device="cpu")
        assert hasattr(model, "peft_config") != merge  # merged: a plain transformers model again
        outputs[merge] = generate_batch(model, tokenizer, stop, rows, args, seed=0, sample=False)
        encoded = tokenizer("A calm piano piece", return_tensors="pt")
        with torch.no_grad():
            logits[merge] = model(**encoded).logits
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-5)
    assert outputs[True] == outputs[False]


def test_vllm_engine_without_vllm_is_a_clear_error(captioner_run, copy_run):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: the missing-engine message cannot be shown")
    run = copy_run(captioner_run)
    with pytest.raises(ConceptCapsError, match=r"--engine vllm needs vLLM"):
        generate_captions(CaptionsArguments(run=str(run), engine="vllm", **QUICK))


def test_zero_shot_baseline_writes_its_own_file(captioner_run, copy_run):
    """--zero_shot: the captioner's base model without the adapter, beside (not over) the real captions."""
    from conceptcaps_pipeline.run_dir import read_manifest

    run = copy_run(captioner_run)
    real = generate_captions(CaptionsArguments(run=str(run), seed=1, limit=16, **QUICK))
    before = (run / "captions.parquet").read_bytes()
    manifest = generate_captions(CaptionsArguments(run=str(run), seed=1, limit=16, zero_shot=True, **QUICK))
    assert (run / "captions.parquet").read_bytes() == before
    assert read_manifest(run, "captions_generate") == real
    assert read_manifest(run, "captions_generate_zero_shot") == manifest
    assert "adapter" not in manifest["inputs"] and "adapter" in real["inputs"]
    plan = json.loads((run / "captions_zero_shot" / "plan.json").read_text())
    base = json.loads((run / "captions" / "plan.json").read_text())["base_model"]
    assert plan["adapter"] is None and plan["adapter_weights"] is None and plan["base_model"] == base
    rows = pq.read_table(run / "captions_zero_shot.parquet").to_pylist()
    assert len(rows) + manifest["counts"]["failed"] == 16 and "recording_quality_rate" in manifest["coverage"]
    # The same ids and prompts, another model: the captions differ.
    ours = {r["id"]: r["caption"] for r in _captions(run)}
    assert any(ours.get(r["id"]) != r["caption"] for r in rows)
    with pytest.raises(ConceptCapsError, match="--zero_shot captions with the base model alone: drop --adapter"):
        generate_captions(CaptionsArguments(run=str(run), zero_shot=True, adapter=str(run / "captioner"), **QUICK))


def test_a_qlora_adapter_is_applied_to_the_dequantised_base(captioner_run, tiny_llm, tmp_path):
    """An adapter trained on a 4-bit base (the captioner manifest says load_in_4bit) is merged into the base's
    NF4-rounded weights (simulated on a CPU): the logits of the adapter over that base, not over the original."""
    import shutil

    import torch
    from conceptcaps_pipeline.captions.adapter_merge import fake_nf4, load_base, trained_on_4bit
    from conceptcaps_pipeline.captions.generate import load_captioner
    from peft import PeftModel

    assert trained_on_4bit(captioner_run / "captioner") is False  # trained on float32 weights
    run = tmp_path / "run"
    shutil.copytree(captioner_run / "captioner", run / "captioner")
    manifest = json.loads((captioner_run / "manifests" / "captioner_train.json").read_text())
    text = json.dumps(manifest).replace('"load_in_4bit": false', '"load_in_4bit": true')
    assert text != json.dumps(manifest)
    (run / "manifests").mkdir()
    (run / "manifests" / "captioner_train.json").write_text(text)
    adapter = str(run / "captioner")
    assert trained_on_4bit(adapter) is True

    weight = torch.randn(4, 100)
    rounded = fake_nf4(weight)
    assert len(torch.unique(rounded[0, :64] / rounded[0, :64].abs().max())) <= 16  # 16 levels a block
    assert 0 < float((rounded - weight).abs().max()) < 0.2 * float(weight.abs().max())

    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        reference = PeftModel.from_pretrained(load_base(str(tiny_llm), torch.float32, "cpu", quantized=True),
                                              adapter)(ids).logits
        merged = load_captioner(str(tiny_llm), adapter, "float32", merge=True, device="cpu")[0](ids).logits
        original = load_captioner(str(tiny_llm), adapter, "float32", merge=True, device="cpu",
                                  quantized_base=False)[0](ids).logits
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-5)
    assert float((original - reference).abs().max()) > 100 * float((merged - reference).abs().max())


def test_vllm_takes_the_adapters_tokenizer_and_chat_template(captioner_run, tiny_llm, tmp_path):
    import shutil

    from conceptcaps_pipeline.captions.generate import vllm_settings

    adapter = tmp_path / "captioner"
    shutil.copytree(captioner_run / "captioner", adapter)
    template = adapter / "chat_template.jinja"
    changed = template.read_text().replace("<|eot_id|>", "<|eot_id|>", 1) + "{# the adapter's own template #}"
    template.write_text(changed)
    settings = vllm_settings(str(tiny_llm), str(adapter), CaptionsArguments(run=str(captioner_run)))
    assert settings["tokenizer_path"] == str(adapter) and settings["model"] == str(tiny_llm)
    assert settings["chat_template"].endswith("{# the adapter's own template #}")
    assert settings["tokenizer"].convert_tokens_to_ids("<|eot_id|>") in settings["stop_token_ids"]
    assert settings["enable_lora"] and settings["max_lora_rank"] >= 32
    base = vllm_settings(str(tiny_llm), None, CaptionsArguments(run=str(captioner_run)))
    assert base["tokenizer_path"] == str(tiny_llm) and not base["chat_template"].endswith("template #}")
