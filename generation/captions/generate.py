"""Write one caption per sampled attribute set with the fine-tuned captioner, resumably.

    conceptcaps captions generate --run runs/demo
    conceptcaps captions generate --run runs/demo --adapter runs/demo/captioner --batch_size 32 --seed 1
    conceptcaps captions generate --run runs/demo --model /models/Llama-3.1-8B-Instruct --adapter none
    conceptcaps captions generate --run runs/demo --zero_shot    # baseline: RUN/captions_zero_shot.parquet

Reads RUN/attributes.parquet and prompts the model (generation/captions/prompts.py) through its chat
template. The adapter is RUN/captioner unless --adapter says otherwise (`none`: the base
model alone); the base model comes from the adapter's config unless --model is given.

Prompts are sorted by length and cut into fixed batches (left padding); each batch is
generated with a seed derived from --seed and its index, stops at the end of the turn or
after --max_new_tokens, and is written as one shard RUN/captions/shard-NNNNNN.parquet
(atomically, by a writer thread). A re-run skips the batches already on disk, so a killed
run resumes and every id ends up exactly once. Chat artefacts are stripped; an output that
is empty, repeats an n-gram, never ends its turn or is too short is retried with a new
seed (sampling) up to --max_attempts; what still fails is listed in the manifest, never
written as a caption. At the end the good captions, with their attribute coverage
(eval/attribute_coverage), are gathered into RUN/captions.parquet.

Zero-shot baseline (`--zero_shot`): the captioner's base model without its adapter (the
paper's comparison for the fine-tune), with the same prompts, decoding and checks. It
writes RUN/captions_zero_shot.parquet, shards in RUN/captions_zero_shot/ and the manifest
`captions_generate_zero_shot`, so the dataset's captions stay; `conceptcaps evaluate
--baseline zero_shot` scores it (docs/evaluate.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from conceptcaps_pipeline.captions.prompts import prompt_messages
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import (
    file_sha256,
    finished,
    read_json,
    read_manifest,
    require,
    stage,
    write_json,
    write_manifest,
    write_parquet,
)
from conceptcaps_pipeline.taxonomy import CATEGORIES, DEFAULT_TAXONOMY, Taxonomy

logger = logging.getLogger(__name__)

STAGE = "captions_generate"
SHARD_DIR = "captions"


@dataclass
class CaptionsArguments:
    run: str = field(metadata={"help": "Run directory holding attributes.parquet; writes RUN/captions.parquet."})
    model: str | None = field(
        default=None, metadata={"help": "Base model (Hub id or folder); default: the base named in the adapter config."}
    )
    adapter: str | None = field(
        default=None, metadata={"help": "LoRA adapter folder (default RUN/captioner); 'none' uses the base model alone."}
    )
    taxonomy: str | None = field(
        default=None, metadata={"help": "Taxonomy for attribute coverage (default RUN/taxonomy.json, else the repo YAML)."}
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts per generate() call."})
    max_new_tokens: int = field(default=200, metadata={"help": "Longest caption in tokens; hitting it counts as runaway."})
    do_sample: bool = field(default=True, metadata={"help": "Sample (seeded); False: greedy first attempt."})
    temperature: float = field(default=0.6, metadata={"help": "Sampling temperature (Llama 3.1 Instruct's default)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling threshold."})
    seed: int = field(default=0, metadata={"help": "Base seed; each batch and attempt derives its own from it."})
    max_attempts: int = field(default=3, metadata={"help": "Tries per id before it is reported as failed."})
    ngram_size: int = field(default=4, metadata={"help": "Word n-gram length of the repetition check."})
    max_ngram_repeats: int = field(
        default=3, metadata={"help": "An n-gram occurring this many times makes a caption degenerate."}
    )
    min_words: int = field(default=5, metadata={"help": "Captions with fewer words are degenerate."})
    require_end_of_turn: bool = field(
        default=True, metadata={"help": "An output that never ends its turn within max_new_tokens is degenerate."}
    )
    max_failure_rate: float = field(
        default=0.05, metadata={"help": "Refuse to finish when a larger share of ids failed every attempt."}
    )
    limit: int | None = field(default=None, metadata={"help": "Caption only the first N attribute sets (quick runs)."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto (bfloat16 on a GPU, float32 on a CPU), float32, ..."})
    merge_adapter: bool = field(
        default=True,
        metadata={"help": "Merge the LoRA weights into the base model before generating (peft merge_and_unload): one "
                          "matmul per layer instead of three. With a bf16 base the merged weights are rounded to bf16."})
    engine: str = field(
        default="transformers",
        metadata={"help": "transformers (any device, under `accelerate launch` for several processes) or vllm (where "
                          "vLLM is installed: its own batching and paged KV cache; LoRA adapters supported)."})
    zero_shot: bool = field(
        default=False,
        metadata={"help": "Baseline: caption with the base model alone (no adapter; the base of RUN/captioner unless "
                          "--model names one) into RUN/captions_zero_shot.parquet, leaving captions.parquet as it is."})
    force: bool = field(default=False, metadata={"help": "Make every caption again; the old ones are set aside and "
                                                         "dropped once the new ones are made."})


def outputs_of(args: CaptionsArguments) -> tuple[str, str, str]:
    """(manifest and lock name, output file, shard folder) under RUN: a baseline never replaces the real captions."""
    if args.zero_shot:
        return f"{STAGE}_zero_shot", "captions_zero_shot.parquet", f"{SHARD_DIR}_zero_shot"
    return STAGE, "captions.parquet", SHARD_DIR


# -- coverage: the one implementation lives in the evaluate module ---------------------------
def load_coverage_module():
    """The attribute_coverage metric's script as a module (its `caption_coverage`, `summarize`)."""
    from conceptcaps_eval.attribute_coverage import attribute_coverage

    return attribute_coverage


