"""A handful of clips of the release, written as WAV files for the card's audio players.

    from conceptcaps_pipeline.dataset_card.examples import write_examples
    examples = write_examples("runs/demo/release", category_of, n=6)   # -> RELEASE/examples/<id>.wav

The clips come from the `audio` config's shards as shipped (RELEASE/data/audio/*.parquet), chosen
so that together they show as many different tags as possible: each pick is the row adding the
most tags not shown yet (ties: the smallest hash of the id, so the choice is deterministic).
They are written as 16-bit WAV, which every browser plays in an HTML `<audio>` element (the
Hub renders those in a card); the card's table gives each its caption and labels.

Reading the chosen clips costs (almost) nothing: `build` picks the same rows from its plan before
the audio passes and keeps their FLAC bytes as they go by (release/write.py), in a hidden
RELEASE/.example_clips.parquet that this module reads and removes. Without it (a card re-rendered
over reused shards) each chosen clip is read from the one row group that holds it, audio column
only, never a whole shard (the filter on id read every row group of a 500 MB shard: ~0.85 GB).
"""

from __future__ import annotations

import html
import io
from pathlib import Path

EXAMPLES_DIR = "examples"
DEFAULT_COUNT = 6
CLIPS_STASH = ".example_clips.parquet"  # hidden: not part of the release (build.release_files), removed once read


def stash_clips(release: str | Path, clips: dict[str, bytes]) -> None:
    """Keep the FLAC bytes of the clips `choose_examples` will pick, for write_examples (build's pass over the audio)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": pa.array(list(clips), pa.string()), "audio": pa.array(list(clips.values()), pa.binary())})
    pq.write_table(table, Path(release) / CLIPS_STASH)


def _read_stash(release: Path) -> dict[str, bytes]:
    import pyarrow.parquet as pq

    path = release / CLIPS_STASH
    if not path.exists():
        return {}
    table = pq.read_table(path)
    return dict(zip(table.column("id").to_pylist(), table.column("audio").to_pylist()))


def _read_clips(shard: Path, row_index: dict[str, int]) -> dict[str, bytes]:
    """The audio bytes of the given rows ({id: row number in the shard}): only the row group holding each, and only
    its audio column."""
    import pyarrow.parquet as pq

    file = pq.ParquetFile(shard)
    starts, start = [], 0
    for i in range(file.metadata.num_row_groups):
        starts.append(start)
        start += file.metadata.row_group(i).num_rows
    clips = {}
    for clip_id, index in row_index.items():
        group = max(i for i, s in enumerate(starts) if s <= index)
        column = file.read_row_group(group, columns=["audio"]).column("audio")
        clips[clip_id] = column[index - starts[group]].as_py()["bytes"]
    return clips


def printable(text: str) -> str:
    """`text` without control characters (a NUL or other C0/C1 code would make the card a binary
    file to many tools; a noisy model's captions can hold them), each shown as U+FFFD."""
    import unicodedata

    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else "\ufffd" for c in text)


def choose_examples(rows: list[dict], n: int) -> list[dict]:
    """Up to n rows that together hold the most distinct tags (greedy; ties by the hash of the id)."""
    from conceptcaps_pipeline.run_dir import stable_hash

    left = sorted(rows, key=lambda r: (stable_hash(r["id"]), r["id"]))
    shown: set[str] = set()
    chosen = []
    while left and len(chosen) < n:
        best = max(left, key=lambda r: len(set(r["aspect_list"]) - shown))  # max keeps the first (smallest hash) on ties
        chosen.append(best)
        shown |= set(best["aspect_list"])
        left.remove(best)
    return chosen


def audio_url(name: str, repo_id: str | None, revision: str = "main") -> str:
    """Where the card's player finds a clip: the Hub's resolve URL when the repository is known, else a relative path.

    Why absolute on the Hub: the card's markdown images are resolved against the repository, but
    an HTML `src` is used as written, and a relative one would point at the card's page.
    """
    path = f"{EXAMPLES_DIR}/{name}"
    return f"https://huggingface.co/datasets/{repo_id}/resolve/{revision}/{path}" if repo_id else path


def write_examples(release: str | Path, category_of: dict[str, str], n: int = DEFAULT_COUNT, config: str = "audio",
                   repo_id: str | None = None, revision: str = "main") -> list[dict]:
    """Write up to n clips of `config` to RELEASE/examples/<id>.wav; returns their rows for the card (HTML-escaped)."""
    import pyarrow.parquet as pq
    import soundfile as sf
    from conceptcaps_pipeline.run_dir import atomic_dir

    release = Path(release)
    shards = sorted((release / "data" / config).glob("*.parquet"))
    if not shards:
        return []
    rows = []
    for shard in shards:
        split = shard.name.split("-", 1)[0]
        for index, row in enumerate(pq.read_table(shard, columns=["id", "caption", "aspect_list"]).to_pylist()):
            rows.append({**row, "split": split, "shard": shard, "index": index})
    chosen = choose_examples(rows, n)
    clips = _read_stash(release)
    for shard in sorted({row["shard"] for row in chosen}):  # clips the build did not keep: their row groups only
        wanted = {row["id"]: row["index"] for row in chosen if row["shard"] == shard and row["id"] not in clips}
        if wanted:
            clips.update(_read_clips(shard, wanted))
    examples = []
    with atomic_dir(release / EXAMPLES_DIR) as folder:
        for row in chosen:
            audio, rate = sf.read(io.BytesIO(clips[row["id"]]), dtype="float32")
            name = f"{row['id']}.wav"
            sf.write(folder / name, audio, rate, subtype="PCM_16", format="WAV")
            by_category: dict[str, list[str]] = {}
            for tag in row["aspect_list"]:
                by_category.setdefault(category_of.get(tag, "other"), []).append(tag)
            examples.append({
                "id": row["id"], "split": row["split"], "file": f"{EXAMPLES_DIR}/{name}",
                "src": html.escape(audio_url(name, repo_id, revision), quote=True),
                "caption": html.escape(printable(row["caption"])),
                "labels": "<br>".join(f"<b>{html.escape(c)}</b>: {html.escape(', '.join(tags))}"
                                      for c, tags in by_category.items()),
                "seconds": round(len(audio) / rate, 2),
            })
    (release / CLIPS_STASH).unlink(missing_ok=True)
    return examples
