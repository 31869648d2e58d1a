"""CLAP score: cosine similarity between a text and an audio clip in a CLAP model's joint space.

    import evaluate
    clap_score = evaluate.load("eval/clap_score")      # path from the repository root
    clap_score.compute(predictions=["a calm piano melody"], references=["clip.flac"])

Texts are the predictions, audio clips the references (file paths, encoded bytes, arrays,
or the decoded `Audio` items of a dataset). Clips are resampled to the model's rate and
embedded in fixed windows from the start; see `_DESCRIPTION` for the exact procedure. That
code is clap_windows.py beside this file, the one copy eval/fad uses too (its clap_windows.py
is a symlink to this folder's).
"""

import datasets
import evaluate
import numpy as np

# The audio and text embedding code, shared with eval/fad (whose clap_windows.py links here).
from .clap_windows import DEFAULT_MODEL, as_audio_record, embed_audio_items, embed_texts, load_clap

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
    >>> from conceptcaps_pipeline.testing.tiny_eval_models import build_tiny_clap
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
        clap, processor, device = self._model(model, device)
        return embed_audio_items(clap, processor, audio, sampling_rate, batch_size, device)

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
