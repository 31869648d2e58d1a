"""Synthetic releases whose concepts are known, to check `conceptcaps tcav` before trusting it.

    from conceptcaps_pipeline.testing.tcav_world import tone_rows, ToneClassifier, write_release
    write_release("runs/check/release", {"train": tone_rows(400, seed=0), "test": tone_rows(60, seed=1)})
    model = ToneClassifier(planted=True)        # hand-set: its `jazz` output reads the 440 Hz band

Worlds, each a release folder in the real schema (`conceptcaps.features`, `audio` config):

- **tones** (`tone_rows`): one-second noise clips; each instrument tag is a tone mixed in
  (piano 440 Hz, organ 880 Hz, flute 1,500 Hz, harp 2,500 Hz), each with probability 0.35;
  `banjo` is given with the same probability and has no sound. `ToneClassifier` is a small
  mel-style CNN with hand-set weights (no training): band energies of an STFT, a 1-D
  convolution (`conv`, output (batch, channels, time)), a per-frame mixing layer (`mix`,
  output (batch, time, features)) and a linear head. With `planted=True` its `jazz` output
  reads the 440 Hz band, so TCAV must find `piano` for `jazz` and nothing else; the null twin
  (`planted=False`) reads a band no tag sounds in, so nothing may be found. `tone_classifier`
  and `null_tone_classifier` are `module:function` factories for `conceptcaps tcav --model`.
- **noise** (`noise_rows`): white noise of random level; every concept tag is given at random.
  With any classifier nothing can be found, so the share of "significant" results measures
  how often the test is wrong under the null hypothesis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

RATE = 16_000
TONES_HZ = {"piano": 440.0, "organ": 880.0, "flute": 1500.0, "harp": 2500.0}
SILENT = "banjo"  # a tag with no sound
TONE_CONCEPTS = (*TONES_HZ, SILENT)
PLANTED = "piano"  # the tag whose tone the planted classifier's jazz output reads
UNRELATED = SILENT
CLASSES = ("blues", "jazz", "rock", "metal")
# Bands of the classifier's front end: the four tones, then two bands no tag sounds in.
BANDS_HZ = (*TONES_HZ.values(), 4000.0, 6000.0)
NOISE_CONCEPTS = ("piano", "banjo", "acoustic guitar", "violin")


def _row(clip_id: str, tags: list[str], audio: np.ndarray) -> dict:
    return {"id": clip_id, "aspect_list": tags, "audio": audio.astype(np.float32)}


def tone_rows(n: int, seed: int, seconds: float = 1.0, share: float = 0.35) -> list[dict]:
    """Clips of the tones world (see the module docstring): noise plus the tones of their instrument tags."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(RATE * seconds)) / RATE
    rows = []
    for i in range(n):
        audio = 0.1 * rng.standard_normal(len(t))  # one noise level: band energies share no loudness factor
        tags = [str(rng.choice(CLASSES)), "mellow"]
        for tag in TONE_CONCEPTS:
            if rng.random() < share:
                tags.append(tag)
                if tag in TONES_HZ:
                    audio += rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * TONES_HZ[tag] * t + rng.uniform(0, 2 * np.pi))
        rows.append(_row(f"t{seed}-{i:05d}", tags, audio))
    return rows


