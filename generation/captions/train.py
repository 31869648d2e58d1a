"""Fine-tune a chat LLM to turn an attribute list into a caption (LoRA or QLoRA, via TRL).

    conceptcaps captioner train --run runs/demo --config generation/configs/captioner.yaml
    conceptcaps captioner train --run runs/demo --model /models/Llama-3.1-8B-Instruct --load_in_4bit
    conceptcaps captioner train --run runs/demo --model runs/tiny-llm --num_train_epochs 1

A thin layer over TRL: the arguments are TRL's own `SFTConfig` and `ModelConfig` (every
`--lora_*`, `--load_in_4bit`, `--learning_rate` ... flag works), with the paper's defaults
(LoRA rank 32, alpha 8, dropout 0.26 on all linear layers, 5 epochs, batch 4) set on the
two dataclasses below; a `--config` YAML and then the command line override them.

Each (attribute list, caption) pair of RUN/distilled.parquet becomes a conversational
prompt-completion example (generation/captions/prompts.py: system + user turn with the attributes,
assistant turn = the caption), rendered by the model's chat template; SFTTrainer puts the
loss on the completion only. It trains on the `train` split, evaluates on `validation`,
and writes the adapter, the tokenizer and training_summary.json to RUN/captioner/ (or
--output_dir) plus RUN/manifests/captioner_train.json. QLoRA (`--load_in_4bit`: 4-bit NF4
weights, bfloat16 compute) needs a CUDA GPU and bitsandbytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import trl
from conceptcaps_pipeline.captions.prompts import training_example
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.models import load_pretrained, resolve_model
from conceptcaps_pipeline.run_dir import atomic_dir, finished, require, stage, write_json, write_manifest

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
STAGE = "captioner_train"


@dataclass
class CaptionerArguments:
    run: str = field(metadata={"help": "Run directory holding distilled.parquet; the adapter goes to RUN/captioner."})
    model: str | None = field(
        default=None,
        metadata={"help": f"Base model: a Hub id or a local folder (short for --model_name_or_path; default {DEFAULT_MODEL})."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N pairs of the train split only (quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N pairs of the validation split only."}
    )
    force: bool = field(default=False, metadata={"help": "Retrain even if RUN/captioner is up to date."})


@dataclass
class ModelConfig(trl.ModelConfig):
    """trl.ModelConfig with the paper's LoRA settings as defaults."""

    model_name_or_path: str | None = field(
        default=DEFAULT_MODEL, metadata={"help": "Base model: a Hub id or a local folder."}
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (the paper); False fine-tunes every weight."})
    lora_r: int = field(default=32, metadata={"help": "LoRA rank (paper: 32)."})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA alpha (paper: 8)."})
    lora_dropout: float = field(default=0.26, metadata={"help": "LoRA dropout (paper: 0.26)."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules that get LoRA weights; 'all-linear' = every linear layer but the output head (paper)."},
    )


@dataclass
class SFTConfig(trl.SFTConfig):
    """trl.SFTConfig with the paper's schedule and quiet, checkpoint-free defaults.

    `output_dir` defaults to RUN/captioner. `bf16` defaults to on only where a CUDA GPU
    supports it (TRL's default, always on, is refused by transformers on a CPU).
    """

    output_dir: str | None = field(default=None, metadata={"help": "Where the adapter goes (default: RUN/captioner)."})
    num_train_epochs: float = field(default=5.0, metadata={"help": "Training epochs (paper: 5)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Batch size per device (paper: 4)."})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Evaluation batch size per device."})
    # The paper gives no learning rate; LoRA adapters want ~10x TRL's full fine-tune default (2e-5).
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak AdamW learning rate."})
    # A prompt plus a MusicCaps caption stays well under 512 tokens for a Llama-3 tokenizer.
    max_length: int | None = field(default=512, metadata={"help": "Longest tokenized example; longer ones are cut."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate on the validation split (no, steps, epoch)."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoints during training (no: only the final adapter)."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Experiment trackers (none, wandb, ...)."})
    bf16: bool | None = field(default=None, metadata={"help": "bfloat16 mixed precision (default: on where the GPU supports it)."})
    # None leaves TRL's deprecated alias unset; transformers then reads activation_checkpointing (off).
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of --activation_checkpointing."}
    )

    # None: pin where an accelerator is; pinning on a CPU-only machine does nothing but warn (torch's DataLoader).
    dataloader_pin_memory: bool | None = field(
        default=None, metadata={"help": "Pin batches in host memory (default: on where an accelerator is)."}
    )

    def __post_init__(self):
        import torch

        if self.bf16 is None and not self.fp16:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = torch.accelerator.is_available()
        if self.output_dir is None:
            self.output_dir = ""  # filled with RUN/captioner by train_captioner
        super().__post_init__()


# -- models by id or path: generation/models.py ------------------------------------------------
def resolve_model_name(name: str) -> str:
    return resolve_model(name, "model")


def from_pretrained(loader, name: str, what: str = "model", **kwargs):
    return load_pretrained(loader, name, "model", what, **kwargs)


def load_tokenizer(name: str, revision: str = "main", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, name, "tokenizer", revision=revision, trust_remote_code=trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise ConceptCapsError(
            f"the tokenizer of {name} has no chat template: use an instruct/chat model (any causal LM with a chat template)."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama 3 has no pad token; padding is masked anyway
    return tokenizer


def check_quantization(model_config: ModelConfig) -> None:
    """QLoRA needs CUDA and bitsandbytes: say so before anything is loaded."""
    if not (model_config.load_in_4bit or model_config.load_in_8bit):
        return
    import torch

    flag = "--load_in_4bit" if model_config.load_in_4bit else "--load_in_8bit"
    if not torch.cuda.is_available():
        raise ConceptCapsError(
            f"{flag} (QLoRA, bitsandbytes quantization) needs a CUDA GPU, and this machine has none. "
            f"Run on a GPU machine, or leave out {flag} to train a plain LoRA adapter on full-precision weights "
            f"(fine for a small model, far too slow for an 8B one on a CPU)."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ConceptCapsError(f"{flag} needs bitsandbytes: `pip install 'conceptcaps[quant]'`.") from err


def load_model(model_config: ModelConfig, name: str, trust_remote_code: bool = False):
    """The base causal LM; 4/8-bit (bfloat16 compute) when asked, which `check_quantization` allows."""
    from transformers import AutoModelForCausalLM

    check_quantization(model_config)
    kwargs = {"revision": model_config.model_revision, "trust_remote_code": trust_remote_code,
              "attn_implementation": model_config.attn_implementation}
    if model_config.load_in_4bit or model_config.load_in_8bit:
        from accelerate import PartialState

        # QLoRA computes in bfloat16 (the paper's setting) unless a half dtype was asked for.
        dtype = model_config.dtype if model_config.dtype in ("bfloat16", "float16") else "bfloat16"
        kwargs["quantization_config"] = trl.get_quantization_config(dataclasses.replace(model_config, dtype=dtype))
        kwargs["device_map"] = {"": PartialState().local_process_index}
        kwargs["dtype"] = dtype
    else:
        kwargs["dtype"] = model_config.dtype
    return from_pretrained(AutoModelForCausalLM, name, "model", **kwargs)


# -- data -------------------------------------------------------------------------------------
def load_pairs(run: Path, max_train: int | None, max_eval: int | None):
    """Train and validation `datasets.Dataset`s of conversational prompt-completion examples."""
    import datasets

    path = require(run, "distilled.parquet")
    from conceptcaps_pipeline.run_dir import read_table

    rows = read_table(path, fix=f"re-run `conceptcaps distill --run {run} --force`").to_pylist()
    if not rows:
        raise ConceptCapsError(f"{path} has no rows: re-run `conceptcaps distill` on a source with captions.")
    splits = {}
    for split, limit in (("train", max_train), ("validation", max_eval)):
        examples = [training_example(r) for r in rows if r["split"] == split]
        splits[split] = datasets.Dataset.from_list(examples[:limit] if limit else examples)
    return splits["train"], splits["validation"]


# -- training ---------------------------------------------------------------------------------
def resolve_arguments(args: CaptionerArguments, sft_config: SFTConfig, model_config: ModelConfig) -> str:
    """Apply --model and the RUN/captioner default; return the base model name or absolute path."""
    given = model_config.model_name_or_path
    name = resolve_model_name(args.model or given or DEFAULT_MODEL)
    if args.model and given not in (DEFAULT_MODEL, None) and resolve_model_name(given) != name:
        raise ConceptCapsError(f"--model {args.model} and --model_name_or_path {given} disagree: pass one of them.")
    model_config.model_name_or_path = name
    if not sft_config.output_dir:
        sft_config.output_dir = str(Path(args.run) / "captioner")
    return model_config.model_name_or_path


def build_trainer(args: CaptionerArguments, sft_config: SFTConfig, model_config: ModelConfig):
    """An SFTTrainer with the LoRA adapter attached, ready to train (used by train_captioner and tests)."""
    name = resolve_arguments(args, sft_config, model_config)
    check_quantization(model_config)  # before reading data or loading weights
    train, validation = load_pairs(Path(args.run), args.max_train_samples, args.max_eval_samples)
    if len(train) == 0:
        raise ConceptCapsError(f"{args.run}/distilled.parquet has no 'train' rows: re-run distill with more data.")
    if sft_config.eval_strategy != "no" and len(validation) == 0:
        raise ConceptCapsError(
            f"{args.run}/distilled.parquet has no 'validation' rows: pass --eval_strategy no, "
            f"or re-run distill with --validation_fraction above 0."
        )
    tokenizer = load_tokenizer(name, model_config.model_revision, sft_config.trust_remote_code)
    model = load_model(model_config, name, sft_config.trust_remote_code)
    logger.info("captioner: %s on %d train / %d validation pairs", name, len(train), len(validation))
    return trl.SFTTrainer(
        model=model,
        args=sft_config,
        train_dataset=train,
        eval_dataset=validation if sft_config.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=trl.get_peft_config(model_config),
    )


def _arguments(args, sft_config, model_config) -> dict:
    captioner = dataclasses.asdict(args)
    captioner.pop("force")  # --force changes whether the stage runs, not what it makes
    return {
        "captioner": captioner,
        "sft": json.loads(json.dumps(sft_config.to_dict(), default=str)),
        "model": dataclasses.asdict(model_config),
    }


def check_arguments(sft_config: SFTConfig, model_config: ModelConfig) -> None:
    """The training options a typo makes nonsense of, before any data or weights load."""
    checks = [
        (sft_config.num_train_epochs > 0, f"--num_train_epochs {sft_config.num_train_epochs}: give a positive number."),
        (sft_config.learning_rate > 0, f"--learning_rate {sft_config.learning_rate}: give a positive rate, e.g. 2e-4."),
        (sft_config.per_device_train_batch_size >= 1,
         f"--per_device_train_batch_size {sft_config.per_device_train_batch_size}: give at least 1."),
        (not model_config.use_peft or model_config.lora_r >= 1, f"--lora_r {model_config.lora_r}: give at least 1."),
        (0 <= model_config.lora_dropout < 1, f"--lora_dropout {model_config.lora_dropout}: give a share in [0, 1)."),
        (sft_config.max_length is None or sft_config.max_length >= 1,
         f"--max_length {sft_config.max_length}: give at least 1 token."),
    ]
    for ok, message in checks:
        if not ok:
            raise ConceptCapsError(message)


def check_stage(args: CaptionerArguments, sft_config: SFTConfig, model_config: ModelConfig) -> None:
    """The options, then whether their quantization can run on this machine: before anything is touched."""
    check_arguments(sft_config, model_config)
    check_quantization(model_config)  # before anything else: no CUDA is the first thing to know


@stage(STAGE, check=check_stage)
def train_captioner(args: CaptionerArguments, sft_config: SFTConfig, model_config: ModelConfig) -> dict:
    """Run the stage and return its manifest."""
    from conceptcaps_pipeline.run_dir import remove_leftovers

    started = time.time()
    run = Path(args.run)
    resolve_arguments(args, sft_config, model_config)
    out = Path(sft_config.output_dir)
    inputs = {"distilled": require(run, "distilled.parquet")}
    arguments = _arguments(args, sft_config, model_config)
    done = finished(run, STAGE, arguments, inputs, [out / "adapter_config.json", out / "training_summary.json"])
    if done and not args.force:
        logger.info("captioner train: %s is up to date; --force retrains", out)
        return done

    remove_leftovers(out.parent, [out.name])  # the training folder of an interrupted run
    with atomic_dir(out) as tmp:
        # Train with the temporary folder as output_dir so that a crash leaves no half-written adapter.
        sft_config.output_dir = str(tmp)
        trainer = build_trainer(args, sft_config, model_config)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())
        train_metrics = trainer.train().metrics
        eval_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
        trainer.save_model(str(tmp))  # adapter (or full weights without PEFT) + tokenizer
        from conceptcaps_pipeline.models import portable_adapter_config
        from conceptcaps_pipeline.run_dir import run_relative

        portable_adapter_config(tmp, run)  # a base model inside the run as RUN/...: the run can be copied
        summary = {
            "base_model": run_relative(model_config.model_name_or_path, run),
            "base_model_in_run": run_relative(model_config.model_name_or_path, run),
            "train_examples": len(trainer.train_dataset),
            "eval_examples": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "train": train_metrics,
            "eval": eval_metrics,
            "log_history": trainer.state.log_history,
        }
        write_json(tmp / "training_summary.json", summary)
        sft_config.output_dir = str(out)
    counts = {k: summary[k] for k in ("train_examples", "eval_examples", "trainable_parameters", "total_parameters")}
    counts.update({"train_loss": train_metrics.get("train_loss"), "eval_loss": eval_metrics.get("eval_loss")})
    logger.info("captioner train: %s -> %s", counts, out)
    return write_manifest(run, STAGE, arguments, inputs=inputs, counts=counts, started=started,
                          extra={"output_dir": run_relative(out, run)})