# -- cleaning and degeneracy ------------------------------------------------------------------
_PREFIX = re.compile(r"^\s*(?:assistant|caption|description)\s*[:\-]?\s*\n*", re.IGNORECASE)
_WORD = re.compile(r"[\w']+")


def clean_caption(text: str) -> str:
    """Strip chat artefacts: a role or 'Caption:' prefix, markdown emphasis, wrapping quotes, extra space,
    and the replacement characters that a cut multi-byte character decodes to."""
    text = _PREFIX.sub("", text.replace("\ufffd", "").strip(), count=1)
    text = text.replace("**", "").replace("__", "")
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1].strip()
    if len(text) >= 2 and text[0] == "“" and text[-1] == "”":
        text = text[1:-1].strip()
    return text


def degeneracy(
    text: str, ended: bool, *, ngram_size: int = 4, max_ngram_repeats: int = 3, min_words: int = 5,
    require_end_of_turn: bool = True,
) -> str | None:
    """Why a cleaned output is not a usable caption ('empty', 'runaway', 'repetition', 'too_short'), or None."""
    words = _WORD.findall(text.lower())
    if not words:
        return "empty"
    if require_end_of_turn and not ended:
        return "runaway"
    grams = Counter(tuple(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1))
    if grams and max(grams.values()) >= max_ngram_repeats:
        return "repetition"
    if len(words) < min_words:
        return "too_short"
    return None


def derived_seed(seed: int, batch: int, attempt: int) -> int:
    """A seed per (run seed, batch, attempt), independent of which batches already ran."""
    digest = hashlib.sha256(f"{seed}/{batch}/{attempt}".encode()).hexdigest()
    return int(digest[:8], 16) % (2**31)