def _tone_classifier_class():
    import torch

    class ToneClassifier(torch.nn.Module):
        """A mel-style CNN with hand-set weights; input (batch, samples) at 16 kHz, output (batch, 4) logits."""

        id2label = dict(enumerate(CLASSES))  # noqa: RUF012 - read, never changed
        sampling_rate = RATE

        def __init__(self, planted: bool = True, n_fft: int = 512, hop: int = 256):
            super().__init__()
            self.n_fft, self.hop = n_fft, hop
            freqs = np.fft.rfftfreq(n_fft, 1 / RATE)
            # Triangular bands 60 Hz wide either side of each centre: one band per tone.
            bank = np.stack([np.clip(1 - np.abs(freqs - hz) / 60.0, 0, None) for hz in BANDS_HZ])
            self.register_buffer("bank", torch.tensor(bank, dtype=torch.float32))
            bands = len(BANDS_HZ)
            self.conv = torch.nn.Conv1d(bands, bands, kernel_size=3, padding=1)
            self.mix = torch.nn.Linear(bands, bands)
            self.head = torch.nn.Linear(bands, len(CLASSES))
            with torch.no_grad():
                # conv: each channel the mean of its band over three frames; mix: each band on its own. No
                # crosstalk, so a tone reaches an output only through the band that output reads.
                self.conv.weight.copy_(torch.eye(bands)[:, :, None].repeat(1, 1, 3) / 3)
                self.conv.bias.zero_()
                self.mix.weight.copy_(torch.eye(bands))
                self.mix.bias.zero_()
                self.head.weight.zero_()
                self.head.bias.zero_()
                # jazz reads the 440 Hz band (planted) or the 4 kHz band no tag sounds in (the null twin);
                # rock and metal read the bands above; blues is the reference class.
                self.head.weight[CLASSES.index("jazz"), 0 if planted else 4] = 1.5
                self.head.weight[CLASSES.index("rock"), 5] = 0.5
                self.head.weight[CLASSES.index("metal"), 4 if planted else 5] = 0.3
                self.head.bias[CLASSES.index("jazz")] = 1.0

        def forward(self, waveform):
            window = torch.hann_window(self.n_fft, device=waveform.device)
            spectrum = torch.stft(waveform, self.n_fft, self.hop, window=window, return_complex=True).abs() ** 2
            energy = torch.log(self.bank @ spectrum + 1e-4) / 4  # (batch, bands, frames): channels first
            frames = self.conv(energy).transpose(1, 2)  # (batch, frames, bands)
            hidden = torch.tanh(self.mix(frames) - 0.8)  # (batch, frames, bands): time second, as transformers
            return self.head(hidden.mean(dim=1))

    return ToneClassifier


def ToneClassifier(planted: bool = True):
    """The hand-set classifier of the tones world (see the module docstring)."""
    return _tone_classifier_class()(planted=planted)


def tone_classifier():
    """`conceptcaps tcav --model conceptcaps_pipeline.testing.tcav_world:tone_classifier`: the planted model."""
    return ToneClassifier(planted=True)


def null_tone_classifier():
    """The null twin: the same model, its jazz output reading a band no tag sounds in."""
    return ToneClassifier(planted=False)


def noise_rows(n: int, seed: int, seconds: float = 1.0, share: float = 0.3) -> list[dict]:
    """Clips of the noise world: noise of random level; each of NOISE_CONCEPTS given with probability `share`."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        audio = rng.uniform(0.02, 0.3) * rng.standard_normal(int(RATE * seconds))
        tags = [str(rng.choice(CLASSES)), "mellow", *[c for c in NOISE_CONCEPTS if rng.random() < share]]
        rows.append(_row(f"n{seed}-{i:05d}", tags, audio))
    return rows


def write_release(folder: str | Path, splits: dict[str, list[dict]], taxonomy=None) -> Path:
    """A release folder with the `audio` and `default` configs (the real features) holding `splits`; returns it."""
    import datasets
    from conceptcaps_pipeline.audio.shards import encode_flac
    from conceptcaps_pipeline.taxonomy import CATEGORIES, Taxonomy

    from conceptcaps import features

    folder = Path(folder)
    taxonomy = taxonomy or Taxonomy.load()
    schema = features(taxonomy, RATE)
    for split, rows in splits.items():
        data = {
            "id": [r["id"] for r in rows],
            "caption": [", ".join(r["aspect_list"]) for r in rows],
            "aspect_list": [[t for t in taxonomy.tags if t in r["aspect_list"]] for r in rows],
            **{c: [[schema[c].feature.str2int(t) for t in r["aspect_list"] if taxonomy.category_of[t] == c]
                   for r in rows] for c in CATEGORIES},
            "labels": [sorted(taxonomy.index[t] for t in r["aspect_list"]) for r in rows],
            "coverage": [1.0] * len(rows),
        }
        text = datasets.Dataset.from_dict(data, features=features(taxonomy))
        path = folder / "data" / "default" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        text.to_parquet(str(path))
        data["audio"] = [{"bytes": encode_flac(r["audio"][None], RATE), "path": f"{r['id']}.flac"} for r in rows]
        data["duration_s"] = [len(r["audio"]) / RATE for r in rows]
        path = folder / "data" / "audio" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(data, features=schema).to_parquet(str(path))
    card = ["---", "configs:"]
    for config in ("default", "audio"):
        card += [f"- config_name: {config}", "  data_files:"]
        card += [f"  - split: {split}\n    path: data/{config}/{split}-*.parquet" for split in splits]
    (folder / "README.md").write_text("\n".join([*card, "---", "", "A synthetic release (generation/testing/tcav_world.py).", ""]))
    return folder
