r"""Synthesize one MusicGen clip per caption into RUN/audio/, on one process or many.

    conceptcaps audio generate --run runs/demo                                  # one process
    conceptcaps audio generate --run runs/demo --model facebook/musicgen-large --duration 30 \
        --guidance_scale 3.3 --batch_size 8
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m conceptcaps_pipeline.cli \
        audio generate --run runs/demo                                          # every GPU of a node
    conceptcaps audio generate --run runs/demo --candidates 4                    # best of 4 by CLAP evidence

Reads RUN/captions.parquet (id, caption). Every caption goes into a fixed batch (captions
sorted by prompt length, so the text encoder pads little); the batches that still lack a clip
are split between the processes by Accelerate (`PartialState.split_between_processes`). Each
batch is generated with a seed from the base seed and its first id (by default the paper's
classifier-free guidance 3.3 and 30-second clips, the only generation settings the paper states,
and top-k 250 sampling, MusicGen's own default, not the paper's) and handed to a writer thread that encodes
FLAC and writes `RUN/audio/shard-r{rank}-{writer}-{n}.parquet` atomically. Because batches and
seeds do not depend on what was done before or on the number of processes, a resumed or
multi-process run makes the clips of one uninterrupted run (on the same device type, with the
same --num_threads on a CPU; the manifest records what the samples depend on).

Every clip stores the fingerprint of its caption and the settings that made it. A re-run sets
aside (RUN/.set-aside/audio/) and makes again the clips whose caption has changed, and refuses
to mix in clips of other settings. `--force` checks every option and loads the model first, then
sets the old clips aside, and drops them only once the new ones are made. One process at a time
may work on a run (RUN/.locks/audio.lock). On a GPU the model runs in bf16 while the EnCodec
decoder stays in float32. Writes RUN/manifests/audio.json (counts per rank, audio seconds, wall
time, and one entry per session when a run was resumed).

`--candidates K` (best of K, docs/audio.md): each batch is made K times, with candidate seeds from
`best_of.candidate_seeds` (candidate 0 is the seed above, so K = 1 is the plain run, byte for byte);
every candidate is encoded to FLAC and scored by the CLAP of `--clap_model` (per label, the rank
percentile `audio score` stores as evidence), and per caption the candidate whose labels have the
highest mean evidence is kept. Every candidate's score is recorded in the parquet metadata of the
shard that holds the kept clip (`best_of.read_candidate_records`), so record and clip are written
together; the manifest counts which candidate won and the mean evidence kept. `--keep_candidates`
also writes the other candidates to RUN/audio/candidates/ (never shipped by `build`).

`--model` takes a Hub id (facebook/musicgen-small, -medium, -large, -stereo-*) or a local folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from conceptcaps_pipeline.audio.shards import INDEX_COLUMNS, Batch, ShardWriter, read_shards, shard_paths
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.models import load_pretrained, resolve_model
from conceptcaps_pipeline.run_dir import read_manifest, require, stage, write_manifest

logger = logging.getLogger(__name__)

STAGE = "audio"
DEFAULT_MODEL = "facebook/musicgen-large"
SCORE_MODEL = "laion/larger_clap_music"  # audio score's DEFAULT_MODEL (not imported: score.py loads evaluate code)
CANDIDATES_FOLDER = "candidates"  # RUN/audio/candidates/: --keep_candidates' other candidates


@dataclass
class AudioArguments:
    run: str = field(metadata={"help": "Run directory holding captions.parquet; clips go to RUN/audio/."})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "MusicGen checkpoint: a Hub id or a local folder."})
    duration: float = field(default=30.0, metadata={"help": "Seconds of audio per caption (the paper: 30)."})
    guidance_scale: float = field(default=3.3, metadata={"help": "Classifier-free guidance scale (the paper: 3.3)."})
    top_k: int = field(default=250, metadata={"help": "Top-k sampling over each codebook (MusicGen's default: 250)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    batch_size: int = field(
        default=0,
        metadata={"help": "Captions decoded together on each process; 0: on a GPU the largest batch its free memory "
                          "holds (KV cache and codec), on a CPU 8. The clips depend on it (their batches)."})
    decoder: str = field(
        default="static",
        metadata={"help": "static: the static-cache decode loop (CUDA graphs on a GPU; the same clips as generate); "
                          "generate: transformers' MusicgenForConditionalGeneration.generate."})
    codec_batch_size: int = field(
        default=0, metadata={"help": "Clips the EnCodec decoder turns into audio at once (0: 4 on a GPU, all on a CPU)."})
    seed: int = field(default=0, metadata={"help": "Base seed; each batch's seed derives from it and its first id."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Transformer dtype: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32. "
                          "The EnCodec decoder always runs in float32."},
    )
    flac_subtype: str = field(default="PCM_16", metadata={"help": "FLAC sample format: PCM_16 or PCM_24."})
    max_pending: int = field(default=4, metadata={"help": "Batches that may wait for the writer thread."})
    num_threads: int = field(
        default=1,
        metadata={"help": "Torch CPU threads per process. On a CPU the exact samples depend on it, so the default "
                          "(1) gives the same clips whatever launcher or core count runs them; 0: torch's default."})
    cpu: bool = field(default=False, metadata={"help": "Run on CPU even where a GPU is present."})
    force: bool = field(default=False, metadata={"help": "Make every clip again; the old ones are set aside and "
                                                         "dropped once the new ones are made."})
    candidates: int = field(
        default=1,
        metadata={"help": "Best of K: make K candidates per caption and keep the one whose labels have the highest "
                          "mean CLAP evidence (K x the audio time, plus scoring); 1: one clip per caption, as before."})
    clap_model: str = field(
        default=SCORE_MODEL,
        metadata={"help": "With --candidates > 1: the CLAP checkpoint (Hub id or local folder) that scores the "
                          "candidates; `audio score`'s default, so the kept clip is chosen by the evidence it reports."})
    keep_candidates: bool = field(
        default=False,
        metadata={"help": "With --candidates > 1: also write the candidates not kept to RUN/audio/candidates/ "
                          "(for inspection; `build` never ships them)."})


def batch_seed(base_seed: int, first_id: str) -> int:
    """A batch's seed: a hash of the base seed and its first id, so it never depends on ranks."""
    digest = hashlib.sha256(f"{base_seed}:{first_id}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def codec_timing_from(model_id: str) -> dict:
    """codec_timing of a checkpoint, from its config alone (no weights loaded)."""
    from transformers import MusicgenConfig

    return codec_timing(load_pretrained(MusicgenConfig, resolve_model(model_id, "model"), "model", "MusicGen config"))


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
        raise ConceptCapsError(f"--dtype {name!r}: use one of {', '.join(DTYPES)}.") from None


def load_processor(model_id: str):
    """The MusicGen processor (tokenizer + feature extractor) of a Hub id or folder."""
    from transformers import AutoProcessor

    return load_pretrained(AutoProcessor, resolve_model(model_id, "model"), "model", "MusicGen processor")


def load_musicgen(model_id: str, device, dtype, processor=None):
    """Load model and processor; transformer weights in `dtype`, the EnCodec decoder in float32."""
    import torch
    from transformers import MusicgenForConditionalGeneration

    processor = processor or load_processor(model_id)
    model_id = resolve_model(model_id, "model")
    model = load_pretrained(MusicgenForConditionalGeneration, model_id, "model", "MusicGen model", dtype=dtype)
    # Why: EnCodec's decoder is small but numerically touchy; bf16 there adds audible noise.
    model.audio_encoder.to(torch.float32)
    return model.to(device).eval(), processor


def synthesize(model, processor, prompts: list[str], *, seed: int, max_new_tokens: int,
               guidance_scale: float = 3.3, top_k: int = 250, temperature: float = 1.0,
               decoder=None, codec_batch_size: int | None = None) -> np.ndarray:
    """Generate one clip per prompt: (batch, channels, samples) float32 audio.

    With `decoder` (a `StaticMusicgenDecoder`) the loop is the static-cache one, which gives the
    same clips as `model.generate` for the same seed; the codec then decodes `codec_batch_size`
    clips at a time (EnCodec's activations for 30 s clips are large).
    """
    import torch

    # The compiled static step pads the text itself (to a fixed length): one graph whatever the prompts.
    inputs = processor(text=prompts, padding=True, truncation=True, return_tensors="pt").to(model.device)
    torch.manual_seed(seed)  # seeds every device's generator: same batch + seed -> same clips
    with torch.inference_mode():
        if decoder is None:
            audio = model.generate(
                **inputs, do_sample=True, top_k=top_k, temperature=temperature,
                guidance_scale=guidance_scale, max_new_tokens=max_new_tokens,
            )
        else:
            codes = decoder.generate_codes(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=max_new_tokens,
                                           guidance_scale=guidance_scale, top_k=top_k, temperature=temperature)
            step = codec_batch_size or codes.shape[1]
            audio = torch.cat([decoder.decode_audio(codes[:, i:i + step]) for i in range(0, codes.shape[1], step)])
    return audio.float().cpu().numpy()


def plan_batches(ids: list[str], prompts: dict[str, str], tokenizer, batch_size: int) -> list[list[str]]:
    """Sort ids by tokenised prompt length (then id) and cut them into batches."""
    if not ids:
        return []
    # Why chunks: tokenising every caption at once holds all token lists (+385 MB at 25.8k captions); only
    # the lengths are kept, so memory is bounded by the chunk.
    lengths = []
    for start in range(0, len(ids), 1024):
        chunk = [prompts[i] for i in ids[start:start + 1024]]
        lengths += [len(x) for x in tokenizer(chunk, truncation=True)["input_ids"]]
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


SETTING_KEYS = ("model", "duration", "guidance_scale", "top_k", "temperature", "flac_subtype")
DECODERS = ("static", "generate")
CPU_BATCH_SIZE = 8
GPU_CODEC_BATCH_SIZE = 4
MEMORY_HEADROOM = 0.85  # of the free memory after the weights: allocator slack, the codec, activations


def kv_bytes_per_clip(decoder_config, max_new_tokens: int, guidance: bool, dtype_bytes: int, text_tokens: int = 128) -> int:
    """Bytes one clip holds on the device while it decodes: self- and cross-attention KV cache, both CFG halves."""
    rows = 2 if guidance else 1
    width = decoder_config.hidden_size  # heads x head size
    layers = decoder_config.num_hidden_layers
    self_attention = 2 * layers * width * (max_new_tokens + 1) * dtype_bytes
    cross_attention = 2 * layers * width * text_tokens * dtype_bytes
    return rows * (self_attention + cross_attention)


def batch_size_from_memory(free_bytes: int, decoder_config, max_new_tokens: int, guidance: bool, dtype_bytes: int,
                           limit: int = 256) -> int:
    """The largest batch whose KV cache fits in MEMORY_HEADROOM of `free_bytes` (at least 1, at most `limit`).

    >>> from transformers import MusicgenDecoderConfig
    >>> large = MusicgenDecoderConfig(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32)
    >>> batch_size_from_memory(72 * 2**30, large, 1503, guidance=True, dtype_bytes=2)   # H100 after bf16 weights
    51
    """
    per_clip = kv_bytes_per_clip(decoder_config, max_new_tokens, guidance, dtype_bytes)
    return max(1, min(limit, int(free_bytes * MEMORY_HEADROOM) // per_clip))
FLAC_SUBTYPES = ("PCM_S8", "PCM_16", "PCM_24")
DTYPES = ("auto", "bfloat16", "float16", "float32")


FREE_MEMORY_ENV = "CONCEPTCAPS_FREE_MEMORY"


def free_memory(device, rank: int = 0) -> int | None:
    """Free bytes on `device` for sizing the batch (None on a CPU), read by the process of index `rank`.

    $CONCEPTCAPS_FREE_MEMORY overrides the measurement: bytes, or one value per rank separated by commas
    (to hold memory back for another job, or to make processes disagree in a test); on a CPU too.
    """
    value = os.environ.get(FREE_MEMORY_ENV, "").strip()
    if value:
        items = [v.strip() for v in value.split(",")]
        item = items[min(rank, len(items) - 1)]
        try:
            return int(float(item))
        except ValueError:
            raise ConceptCapsError(f"${FREE_MEMORY_ENV}={value!r}: give bytes (e.g. 40e9), or one value per rank "
                                   f"separated by commas.") from None
    if device.type != "cuda":
        return None
    import torch

    return int(torch.cuda.mem_get_info(device)[0])


def resolve_batch_size(args: AudioArguments, device, max_new_tokens: int, rank: int = 0) -> int:
    """This process's batch: --batch_size, or (0) the largest its free memory holds next to the weights (8 on a CPU).

    A run with several processes uses `agreed_batch_size`, the smallest of these over all ranks.
    """
    if args.batch_size:
        return args.batch_size
    free = free_memory(device, rank)
    if free is None:
        return CPU_BATCH_SIZE
    import torch
    from transformers import MusicgenConfig, MusicgenForConditionalGeneration

    config = load_pretrained(MusicgenConfig, resolve_model(args.model, "model"), "model", "MusicGen config")
    with torch.device("meta"):  # counts the weights without allocating them
        parameters = sum(p.numel() for p in MusicgenForConditionalGeneration(config).parameters())
    dtype_bytes = resolve_dtype(args.dtype, device).itemsize
    size = batch_size_from_memory(free - parameters * dtype_bytes, config.decoder, max_new_tokens,
                                  args.guidance_scale > 1, dtype_bytes)
    logger.info("audio: rank %d: batch size %d from %.1f GiB free on %s (weights %.1f GiB)", rank, size,
                free / 2**30, device, parameters * dtype_bytes / 2**30)
    return size


def agreed_batch_size(state, local: int) -> int:
    """The batch size of every process: the main process takes the smallest over the ranks and broadcasts it.

    Why: the batches (and so which process makes which clip, and each clip's seed) are planned from the
    batch size; ranks with different free memory would otherwise plan different batches and split the
    work differently, making some clips twice and others never.
    """
    if state.num_processes == 1:
        return local
    from accelerate.utils import broadcast_object_list, gather_object

    sizes = gather_object([local])
    decided = [min(sizes) if state.is_main_process else None]
    broadcast_object_list(decided, from_process=0)
    if state.is_main_process and len(set(sizes)) > 1:
        logger.info("audio: batch sizes per rank %s; every rank uses %d", sizes, decided[0])
    return int(decided[0])


def check_arguments(args: AudioArguments) -> None:
    """Every option that can be checked before a model loads or a file is touched: one clear error each."""
    checks = [
        (args.batch_size >= 0, f"--batch_size {args.batch_size}: give 0 (from memory) or more."),
        (args.decoder in DECODERS, f"--decoder {args.decoder!r}: use one of {', '.join(DECODERS)}."),
        (args.codec_batch_size >= 0, f"--codec_batch_size {args.codec_batch_size}: give 0 (automatic) or more."),
        (args.duration > 0, f"--duration {args.duration}: give a positive number of seconds."),
        (args.top_k >= 0, f"--top_k {args.top_k}: give 0 (no top-k cut) or a positive number of codes."),
        (args.temperature > 0, f"--temperature {args.temperature}: give a positive temperature, e.g. 1.0."),
        (args.guidance_scale >= 0, f"--guidance_scale {args.guidance_scale}: give 0 or more (1 and below: no guidance)."),
        (args.dtype in DTYPES, f"--dtype {args.dtype!r}: use one of {', '.join(DTYPES)}."),
        (args.flac_subtype in FLAC_SUBTYPES, f"--flac_subtype {args.flac_subtype!r}: use one of {', '.join(FLAC_SUBTYPES)}."),
        (args.max_pending >= 1, f"--max_pending {args.max_pending}: give at least 1."),
        (args.num_threads >= 0, f"--num_threads {args.num_threads}: give 0 (torch's default) or more."),
        (args.candidates >= 1, f"--candidates {args.candidates}: give 1 (one clip per caption) or more (best of K)."),
        (args.candidates > 1 or not args.keep_candidates,
         "--keep_candidates needs --candidates 2 or more: with one candidate there is nothing else to keep."),
    ]
    for ok, message in checks:
        if not ok:
            raise ConceptCapsError(message)


def clip_settings(args: AudioArguments, run: Path) -> dict:
    """What a clip's sound depends on besides its caption and seed (stored with every clip)."""
    from conceptcaps_pipeline.run_dir import run_relative

    settings = {key: getattr(args, key) for key in SETTING_KEYS}
    settings["model"] = run_relative(args.model, run)
    if args.candidates > 1:  # only then: a plain run's settings (and so its shards) stay as they always were
        settings.update(candidates=args.candidates, clap_model=run_relative(args.clap_model, run))
    return settings


def _check_settings(index, settings: dict, run: Path) -> None:
    """Refuse to mix clips made with other settings into one run (use --force to redo them)."""
    stored = {s for s in index.column("settings").to_pylist() if s}
    models = {m for m in index.column("model").to_pylist() if m}
    from conceptcaps_pipeline.run_dir import run_relative

    for text in sorted(stored):
        other = json.loads(text)
        # Both sides' keys: a best-of-K clip carries candidates/clap_model, a plain one does not.
        differ = {k: (other.get(k), settings.get(k)) for k in {*settings, *other} if other.get(k) != settings.get(k)}
        if differ:
            listed = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(differ.items()))
            raise ConceptCapsError(
                f"{run / 'audio'} holds clips made with other settings ({listed}): resume with the same settings, "
                f"or pass --force to set the old clips aside and make every clip again."
            )
    if not stored and models and {run_relative(m, run) for m in models} != {settings["model"]}:
        raise ConceptCapsError(
            f"{run / 'audio'} holds clips made by {sorted(models)}, but --model is {settings['model']!r}: resume with "
            f"the same --model, or pass --force to set the old clips aside and start again."
        )


def stale_clips(index, prompts: dict[str, str]) -> dict[str, set[str]]:
    """{shard: ids} of clips whose caption changed since they were made (or that carry no caption fingerprint)."""
    from conceptcaps_pipeline.audio.shards import caption_sha256

    stale: dict[str, set[str]] = {}
    columns = zip(index.column("id").to_pylist(), index.column("caption_sha256").to_pylist(),
                  index.column("shard").to_pylist())
    for clip_id, fingerprint, shard in columns:
        if clip_id in prompts and fingerprint != caption_sha256(prompts[clip_id]):
            stale.setdefault(shard, set()).add(clip_id)
    return stale


def plan_all_batches(prompts: dict[str, str], tokenizer, batch_size: int) -> list[list[str]]:
    """Every caption in fixed batches (sorted by prompt length, then id).

    Why fixed: a clip depends on the batch it was made in; batches planned over all captions,
    whatever is done already and however many processes share the work, make a resumed or
    multi-process run give the clips of a single uninterrupted run.
    """
    return plan_batches(sorted(prompts), prompts, tokenizer, batch_size)


def prepare_audio_dir(args: AudioArguments, run: Path, stale: dict[str, set[str]]) -> dict:
    """Main process, under the stage lock, with the model loaded: set aside what --force or changed captions replace."""
    from conceptcaps_pipeline.audio.shards import move_rows_aside, remove_stale_temporaries
    from conceptcaps_pipeline.run_dir import set_aside

    audio_dir = run / "audio"
    report = {"leftovers": remove_stale_temporaries(audio_dir) if audio_dir.is_dir() else 0,
              "stale": sum(len(ids) for ids in stale.values())}
    if args.force:
        folder = set_aside(run, STAGE, shard_paths(audio_dir) + shard_paths(audio_dir / CANDIDATES_FOLDER))
        if folder:
            logger.info("audio: --force: the old clips are set aside in %s until the new ones are made", folder)
    elif report["stale"]:
        folder = move_rows_aside(run, stale, STAGE)
        logger.warning("audio: %d clip(s) were made from captions that have changed since (or carry no caption "
                       "fingerprint); they are set aside in %s and made again", report["stale"], folder)
    return report


def _before_lock(args: AudioArguments) -> dict:
    """What precedes the lock: the captions, their settings, the processor and accelerate's process state."""
    import torch

    run = Path(args.run)
    captions_path = require(run, "captions.parquet")
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    return {"prompts": _read_captions(captions_path), "settings": clip_settings(args, run),
            "processor": load_processor(args.model),  # a wrong id or folder fails here, before anything is touched
            "launcher": _die_with_launcher(), "state": _partial_state(args)}


# Only the main process holds the lock; the other processes of `accelerate launch` work under it.
@stage("audio_generate", check=check_arguments, prepare=_before_lock,
       lock=lambda args, state, **_: STAGE if state.is_main_process else None)
def generate_audio(args: AudioArguments, *, prompts, settings, processor, launcher, state) -> dict:
    """Generate the missing clips of RUN on this process's share; returns the stage manifest."""
    import torch
    from accelerate.utils import gather_object, tqdm
    from conceptcaps_pipeline.audio.shards import caption_sha256
    from conceptcaps_pipeline.run_dir import drop_set_aside

    started = time.time()
    run = Path(args.run)
    captions_path = run / "captions.parquet"
    audio_dir = run / "audio"
    rank = state.process_index

    # 1. What is there, read-only: clips of other settings are refused, changed captions are redone.
    index = read_shards(audio_dir, columns=INDEX_COLUMNS)
    if not args.force:
        _check_settings(index, settings, run)
    stale = {} if args.force else stale_clips(index, prompts)
    gone = {i for ids in stale.values() for i in ids}
    done = set() if args.force else set(index.column("id").to_pylist()) - gone
    max_new_tokens = decoding_steps(args.duration, codec_timing_from(args.model))[1]
    batch_size = agreed_batch_size(state, resolve_batch_size(args, state.device, max_new_tokens, rank))
    batches = plan_all_batches(prompts, processor.tokenizer, batch_size)  # a pure function of both: same on every rank
    todo = [b for b, ids in enumerate(batches) if not all(i in done for i in ids)]
    previous = read_manifest(run, STAGE)
    if not todo:
        if state.is_main_process:
            logger.info("audio: all %d captions have a clip in %s; nothing to do (--force redoes them)",
                        len(prompts), audio_dir)
        if previous is not None and previous.get("counts", {}).get("clips") == len(prompts):
            state.wait_for_everyone()
            return previous

    # 2. Load the models (a bad --clap_model fails before the large one loads); only then does the main process
    # set aside what is replaced.
    device = state.device
    best_of = _load_best_of(args, run, captions_path, device) if args.candidates > 1 else None
    dtype = resolve_dtype(args.dtype, device)
    model, processor = load_musicgen(args.model, device, dtype, processor)
    timing = codec_timing(model.config)
    static = None
    if args.decoder == "static":
        from conceptcaps_pipeline.audio.decode import StaticMusicgenDecoder

        static = StaticMusicgenDecoder(model)
        if static.compile_step:  # compile every graph now: the first batch then runs at full speed
            static.warm_up(batch_size, max_new_tokens, args.guidance_scale, args.top_k, args.temperature)
    codec_batch = args.codec_batch_size or (GPU_CODEC_BATCH_SIZE if device.type == "cuda" else None)
    state.wait_for_everyone()
    report = prepare_audio_dir(args, run, stale) if state.is_main_process else {}
    if state.is_main_process and not args.force:
        report["candidate_rows_dropped"] = prune_candidates(audio_dir / CANDIDATES_FOLDER, done)
    # Why: no process may write a shard before the main one has set old clips aside.
    state.wait_for_everyone()

    # 3. Generate this process's share of the batches; the writer thread does the disk work.
    local = {"rank": rank, "assigned": 0, "clips": 0, "shards": 0, "audio_seconds": 0.0,
             "generate_seconds": 0.0, "failed": {}}
    if best_of is not None:
        local.update(candidate_clips=0, score_seconds=0.0)
    with state.split_between_processes(todo) as mine:
        if mine:
            local["assigned"] = sum(1 for b in mine for i in batches[b] if i not in done)
            logger.info("audio: rank %d generates %d clips in %d batches on %s (%s, %d thread(s))", rank,
                        local["assigned"], len(mine), device, str(dtype).replace("torch.", ""),
                        torch.get_num_threads())
            writer = ShardWriter(audio_dir, rank, timing["sampling_rate"], settings["model"],
                                 subtype=args.flac_subtype, max_pending=args.max_pending,
                                 settings=json.dumps(settings, sort_keys=True))
            for b in tqdm(list(mine), desc="audio", unit="batch"):
                if launcher is not None and os.getppid() != launcher:
                    os._exit(1)  # orphaned: the launcher died; stop before writing anything more
                batch_ids = batches[b]
                seed = batch_seed(args.seed, batch_ids[0])
                keep = [i not in done for i in batch_ids]
                fingerprints = [caption_sha256(prompts[i]) for i in batch_ids]

                def make(seed: int, batch_ids=batch_ids) -> np.ndarray:
                    tick = time.time()
                    audio = synthesize(model, processor, [prompts[i] for i in batch_ids], seed=seed,
                                       max_new_tokens=max_new_tokens, guidance_scale=args.guidance_scale,
                                       top_k=args.top_k, temperature=args.temperature, decoder=static,
                                       codec_batch_size=codec_batch)
                    local["generate_seconds"] += time.time() - tick
                    return audio

                if best_of is None:
                    writer.put(Batch(ids=batch_ids, audio=make(seed), seed=seed, caption_sha256=fingerprints,
                                     keep=keep))
                    continue
                # Best of K: candidate 0 is the clip above; the kept ones go out with every candidate's score.
                from conceptcaps_pipeline.audio.best_of import best_of_batch, shard_metadata

                tick, generating = time.time(), local["generate_seconds"]
                chosen = best_of_batch(make, batch_ids, [best_of["labels"][i] for i in batch_ids], key=batch_ids[0],
                                       base_seed=args.seed, k=args.candidates, sampling_rate=timing["sampling_rate"],
                                       scorer=best_of["scorer"], tags=best_of["tags"], text=best_of["text"],
                                       subtype=args.flac_subtype)
                local["score_seconds"] += time.time() - tick - (local["generate_seconds"] - generating)
                local["candidate_clips"] += args.candidates * sum(keep)
                if args.keep_candidates:  # before the kept clips: a kill in between redoes the batch (docs/audio.md)
                    _write_other_candidates(audio_dir / CANDIDATES_FOLDER, writer.token, rank, b, batch_ids, keep,
                                            chosen, fingerprints, timing["sampling_rate"], settings, args)
                kept_ids = [i for i, k in zip(batch_ids, keep) if k]
                metadata = shard_metadata({i: chosen.choices[i] for i in kept_ids}, best_of["scorer"].name,
                                          best_of["labels"], chosen.seeds)
                writer.put(Batch(ids=batch_ids, audio=np.stack(chosen.audio), seed=seed,
                                 seeds=[chosen.choices[i].seed for i in batch_ids], metadata=metadata,
                                 caption_sha256=fingerprints, keep=keep))
            stats = writer.close()
            local.update(clips=stats.clips, shards=stats.shards, audio_seconds=round(stats.audio_seconds, 3),
                         failed=stats.failed)
    local["generate_seconds"] = round(local["generate_seconds"], 3)
    if best_of is not None:
        local["score_seconds"] = round(local["score_seconds"], 3)

    # 4. Collect every process's counts; the main process writes the manifest.
    per_rank = gather_object([local])
    state.wait_for_everyone()
    manifest = None
    if state.is_main_process:
        manifest = _write_audio_manifest(args, run, captions_path, prompts, todo, per_rank, previous, timing,
                                         report, state, started, batch_size)
        drop_set_aside(run, STAGE)  # the new clips are in place: what --force or a caption change replaced goes
    state.wait_for_everyone()
    return manifest if manifest is not None else (read_manifest(run, STAGE) or {})


def _load_best_of(args: AudioArguments, run: Path, captions_path: Path, device) -> dict:
    """What --candidates needs: the CLAP scorer, each caption's labels, the taxonomy's tags and their text embeddings."""
    from conceptcaps_pipeline.audio.score import ClapScorer, _labels, tag_embeddings
    from conceptcaps_pipeline.taxonomy import Taxonomy

    taxonomy = Taxonomy.load(require(run, "taxonomy.json"))
    ids, labels, _ = _labels(captions_path)
    try:
        scorer = ClapScorer(args.clap_model, str(device))
    except ConceptCapsError as err:  # its message names audio score's --model
        raise ConceptCapsError(str(err).replace("--model", "--clap_model", 1)) from None
    # The tags in audio score's order, so that a label's rank percentile is the evidence that stage reports.
    tags = [(tag, category) for category, members in taxonomy.categories.items() for tag in members]
    return {"scorer": scorer, "labels": dict(zip(ids, labels)), "tags": tags, "text": tag_embeddings(scorer, tags)}


def prune_candidates(folder: Path, done: set[str]) -> int:
    """Drop the --keep_candidates rows of ids without a kept clip (main process, under the lock); returns how many.

    Why: a batch's other candidates are written just before its kept clips, so a kill in between leaves
    candidates whose batch is made again; dropping them first keeps every candidate exactly once. Each
    shard is rewritten in place atomically (or removed when nothing of it stays).
    """
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.run_dir import atomic_path

    dropped = 0
    for path in shard_paths(folder):
        table = pq.read_table(path)
        keep = [n for n, i in enumerate(table.column("id").to_pylist()) if i in done]
        if len(keep) == table.num_rows:
            continue
        dropped += table.num_rows - len(keep)
        if keep:
            with atomic_path(path) as tmp:
                pq.write_table(table.take(keep), tmp)
        else:
            path.unlink()
    if dropped:
        logger.info("audio: %d candidate row(s) of batches to be made again were dropped from %s", dropped, folder)
    return dropped


def _write_other_candidates(folder: Path, token: str, rank: int, batch: int, ids: list[str], keep: list[bool],
                            chosen, fingerprints: list[str], sampling_rate: int, settings: dict,
                            args: AudioArguments) -> None:
    """--keep_candidates: the candidates not kept, one shard per batch in RUN/audio/candidates/ (written at once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.audio.shards import encode_flac, shard_schema
    from conceptcaps_pipeline.run_dir import atomic_path

    rows = []
    for n, (clip_id, wanted) in enumerate(zip(ids, keep)):
        for c, seed in enumerate(chosen.seeds):
            audio = chosen.candidates[c][n]
            if not wanted or c == chosen.choices[clip_id].index or not np.isfinite(audio).all():
                continue
            rows.append({"id": clip_id, "audio": encode_flac(audio, sampling_rate, args.flac_subtype),
                         "duration_s": audio.shape[-1] / sampling_rate, "sampling_rate": sampling_rate, "seed": seed,
                         "model": settings["model"], "caption_sha256": fingerprints[n],
                         "settings": json.dumps(settings, sort_keys=True)})
    if rows:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"shard-r{rank:03d}-{token}-{batch:06d}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=shard_schema()), tmp)


def best_of_counts(audio_dir: Path, ids, candidates: int) -> dict:
    """The manifest's best-of-K summary over the clips in RUN/audio/: which candidate won, and the mean
    evidence kept against candidate 0's (what a plain run would have shipped)."""
    from conceptcaps_pipeline.audio.best_of import read_candidate_records

    records = read_candidate_records(audio_dir)
    records = [records[i] for i in ids if i in records]
    kept = [r["candidate_means"][r["kept"]] for r in records]
    first = [r["candidate_means"][0] for r in records]

    def mean(values):
        values = [v for v in values if v is not None]
        return round(float(np.mean(values)), 6) if values else None

    won = {str(c): sum(r["kept"] == c for r in records) for c in range(candidates)}
    return {"candidates": candidates, "clips_with_record": len(records), "kept_candidate": won,
            "mean_evidence_kept": mean(kept), "mean_evidence_candidate_0": mean(first),
            "scorers": sorted({r["scorer"] for r in records})}


def determinism(args: AudioArguments, state, batch_size: int) -> dict:
    """What a clip's exact samples depend on, recorded so that a rerun can match it (docs/audio.md)."""
    import torch

    record = {"torch": torch.__version__, "device": str(state.device), "threads": torch.get_num_threads(),
              "batch_size": batch_size, "seed": args.seed, "dtype": args.dtype, "decoder": args.decoder,
              "codec_batch_size": args.codec_batch_size or (GPU_CODEC_BATCH_SIZE if state.device.type == "cuda" else
                                                             "all")}
    if args.candidates > 1:
        record.update(candidates=args.candidates, clap_model=args.clap_model)
    if torch.cuda.is_available() and state.device.type == "cuda":
        record.update(gpu=torch.cuda.get_device_name(state.device), cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version())
    return record


def _write_audio_manifest(args, run, captions_path, prompts, todo, per_rank, previous, timing, report, state,
                          started, batch_size) -> dict:
    audio_dir = run / "audio"
    index = read_shards(audio_dir, columns=INDEX_COLUMNS)
    clip_ids = index.column("id").to_pylist()
    failed = {k: v for r in per_rank for k, v in r["failed"].items()}
    session = {
        "processes": state.num_processes, "generated": sum(r["clips"] for r in per_rank),
        "audio_seconds": round(sum(r["audio_seconds"] for r in per_rank), 3),
        "wall_time_s": round(time.time() - started, 3), "per_rank": per_rank,
        "determinism": determinism(args, state, batch_size),
        "stale_replaced": report.get("stale", 0), "leftovers_removed": report.get("leftovers", 0),
    }
    if report.get("candidate_rows_dropped"):
        session["candidate_rows_dropped"] = report["candidate_rows_dropped"]
    counts = {
        "captions": len(prompts), "already_done": len(prompts) - sum(r["assigned"] for r in per_rank),
        "assigned": sum(r["assigned"] for r in per_rank), "batches_run": len(todo),
        "generated": session["generated"], "failed": len(failed), "clips": len(set(clip_ids) & set(prompts)),
        "missing": len(set(prompts) - set(clip_ids)), "shards": len(shard_paths(audio_dir)),
        "audio_seconds_total": round(float(np.sum(index.column("duration_s").to_numpy())), 3),
        "audio_seconds_generated": session["audio_seconds"],
        "per_rank": {str(r["rank"]): r["clips"] for r in per_rank},  # str: the same keys as in the JSON file
    }
    if args.candidates > 1:
        counts["candidate_clips_generated"] = sum(r.get("candidate_clips", 0) for r in per_rank)
        counts["best_of"] = best_of_counts(audio_dir, sorted(prompts), args.candidates)
    sessions = (previous or {}).get("sessions", []) if not args.force else []
    extra = {"sessions": sessions + [session], "failed_ids": failed,
             "codec": {**timing, "frames_per_clip": decoding_steps(args.duration, timing)[0]}}
    manifest = write_manifest(run, STAGE, args, inputs={"captions": captions_path}, counts=counts,
                              started=started, extra=extra)
    logger.info("audio: %d/%d captions have a clip (%d generated now by %d process(es), %.1f s of audio)",
                counts["clips"], len(prompts), counts["generated"], state.num_processes,
                counts["audio_seconds_generated"])
    if failed:
        logger.warning("audio: %d clip(s) were not written (NaN/Inf): %s; re-run to retry them",
                       len(failed), ", ".join(sorted(failed)[:20]))
    return manifest
