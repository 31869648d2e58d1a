r"""Synthesize one MusicGen clip per caption into RUN/audio/, on one process or many.

    conceptcaps audio generate --run runs/demo                                  # one process
    conceptcaps audio generate --run runs/demo --model facebook/musicgen-large --duration 30 \
        --guidance-scale 3.3 --batch-size 8
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m generation.cli \
        audio generate --run runs/demo                                          # every GPU of a node

Reads RUN/captions.parquet (id, caption). The ids that have no clip yet are split between the
processes by Accelerate (`PartialState.split_between_processes`); each process sorts its share
by prompt length (less padding in the text encoder), generates in batches with the paper's
sampling setup (top-k 250, classifier-free guidance 3.3), seeds each batch from the base seed
and the batch's first id, and hands the audio to a writer thread that encodes FLAC and writes
`RUN/audio/shard-r{rank}-{n}.parquet` atomically. Re-running the same command, with any number
of processes, generates only what is missing. On a GPU the model runs in bf16 while the EnCodec
decoder stays in float32. Writes RUN/manifests/audio.json (counts per rank, audio seconds, wall
time, and one entry per session when a run was resumed).

`--model` takes a Hub id (facebook/musicgen-small, -medium, -large, -stereo-*) or a local folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio_shards import INDEX_COLUMNS, Batch, ShardWriter, read_shards, remove_stale_temporaries, shard_paths
from .errors import ConceptCapsError
from .models import load_pretrained, resolve_model
from .run_dir import read_manifest, require, write_manifest

logger = logging.getLogger(__name__)

STAGE = "audio"
DEFAULT_MODEL = "facebook/musicgen-large"


@dataclass
class AudioArguments:
    run: str = field(metadata={"help": "Run directory holding captions.parquet; clips go to RUN/audio/."})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "MusicGen checkpoint: a Hub id or a local folder."})
    duration: float = field(default=30.0, metadata={"help": "Seconds of audio per caption (the paper: 30)."})
    guidance_scale: float = field(default=3.3, metadata={"help": "Classifier-free guidance scale (the paper: 3.3)."})
    top_k: int = field(default=250, metadata={"help": "Top-k sampling over each codebook (MusicGen's default: 250)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    batch_size: int = field(default=8, metadata={"help": "Captions per generate() call on each process."})
    seed: int = field(default=0, metadata={"help": "Base seed; each batch's seed derives from it and its first id."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Transformer dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32. "
                          "The EnCodec decoder always runs in float32."},
    )
    flac_subtype: str = field(default="PCM_16", metadata={"help": "FLAC sample format: PCM_16 or PCM_24."})
    max_pending: int = field(default=4, metadata={"help": "Batches that may wait for the writer thread."})
    cpu: bool = field(default=False, metadata={"help": "Run on CPU even where a GPU is present."})
    force: bool = field(default=False, metadata={"help": "Delete existing clips and generate every caption again."})


def batch_seed(base_seed: int, first_id: str) -> int:
    """A batch's seed: a hash of the base seed and its first id, so it never depends on ranks."""
    digest = hashlib.sha256(f"{base_seed}:{first_id}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def codec_timing(config) -> dict:
    """Frame rate, hop length and codebooks per channel of a MusicgenConfig."""
    audio = config.audio_encoder
    decoder = config.decoder
    return {
        "sampling_rate": int(audio.sampling_rate),
        "frame_rate": float(audio.frame_rate),
        "hop_length": int(audio.hop_length),
        "audio_channels": int(decoder.audio_channels),
        "channel_codebooks": int(decoder.num_codebooks // decoder.audio_channels),
    }


def decoding_steps(duration: float, timing: dict) -> tuple[int, int]:
    """(frames wanted, max_new_tokens) for `duration` seconds.

    MusicGen's delay pattern offsets codebook k by k steps, so `n` decoder steps give
    n - (codebooks - 1) complete frames: ask for that many more steps than frames.
    """
    frames = max(1, round(duration * timing["frame_rate"]))
    return frames, frames + timing["channel_codebooks"] - 1


def resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise ConceptCapsError(f"--dtype {name!r} is not one of auto, bfloat16, float16, float32.") from None


def load_musicgen(model_id: str, device, dtype):
    """Load model and processor; transformer weights in `dtype`, the EnCodec decoder in float32."""
    import torch
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    model_id = resolve_model(model_id, "model")
    processor = load_pretrained(AutoProcessor, model_id, "model", "MusicGen processor")
    model = load_pretrained(MusicgenForConditionalGeneration, model_id, "model", "MusicGen model", dtype=dtype)
    # Why: EnCodec's decoder is small but numerically touchy; bf16 there adds audible noise.
    model.audio_encoder.to(torch.float32)
    return model.to(device).eval(), processor


def synthesize(model, processor, prompts: list[str], *, seed: int, max_new_tokens: int,
               guidance_scale: float = 3.3, top_k: int = 250, temperature: float = 1.0) -> np.ndarray:
    """Generate one clip per prompt: (batch, channels, samples) float32 audio."""
    import torch

    inputs = processor(text=prompts, padding=True, truncation=True, return_tensors="pt").to(model.device)
    torch.manual_seed(seed)  # seeds every device's generator: same batch + seed -> same clips
    with torch.inference_mode():
        audio = model.generate(
            **inputs, do_sample=True, top_k=top_k, temperature=temperature,
            guidance_scale=guidance_scale, max_new_tokens=max_new_tokens,
        )
    return audio.float().cpu().numpy()


def plan_batches(ids: list[str], prompts: dict[str, str], tokenizer, batch_size: int) -> list[list[str]]:
    """Sort ids by tokenised prompt length (then id) and cut them into batches."""
    if not ids:
        return []
    lengths = [len(x) for x in tokenizer([prompts[i] for i in ids], truncation=True)["input_ids"]]
    ordered = [i for _, i in sorted(zip(lengths, ids))]
    return [ordered[k:k + batch_size] for k in range(0, len(ordered), batch_size)]


def _partial_state(args: AudioArguments):
    import torch
    from accelerate import PartialState
    from accelerate.utils import is_mps_available, is_xpu_available, parse_flag_from_env

    # Why: PartialState picks the gloo CPU backend only when told to run on CPU, and
    # `accelerate launch` exports ACCELERATE_USE_CPU only for its single-process launcher;
    # so a machine without any accelerator runs on CPU too (two CPU processes under torchrun).
    no_accelerator = not (torch.cuda.is_available() or is_xpu_available() or is_mps_available())
    return PartialState(cpu=args.cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or no_accelerator)


def _die_with_launcher() -> int | None:
    """Under a launcher (torchrun), make this process die with it; returns the launcher's pid.

    Why: torchrun starts every worker in a session of its own, so `kill -9` of the launcher or
    of its process group leaves the workers running; a re-run would then generate their ids a
    second time. On Linux the kernel kills us with the launcher (PR_SET_PDEATHSIG); elsewhere
    the generation loop checks the parent pid between batches.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    launcher = os.getppid()
    if launcher == 1:  # the launcher is already gone
        os._exit(1)
    return launcher


def _read_captions(path: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["id", "caption"])
    except Exception as err:
        raise ConceptCapsError(
            f"{path} cannot be read as captions (need columns id, caption): {err}. "
            f"Re-run `conceptcaps captions generate --run {path.parent}`."
        ) from err
    ids, captions = table.column("id").to_pylist(), table.column("caption").to_pylist()
    prompts: dict[str, str] = {}
    for clip_id, caption in zip(ids, captions):
        if not clip_id or clip_id in prompts:
            raise ConceptCapsError(
                f"{path}: id {clip_id!r} is empty or repeated; each caption needs a unique id. "
                f"Re-run `conceptcaps captions generate --run {path.parent} --force`."
            )
        if not caption or not str(caption).strip():
            raise ConceptCapsError(f"{path}: caption of id {clip_id!r} is empty; fix or regenerate captions.parquet.")
        prompts[clip_id] = str(caption)
    return prompts


def _check_existing(index, args: AudioArguments, run: Path) -> None:
    """Refuse to mix clips of another model or duration into one run."""
    if index.num_rows == 0:
        return
    models = set(index.column("model").to_pylist())
    if models != {args.model}:
        raise ConceptCapsError(
            f"{run / 'audio'} holds clips made by {sorted(models)}, but --model is {args.model!r}. Resume with the "
            f"same --model, or pass --force to delete the existing clips and start again."
        )
    durations = np.asarray(index.column("duration_s").to_pylist())
    if np.abs(durations - args.duration).max() > 0.05 * args.duration + 0.05:
        raise ConceptCapsError(
            f"{run / 'audio'} holds clips of about {durations.mean():.2f} s, but --duration is {args.duration}. "
            f"Resume with the same --duration, or pass --force to start again."
        )


def generate_audio(args: AudioArguments) -> dict:
    """Generate the missing clips of RUN on this process's share; returns the stage manifest."""
    from accelerate.utils import gather_object, tqdm

    started = time.time()
    run = Path(args.run)
    captions_path = require(run, "captions.parquet")
    audio_dir = run / "audio"
    if args.batch_size < 1 or args.duration <= 0:
        raise ConceptCapsError(f"--batch_size ({args.batch_size}) and --duration ({args.duration}) must be positive.")
    launcher = _die_with_launcher()
    state = _partial_state(args)
    rank = state.process_index

    # 1. The main process clears what must go; then every process reads the same list of done ids.
    if state.is_main_process:
        if args.force:
            for path in shard_paths(audio_dir):
                path.unlink()
        stale = remove_stale_temporaries(audio_dir) if audio_dir.is_dir() else 0
        if stale:
            logger.info("audio: removed %d half-written shard(s) of an interrupted run", stale)
    state.wait_for_everyone()
    prompts = _read_captions(captions_path)
    index = read_shards(audio_dir, columns=INDEX_COLUMNS)
    _check_existing(index, args, run)
    done = set(index.column("id").to_pylist())
    todo = sorted(i for i in prompts if i not in done)
    # Why: no process may write a shard before all have listed the done ids, or they would
    # split different lists and clips could be made twice or not at all.
    state.wait_for_everyone()
    previous = read_manifest(run, STAGE)
    if not todo:
        if state.is_main_process:
            logger.info("audio: all %d captions have a clip in %s; nothing to do (--force redoes them)",
                        len(prompts), audio_dir)
        if previous is not None and previous.get("counts", {}).get("clips") == len(prompts):
            return previous

    # 2. Load the model on this process's device.
    device = state.device
    dtype = resolve_dtype(args.dtype, device)
    model, processor = load_musicgen(args.model, device, dtype) if todo else (None, None)

    # 3. Generate this process's share, batch by batch; the writer thread does the disk work.
    local = {"rank": rank, "assigned": 0, "clips": 0, "shards": 0, "audio_seconds": 0.0,
             "generate_seconds": 0.0, "failed": {}}
    timing = codec_timing(model.config) if model is not None else None
    with state.split_between_processes(todo) as mine:
        if mine:
            local["assigned"] = len(mine)
            max_new_tokens = decoding_steps(args.duration, timing)[1]
            batches = plan_batches(list(mine), prompts, processor.tokenizer, args.batch_size)
            logger.info("audio: rank %d generates %d clips in %d batches on %s (%s)", rank, len(mine),
                        len(batches), device, str(dtype).replace("torch.", ""))
            writer = ShardWriter(audio_dir, rank, timing["sampling_rate"], args.model,
                                 subtype=args.flac_subtype, max_pending=args.max_pending)
            for batch_ids in tqdm(batches, desc="audio", unit="batch"):
                if launcher is not None and os.getppid() != launcher:
                    os._exit(1)  # orphaned: the launcher died; stop before writing anything more
                seed = batch_seed(args.seed, batch_ids[0])
                tick = time.time()
                audio = synthesize(model, processor, [prompts[i] for i in batch_ids], seed=seed,
                                   max_new_tokens=max_new_tokens, guidance_scale=args.guidance_scale,
                                   top_k=args.top_k, temperature=args.temperature)
                local["generate_seconds"] += time.time() - tick
                writer.put(Batch(ids=batch_ids, audio=audio, seed=seed))
            stats = writer.close()
            local.update(clips=stats.clips, shards=stats.shards, audio_seconds=round(stats.audio_seconds, 3),
                         failed=stats.failed)
    local["generate_seconds"] = round(local["generate_seconds"], 3)

    # 4. Collect every process's counts; the main process writes the manifest.
    per_rank = gather_object([local])
    state.wait_for_everyone()
    manifest = None
    if state.is_main_process:
        index = read_shards(audio_dir, columns=INDEX_COLUMNS)
        clip_ids = index.column("id").to_pylist()
        failed = {k: v for r in per_rank for k, v in r["failed"].items()}
        session = {
            "processes": state.num_processes, "generated": sum(r["clips"] for r in per_rank),
            "audio_seconds": round(sum(r["audio_seconds"] for r in per_rank), 3),
            "wall_time_s": round(time.time() - started, 3), "per_rank": per_rank,
        }
        counts = {
            "captions": len(prompts), "already_done": len(prompts) - len(todo), "assigned": len(todo),
            "generated": session["generated"], "failed": len(failed), "clips": len(set(clip_ids) & set(prompts)),
            "missing": len(set(prompts) - set(clip_ids)), "shards": len(shard_paths(audio_dir)),
            "audio_seconds_total": round(float(np.sum(index.column("duration_s").to_numpy())), 3),
            "audio_seconds_generated": session["audio_seconds"],
            "per_rank": {str(r["rank"]): r["clips"] for r in per_rank},  # str: the same keys as in the JSON file
        }
        sessions = (previous or {}).get("sessions", []) if not args.force else []
        extra = {"sessions": sessions + [session], "failed_ids": failed}
        if timing is not None:
            extra["codec"] = {**timing, "frames_per_clip": decoding_steps(args.duration, timing)[0]}
        elif previous and "codec" in previous:
            extra["codec"] = previous["codec"]
        manifest = write_manifest(run, STAGE, args, inputs={"captions": captions_path}, counts=counts,
                                  started=started, extra=extra)
        logger.info("audio: %d/%d captions have a clip (%d generated now by %d process(es), %.1f s of audio)",
                    counts["clips"], len(prompts), counts["generated"], state.num_processes,
                    counts["audio_seconds_generated"])
        if failed:
            logger.warning("audio: %d clip(s) were not written (NaN/Inf): %s; re-run to retry them",
                           len(failed), ", ".join(sorted(failed)[:20]))
    state.wait_for_everyone()
    return manifest if manifest is not None else (read_manifest(run, STAGE) or {})
