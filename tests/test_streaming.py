"""Streaming the audio config of a release with the paper-size shard layout ends cleanly, every time.

At paper size a 500 MB audio shard holds ~45 row groups of 100 rows; the README's example (filter,
take 10) stops part-way through it. With pyarrow 26 and datasets 5.2 that aborted the process at
exit ("terminate called without an active exception", exit 134) or hung it in about half the runs
(docs/release.md, "Streaming"). Here: the same layout from short synthetic clips (bytes stay small),
streamed in 5 fresh processes through `conceptcaps.stream_release`, and 3 more holding an unfinished
iterator; each must exit 0, and nothing is read ahead of the loop.
"""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

SCRIPT = """
import sys
from conceptcaps import stream_release

stream = stream_release(sys.argv[1], "audio", split="train")
names = stream.features["labels"].feature.names
tag = sys.argv[2]
rows = 0
for row in stream.filter(lambda r: names.index(tag) in r["labels"]).take(10):
    rows += row["audio"]["array"].size > 0
print("rows", rows)
"""

# An iterator still suspended in the first shard when the script ends (no loop, no take), after a pause in which
# a reader with threads would read ahead; prints the rows and the MB read (read() calls) by the loop.
HELD = """
import sys, time
from conceptcaps import stream_release


def read_mb():
    with open("/proc/self/io") as io:
        return int(io.readline().split()[1]) / 1e6

import torch, torchcodec  # imported up front, so that read() counts only the shard (decoding imports them)
iterator = iter(stream_release(sys.argv[1], "audio", split="train"))
before = read_mb()
rows = sum(next(iterator)["audio"]["array"].size > 0 for _ in range(int(sys.argv[2])))
time.sleep(1)
print(rows, read_mb() - before)
"""


@pytest.fixture(scope="module")
def paper_layout_release(tmp_path_factory, distilled_run):
    """A release whose audio train split is one shard of ~45 row groups of 100 rows (the layout of a 500 MB shard)."""
    import shutil

    from conceptcaps_pipeline.release.build import BuildArguments, build_release
    from conceptcaps_pipeline.testing.synthetic_run import write_audio, write_captions

    run = tmp_path_factory.mktemp("paper_layout") / "run"
    shutil.copytree(distilled_run, run)
    write_captions(run, 6400)
    write_audio(run, seconds=0.05, sampling_rate=8000, batch=256)
    build_release(BuildArguments(run=str(run), max_shard_size="500MB", rows_per_group=100))
    return run / "release"


@pytest.fixture(scope="module")
def heavy_release(tmp_path_factory, paper_layout_release):
    """The release above with the bytes of a 500 MB shard: every train clip replaced by one ~100 KB FLAC clip
    (45 row groups of ~10 MB, as 100 two-second 32 kHz clips make). Written straight with pyarrow: encoding and
    building 4,500 real clips would take minutes. On such a shard, plain `load_dataset(..., streaming=True)` left
    part-way aborted or hung at exit in 4 of 4 runs (docs/release.md)."""
    import io
    import shutil

    import numpy as np
    import pyarrow as pa
    import soundfile as sf

    release = tmp_path_factory.mktemp("heavy") / "release"
    shutil.copytree(paper_layout_release, release)
    shard = next((release / "data" / "audio").glob("train-*.parquet"))
    table = pq.read_table(shard)
    sampling_rate = 8000  # the fixture's clips' rate, which the card's features state
    noise = np.random.default_rng(0).normal(0, 0.3, sampling_rate * 7).clip(-1, 1).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, noise, sampling_rate, format="FLAC")
    clip = buffer.getvalue()
    audio = pa.array([{"bytes": clip, "path": f"{i}.flac"} for i in table.column("id").to_pylist()],
                     type=table.schema.field("audio").type)
    table = table.set_column(table.schema.get_field_index("audio"), table.schema.field("audio"), audio)
    pq.write_table(table, shard, row_group_size=100, compression="none", use_dictionary=False)
    return release


def test_paper_layout(heavy_release):
    shards = sorted((heavy_release / "data" / "audio").glob("train-*.parquet"))
    assert len(shards) == 1
    meta = pq.ParquetFile(shards[0]).metadata
    assert meta.num_row_groups >= 40 and meta.row_group(0).num_rows == 100
    assert shards[0].stat().st_size > 400e6


def test_streaming_exits_cleanly_five_times(heavy_release):
    import json

    concepts = json.loads((heavy_release / "concepts.json").read_text())
    counts = {c["tag"]: c["positives"]["audio"]["train"] for c in concepts["concepts"]}
    tag = max(counts, key=counts.get)  # a common tag: the stream stops early in the first shard
    # Five fresh processes at once (each its own interpreter exit), so the test stays short.
    results = run_all([[sys.executable, "-c", SCRIPT, str(heavy_release), tag]] * 5)
    assert [r[0] for r in results] == [0] * 5, results
    assert all(r[1] == "rows 10" for r in results), results


def test_held_iterator_exits_cleanly_and_reads_no_further(heavy_release):
    """`it = iter(stream)` still suspended at exit, after a pause: nothing read ahead (datasets' own reader reads
    the rest of the 450 MB shard during the pause) and exit 0 (it aborted or hung)."""
    results = run_all([[sys.executable, "-c", HELD, str(heavy_release), "150"]] * 3)
    assert [r[0] for r in results] == [0] * 3, results
    for _, out, _ in results:
        rows, read_mb = out.split()
        assert rows == "150" and float(read_mb) < 60, out  # 33 MB: row groups of ~11 MB; datasets' reader: 390-480 MB


def test_same_rows_as_load_dataset(paper_layout_release):
    import datasets

    from conceptcaps import stream_release

    ours = [row["id"] for row in stream_release(paper_layout_release, "default", split="train")]
    theirs = [row["id"] for row in datasets.load_dataset(str(paper_layout_release), "default", split="train",
                                                         streaming=True)]
    assert ours == theirs and len(ours) > 4000
    shuffled = stream_release(paper_layout_release, "default", split="train").shuffle(seed=3, buffer_size=50)
    assert sorted(row["id"] for row in shuffled) == sorted(ours)


def test_stream_pickles_with_its_reader(paper_layout_release):
    """DataLoader workers started with spawn get the stream pickled: the row-group reader must come with it."""
    import pickle

    from conceptcaps_pipeline.release.stream import RowGroupsInTurn

    from conceptcaps import stream_release

    stream = stream_release(paper_layout_release, "default", split="train")
    copy = pickle.loads(pickle.dumps(stream))
    source = copy._ex_iterable
    while hasattr(source, "ex_iterable"):
        source = source.ex_iterable
    assert isinstance(source.generate_tables_fn, RowGroupsInTurn)
    assert [row["id"] for row in copy.take(300)] == [row["id"] for row in stream.take(300)]


def run_all(commands: list[list[str]]) -> list[tuple[int, str, str]]:
    """Start every command at once; (exit code, stdout, stderr tail) of each, a hang at exit killed after 120 s."""
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for command in commands]
    results = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # the other failure mode: a hang at exit
            process.kill()
            out, err = process.communicate()
        results.append((process.returncode, out.strip(), err.strip()[-300:]))
    return results
