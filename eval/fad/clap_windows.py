"""CLAP embeddings of audio clips in fixed windows, and of texts: the one copy that eval/clap_score and eval/fad share.

    from .clap_windows import embed_audio_items, load_clap      # in a metric module beside this file
    clap, processor, device = load_clap("laion/larger_clap_music")
    audio = embed_audio_items(clap, processor, ["clip.flac", {"array": wave, "sampling_rate": 32000}], device=device)

eval/clap_score/clap_windows.py and eval/fad/clap_windows.py are two byte-identical copies
(tests/test_metric_spaces.py keeps them equal): each metric folder stands alone, so a module
copied by itself (a Hub Space, a Windows checkout) loads, and both metrics embed audio with
exactly this code.

The procedure, deterministic by design:
- a clip (a path, `{"bytes"|"path"}`, `{"array", "sampling_rate"}`, a decoded datasets `Audio`
  item or a bare array with `sampling_rate`) is mixed down to mono and resampled with a
  polyphase filter to the feature extractor's rate;
- it is cut into consecutive model-length windows from sample 0 (the last one shorter, and
  repeat-padded by the extractor); no random crop is ever taken;
- the clip embedding is the mean of the unit window embeddings weighted by window length,
  normalised to unit length again.
"""

from collections.abc import Mapping

import numpy as np

DEFAULT_MODEL = "laion/larger_clap_music"


# ---- audio input -------------------------------------------------------------------------

def _mono(array) -> np.ndarray:
    """Float32 mono samples; a 2-D array is averaged over its channel axis (the shorter one)."""
    wave = np.asarray(array, dtype=np.float32)
    if wave.ndim == 2:
        wave = wave.mean(axis=int(np.argmin(wave.shape)))
    if wave.ndim != 1:
        raise ValueError(f"audio must be a 1-D (mono) or 2-D (multi-channel) array, got shape {wave.shape}.")
    return wave


def as_audio_record(item) -> dict:
    """Normalise one audio item to {"path", "bytes", "array", "sampling_rate"}.

    Unused fields are None, but an unused path is "" (evaluate refuses None for a string field)."""
    record = {"path": "", "bytes": None, "array": None, "sampling_rate": None}
    if isinstance(item, str):
        record["path"] = item
    elif hasattr(item, "get_all_samples"):
        # A torchcodec AudioDecoder, as datasets' `Audio` feature decodes to: it indexes like a dict.
        record["array"], record["sampling_rate"] = _mono(item["array"]), int(item["sampling_rate"])
    elif isinstance(item, Mapping):
        if item.get("array") is not None:
            record["array"], record["sampling_rate"] = _mono(item["array"]), item.get("sampling_rate")
        elif item.get("bytes") is not None or item.get("path"):
            record["bytes"], record["path"] = item.get("bytes"), item.get("path") or ""
        else:
            raise ValueError(f"audio dict with keys {sorted(item)}: give 'array' and 'sampling_rate', or 'bytes'/'path'.")
    else:
        record["array"] = _mono(item)
    return record


def resample(wave: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (deterministic, no torchaudio needed)."""
    from math import gcd

    from scipy.signal import resample_poly

    if rate == target_rate:
        return wave.astype(np.float32)
    g = gcd(rate, target_rate)
    return resample_poly(wave, target_rate // g, rate // g).astype(np.float32)


def load_audio(record: dict, sampling_rate: int | None, target_rate: int, where: str) -> np.ndarray:
    """Decode a normalised record to mono float32 samples at `target_rate`."""
    import io

    import soundfile as sf

    if record["array"] is not None:
        wave = np.asarray(record["array"], dtype=np.float32)
        rate = record["sampling_rate"] or sampling_rate
        if rate is None:
            raise ValueError(f"{where} is a bare array: pass `sampling_rate=` (its samples per second).")
    else:
        source = io.BytesIO(record["bytes"]) if record["bytes"] is not None else record["path"]
        try:
            wave, rate = sf.read(source, dtype="float32", always_2d=True)
        except Exception as err:  # soundfile raises LibsndfileError, OSError, TypeError...
            raise ValueError(f"{where} ({record['path'] or 'bytes'}) cannot be decoded as audio: {err}") from err
        wave = wave.mean(axis=1)
    if wave.size == 0:
        raise ValueError(f"{where} has no samples; every clip needs audio.")
    return resample(wave, int(rate), target_rate)


def split_windows(wave: np.ndarray, window: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Consecutive windows from sample 0, and each window's weight (its length / `window`)."""
    windows = [wave[start : start + window] for start in range(0, len(wave), window)]
    return windows, np.array([len(w) / window for w in windows], dtype=np.float64)


# ---- model -------------------------------------------------------------------------------

def load_clap(model: str = DEFAULT_MODEL, device: str | None = None):
    """(ClapModel in eval mode on `device`, ClapProcessor, device); a clear error when it cannot be loaded."""
    import torch
    from transformers import ClapModel, ClapProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        clap = ClapModel.from_pretrained(model).eval().to(device)
        processor = ClapProcessor.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load the CLAP model {model!r} ({err}). Pass `model=` a Hub id or a local folder holding a "
            f"ClapModel and its ClapProcessor (config.json, weights, preprocessor_config.json, tokenizer files); "
            f"the default {DEFAULT_MODEL!r} needs the Hub or a local copy."
        ) from err
    return clap, processor, device


