"""The GPU path, checked and measured by one command: correctness first, then speed, then projections.

    python benchmarks/gpu_check.py                      # on a GPU machine: <= 8 min on one H100/H200, no network
    python benchmarks/gpu_check.py --out runs/gpu-check --max_minutes 8
    python benchmarks/gpu_check.py --dry_run            # every step at toy sizes on a CPU (tests/test_gpu_check.py)

Writes OUT/gpu_check.json (every figure, per step, with its settings) and OUT/gpu_check.md (the
same as tables). Models are built with random weights from the configs in benchmarks/configs/
(the published architectures: MusicGen small/medium/large decoders with the T5-base text encoder
and the 32 kHz EnCodec; Llama-3.1-8B with fewer layers, stated in the report); nothing is
downloaded. The steps, each recorded as ok, failed (with the error) or skipped (with why):

1. environment: GPU, torch/CUDA, package versions against scripts/constraints-cpu.txt;
2. equivalence: the static decoder against `generate` for each size: identical audio in float32
   for `--equivalence_steps` steps; bf16 logits (teacher-forced with generate's greedy codes)
   within BF16_TOLERANCE of their spread for 32 steps;
3. compiled step: graphs compiled (one per attention bucket), calls (CUDA-graph replays),
   recompiles after warm-up (must be 0), cudagraph skips (must be 0), compile seconds;
4. throughput (musicgen-large, bf16, guidance 3.3): ms/step and audio-s per GPU-s at batch 1,
   8 and the memory-derived batch (its cache allocated for the full 30 s clip: no OOM, peak
   memory), ratio to the bandwidth floor (benchmarks/bandwidth_floor.py), projected paper hours;
5. captioner: QLoRA (bitsandbytes 4-bit NF4) training steps on the Llama-shaped model, then the
   adapter merged into the de-quantised base (the captions stage's choice; the logit differences
   of the three ways to apply an adapter are measured) and generation tokens/s;
6. CLAP/FAD on the GPU (a CLAP of laion's HTSAT/RoBERTa architecture, random weights);
7. with more than one GPU: `accelerate launch` over all of them on a small audio run, each id once.

On a CPU without --dry_run it refuses (the figures would mean nothing). docs/performance.md says
what each number means.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
CONFIGS = HERE / "configs"
DEFAULT_CSV = ROOT.parent / "shared" / "data" / "musiccaps" / "musiccaps-public.csv"
PAPER_CLIPS, PAPER_SECONDS = 23_815, 30.0
# Max |static - generate| of the guided bf16 logits over their std. bf16 keeps 8 bits of mantissa, so the two loops'
# different summation orders move logits by a few percent of their spread (CPU: 0.028 on the tests' tiny model, 0.058
# on the dry run's); a wrong mask or position moves them by a multiple of it (the fp32 check demands equality anyway).
BF16_TOLERANCE = 0.1
FALLBACK_CAPTIONS = [
    "A calm jazz piano with soft brushes and a walking double bass", "Loud rock guitar riff with heavy drums",
    "a slow ambient pad with strings, reverb and a distant choir humming", "an upbeat electronic dance track",
    "solo acoustic guitar, fingerpicked folk melody, warm and intimate", "orchestral film score with brass",
] * 20


class Budget:
    """Wall-clock budget: a step that would start after the deadline is skipped, never half-run."""

    def __init__(self, minutes: float):
        self.started = time.time()
        self.deadline = self.started + 60 * minutes

    def left(self) -> float:
        return self.deadline - time.time()


class CountingBackend:
    """A torch.compile backend that counts graphs compiled and calls of them (on CUDA: CUDA-graph replays).

    On CUDA each graph is compiled by inductor with CUDA graphs (what mode="reduce-overhead" does); on a
    CPU (dry run) the graph runs eagerly, so the counts are checked without a long compilation.
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.graphs = 0
        self.calls = 0
        self.compile_seconds = 0.0

    def __call__(self, gm, example_inputs):
        tick = time.time()
        self.graphs += 1
        if self.cuda:
            from torch._inductor.compile_fx import compile_fx

            compiled = compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True})
        else:
            compiled = gm.forward
        self.compile_seconds += time.time() - tick

        def run(*args):
            self.calls += 1
            return compiled(*args)  # arguments passed through as given: boxed or not, the convention is kept

        run.__dict__.update(getattr(compiled, "__dict__", {}))  # e.g. _boxed_call, which dynamo reads
        return run


