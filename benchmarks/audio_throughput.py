"""Audio generation throughput: audio-seconds per wall-second and per device-second.

    python benchmarks/audio_throughput.py                       # tiny MusicGen on CPU
    python benchmarks/audio_throughput.py --model large         # musicgen-large architecture, random weights (GPU)
    python benchmarks/audio_throughput.py --model /path/to/musicgen-large --duration 30

Times the `audio generate` pipeline (prompts sorted by length, batches of B, bf16 on GPU with
EnCodec in float32, FLAC encoding and shard writes on the writer thread) for several batch
sizes, next to a naive baseline timed in the same run: batch 1, captions in file order,
float32, each clip encoded and written before the next one starts. Prompts are real MusicCaps
captions. `--model tiny` builds the test model from a config; `--model large` builds
facebook/musicgen-large's architecture from the config written out in
generation/tiny_musicgen.py (nothing is downloaded) with random weights, so its audio is noise
but its cost is the real model's; any other value is a local checkpoint or a Hub id.

"per device-second" divides by GPU-seconds (wall time x 1 GPU) on a GPU and by the process's
CPU-seconds on CPU. Not a test: it prints a table and the hardware it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

DEFAULT_CSV = ROOT.parent / "shared" / "data" / "musiccaps" / "musiccaps-public.csv"


def hardware(device) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text += f"; GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{text}; load average {load:.2f}; torch {torch.__version__}"


def build_model(name: str, captions: list[str], device, workdir: Path):
    """(model in float32 on device, processor) for `tiny`, `large` or a checkpoint path / Hub id."""
    import torch
    from transformers import EncodecFeatureExtractor, MusicgenForConditionalGeneration, MusicgenProcessor

    from generation.audio_generate import load_musicgen
    from generation.tiny_musicgen import (
        build_tiny_musicgen,
        make_audible,
        musicgen_generation_config,
        musicgen_large_config,
        train_t5_tokenizer,
    )

    if name == "tiny":
        return load_musicgen(str(build_tiny_musicgen(workdir / "tiny", captions)), device, torch.float32)
    if name == "large":
        config = musicgen_large_config()
        # A tokenizer trained on the captions stands in for t5-base's (same T5 class; ids < 32128).
        tokenizer = train_t5_tokenizer(captions, vocab_size=2000)
        processor = MusicgenProcessor(
            EncodecFeatureExtractor(feature_size=1, sampling_rate=config.audio_encoder.sampling_rate), tokenizer)
        torch.manual_seed(0)
        with torch.device(device):
            model = MusicgenForConditionalGeneration(config)
        make_audible(model)
        model.generation_config = musicgen_generation_config(config.decoder.vocab_size)
        return model.eval(), processor
    return load_musicgen(name, device, torch.float32)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive(model, processor, prompts, steps, out: Path, device) -> None:
    """Batch 1, file order, float32, encode and write each clip before generating the next."""
    from generation.audio_generate import synthesize
    from generation.audio_shards import encode_flac

    rate = model.config.audio_encoder.sampling_rate
    for i, prompt in enumerate(prompts):
        audio = synthesize(model, processor, [prompt], seed=i, max_new_tokens=steps)
        (out / f"naive-{i:05d}.flac").write_bytes(encode_flac(audio[0], rate))
    synchronize(device)


def pipeline(model, processor, prompts, steps, batch_size: int, out: Path, device) -> None:
    """What `audio generate` does on one process: sorted batches, writer thread."""
    from generation.audio_generate import batch_seed, plan_batches, synthesize
    from generation.audio_shards import Batch, ShardWriter

    by_id = {f"b-{i:05d}": p for i, p in enumerate(prompts)}
    writer = ShardWriter(out, rank=batch_size, sampling_rate=model.config.audio_encoder.sampling_rate, model_id="bench")
    for ids in plan_batches(list(by_id), by_id, processor.tokenizer, batch_size):
        seed = batch_seed(0, ids[0])
        writer.put(Batch(ids=ids, audio=synthesize(model, processor, [by_id[i] for i in ids], seed=seed,
                                                   max_new_tokens=steps), seed=seed))
    synchronize(device)
    writer.close()


def timed(run, device) -> tuple[float, float]:
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="tiny, large, or a checkpoint (default: large on GPU, tiny on CPU)")
    parser.add_argument("--captions", default=str(DEFAULT_CSV), help="MusicCaps CSV (prompts and tokenizer)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per clip (default 10 GPU, 5 CPU)")
    parser.add_argument("--batch-sizes", default=None, help="comma list (default 4,8,16,32 GPU; 2,4,8,16 CPU)")
    parser.add_argument("--prompts", type=int, default=None, help="clips per setting (default: largest batch)")
    parser.add_argument("--baseline-prompts", type=int, default=None, help="clips for the naive baseline")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    import pandas as pd
    import torch

    from generation.audio_generate import codec_timing, decoding_steps

    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    name = args.model or ("large" if gpu else "tiny")
    duration = args.duration or (10.0 if gpu else 5.0)
    sizes = [int(b) for b in (args.batch_sizes or ("4,8,16,32" if gpu else "2,4,8,16")).split(",")]
    n = args.prompts or max(sizes)
    n_naive = args.baseline_prompts or (min(n, 8) if gpu else n)
    captions = pd.read_csv(args.captions)["caption"].dropna().astype(str).tolist()
    prompts = captions[:n]  # file order: the baseline's "unsorted"

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, processor = build_model(name, captions, device, work)
        timing = codec_timing(model.config)
        steps = decoding_steps(duration, timing)[1]
        print(f"model {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{timing['sampling_rate']} Hz, {timing['frame_rate']:g} frames/s, {duration:g} s clips "
              f"({steps} decoder steps); {hardware(device)}", flush=True)
        rows = []

        def record(label, wall, cpu, clips):
            audio_s = clips * duration
            per_device = audio_s / wall if gpu else audio_s / max(cpu, 1e-9)
            rows.append((label, clips, wall, audio_s / wall, per_device))
            print(f"  {label:<44} {clips:>5} clips {wall:>9.2f} s wall {audio_s / wall:>9.3f} audio-s/s "
                  f"{per_device:>9.3f} audio-s/{'GPU' if gpu else 'CPU'}-s", flush=True)

        # Warm-up (kernels, allocator), then the naive baseline in float32.
        synthesize_warmup(model, processor, prompts[:2], device)
        (work / "naive").mkdir()
        wall, cpu = timed(lambda: naive(model, processor, prompts[:n_naive], steps, work / "naive", device), device)
        record("naive: batch 1, unsorted, float32", wall, cpu, n_naive)

        if gpu:  # the stage's dtype on GPU: bf16 transformer, float32 EnCodec
            model.to(torch.bfloat16)
            model.audio_encoder.to(torch.float32)
        dtype = "bf16" if gpu else "float32"
        for size in sizes:
            synthesize_warmup(model, processor, prompts[:size], device)
            out = work / f"b{size}"
            wall, cpu = timed(lambda s=size, o=out: pipeline(model, processor, prompts, steps, s, o, device), device)
            record(f"pipeline: batch {size}, sorted, {dtype}, writer", wall, cpu, n)
        if gpu:
            print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
        best = max(rows[1:], key=lambda r: r[3])
        print(f"best: {best[0]} = {best[3] / rows[0][3]:.1f}x the naive baseline's audio-s per wall-s")


def synthesize_warmup(model, processor, prompts, device) -> None:
    from generation.audio_generate import synthesize

    synthesize(model, processor, prompts, seed=0, max_new_tokens=8)
    synchronize(device)


if __name__ == "__main__":
    main()
