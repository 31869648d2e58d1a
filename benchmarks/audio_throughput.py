"""MusicGen decoding speed against the memory-bandwidth floor: transformers' generate vs the static loop.

    python benchmarks/audio_throughput.py                            # tiny MusicGen on a CPU
    python benchmarks/audio_throughput.py --model large              # musicgen-large's architecture, random weights (GPU)
    python benchmarks/audio_throughput.py --model large --batch_sizes 8,32,48 --duration 30

For each path (`generate`: MusicgenForConditionalGeneration.generate; `static`: the audio stage's
default, generation/audio/decode.py, CUDA graphs on a GPU) and batch size, in one run: ms per
decode step, audio-seconds per device-second (decoding and the codec), host ops and host syncs
per step (aten ops dispatched by Python, counted; on a GPU each is a kernel launch), and the
ratio to the bandwidth floor (the time to read the decoder's weights and the filled KV cache
once per step at the device's bandwidth), with the projected device-hours for the paper preset
(the static path is warmed up over the whole clip first, so no compilation is timed)
(23,815 clips of 30 s, guidance 3.3). `--model large` builds facebook/musicgen-large's
architecture from the config written out in generation/testing/tiny_musicgen.py with random weights:
the real model's cost, nothing downloaded. On a CPU (tiny model) the figures that mean something
are the static/generate ratios and the ops per step. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))
DEFAULT_CSV = HERE.parent.parent / "shared" / "data" / "musiccaps" / "musiccaps-public.csv"
PAPER_CLIPS, PAPER_SECONDS = 23_815, 30.0


def build_model(name: str, captions: list[str], device, dtype, workdir: Path):
    """(model, processor) for `tiny`, `large` (random weights) or a checkpoint, in `dtype` with EnCodec in float32."""
    from conceptcaps_pipeline.audio.generate import load_musicgen
    from conceptcaps_pipeline.testing.tiny_musicgen import (
        build_tiny_musicgen,
        musicgen_large_config,
        random_musicgen,
        train_t5_tokenizer,
    )
    from transformers import EncodecFeatureExtractor, MusicgenProcessor

    if name == "tiny":
        return load_musicgen(str(build_tiny_musicgen(workdir / "tiny", captions)), device, dtype)
    if name not in ("large", "probe48"):
        return load_musicgen(name, device, dtype)
    if name == "probe48":  # musicgen-large's 48 decoder layers at toy width: its host ops per step, cheaply
        from conceptcaps_pipeline.testing.tiny_musicgen import tiny_musicgen_config

        tokenizer = train_t5_tokenizer(captions, vocab_size=512)
        config = tiny_musicgen_config(len(tokenizer), layers=48)
        processor = MusicgenProcessor(EncodecFeatureExtractor(feature_size=1, sampling_rate=8000), tokenizer)
    else:
        config = musicgen_large_config()
        processor = None
    # A tokenizer trained on the captions stands in for t5-base's (same T5 class; ids < 32128).
    processor = processor or MusicgenProcessor(
        EncodecFeatureExtractor(feature_size=1, sampling_rate=config.audio_encoder.sampling_rate),
        train_t5_tokenizer(captions, vocab_size=2000))
    return random_musicgen(config, device, dtype).eval(), processor


def floor_seconds_per_step(model, batch: int, steps: int, bandwidth: float, dtype_bytes: int) -> float:
    """Bytes one step must read (decoder weights, and on average half the final KV cache of both CFG halves) / bandwidth."""
    decoder = model.decoder
    weights = sum(p.numel() for p in decoder.parameters()) * dtype_bytes
    config = decoder.config
    kv = 2 * config.num_hidden_layers * config.hidden_size * (2 * batch) * (steps / 2) * dtype_bytes
    return (weights + kv) / bandwidth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="tiny, probe48 (large's 48 layers at toy width: its ops per "
                                                       "step), large, or a checkpoint (default: large on GPU, tiny on CPU)")
    parser.add_argument("--captions", default=str(DEFAULT_CSV), help="MusicCaps CSV (prompts and tokenizer)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per clip (default 30 GPU, 5 CPU)")
    parser.add_argument("--batch_sizes", default=None, help="comma list (default 8,32,48 GPU; 1,8,32 CPU)")
    parser.add_argument("--paths", default="generate,static", help="comma list of generate, static")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 stays fast on shared cores)")
    args = parser.parse_args(argv)

    import tempfile

    import pandas as pd
    import torch
    from bandwidth_floor import OpCounter, describe_device, device_bandwidth, per_step, synchronize
    from conceptcaps_pipeline.audio.decode import StaticMusicgenDecoder
    from conceptcaps_pipeline.audio.generate import codec_timing, decoding_steps

    torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    name = args.model or ("large" if gpu else "tiny")
    duration = args.duration or (30.0 if gpu else 5.0)
    sizes = [int(b) for b in (args.batch_sizes or ("8,32,48" if gpu else "1,8,32")).split(",")]
    paths = args.paths.split(",")
    captions = pd.read_csv(args.captions)["caption"].dropna().astype(str).tolist()
    bandwidth, source = device_bandwidth(device)

    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build_model(name, captions, device, dtype, Path(tmp))
        timing = codec_timing(model.config)
        steps = decoding_steps(duration, timing)[1]
        paper_steps = decoding_steps(PAPER_SECONDS, timing)[1]
        dtype_bytes = torch.finfo(dtype).bits // 8
        print(f"# model {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {duration:g} s clips "
              f"({steps} decoder steps), {str(dtype).replace('torch.', '')}; {describe_device(device)}; bandwidth "
              f"{bandwidth / 1e9:.0f} GB/s ({source})", flush=True)
        print(f"{'path':<9}{'batch':>6}{'ms/step':>10}{'audio-s/dev-s':>15}{'ops/step':>10}{'syncs/step':>11}"
              f"{'x floor':>9}{'paper h':>9}")
        static = StaticMusicgenDecoder(model)
        results = {}
        for batch in sizes:
            prompts = captions[:batch]
            inputs = processor(text=prompts, padding=True, return_tensors="pt").to(device)
            for path in paths:
                decoder = static if path == "static" else None

                def decode(n, decoder=decoder, inputs=inputs):
                    torch.manual_seed(0)
                    if decoder is None:
                        return model.generate(**inputs, do_sample=True, top_k=250, guidance_scale=3.3, max_new_tokens=n)
                    return decoder.generate_codes(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=n,
                                                  guidance_scale=3.3, top_k=250)

                with torch.inference_mode():
                    decode(8)  # warm-up: kernels, allocator
                    if path == "static":
                        # Every graph of the timed clip (one per attention bucket) compiled and captured before the
                        # clock starts: a compilation inside the timed run would count as decoding time.
                        static.warm_up(batch, steps, guidance_scale=3.3, top_k=250)
                    if path == "static":  # count the steps alone: the batch's setup is not a step
                        prepared = static.prepare(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=16,
                                                  guidance_scale=3.3)
                        with OpCounter() as counted:
                            static.run(prepared, max_new_tokens=16, guidance_scale=3.3, top_k=250)
                        ops, syncs = (counted.total / 16, counted.syncs / 16) if not gpu else (float("nan"), 0.0)
                    else:  # generate: the difference of two lengths, less the delay pattern's setup (it scales too)
                        ops, syncs = per_step(decode, 8, 24)
                        pattern_ops, pattern_syncs = per_step(lambda n, i=inputs: model.decoder.build_delay_pattern_mask(
                            torch.full((i["input_ids"].shape[0] * model.decoder.num_codebooks, 1), 2048, device=device),
                            pad_token_id=2048, max_length=n + 1), 8, 24)
                        ops, syncs = ops - pattern_ops, syncs - pattern_syncs
                    synchronize(device)
                    started = time.perf_counter()
                    decode(steps)
                    synchronize(device)
                    seconds = time.perf_counter() - started
                    # The codec's share, timed once per batch on the static path's codes.
                    if path == paths[-1]:
                        codes = static.generate_codes(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=steps)
                        synchronize(device)
                        tick = time.perf_counter()
                        static.decode_audio(codes)
                        synchronize(device)
                        results[("codec", batch)] = time.perf_counter() - tick
                results[(path, batch)] = (seconds, ops, syncs)
            codec = results[("codec", batch)]
            floor = floor_seconds_per_step(model, batch, steps, bandwidth, dtype_bytes)
            for path in paths:
                seconds, ops, syncs = results[(path, batch)]
                per_step_s = (seconds - (codec if path == "generate" else 0.0)) / steps if path == "generate" \
                    else seconds / steps
                audio_rate = batch * duration / (per_step_s * steps + codec)
                paper_floor = floor_seconds_per_step(model, batch, paper_steps, bandwidth, dtype_bytes)
                paper_hours = PAPER_CLIPS / batch * (per_step_s / floor * paper_floor * paper_steps
                                                     + codec * PAPER_SECONDS / duration) / 3600
                hours = f"{paper_hours:>9.1f}" if name == "large" else f"{'-':>9}"  # only the real architecture's
                print(f"{path:<9}{batch:>6}{per_step_s * 1e3:>10.2f}{audio_rate:>15.2f}{ops:>10.0f}{syncs:>11.1f}"
                      f"{per_step_s / floor:>9.1f}{hours}", flush=True)
            if len(paths) == 2:
                ratio = results[("generate", batch)][0] / results[("static", batch)][0]
                print(f"# batch {batch}: static is {ratio:.2f}x as fast as generate (decoding, same run)")
    print("# paper h (--model large only): device-hours for 23,815 clips of 30 s at that batch, scaling each step's "
          "time with the floor (the KV cache grows with the clip) and the codec's time with the clip length; ops per "
          "step are not counted for the compiled step (its graph replays without Python).")


if __name__ == "__main__":
    main()