# -- models from the shipped configs -------------------------------------------------------------
def read_config(name: str) -> dict:
    data = json.loads((CONFIGS / name).read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def musicgen_config(size: str, text_vocab: int):
    """MusicgenConfig of facebook/musicgen-SIZE from benchmarks/configs/, or `toy` (dry run: widths differ too)."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    if size == "toy":
        from conceptcaps_pipeline.testing.tiny_musicgen import tiny_musicgen_config

        return tiny_musicgen_config(text_vocab, text_hidden_size=48)
    decoder = {k: v for k, v in read_config(f"musicgen-{size}-decoder.json").items() if k != "model_type"}
    text = {k: v for k, v in read_config("t5-base.json").items() if k != "model_type"}
    codec = {k: v for k, v in read_config("encodec_32khz.json").items() if k != "model_type"}
    return MusicgenConfig(text_encoder=T5Config(**text), audio_encoder=EncodecConfig(**codec),
                          decoder=MusicgenDecoderConfig(**decoder))


def build_musicgen(size: str, tokenizer, device, dtype):
    """(model, processor): random weights on `device`, transformer in `dtype`, EnCodec in float32."""
    from conceptcaps_pipeline.testing.tiny_musicgen import random_musicgen
    from transformers import EncodecFeatureExtractor, MusicgenProcessor

    config = musicgen_config(size, len(tokenizer))
    model = random_musicgen(config, device, dtype)
    processor = MusicgenProcessor(
        EncodecFeatureExtractor(feature_size=1, sampling_rate=config.audio_encoder.sampling_rate), tokenizer)
    return model.eval(), processor


# -- steps ---------------------------------------------------------------------------------------
def step_environment(ctx) -> dict:
    from importlib import metadata

    import torch
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "scripts" / "constraints-cpu.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line.strip())
            try:
                installed = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                installed = None
            pins[requirement.name] = {"pinned": str(requirement.specifier), "installed": installed,
                                      "matches": installed is not None and
                                      requirement.specifier.contains(installed.split("+")[0], prereleases=True)}
    record = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(ctx["device"]),
              "gpus": torch.cuda.device_count(), "packages": pins}
    if ctx["device"].type == "cuda":
        props = torch.cuda.get_device_properties(ctx["device"])
        record.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                      bf16=torch.cuda.is_bf16_supported())
    return record


def _static_vs_generate(model, processor, prompts, steps: int) -> dict:
    import numpy as np
    from conceptcaps_pipeline.audio.decode import StaticMusicgenDecoder
    from conceptcaps_pipeline.audio.generate import synthesize

    settings = {"seed": 7, "max_new_tokens": steps, "guidance_scale": 3.3, "top_k": 250}
    reference = synthesize(model, processor, prompts, **settings)
    static = synthesize(model, processor, prompts, **settings, decoder=StaticMusicgenDecoder(model, compile_step=False))
    return {"steps": steps, "batch": len(prompts), "identical": bool(np.array_equal(static, reference)),
            "max_abs_diff": float(np.abs(static - reference).max())}


def _bf16_logits(model, processor, prompts, steps: int) -> float:
    import torch
    from conceptcaps_pipeline.audio.decode import StaticMusicgenDecoder

    inputs = processor(text=prompts, padding=True, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, guidance_scale=3.3, max_new_tokens=steps,
                             return_dict_in_generate=True, output_scores=True)
        decoder = StaticMusicgenDecoder(model, compile_step=False)
        slot = decoder.prepare(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=steps, guidance_scale=3.3)
        worst = 0.0
        for step, reference in enumerate(out.scores):
            scores = decoder.step_scores(slot, step, 3.3, top_k=0)
            reference = reference.float()
            worst = max(worst, float((scores - reference).abs().max() / reference.std()))
            slot.tokens[:, step + 1] = reference.argmax(-1)
            slot.position += 1
    return worst


def step_equivalence(ctx) -> dict:
    import torch

    results = {}
    for size in ctx["sizes"]:
        if ctx["budget"].left() < 60:
            results[size] = {"skipped": "time budget"}
            continue
        model, processor = build_musicgen(size, ctx["tokenizer"], ctx["device"], torch.float32)
        fp32 = _static_vs_generate(model, processor, ctx["captions"][:2], ctx["equivalence_steps"])
        model.to(torch.bfloat16)
        model.audio_encoder.to(torch.float32)
        worst = _bf16_logits(model, processor, ctx["captions"][:2], 32)
        results[size] = {"fp32": fp32, "bf16_logits_max_over_std": worst, "bf16_tolerance": BF16_TOLERANCE,
                         "ok": fp32["identical"] and worst < BF16_TOLERANCE}
        del model
        _free(ctx)
    results["ok"] = all(r.get("ok", True) for r in results.values() if isinstance(r, dict))
    return results


def _free(ctx) -> None:
    import gc

    import torch

    gc.collect()
    if ctx["device"].type == "cuda":
        torch.cuda.empty_cache()


def _large(ctx):
    """The throughput model (musicgen-large in bf16 on a GPU; toy in float32 on a dry run), built once."""
    import torch

    if "large" not in ctx:
        size = "toy" if ctx["dry_run"] else "large"
        dtype = torch.float32 if ctx["dry_run"] else torch.bfloat16
        ctx["large"] = (size, dtype, *build_musicgen(size, ctx["tokenizer"], ctx["device"], dtype))
    return ctx["large"]


def _timed_batch(ctx, model, processor, batch: int, clip_steps: int, timed_steps: int, counted: bool,
                 after=None) -> dict:
    """Compile, then time `timed_steps` steps of a batch whose slot holds a whole clip.

    counted: compile through CountingBackend (graphs and calls counted); else exactly as the audio stage does
    (inductor, CUDA graphs; graphs counted by dynamo's counters, calls not).
    """
    import torch
    from conceptcaps_pipeline.audio.decode import StaticMusicgenDecoder
    from torch._dynamo.utils import counters

    device = ctx["device"]
    torch._dynamo.reset()
    counters.clear()
    if counted or device.type != "cuda":
        backend = CountingBackend(cuda=device.type == "cuda")
        decoder = StaticMusicgenDecoder(model, compile_step=True, compile_backend=backend)
    else:
        backend = None
        decoder = StaticMusicgenDecoder(model)  # the stage's own compilation
    prompts = (ctx["captions"] * (batch // len(ctx["captions"]) + 1))[:batch]
    inputs = processor(text=prompts, padding=True, truncation=True, return_tensors="pt").to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def decode():
        slot = decoder.prepare(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=clip_steps,
                               guidance_scale=3.3)  # the cache of a whole clip: the memory-derived batch must fit
        decoder.run(slot, max_new_tokens=timed_steps, guidance_scale=3.3, top_k=250)

    tick = time.time()
    with torch.inference_mode():
        decode()  # warm-up: compiles and captures every graph these steps use
        _sync(device)
        warm = time.time() - tick

        def graph_count():
            return backend.graphs if backend is not None else counters["stats"]["unique_graphs"]

        graphs, calls = graph_count(), backend.calls if backend is not None else None
        tick = time.perf_counter()
        decode()
        _sync(device)
        seconds = time.perf_counter() - tick
    record = {"batch": batch, "timed_steps": timed_steps, "clip_steps": clip_steps, "warm_up_s": round(warm, 2),
              "compile_s": round(backend.compile_seconds, 2) if backend is not None else None, "graphs": graphs,
              "expected_graphs": decoder.graphs_for(timed_steps), "recompiles_after_warm_up": graph_count() - graphs,
              "calls_timed": backend.calls - calls if backend is not None else None,
              "graph_breaks": sum(counters["graph_break"].values()),
              "cudagraph_skips": sum(counters["inductor"].get(k, 0) for k in counters["inductor"] if "skip" in k),
              "ms_per_step": 1e3 * seconds / timed_steps}
    if device.type == "cuda":
        record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if after is not None:
        record.update(after(decoder, model, processor, prompts, timed_steps))
    decoder = None  # frees the batch's buffers before the next batch size allocates its own
    _free(ctx)
    return record


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_batch(ctx, model, clip_steps: int, dtype) -> int:
    """The batch the audio stage takes with --batch_size 0 here (free memory after the loaded weights)."""
    import torch
    from conceptcaps_pipeline.audio.generate import batch_size_from_memory

    if ctx["device"].type != "cuda":
        return 4  # dry run: a toy stand-in
    free, _ = torch.cuda.mem_get_info(ctx["device"])
    return batch_size_from_memory(free, model.decoder.config, clip_steps, True, dtype.itemsize)


def step_compiled(ctx) -> dict:
    """The compiled step on the throughput model: graphs per bucket, zero recompiles, replays counted."""
    from conceptcaps_pipeline.audio.decode import BUCKET

    size, _dtype, model, processor = _large(ctx)
    steps = ctx["timed_steps"] if ctx["dry_run"] else 2 * BUCKET  # two buckets: two graphs, replayed in turn
    record = _timed_batch(ctx, model, processor, 2, steps, steps, counted=True, after=_compiled_vs_eager)
    record["model"] = size
    record["ok"] = (record["graphs"] == record["expected_graphs"] and record["recompiles_after_warm_up"] == 0
                    and record["graph_breaks"] == 0 and record["cudagraph_skips"] == 0
                    and record["calls_timed"] == steps and record["compiled_vs_eager_max_over_std"] < BF16_TOLERANCE)
    return record


def _compiled_vs_eager(compiled, model, processor, prompts, steps: int) -> dict:
    """The compiled step's scores against the eager static step's, teacher-forced with the eager greedy codes.

    Why: a miscompiled graph (inductor fusions, CUDA-graph replays reading stale buffers) would pass every count
    above; only the numbers show it. Compared where both keep a code (top-k 250, as compiled): max |difference|
    over the scores' std, and how often the best code agrees.
    """
    import torch
    from conceptcaps_pipeline.audio.decode import TEXT_TOKENS, StaticMusicgenDecoder

    eager = StaticMusicgenDecoder(model, compile_step=False)
    # The compiled slot pads the text to TEXT_TOKENS: give the eager loop the same padded text.
    inputs = processor(text=prompts, padding="max_length", max_length=TEXT_TOKENS, truncation=True,
                       return_tensors="pt").to(model.device)
    worst, agree = 0.0, 0
    with torch.inference_mode():
        slots = [d.prepare(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=steps, guidance_scale=3.3)
                 for d in (compiled, eager)]
        for step in range(steps):
            fast = compiled.step_scores(slots[0], step, 3.3, top_k=250).clone()  # a replay's output is reused later
            slow = eager.step_scores(slots[1], step, 3.3, top_k=250)
            both = torch.isfinite(fast) & torch.isfinite(slow)
            spread = slow[torch.isfinite(slow)].std()
            worst = max(worst, float(((fast - slow).abs()[both]).max() / spread))
            following = slow.argmax(-1)
            agree += int((fast.argmax(-1) == following).sum())
            for slot in slots:
                slot.tokens[:, step + 1] = following
                slot.position += 1
    return {"compiled_vs_eager_max_over_std": worst,
            "compiled_vs_eager_best_code_agreement": agree / (steps * slots[1].tokens.shape[0])}


def step_throughput(ctx) -> dict:
    from audio_throughput import floor_seconds_per_step
    from bandwidth_floor import device_bandwidth
    from conceptcaps_pipeline.audio.generate import codec_timing, decoding_steps

    size, dtype, model, processor = _large(ctx)
    timing = codec_timing(model.config)
    seconds = 1.0 if ctx["dry_run"] else PAPER_SECONDS
    clip_steps = decoding_steps(seconds, timing)[1]
    paper_steps = decoding_steps(PAPER_SECONDS, timing)[1]
    bandwidth, source = device_bandwidth(ctx["device"])
    codec_s = _codec_seconds_per_clip(ctx, model, clip_steps)
    rows = []
    batches = [memory_batch(ctx, model, clip_steps, dtype), 8, 1]  # the one that matters most first
    for batch in dict.fromkeys(batches):
        if ctx["budget"].left() < (30 if ctx["dry_run"] else 75):
            rows.append({"batch": batch, "skipped": "time budget"})
            continue
        record = _timed_batch(ctx, model, processor, batch, clip_steps, ctx["timed_steps"], counted=False)
        per_step = record["ms_per_step"] / 1e3
        floor = floor_seconds_per_step(model, batch, ctx["timed_steps"], bandwidth, dtype.itemsize)
        paper_floor = floor_seconds_per_step(model, batch, paper_steps, bandwidth, dtype.itemsize)
        ratio = per_step / floor
        clip_decode = ratio * paper_floor * paper_steps  # a 30 s clip's steps, each at the measured ratio to its floor
        record.update(memory_derived=batch == batches[0], ratio_to_floor=round(ratio, 3),
                      audio_s_per_gpu_s=round(batch * PAPER_SECONDS / (clip_decode + batch * codec_s), 2),
                      projected_paper_hours=round(PAPER_CLIPS / batch * (clip_decode + batch * codec_s) / 3600, 2))
        rows.append(record)
    return {"model": size, "dtype": str(dtype).replace("torch.", ""), "bandwidth_bytes_s": bandwidth,
            "bandwidth_source": source, "clip_steps": clip_steps, "codec_s_per_clip": round(codec_s, 4), "rows": rows,
            "ok": all("error" not in r for r in rows)}


def _codec_seconds_per_clip(ctx, model, clip_steps: int) -> float:
    """EnCodec decoding of a clip's codes, 4 clips at a time (the stage's GPU default), per clip."""
    import torch
    from conceptcaps_pipeline.audio.decode import StaticMusicgenDecoder

    frames = clip_steps - model.decoder.config.num_codebooks + 1
    codes = torch.randint(0, model.decoder.config.vocab_size, (1, 4, model.decoder.config.num_codebooks, frames),
                          device=ctx["device"])
    decoder = StaticMusicgenDecoder(model, compile_step=False)
    with torch.inference_mode():
        decoder.decode_audio(codes)
        _sync(ctx["device"])
        tick = time.perf_counter()
        decoder.decode_audio(codes)
        _sync(ctx["device"])
    return (time.perf_counter() - tick) / 4


def llama_config(ctx):
    from transformers import LlamaConfig

    if ctx["dry_run"]:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    data = read_config("llama-3.1-8b.json")
    data.pop("model_type")
    data["num_hidden_layers"] = ctx["llm_layers"]
    return LlamaConfig(**data)


def step_captioner(ctx) -> dict:
    """QLoRA steps on the Llama-shaped model, the adapter's three inference forms compared, merged generation speed."""
    import torch
    from conceptcaps_pipeline.captions.adapter_merge import adapter_forms_difference, merged_model
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    device, config = ctx["device"], llama_config(ctx)
    cuda = device.type == "cuda"
    try:
        import bitsandbytes  # noqa: F401
        has_bnb = cuda
    except ImportError:
        has_bnb = False
    record = {"layers": config.num_hidden_layers, "layers_of_the_real_model": 32, "hidden_size": config.hidden_size,
              "quantization": "bitsandbytes nf4" if has_bnb else "none (no CUDA/bitsandbytes): fake NF4 for the forms"}
    workdir = Path(ctx["workdir"]) / "llm"
    torch.manual_seed(0)
    with torch.device(device):  # why on the device: 2 B random parameters initialise in seconds there, not on a CPU
        LlamaForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32).save_pretrained(workdir)
    _free(ctx)  # the saved copy is the base of every form below
    compute = torch.bfloat16 if cuda else torch.float32
    if has_bnb:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        base = LlamaForCausalLM.from_pretrained(workdir, quantization_config=quantization, dtype=torch.bfloat16,
                                                device_map={"": device.index or 0})
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    else:
        base = LlamaForCausalLM.from_pretrained(workdir, dtype=compute).to(device)
    lora = LoraConfig(r=32, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch, length, steps = (2, 32, 3) if ctx["dry_run"] else (4, 512, 10)
    ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    losses = []
    for step in range(steps + 1):  # step 0 warms up, untimed
        if step == 1:
            _sync(device)
            tick = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    _sync(device)
    train_s = (time.perf_counter() - tick) / steps
    record.update(train_batch=batch, train_tokens=length, train_steps=steps, train_s_per_step=round(train_s, 4),
                  train_tokens_per_s=round(batch * length / train_s, 1), losses=[round(x, 4) for x in losses])
    if cuda:
        record["train_peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    adapter = Path(ctx["workdir"]) / "adapter"
    model.save_pretrained(adapter)
    del model, base, optimizer
    _free(ctx)
    # The three forms of the trained adapter at inference: over the quantised base, merged into it de-quantised, merged
    # into the original weights; logits compared on one batch.
    record["adapter_forms"] = adapter_forms_difference(str(workdir), str(adapter), device=device,
                                                       real_4bit=has_bnb, prompt=ids[:, :16])
    merged = merged_model(str(workdir), str(adapter), dtype=compute, device=device, quantized=True, real_4bit=has_bnb)
    gen_batch, new = (2, 8) if ctx["dry_run"] else (64, 96)
    prompt = torch.randint(0, config.vocab_size, (gen_batch, 64), device=device)
    with torch.inference_mode():
        merged.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        _sync(device)
        tick = time.perf_counter()
        merged.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        _sync(device)
    seconds = time.perf_counter() - tick
    record.update(generate_batch=gen_batch, new_tokens=new, generate_tokens_per_s=round(gen_batch * new / seconds, 1))
    del merged
    _free(ctx)
    record["ok"] = not any(math.isnan(x) for x in losses)
    return record


def build_clap(ctx, out: Path) -> Path:
    """A CLAP with random weights: laion's HTSAT + RoBERTa-base sizes on a GPU, the tests' tiny one on a dry run."""
    from conceptcaps_pipeline.testing.tiny_eval_models import build_tiny_clap, train_tokenizer

    if ctx["dry_run"]:
        return build_tiny_clap(out, ctx["captions"])
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    tokenizer = train_tokenizer(ctx["captions"], "roberta")
    config = ClapConfig(text_config={"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
                        audio_config={"enable_fusion": False}, projection_dim=512)
    torch.manual_seed(0)
    ClapModel(config).eval().save_pretrained(out)
    ClapProcessor(feature_extractor=ClapFeatureExtractor(truncation="rand_trunc"), tokenizer=tokenizer).save_pretrained(out)
    return out


def step_clap_fad(ctx) -> dict:
    import numpy as np
    from conceptcaps_eval.fad.clap_windows import embed_audio_items, embed_texts, load_clap
    from conceptcaps_eval.fad.fad import frechet_distance, gaussian_stats

    path = build_clap(ctx, Path(ctx["workdir"]) / "clap")
    device = str(ctx["device"])
    clap, processor, device = load_clap(str(path), device)
    rate = processor.feature_extractor.sampling_rate
    n, seconds = (8, 1.0) if ctx["dry_run"] else (64, 10.0)
    rng = np.random.default_rng(0)
    generated = [{"array": rng.normal(0, 0.1, int(rate * seconds)).astype("float32"), "sampling_rate": rate}
                 for _ in range(n)]
    reference = [{"array": np.sin(np.arange(int(rate * seconds)) * (0.01 + 0.001 * i)).astype("float32") * 0.1,
                  "sampling_rate": rate} for i in range(n)]
    tick = time.perf_counter()
    a = embed_audio_items(clap, processor, generated, None, 8, device)
    b = embed_audio_items(clap, processor, reference, None, 8, device)
    embed_s = time.perf_counter() - tick
    texts = embed_texts(clap, processor, ctx["captions"][:n], 8, device)
    fad = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    clap_score = float(np.mean(np.sum(a / np.linalg.norm(a, axis=1, keepdims=True)
                                      * texts / np.linalg.norm(texts, axis=1, keepdims=True), axis=1)))
    return {"device": device, "clips": 2 * n, "clip_seconds": seconds, "embed_s": round(embed_s, 3),
            "audio_s_per_s": round(2 * n * seconds / embed_s, 1), "fad": float(fad), "clap_score": clap_score,
            "ok": bool(np.isfinite(fad))}


def step_multi_gpu(ctx) -> dict:
    """accelerate launch over every GPU on a 12-caption tiny audio run: each id exactly once."""
    import torch

    count = torch.cuda.device_count() if ctx["device"].type == "cuda" else 0
    if count < 2:
        return {"skipped": f"{count} GPU(s) visible; needs 2 or more (tests/test_audio_generate.py runs two CPU "
                           f"processes instead)"}
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.audio.shards import read_shards
    from conceptcaps_pipeline.testing.tiny_musicgen import build_tiny_musicgen

    run = Path(ctx["workdir"]) / "run"
    run.mkdir(parents=True)
    ids = [f"cc-{i:06d}" for i in range(12)]
    pq.write_table(pa.table({"id": ids, "caption": ctx["captions"][:12]}), run / "captions.parquet")
    model = build_tiny_musicgen(Path(ctx["workdir"]) / "tiny", ctx["captions"])
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "multi_gpu.yaml"), "--num_processes", str(count), "-m",
               "conceptcaps_pipeline.cli", "audio", "generate", "--run", str(run), "--model", str(model),
               "--duration", "1.0", "--batch_size", "2"]
    tick = time.time()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(60, ctx["budget"].left()),
                          check=False)  # the return code is a figure of the report
    made = read_shards(run / "audio").column("id").to_pylist() if (run / "audio").is_dir() else []
    return {"gpus": count, "returncode": done.returncode, "seconds": round(time.time() - tick, 1),
            "each_id_once": sorted(made) == ids, "log_tail": done.stdout[-1500:] + done.stderr[-1500:],
            "ok": done.returncode == 0 and sorted(made) == ids}


