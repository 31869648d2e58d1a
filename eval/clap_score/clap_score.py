"""CLAP score: cosine similarity between a text and an audio clip in a CLAP model's joint space.

    import evaluate
    clap_score = evaluate.load("eval/clap_score")      # path from the repository root
    clap_score.compute(predictions=["a calm piano melody"], references=["clip.flac"])

Texts are the predictions, audio clips the references (file paths, encoded bytes, arrays,
or the decoded `Audio` items of a dataset). Clips are resampled to the model's rate and
embedded in fixed windows from the start; see `_DESCRIPTION` for the exact procedure.
"""

import logging
from collections.abc import Mapping

import datasets
import evaluate
import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "laion/larger_clap_music"

_CITATION = """\
@inproceedings{wu2023clap,
  title={Large-scale Contrastive Language-Audio Pretraining with Feature Fusion and Keyword-to-Caption Augmentation},
  author={Wu, Yusong and Chen, Ke and Zhang, Tianyu and Hui, Yuchen and Berg-Kirkpatrick, Taylor and Dubnov, Shlomo},
  booktitle={ICASSP},
  year={2023}
}
@article{sienkiewicz2026conceptcaps,
  title={ConceptCaps -- a Distilled Concept Dataset for Interpretability in Music Models},
  author={Sienkiewicz, Bruno and Neumann, {\\L}ukasz and Modrzejewski, Mateusz},
  journal={arXiv preprint arXiv:2601.14157},
  year={2026}
}
"""

