"""A synthetic run of any size without a model: captions cycled from a real distill, and music-like
FLAC clips written through the project's own shard writer (fingerprints included).

    from conceptcaps_pipeline.testing.synthetic_run import write_audio, write_captions
    write_captions(run, 24_000)                       # RUN/distilled.parquet -> RUN/captions.parquet
    write_audio(run, seconds=30.0, sampling_rate=32_000)

For benchmarks (benchmarks/scale.py) and tests of the CPU stages at scale (build's bytes read,
streaming a paper-size layout). The clips are not MusicGen's, but they have its rate, length and
byte rate order (a few chords with note changes and a noise floor: ~1.4 MB of FLAC per 30-s clip, measured), and
each carries the fingerprint of its caption, so `build` ships them like generated ones.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CAPTION_SCHEMA_COLUMNS = ("caption", "aspect_list", "genre", "mood", "instrument", "tempo")


def write_captions(run: str | Path, n: int) -> Path:
    """RUN/captions.parquet in the captions stage's schema: n rows cycled from RUN/distilled.parquet (ids cc-NNNNNNN)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = Path(run)
    strings = pa.list_(pa.string())
    schema = pa.schema([
        ("id", pa.string()), ("caption", pa.string()), ("aspect_list", strings), ("genre", strings),
        ("mood", strings), ("instrument", strings), ("tempo", strings), ("coverage", pa.float64()),
        ("unrequested_tags", strings), ("seed", pa.int64()), ("attempts", pa.int64()),
    ])
    source = pq.read_table(run / "distilled.parquet", columns=list(CAPTION_SCHEMA_COLUMNS)).to_pylist()
    rows = [{"id": f"cc-{i:07d}", **source[i % len(source)], "coverage": 1.0, "unrequested_tags": [], "seed": 0,
             "attempts": 1} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), run / "captions.parquet")
    return run / "captions.parquet"


def music_like(seconds: float, sampling_rate: int, rng: np.random.Generator) -> np.ndarray:
    """(1, samples) float32: chords of decaying partials that change every half second, over a noise floor."""
    samples = round(seconds * sampling_rate)
    t = np.arange(samples, dtype=np.float32) / sampling_rate
    out = np.zeros(samples, dtype=np.float32)
    step = sampling_rate // 2
    for start in range(0, samples, step):
        part = slice(start, min(samples, start + step))
        local = t[part] - t[start]
        envelope = np.exp(-3.0 * local)
        for f in rng.choice([110.0, 146.8, 164.8, 196.0, 220.0, 261.6, 329.6, 392.0], size=3, replace=False):
            out[part] += 0.15 * envelope * np.sin(2 * np.pi * f * local).astype(np.float32)
    # Why the noise floor: pure tones compress ~20x in FLAC; real music (and MusicGen) ~2x.
    out += rng.normal(0.0, 0.02, samples).astype(np.float32)
    return out[None, :]


def write_audio(run: str | Path, *, seconds: float, sampling_rate: int = 32_000, batch: int = 32, seed: int = 0,
                distinct: int = 64) -> int:
    """RUN/audio/ shards for every caption of RUN/captions.parquet (one shard per batch, as `audio generate`
    writes them); returns the bytes of the shards. `distinct` clips are synthesised and reused (speed)."""
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.audio.shards import Batch, ShardWriter, caption_sha256, shard_paths

    run = Path(run)
    table = pq.read_table(run / "captions.parquet", columns=["id", "caption"])
    ids, captions = table.column("id").to_pylist(), table.column("caption").to_pylist()
    rng = np.random.default_rng(seed)
    clips = [music_like(seconds, sampling_rate, rng) for _ in range(min(distinct, len(ids)) or 1)]
    settings = json.dumps({"model": "synthetic", "duration": seconds})
    writer = ShardWriter(run / "audio", rank=0, sampling_rate=sampling_rate, model_id="synthetic", settings=settings)
    for start in range(0, len(ids), batch):
        chunk = range(start, min(len(ids), start + batch))
        writer.put(Batch(ids=[ids[i] for i in chunk], audio=np.stack([clips[i % len(clips)] for i in chunk]),
                         seed=seed, caption_sha256=[caption_sha256(captions[i]) for i in chunk]))
    writer.close()
    return sum(p.stat().st_size for p in shard_paths(run / "audio"))
