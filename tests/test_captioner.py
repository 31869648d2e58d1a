"""Caption fine-tune: tiny Llama builder, TRL SFT with LoRA on the real distilled pairs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conceptcaps_pipeline.errors import ConceptCapsError
from conftest import ROOT, tiny_captioner_configs

PRESET = ROOT / "generation" / "configs" / "captioner.yaml"


def test_tiny_llm_loads_by_path_with_chat_template(tiny_llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm)
    assert model.config.model_type == "llama" and model.num_parameters() < 1_000_000
    # Trained on MusicCaps captions: common caption words are single tokens.
    assert len(tokenizer.tokenize(" guitar")) == 1 and len(tokenizer.tokenize(" tempo")) == 1
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    text = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assistant = [t for t, m in zip(full["input_ids"], full["assistant_masks"]) if m]
    assert tokenizer.decode(assistant) == "A<|eot_id|>"  # the end of turn is trained too
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_paper_defaults_and_preset_parse():
    from conceptcaps_pipeline.cli import make_parser

    parser = make_parser(("captioner", "train"))
    args, sft, model = parser.parse_args_and_config(["--run", "runs/x", "--model", "some/model"])
    assert (model.lora_r, model.lora_alpha, model.lora_dropout, model.lora_target_modules) == (32, 8, 0.26, "all-linear")
    assert model.use_peft and not model.load_in_4bit and args.model == "some/model"
    assert (sft.num_train_epochs, sft.per_device_train_batch_size, sft.report_to) == (5, 4, [])
    assert sft.save_strategy == "no" and sft.output_dir == ""  # filled with RUN/captioner
    # bf16 where the GPU supports it: not every CUDA GPU does (T4, V100), and a CPU run trains in float32.
    assert sft.bf16 == bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    _args, sft, model = parser.parse_args_and_config(["--config", str(PRESET), "--run", "runs/x", "--lora_r", "8"])
    assert model.load_in_4bit and model.dtype == "bfloat16" and model.lora_alpha == 8
    assert model.lora_r == 8  # the command line overrides the YAML


def test_sft_trains_lora_weights_only(distilled_run, copy_run, tiny_llm):
    from conceptcaps_pipeline.captions.train import build_trainer

    run = copy_run(distilled_run)
    trainer = build_trainer(*tiny_captioner_configs(run, tiny_llm, max_steps=2, eval_strategy="no"))
    # Conversational prompt-completion data: the loss mask covers the caption (and end of turn) only.
    example = trainer.train_dataset[0]
    labelled = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    caption = trainer.processing_class.decode(labelled)
    assert caption.endswith("<|eot_id|>") and "Describe a music clip" not in caption and "<|start_header_id|>" not in caption

    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} == linear  # all-linear
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    assert changed and changed <= trainable
    assert any(".lora_B." in name for name in changed)  # B starts at zero: the adapter really learned


def test_train_captioner_writes_adapter_and_summary(captioner_run, tiny_llm):
    out = captioner_run / "captioner"
    config = json.loads((out / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == Path(tiny_llm).resolve()
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (32, 8, 0.26)
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not list(out.glob("checkpoint-*"))
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["train_examples"] == 16 and summary["eval_examples"] == 8
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]
    assert summary["eval"]["eval_loss"] > 0 and summary["train"]["train_loss"] > 0
    manifest = json.loads((captioner_run / "manifests" / "captioner_train.json").read_text())
    assert manifest["arguments"]["model"]["lora_r"] == 32
    # Recorded as the run-relative RUN/captioner (a moved run still resolves it) or, before that, as a full path.
    from conceptcaps_pipeline.run_dir import from_run_relative

    recorded = manifest["arguments"]["sft"]["output_dir"]
    assert Path(from_run_relative(recorded, captioner_run)).resolve() == out.resolve()


def test_rerun_is_skipped_when_up_to_date(captioner_run, tiny_llm):
    from conceptcaps_pipeline.captions.train import train_captioner

    run = captioner_run  # same arguments and inputs: nothing is retrained, nothing written
    first = json.loads((run / "manifests" / "captioner_train.json").read_text())
    manifest = train_captioner(*tiny_captioner_configs(run, tiny_llm))
    assert manifest["finished_at"] == first["finished_at"]


def test_qlora_on_cpu_is_a_clear_error_before_loading(distilled_run, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from conceptcaps_pipeline.cli import main

    # The preset's model is a Hub id that cannot load offline: the CUDA check must come first.
    code = main(["captioner", "train", "--config", str(PRESET), "--run", str(distilled_run)])
    error = capsys.readouterr().err
    assert code == 2 and "--load_in_4bit" in error and "CUDA" in error
    assert not (distilled_run / "captioner").exists()


def test_hub_id_offline_says_how_to_use_a_local_copy(distilled_run, copy_run):
    from conceptcaps_pipeline.captions.train import CaptionerArguments, ModelConfig, SFTConfig, train_captioner

    run = copy_run(distilled_run)
    with pytest.raises(ConceptCapsError, match=r"hf download meta-llama/Llama-3.1-8B-Instruct --local-dir DIR.*--model DIR"):
        train_captioner(CaptionerArguments(run=str(run)), SFTConfig(), ModelConfig())


def test_missing_inputs_are_clear_errors(tmp_path, tiny_llm):
    from conceptcaps_pipeline.captions.train import train_captioner

    with pytest.raises(ConceptCapsError, match="distilled.parquet.*conceptcaps distill"):
        train_captioner(*tiny_captioner_configs(tmp_path, tiny_llm))
    with pytest.raises(ConceptCapsError, match="model folder .* not found"):
        train_captioner(*tiny_captioner_configs(tmp_path, tmp_path / "no" / "such" / "model"))


def test_tiny_llm_warm_up_and_command_line(distilled_run, tmp_path):
    from conceptcaps_pipeline.testing.tiny_llm import main
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = distilled_run / "distilled.parquet"
    small = ["--vocab_size", "512", "--train_batch_size", "8", "--train_max_tokens", "48"]
    main(["--out", str(tmp_path / "random"), "--source", str(source), *small])
    main(["--out", str(tmp_path / "warm"), "--source", str(source), *small, "--train_steps", "30"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "warm")
    caption = [{"role": "assistant", "content": "A slow jazz song with a piano melody and soft drums."}]
    ids = tokenizer.apply_chat_template(caption, return_tensors="pt", return_dict=True)["input_ids"]
    losses = {name: AutoModelForCausalLM.from_pretrained(tmp_path / name)(input_ids=ids, labels=ids).loss.item()
              for name in ("random", "warm")}
    assert losses["warm"] < losses["random"] - 0.5  # the warm-up really trains on the captions