def _embed_window_batch(clap, processor, windows: list[np.ndarray], device: str) -> np.ndarray:
    """Raw CLAP audio embeddings of windows that each fit the model window."""
    import torch

    extractor = processor.feature_extractor
    # Every window fits the model window, so neither truncation mode crops at random; the
    # mode only picks the mel layout the checkpoint expects (4 stacked mels when fused).
    truncation = "fusion" if clap.config.audio_config.enable_fusion else "rand_trunc"
    inputs = extractor(windows, sampling_rate=extractor.sampling_rate, truncation=truncation, return_tensors="pt")
    is_longer = torch.zeros_like(inputs["is_longer"], dtype=torch.bool)  # undo the extractor's random pick
    with torch.no_grad():
        out = clap.get_audio_features(input_features=inputs["input_features"].to(device), is_longer=is_longer.to(device))
    return out.pooler_output.float().cpu().numpy()


def embed_audio_clips(clap, processor, waves: list[np.ndarray], batch_size: int, device: str) -> np.ndarray:
    """Unit CLAP embeddings (n, d) of mono clips already at the extractor's rate (windowed, weighted mean)."""
    window = processor.feature_extractor.nb_max_samples
    pieces, weights, owner = [], [], []
    for index, wave in enumerate(waves):
        clip_windows, clip_weights = split_windows(wave, window)
        pieces += clip_windows
        weights.append(clip_weights)
        owner += [index] * len(clip_windows)
    embedded = np.concatenate(
        [_embed_window_batch(clap, processor, pieces[i : i + batch_size], device) for i in range(0, len(pieces), batch_size)]
    )
    weights = np.concatenate(weights)
    owner = np.asarray(owner)
    clips = np.stack([(embedded[owner == i] * weights[owner == i, None]).sum(axis=0) for i in range(len(waves))])
    return clips / np.linalg.norm(clips, axis=1, keepdims=True)


def embed_audio_items(clap, processor, audio, sampling_rate=None, batch_size=8, device="cpu") -> np.ndarray:
    """Unit CLAP audio embeddings (n, d) of audio items in any accepted form, `batch_size` clips at a
    time (memory stays at one batch of decoded clips), with a progress bar."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    rate = processor.feature_extractor.sampling_rate
    records = [as_audio_record(item) for item in audio]
    out = []
    for start in tqdm(range(0, len(records), batch_size), desc="CLAP audio", unit="batch", disable=None):
        waves = [
            load_audio(record, sampling_rate, rate, f"clip {start + i}")
            for i, record in enumerate(records[start : start + batch_size])
        ]
        out.append(embed_audio_clips(clap, processor, waves, batch_size, device))
    return np.concatenate(out) if out else np.zeros((0, clap.config.projection_dim), dtype=np.float32)


def embed_texts(clap, processor, texts: list[str], batch_size: int, device: str) -> np.ndarray:
    """Unit CLAP text embeddings (n, d)."""
    import torch

    tokenizer = processor.tokenizer
    out = []
    for i in range(0, len(texts), batch_size):
        inputs = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            features = clap.get_text_features(
                input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
            )
        out.append(features.pooler_output.float().cpu().numpy())
    embedded = np.concatenate(out)
    return embedded / np.linalg.norm(embedded, axis=1, keepdims=True)