# -- model ------------------------------------------------------------------------------------
def resolve_models(args: CaptionsArguments, run: Path) -> tuple[str, str | None]:
    """(base model name or path, adapter folder or None), with a clear error when neither exists."""
    from conceptcaps_pipeline.captions.train import resolve_model_name

    if getattr(args, "zero_shot", False):
        if args.adapter and args.adapter.lower() != "none":
            raise ConceptCapsError(f"--zero_shot captions with the base model alone: drop --adapter {args.adapter}.")
        if args.model:
            return resolve_model_name(args.model), None
        # The base model of the run's captioner: what the fine-tune is compared with.
        base, _ = resolve_models(CaptionsArguments(run=args.run, adapter=None), run)
        return base, None
    adapter = None
    if args.adapter and args.adapter.lower() != "none":
        adapter = Path(args.adapter).expanduser()
        if not (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists():
            raise ConceptCapsError(
                f"adapter folder {adapter} not found or holds no adapter_config.json: pass --adapter with the folder "
                f"written by `conceptcaps captioner train --run {run} --model MODEL` (default {run}/captioner), "
                f"or --adapter none to caption with the base model alone."
            )
    elif args.adapter is None:
        default = run / "captioner"
        if (default / "adapter_config.json").exists() or (default / "config.json").exists():
            adapter = default
        elif not args.model:
            raise ConceptCapsError(
                f"{default} not found: run `conceptcaps captioner train --run {run} --model MODEL` first, "
                f"or pass --model MODEL --adapter none to caption with a base model that was not fine-tuned."
            )
    if adapter is not None and not (adapter / "adapter_config.json").exists():
        return str(adapter.resolve()), None  # a full fine-tune: the folder is the model
    if args.model:
        return resolve_model_name(args.model), str(adapter.resolve()) if adapter else None
    base = read_json(adapter / "adapter_config.json", fix="re-run `conceptcaps captioner train --force`").get(
        "base_model_name_or_path")
    if not base:
        raise ConceptCapsError(f"{adapter}/adapter_config.json names no base_model_name_or_path: pass --model.")
    if not Path(base).exists() and (adapter / "training_summary.json").exists():
        # A base model that lived in the run (a tiny model) moved with it: the summary names it RUN/...
        from conceptcaps_pipeline.run_dir import from_run_relative

        summary = read_json(adapter / "training_summary.json")
        if str(summary.get("base_model_in_run") or "").startswith("RUN"):
            base = from_run_relative(summary["base_model_in_run"], run)
    return resolve_model_name(base), str(adapter.resolve())


def load_captioner(base: str, adapter: str | None, dtype: str, merge: bool = False, device=None,
                   quantized_base: bool | None = None):
    """(model on `device` (default: the best one), left-padding tokenizer, end-of-turn token ids).

    `merge` folds the LoRA weights into the base weights (peft's merge_and_unload), so each
    linear layer is one matmul at generation time. An adapter trained on a 4-bit base (QLoRA;
    `quantized_base`, by default read from RUN/manifests/captioner_train.json) is applied to the
    base's de-quantised 4-bit weights, the weights it was trained with, not to the original ones:
    measured in captions/adapter_merge.py and docs/captions.md (merging into the original weights
    moves the logits by the whole quantisation error; into the de-quantised ones, by rounding).
    The tokenizer is the adapter's where it has one (its chat template and special tokens).
    """
    import torch
    from conceptcaps_pipeline.captions.adapter_merge import load_base, trained_on_4bit
    from conceptcaps_pipeline.captions.train import from_pretrained, load_tokenizer
    from transformers import AutoModelForCausalLM

    has_tokenizer = adapter and (Path(adapter) / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(adapter if has_tokenizer else base)
    tokenizer.padding_side = "left"  # decoder-only models continue from the right end of the prompt
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if quantized_base is None:
        quantized_base = bool(adapter) and bool(trained_on_4bit(adapter))
    if adapter and quantized_base:
        logger.info("captions: the adapter was trained on a 4-bit base: applied to its de-quantised weights")
        model = load_base(base, getattr(torch, dtype), device, quantized=True)
    else:
        model = from_pretrained(AutoModelForCausalLM, base, "model", dtype=getattr(torch, dtype))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if merge:
            model = model.merge_and_unload()
    model.to(device).eval()
    return model, tokenizer, end_of_turn_ids(tokenizer, model.generation_config.eos_token_id)


def end_of_turn_ids(tokenizer, eos=None) -> list[int]:
    """Token ids that end a caption: the model's eos id(s), the tokenizer's, and common chat end-of-turn tokens."""
    stop = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    stop.add(tokenizer.eos_token_id)
    for token in ("<|eot_id|>", "<|im_end|>", "<|end|>"):  # end-of-turn tokens of common chat templates
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token in tokenizer.get_vocab():
            stop.add(token_id)
    return sorted(i for i in stop if i is not None)


def generate_batch(model, tokenizer, stop_ids, rows, args: CaptionsArguments, seed: int, sample: bool):
    """Raw (text, ended) per row: tokens up to the first end-of-turn token, decoded without specials."""
    import torch
    from transformers import set_seed

    encoded = tokenizer.apply_chat_template(
        [prompt_messages(r) for r in rows], add_generation_prompt=True, return_dict=True, return_tensors="pt",
        padding=True,
    ).to(model.device)
    kwargs = {"max_new_tokens": args.max_new_tokens, "eos_token_id": stop_ids, "pad_token_id": tokenizer.pad_token_id,
              "do_sample": sample}
    if sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    set_seed(seed)
    with torch.inference_mode():
        output = model.generate(**encoded, **kwargs)
    results = []
    for sequence in output[:, encoded["input_ids"].shape[1] :].tolist():
        cut = next((i for i, token in enumerate(sequence) if token in stop_ids), None)
        tokens = sequence if cut is None else sequence[:cut]
        results.append((tokenizer.decode(tokens, skip_special_tokens=True), cut is not None))
    return results


# -- shards -----------------------------------------------------------------------------------
def _schema():
    import pyarrow as pa

    strings = pa.list_(pa.string())
    return pa.schema([
        ("id", pa.string()), ("caption", pa.string()), ("aspect_list", strings),
        *[(c, strings) for c in CATEGORIES],
        ("coverage", pa.float64()), ("unrequested_tags", strings), ("seed", pa.int64()), ("attempts", pa.int64()),
        ("failure", pa.string()), ("failed_output", pa.string()),
    ])


def read_shards(folder: Path) -> list[dict]:
    from conceptcaps_pipeline.run_dir import read_table

    rows = []
    for shard in sorted(folder.glob("shard-*.parquet")):
        rows.extend(read_table(shard, fix=f"move it out of {folder} and re-run the same command: its batch is made "
                                          f"again").to_pylist())
    return rows


def _plan(args: CaptionsArguments, attributes: Path, taxonomy: Path, base: str, adapter: str | None, run: Path) -> dict:
    """What the shards depend on; a re-run with another plan may not mix its shards with these.

    Models inside the run are named `RUN/...`, so a moved or copied run still resumes.
    """
    from conceptcaps_pipeline.run_dir import run_relative

    keep = ("batch_size", "max_new_tokens", "do_sample", "temperature", "top_p", "seed", "max_attempts",
            "ngram_size", "max_ngram_repeats", "min_words", "require_end_of_turn", "limit", "dtype", "merge_adapter",
            "engine")
    plan = {key: getattr(args, key) for key in keep}
    from conceptcaps_pipeline.captions.adapter_merge import trained_on_4bit

    if adapter and not args.zero_shot and trained_on_4bit(adapter):
        plan["adapter_base"] = "de-quantised 4-bit weights"  # a QLoRA adapter meets the weights it was trained with
    weights = next((Path(adapter) / n for n in ("adapter_model.safetensors", "adapter_model.bin")
                    if adapter and (Path(adapter) / n).exists()), None)
    plan.update(attributes=file_sha256(attributes), taxonomy=file_sha256(taxonomy), base_model=run_relative(base, run),
                adapter=run_relative(adapter, run), adapter_weights=file_sha256(weights) if weights else None)
    return plan


def _check_rows(rows: list[dict], path: Path) -> None:
    if not rows:
        raise ConceptCapsError(f"{path} has no rows: re-run `conceptcaps vae sample --n N --force` with N > 0.")
    seen = set()
    for row in rows:
        if row["id"] in seen:
            raise ConceptCapsError(f"{path}: id {row['id']!r} occurs twice; re-run `conceptcaps vae sample --force`.")
        seen.add(row["id"])
        if not row.get("aspect_list"):
            raise ConceptCapsError(
                f"{path}: id {row['id']!r} has an empty aspect_list; re-run `conceptcaps vae sample --force`."
            )


# -- the stage --------------------------------------------------------------------------------
DTYPES = ("auto", "bfloat16", "float16", "float32")
ENGINES = ("transformers", "vllm")


def check_arguments(args: CaptionsArguments) -> None:
    """Every option that can be checked before a model loads or a file is touched: one clear error each."""
    checks = [
        (args.batch_size >= 1, f"--batch_size {args.batch_size}: give at least 1."),
        (args.max_attempts >= 1, f"--max_attempts {args.max_attempts}: give at least 1."),
        (args.max_new_tokens >= 1, f"--max_new_tokens {args.max_new_tokens}: give at least 1 token."),
        (args.temperature > 0, f"--temperature {args.temperature}: give a positive temperature, e.g. 0.6."),
        (0 < args.top_p <= 1, f"--top_p {args.top_p}: give a probability in (0, 1]."),
        (args.ngram_size >= 1, f"--ngram_size {args.ngram_size}: give at least 1."),
        (args.max_ngram_repeats >= 2, f"--max_ngram_repeats {args.max_ngram_repeats}: give at least 2."),
        (args.min_words >= 0, f"--min_words {args.min_words}: give 0 or more."),
        (0 <= args.max_failure_rate <= 1, f"--max_failure_rate {args.max_failure_rate}: give a share in [0, 1]."),
        (args.limit is None or args.limit >= 1, f"--limit {args.limit}: give at least 1 (or leave it out)."),
        (args.dtype in DTYPES, f"--dtype {args.dtype!r}: use one of {', '.join(DTYPES)}."),
        (args.engine in ENGINES, f"--engine {args.engine!r}: use one of {', '.join(ENGINES)}."),
    ]
    for ok, message in checks:
        if not ok:
            raise ConceptCapsError(message)


def _processes(args: CaptionsArguments) -> dict:
    """Before the lock: the sets to caption are there, and accelerate's process state (the main process locks)."""
    require(args.run, "attributes.parquet")
    state = partial_state()
    if args.engine == "vllm" and state.num_processes > 1:
        raise ConceptCapsError("--engine vllm spreads the work itself: run it as one process, not under "
                               "`accelerate launch` (vLLM uses every GPU it is given).")
    return {"state": state}


def partial_state():
    """Accelerate's process state; on a machine without an accelerator, CPU processes (gloo)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import is_mps_available, is_xpu_available

    return PartialState(cpu=not (torch.cuda.is_available() or is_xpu_available() or is_mps_available()))


@stage(STAGE, check=check_arguments, prepare=_processes,
       lock=lambda args, state: outputs_of(args)[0] if state.is_main_process else None)
def generate_captions(args: CaptionsArguments, state) -> dict:
    """Run the stage (on this process's share of the batches, under `accelerate launch`) and return its manifest."""
    from accelerate.utils import tqdm
    from conceptcaps_pipeline.run_dir import drop_set_aside, read_table, set_aside

    started = time.time()
    run = Path(args.run)
    attributes_path = require(run, "attributes.parquet")
    base, adapter = resolve_models(args, run)
    taxonomy_path = args.taxonomy or (run / "taxonomy.json" if (run / "taxonomy.json").exists() else DEFAULT_TAXONOMY)
    if not Path(taxonomy_path).is_file():
        raise ConceptCapsError(f"--taxonomy {taxonomy_path} not found: pass a taxonomy YAML or a RUN/taxonomy.json.")
    inputs = {"attributes": attributes_path, "taxonomy": taxonomy_path}
    if adapter:
        weights = [Path(adapter) / n for n in ("adapter_model.safetensors", "model.safetensors")]
        inputs["adapter"] = next((w for w in weights if w.exists()), adapter)
    stage, out_name, shard_dir = outputs_of(args)
    out, shards = run / out_name, run / shard_dir
    done = finished(run, stage, args, inputs, [out])
    if done and not args.force:
        logger.info("captions: %s is up to date (%d captions); --force redoes it", out, done["counts"]["captions"])
        return done

    plan = json.loads(json.dumps(_plan(args, attributes_path, Path(taxonomy_path), base, adapter, run)))
    if state.is_main_process:
        for stale in shards.glob(".shard-*.tmp"):  # a shard being written when the last run was killed
            stale.unlink()
    plan_path = shards / "plan.json"
    existing = list(shards.glob("shard-*.parquet"))
    if existing and not args.force:
        stored = read_json(plan_path, fix=f"pass --force to set the shards of {shards} aside and start again") \
            if plan_path.exists() else None
        if stored is None:
            raise ConceptCapsError(f"{shards} holds shards but no plan.json, so what made them is unknown: pass --force "
                                   f"to set them aside and start again.")
        if stored != plan:
            differ = sorted(k for k in set(plan) | set(stored) if stored.get(k) != plan.get(k))
            raise ConceptCapsError(
                f"{shards} holds shards made with other settings ({', '.join(differ)} differ; see {plan_path}): pass "
                f"--force to set them aside and start again, or re-run with the same settings to resume."
            )

    rows = read_table(attributes_path, fix=f"re-run `conceptcaps vae sample --run {run} --force`").to_pylist()[: args.limit]
    _check_rows(rows, attributes_path)
    taxonomy = Taxonomy.load(taxonomy_path)
    coverage = load_coverage_module()
    if args.engine == "vllm":
        generator = VllmCaptioner(base, adapter, args)
        tokenizer = generator.tokenizer
    else:
        model, tokenizer, stop_ids = load_captioner(base, adapter, args.dtype, args.merge_adapter, state.device)
    state.wait_for_everyone()  # every process has its model: only now may the old work go
    if state.is_main_process:
        if args.force:  # and only aside until the new work is done
            folder = set_aside(run, stage, [shards, out])
            if folder:
                logger.info("captions: --force: the old captions are set aside in %s until the new ones are made",
                            folder)
        write_json(plan_path, plan)  # written before the first shard, so every shard has its plan
    state.wait_for_everyone()

    # Fixed batches of length-sorted prompts: the same batches (and so the same seeds) on every re-run,
    # whatever the number of processes; each process takes its share of the batches still to do.
    lengths = [len(tokenizer.apply_chat_template(prompt_messages(r), add_generation_prompt=True, return_dict=True)["input_ids"])
               for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (-lengths[i], rows[i]["id"]))
    batches = [[rows[i] for i in order[s : s + args.batch_size]] for s in range(0, len(order), args.batch_size)]
    written = {row["id"] for row in read_shards(shards)}
    pending = [(b, batch) for b, batch in enumerate(batches) if not all(r["id"] in written for r in batch)]
    resumed = len(batches) - len(pending)
    if resumed and state.is_main_process:
        logger.info("captions: resuming, %d of %d batches already in %s", resumed, len(batches), shards)

    checks = {k: getattr(args, k) for k in ("ngram_size", "max_ngram_repeats", "min_words", "require_end_of_turn")}
    with state.split_between_processes(pending) as mine, ThreadPoolExecutor(max_workers=1) as writer:
        last_write = None  # the accelerator never waits on the disk
        for b, batch in tqdm(list(mine), desc="captions", unit="batch"):
            results = {}
            todo = list(batch)
            for attempt in range(1, args.max_attempts + 1):
                seed = derived_seed(args.seed, b, attempt)
                # Greedy output is the same every time, so retries always sample.
                sample = args.do_sample or attempt > 1
                if args.engine == "vllm":
                    outputs = generator.generate(todo, seed, sample)
                else:
                    outputs = generate_batch(model, tokenizer, stop_ids, todo, args, seed, sample)
                retry = []
                for row, (raw, ended) in zip(todo, outputs):
                    caption = clean_caption(raw)
                    reason = degeneracy(caption, ended, **checks)
                    results[row["id"]] = (caption, reason, seed, attempt, raw)
                    if reason:
                        retry.append(row)
                todo = retry
                if not todo:
                    break
            records = []
            for row in batch:
                caption, reason, seed, attempts, raw = results[row["id"]]
                score, _, unrequested = coverage.caption_coverage(caption, row["aspect_list"], taxonomy)
                records.append({
                    "id": row["id"], "caption": None if reason else caption, "aspect_list": row["aspect_list"],
                    **{c: row.get(c) or [] for c in CATEGORIES},
                    "coverage": None if reason else score, "unrequested_tags": [] if reason else unrequested,
                    "seed": seed, "attempts": attempts, "failure": reason, "failed_output": raw[:500] if reason else None,
                })
            if last_write is not None:
                last_write.result()  # surface a write error now, and keep at most one shard in flight
            last_write = writer.submit(_write_shard, records, shards / f"shard-{b:06d}.parquet")
        if last_write is not None:
            last_write.result()

    state.wait_for_everyone()
    manifest = None
    if state.is_main_process:
        manifest = _finish(args, run, rows, shards, out, inputs, coverage, taxonomy, started, resumed, len(batches),
                           state.num_processes)
        drop_set_aside(run, stage)
    state.wait_for_everyone()
    return manifest if manifest is not None else (read_manifest(run, stage) or {})


class VllmCaptioner:
    """Caption generation with vLLM (`--engine vllm`): the same prompts, seeds and checks, vLLM's batching.

    Why optional: vLLM needs a CUDA build and is not installed with ConceptCaps; where it is,
    its paged KV cache and continuous batching generate captions faster than transformers.
    """

    def __init__(self, base: str, adapter: str | None, args: CaptionsArguments):
        try:
            from vllm import LLM
        except ImportError as err:
            raise ConceptCapsError("--engine vllm needs vLLM (`pip install vllm` on a CUDA machine); without it use "
                                   "--engine transformers, under `accelerate launch` for several GPUs.") from err
        self.args = args
        self.adapter = adapter
        settings = vllm_settings(base, adapter, args)
        self.tokenizer = settings.pop("tokenizer")
        self.chat_template = settings.pop("chat_template")
        self.stop_token_ids = settings.pop("stop_token_ids")
        settings["tokenizer"] = settings.pop("tokenizer_path")  # vLLM loads the tokenizer from this folder
        self.llm = LLM(**settings)

    def generate(self, rows: list[dict], seed: int, sample: bool) -> list[tuple[str, bool]]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        params = SamplingParams(temperature=self.args.temperature if sample else 0.0, top_p=self.args.top_p,
                                max_tokens=self.args.max_new_tokens, seed=seed, stop_token_ids=self.stop_token_ids)
        request = LoRARequest("captioner", 1, self.adapter) if self.adapter else None
        # The adapter's chat template: the prompts the adapter was trained on, not the base model's.
        outputs = self.llm.chat([prompt_messages(r) for r in rows], params, lora_request=request, use_tqdm=False,
                                chat_template=self.chat_template)
        return [(o.outputs[0].text, o.outputs[0].finish_reason == "stop") for o in outputs]


def vllm_settings(base: str, adapter: str | None, args: CaptionsArguments) -> dict:
    """vLLM's engine arguments plus the tokenizer, chat template and stop ids it must use (no vLLM needed).

    Why the adapter's tokenizer: training saves it beside the adapter (its chat template, its pad
    and end-of-turn tokens); vLLM would otherwise take the base model's, and prompt the adapter
    in a format it was not trained on.
    """
    from conceptcaps_pipeline.captions.train import load_tokenizer

    source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else base
    tokenizer = load_tokenizer(source)
    rank = 64
    if adapter:
        rank = int(read_json(Path(adapter) / "adapter_config.json").get("r", rank))
    return {"model": base, "tokenizer": tokenizer, "tokenizer_path": source, "chat_template": tokenizer.chat_template,
            "stop_token_ids": end_of_turn_ids(tokenizer), "dtype": args.dtype, "enable_lora": bool(adapter),
            "max_lora_rank": max(rank, 8), "seed": args.seed}


def _write_shard(records: list[dict], path: Path) -> None:
    import pyarrow as pa

    write_parquet(pa.Table.from_pylist(records, schema=_schema()), path)


def _finish(args, run, rows, shards, out, inputs, coverage, taxonomy, started, resumed, n_batches,
            processes: int = 1) -> dict:
    """Gather the shards into RUN/captions.parquet (good captions only) and write the manifest."""
    import pyarrow as pa

    by_id = {}
    for record in read_shards(shards):
        by_id.setdefault(record["id"], record)  # a batch re-run after a crash rewrote the same ids
    missing = [r["id"] for r in rows if r["id"] not in by_id]
    if missing:
        raise ConceptCapsError(f"{len(missing)} ids have no shard in {shards} (first: {missing[:3]}): re-run to resume.")
    ordered = [by_id[r["id"]] for r in rows]
    good = [r for r in ordered if r["failure"] is None]
    failed = [{"id": r["id"], "reason": r["failure"], "attempts": r["attempts"], "output": r["failed_output"]}
              for r in ordered if r["failure"] is not None]
    for record in failed:
        logger.warning("captions: %s failed %d attempts (%s): %r", record["id"], record["attempts"],
                       record["reason"], (record["output"] or "")[:80])
    rate = len(failed) / max(len(rows), 1)
    if rate > args.max_failure_rate:
        reasons = dict(Counter(f["reason"] for f in failed))
        raise ConceptCapsError(
            f"{len(failed)} of {len(rows)} ids ({rate:.0%}) got no usable caption after {args.max_attempts} attempts "
            f"({reasons}; examples in {shards}). Check the captioner (a tiny or untrained model writes noise), raise "
            f"--max_attempts or --max_new_tokens, loosen --max_ngram_repeats/--min_words, or accept the loss with "
            f"--max_failure_rate {rate:.2f}; the shards are kept, so a re-run with the same settings is quick."
        )
    columns = [name for name in _schema().names if name not in ("failure", "failed_output")]
    table = pa.Table.from_pylist([{k: r[k] for k in columns} for r in good], schema=pa.schema([_schema().field(c) for c in columns]))
    write_parquet(table, out)
    summary = coverage.summarize([r["caption"] for r in good], [r["aspect_list"] for r in good], taxonomy)
    unrequested = Counter(tag for r in good for tag in r["unrequested_tags"])
    counts = {
        "attributes": len(rows),
        "captions": len(good),
        "failed": len(failed),
        "failure_reasons": dict(Counter(f["reason"] for f in failed)),
        "retried": sum(r["attempts"] > 1 for r in good),
        "batches": n_batches,
        "resumed_batches": resumed,
        "processes": processes,
        "mean_words": sum(len(r["caption"].split()) for r in good) / max(len(good), 1),
    }
    logger.info("captions: %d written, %d failed, coverage %.3f, recording-quality remarks %.3f -> %s",
                len(good), len(failed), summary["coverage"], summary["recording_quality_rate"], out)
    return write_manifest(
        run, outputs_of(args)[0], args, inputs=inputs, counts=counts, started=started,
        extra={"coverage": summary, "top_unrequested_tags": dict(unrequested.most_common(20)), "failed": failed,
               "plan": json.loads((shards / "plan.json").read_text())},
    )