STEPS = [("environment", step_environment), ("equivalence", step_equivalence), ("compiled_step", step_compiled),
         ("throughput", step_throughput), ("captioner", step_captioner), ("clap_fad", step_clap_fad),
         ("multi_gpu", step_multi_gpu)]


# -- report --------------------------------------------------------------------------------------
def write_markdown(report: dict, path: Path) -> None:
    lines = [f"# GPU check ({'dry run: toy sizes on a CPU, figures mean nothing' if report['dry_run'] else 'GPU'})", "",
             f"{report['started']}, {report['wall_s']:.0f} s, device {report['steps']['environment'].get('gpu') or 'cpu'}",
             "", "| step | status | seconds |", "| --- | --- | --- |"]
    for name, step in report["steps"].items():
        status = step.get("status", "")
        lines.append(f"| {name} | {status}{': ' + step['error'].splitlines()[-1] if step.get('error') else ''} "
                     f"| {step.get('seconds', '')} |")
    throughput = report["steps"].get("throughput", {})
    if throughput.get("rows"):
        lines += ["", f"## Throughput ({throughput.get('model')}, {throughput.get('dtype')}, guidance 3.3)", "",
                  "| batch | ms/step | audio-s per GPU-s | x floor | paper hours | peak GiB | graphs | recompiles |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in throughput["rows"]:
            if "ms_per_step" not in row:
                lines.append(f"| {row.get('batch')} | {row.get('skipped', row.get('error', ''))} | | | | | | |")
                continue
            lines.append(f"| {row['batch']}{' (memory)' if row.get('memory_derived') else ''} | {row['ms_per_step']:.2f} "
                         f"| {row['audio_s_per_gpu_s']} | {row['ratio_to_floor']} | {row['projected_paper_hours']} "
                         f"| {row.get('peak_memory_gib', '-')} | {row['graphs']} | {row['recompiles_after_warm_up']} |")
    equivalence = report["steps"].get("equivalence", {})
    sizes = [k for k, v in equivalence.items() if isinstance(v, dict) and "fp32" in v]
    if sizes:
        lines += ["", "## Static decoder against generate", "", "| model | fp32 identical (steps) | bf16 max diff / std |",
                  "| --- | --- | --- |"]
        lines += [f"| {s} | {equivalence[s]['fp32']['identical']} ({equivalence[s]['fp32']['steps']}) "
                  f"| {equivalence[s]['bf16_logits_max_over_std']:.4f} (limit {BF16_TOLERANCE}) |" for s in sizes]
    lines += ["", "Every figure, with its settings: gpu_check.json. What each means: docs/performance.md."]
    path.write_text("\n".join(lines) + "\n")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry_run", action="store_true", help="every step at toy sizes on the CPU (for the tests)")
    parser.add_argument("--max_minutes", type=float, default=7.5, help="time budget; later steps are skipped")
    parser.add_argument("--sizes", default="small,medium,large", help="MusicGen sizes for the equivalence step")
    parser.add_argument("--equivalence_steps", type=int, default=None, help="fp32 steps compared (default 300; dry 24)")
    parser.add_argument("--timed_steps", type=int, default=None,
                        help="decode steps timed per batch in the throughput step (default 128: one attention "
                             "bucket, one compilation per batch size; dry 8)")
    parser.add_argument("--llm_layers", type=int, default=4, help="layers of the Llama-3.1-8B-shaped captioner (of 32)")
    parser.add_argument("--captions", default=str(DEFAULT_CSV), help="MusicCaps CSV: prompts and tokenizers")
    parser.add_argument("--steps", default=",".join(name for name, _ in STEPS), help="comma list of steps to run")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    if not torch.cuda.is_available() and not args.dry_run:
        raise SystemExit("gpu_check: no CUDA device here; on a CPU only --dry_run runs (toy sizes).")
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    if args.dry_run:
        torch.set_num_threads(1)
    captions = FALLBACK_CAPTIONS
    if Path(args.captions).is_file():
        import pandas as pd

        captions = pd.read_csv(args.captions)["caption"].dropna().astype(str).tolist()[:400]
    from conceptcaps_pipeline.testing.tiny_musicgen import train_t5_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "arguments": vars(args), "steps": {}}
    with tempfile.TemporaryDirectory() as workdir:
        ctx = {"device": device, "dry_run": args.dry_run, "budget": Budget(args.max_minutes), "captions": captions,
               "tokenizer": train_t5_tokenizer(captions[:200] if args.dry_run else captions, vocab_size=512 if args.dry_run else 2000),
               "sizes": ["toy"] if args.dry_run else args.sizes.split(","), "workdir": workdir,
               "equivalence_steps": args.equivalence_steps or (24 if args.dry_run else 300),
               "timed_steps": args.timed_steps or (8 if args.dry_run else 128), "llm_layers": args.llm_layers}
        wanted = args.steps.split(",")
        for name, step in STEPS:
            if name not in wanted:
                continue
            tick = time.time()
            if ctx["budget"].left() <= 0:
                record = {"status": "skipped", "why": "time budget"}
            else:
                try:
                    record = step(ctx)
                    record["status"] = "skipped" if "skipped" in record else ("ok" if record.get("ok", True) else
                                                                              "FAILED")
                except Exception:  # noqa: BLE001 -- one broken step must not lose the others' figures
                    record = {"status": "error", "error": traceback.format_exc()[-3000:]}
            record["seconds"] = round(time.time() - tick, 1)
            report["steps"][name] = record
            print(f"gpu_check: {name}: {record['status']} ({record['seconds']} s)", file=sys.stderr, flush=True)
            (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))  # partial results survive
    report["wall_s"] = round(time.time() - ctx["budget"].started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    write_markdown(report, out / "gpu_check.md")
    return report


if __name__ == "__main__":
    main()
