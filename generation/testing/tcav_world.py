"""Synthetic releases whose concepts are known, to check `conceptcaps tcav` before trusting it.

    from conceptcaps_pipeline.testing.tcav_world import noise_rows, planted_rows, train_planted_classifier, write_release
    write_release("runs/check/release", {"train": planted_rows(400, seed=0), "test": planted_rows(60, seed=1)})
    train_planted_classifier("runs/check/model", planted_rows(400, seed=0))   # a tiny model built from a config

Two worlds, each a release folder in the real schema (`conceptcaps.features`, `audio` config):

- **planted**: every clip holds one "genre" tone (jazz 1 kHz, metal 3 kHz, rock 400 Hz, blues
  2 kHz), distractor tones and noise. The tag `piano` marks exactly the clips with the jazz
  tone, and a classifier trained on these clips uses that tone for `jazz`: TCAV must find
  `piano` for `jazz`. The tag `banjo` is given to 40% of the clips at random: it has no sound,
  so TCAV must not find it.
- **noise**: white noise of random level; every concept tag is given at random. With an
  untrained classifier nothing can be found, so the share of "significant" results measures
  how often the test is wrong under the null hypothesis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

RATE = 16_000
GENRE_TONE_HZ = {"jazz": 1000.0, "metal": 3000.0, "rock": 400.0, "blues": 2000.0}
DISTRACTOR_HZ = (250.0, 600.0, 1500.0, 4500.0, 6000.0)
PLANTED = "piano"  # the tag that is exactly the jazz tone
UNRELATED = "banjo"  # a tag with no sound
NOISE_CONCEPTS = ("piano", "banjo", "acoustic guitar", "violin")


def _row(clip_id: str, tags: list[str], audio: np.ndarray) -> dict:
    return {"id": clip_id, "aspect_list": tags, "audio": audio.astype(np.float32)}


def planted_rows(n: int, seed: int, seconds: float = 1.0) -> list[dict]:
    """Clips of the planted world (see the module docstring), with a `genre` key for training."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(RATE * seconds)) / RATE
    rows = []
    for i in range(n):
        genre = str(rng.choice(list(GENRE_TONE_HZ)))
        audio = rng.uniform(0.02, 0.2) * rng.standard_normal(len(t))
        for hz in rng.choice(DISTRACTOR_HZ, size=rng.integers(0, 3), replace=False):
            audio += rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi))
        audio += rng.uniform(0.15, 0.3) * np.sin(2 * np.pi * GENRE_TONE_HZ[genre] * rng.uniform(0.97, 1.03) * t)
        tags = [genre, "mellow", *([PLANTED] if genre == "jazz" else []), *([UNRELATED] if rng.random() < 0.4 else [])]
        rows.append({**_row(f"p{seed}-{i:05d}", tags, audio), "genre": genre})
    return rows


def noise_rows(n: int, seed: int, seconds: float = 1.0, share: float = 0.3) -> list[dict]:
    """Clips of the noise world: noise of random level; each of NOISE_CONCEPTS given with probability `share`."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        audio = rng.uniform(0.02, 0.3) * rng.standard_normal(int(RATE * seconds))
        tags = [str(rng.choice(list(GENRE_TONE_HZ))), "mellow", *[c for c in NOISE_CONCEPTS if rng.random() < share]]
        rows.append(_row(f"n{seed}-{i:05d}", tags, audio))
    return rows


def write_release(folder: str | Path, splits: dict[str, list[dict]], taxonomy=None) -> Path:
    """A release folder with the `audio` config (the real features) holding `splits`; returns it."""
    import datasets

    from conceptcaps import features

    from conceptcaps_pipeline.audio.shards import encode_flac
    from conceptcaps_pipeline.taxonomy import CATEGORIES, Taxonomy

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
            "audio": [{"bytes": encode_flac(r["audio"][None], RATE), "path": f"{r['id']}.flac"} for r in rows],
            "duration_s": [len(r["audio"]) / RATE for r in rows],
        }
        path = folder / "data" / "audio" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(data, features=schema).to_parquet(str(path))
    card = ["---", "configs:", "- config_name: audio", "  data_files:"]
    card += [f"  - split: {split}\n    path: data/audio/{split}-*.parquet" for split in splits]
    (folder / "README.md").write_text("\n".join([*card, "---", "", "A synthetic release (generation/testing/tcav_world.py).", ""]))
    return folder


def train_planted_classifier(model_dir: str | Path, rows: list[dict], steps: int = 200, seed: int = 0) -> float:
    """Build a tiny audio classifier into `model_dir` and train it to tell the genres by their tones.

    Returns its accuracy on `rows`: above 0.9 means it demonstrably uses the tones, the jazz one included.
    """
    import torch
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    from conceptcaps_pipeline.testing.tiny_eval_models import build_tiny_audio_classifier

    build_tiny_audio_classifier(model_dir, seed=seed)
    model = AutoModelForAudioClassification.from_pretrained(model_dir)
    extractor = AutoFeatureExtractor.from_pretrained(model_dir)
    x = extractor([r["audio"] for r in rows], sampling_rate=RATE, return_tensors="pt")["input_values"]
    y = torch.tensor([model.config.label2id[r["genre"]] for r in rows])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(rows), (16,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(input_values=x[batch]).logits, y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(input_values=x).logits.argmax(-1) == y).float().mean())
    model.save_pretrained(model_dir)
    return accuracy