_DESCRIPTION = """\
CLAP score: how well each audio clip matches its text, as the cosine similarity of the
text embedding and the audio embedding of a CLAP model (transformers' `ClapModel`; by
default the music CLAP `laion/larger_clap_music`; any Hub id or local path works).

Audio handling, deterministic by design:
- Each clip is mixed down to mono and resampled (polyphase, `scipy.signal.resample_poly`)
  to the feature extractor's sampling rate.
- A clip is cut into consecutive windows of the model's length (`max_length_s` of its
  feature extractor, 10 s for the LAION music CLAPs) starting at sample 0; a 30 s clip
  gives three windows. No random crop is ever taken (CLAP's own feature extractor crops
  long clips at random). The last, shorter window is repeat-padded as CLAP pads short
  clips. Every window is embedded, and the clip embedding is the average of the unit
  window embeddings weighted by each window's length (so a 0.5 s tail counts for 0.05 of
  a 10 s window), normalised again to unit length.
- The `is_longer` flag is False for every window (each fits the model window), so fused
  CLAP models take their short-clip path, without the feature extractor's random choice.

Scores are raw cosines in [-1, 1], not the `max(100 * cos, 0)` variant some papers report.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): texts (captions), one per clip.
    references: audio clips aligned with `predictions`, each one of
        - a path to an audio file (any format `soundfile` reads: WAV, FLAC, OGG, MP3),
        - a dict `{"bytes": ..., "path": ...}` of encoded audio (a dataset's `Audio(decode=False)` item),
        - a dict `{"array": ..., "sampling_rate": ...}` or a decoded `Audio` item of a dataset,
        - a 1-D array of samples, with `sampling_rate` given.
        Stereo input is averaged to mono.
    model (`str`): Hub id or local path of a `ClapModel` with its `ClapProcessor`.
        Defaults to "laion/larger_clap_music".
    sampling_rate (`int`, optional): rate of the bare arrays among `references`.
    batch_size (`int`): clips (and texts) per forward pass. Defaults to 8.
    device (`str`, optional): torch device; defaults to "cuda" when available, else "cpu".
Returns:
    clap_score (`float`): mean cosine similarity over the clips.
    clap_score_std (`float`): population standard deviation of the per-clip cosines.
    clap_scores (`list` of `float`): the cosine of each (text, clip) pair, in input order.
Examples:
    A tiny random-weight CLAP keeps this example offline and fast; its scores are noise.

    >>> import tempfile
    >>> import evaluate
    >>> import numpy as np
    >>> from generation.tiny_eval_models import build_tiny_clap
    >>> texts = ["a calm piano melody", "loud rock drums and distorted guitar"]
    >>> model_dir = build_tiny_clap(tempfile.mkdtemp(), texts)
    >>> clap_score = evaluate.load("eval/clap_score")
    >>> sr = 22050
    >>> t = np.arange(3 * sr) / sr   # 3 s clips: longer than the tiny model's 2 s window
    >>> clips = [0.3 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sign(np.sin(2 * np.pi * 110 * t))]
    >>> results = clap_score.compute(predictions=texts, references=clips, sampling_rate=sr, model=str(model_dir))
    >>> len(results["clap_scores"]), -1.0 <= results["clap_score"] <= 1.0
    (2, True)
    >>> again = clap_score.compute(predictions=texts, references=clips, sampling_rate=sr, model=str(model_dir))
    >>> again["clap_scores"] == results["clap_scores"]
    True
"""


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
    """Normalise one audio reference to {"path", "bytes", "array", "sampling_rate"}.

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


def resample(wave: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (deterministic, no torchaudio needed)."""
    from math import gcd

    from scipy.signal import resample_poly

    if rate == target_rate:
        return wave.astype(np.float32)
    g = gcd(rate, target_rate)
    return resample_poly(wave, target_rate // g, rate // g).astype(np.float32)


def split_windows(wave: np.ndarray, window: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Consecutive windows from sample 0, and each window's weight (its length / `window`)."""
    windows = [wave[start : start + window] for start in range(0, len(wave), window)]
    return windows, np.array([len(w) / window for w in windows], dtype=np.float64)


# ---- model -------------------------------------------------------------------------------

def load_clap(model: str, device: str | None = None):
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


# ---- the metric --------------------------------------------------------------------------

_AUDIO_RECORD = {
    "path": datasets.Value("string"),
    "bytes": datasets.Value("binary"),
    "array": datasets.Sequence(datasets.Value("float32")),
    "sampling_rate": datasets.Value("int32"),
}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ClapScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # One record type for every audio form: evaluate picks among several feature
            # options by trial encoding, which cannot tell a dict from a list of floats.
            features=datasets.Features({"predictions": datasets.Value("string"), "references": _AUDIO_RECORD}),
            codebase_urls=["https://github.com/LAION-AI/CLAP"],
            reference_urls=["https://huggingface.co/laion/larger_clap_music", "https://arxiv.org/abs/2211.06687"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of (text, clip) pairs; clips are normalised to one audio record type first.\n"""
        if references is not None:
            references = [as_audio_record(item) for item in references]
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one (text, clip) pair; the clip is normalised to one audio record type first.\n"""
        if reference is not None:
            reference = as_audio_record(reference)
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _model(self, model: str, device: str | None):
        """Load a CLAP once per (model, device) for this metric object."""
        cache = self.__dict__.setdefault("_clap_cache", {})
        if (model, device) not in cache:
            cache[(model, device)] = load_clap(model, device)
        return cache[(model, device)]

    def embed_audio(self, audio, model=DEFAULT_MODEL, sampling_rate=None, batch_size=8, device=None) -> np.ndarray:
        """Unit CLAP audio embeddings (n, d) of clips given in any of the `references` forms."""
        from tqdm.auto import tqdm

        clap, processor, device = self._model(model, device)
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

    def embed_text(self, texts, model=DEFAULT_MODEL, batch_size=8, device=None) -> np.ndarray:
        """Unit CLAP text embeddings (n, d)."""
        clap, processor, device = self._model(model, device)
        return embed_texts(clap, processor, list(texts), batch_size, device)

    def _compute(self, predictions, references, model=DEFAULT_MODEL, sampling_rate=None, batch_size=8, device=None):
        if not predictions:
            raise ValueError("clap_score needs at least one (text, clip) pair.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        text = self.embed_text(predictions, model=model, batch_size=batch_size, device=device)
        audio = self.embed_audio(references, model=model, sampling_rate=sampling_rate, batch_size=batch_size, device=device)
        # Both sides are unit vectors; the clip only absorbs float round-off beyond +-1.
        scores = np.clip(np.sum(text.astype(np.float64) * audio.astype(np.float64), axis=1), -1.0, 1.0)
        return {
            "clap_score": float(scores.mean()),
            "clap_score_std": float(scores.std()),
            "clap_scores": [float(s) for s in scores],
        }
