"""Streaming a release (`load_dataset(..., streaming=True)`) that reads one row group at a time and always exits.

    from conceptcaps import stream_release
    stream = stream_release("my-org/conceptcaps", "audio", split="train")
    for row in stream.take(10): ...

It is `load_dataset(source, config, split=split, streaming=True)` (the same builder, files, features, keys,
shuffling and splitting by node) with one thing changed: how a Parquet shard is read. datasets reads each
shard with pyarrow's `ParquetFileFragment.to_batches()` over a Python file object, which

- **reads the whole shard ahead** on pyarrow's threads whenever the loop is slower than the disk (a training
  loop is), whatever `batch_readahead` says: memory follows the shard, not the row group (a 545 MB shard of
  30-s clips: 1.6 GB for a slow loop, docs/release.md);
- **aborts or hangs the process at exit** when a stream is left part-way (`take`, `break`, an iterator still
  held): the reads still in flight call back into a Python that is shutting down ("terminate called without
  an active exception", "PyGILState_Release", exit 134): apache/arrow#45214. datasets works around it only
  for pyarrow <= 24 (huggingface/datasets#8176), and collecting or closing the stream at exit does not help
  while reads are in flight (measured: 4 of 4 runs still aborted or hung).

Here each shard is read with `ParquetFile.iter_batches`: a row group is read when the loop asks for it, on
the loop's own thread, so nothing is read ahead and nothing is in flight at exit. With `filters` or
`on_bad_files`, datasets' own reader is kept (those are its features).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.builder import Key
from datasets.packaged_modules.parquet.parquet import Parquet


def stream_release(source: str | Path, config: str = "audio", split: str = "train", **kwargs) -> datasets.IterableDataset:
    """`load_dataset(source, config, split=split, streaming=True, **kwargs)`, reading one row group at a time and
    exiting cleanly when left part-way (module docstring). `kwargs` are `load_dataset_builder`'s (revision, token,
    data_files, features, columns, ...); with `filters` or `on_bad_files` datasets' own Parquet reader is kept."""
    # What load_dataset(..., streaming=True) does, with the Parquet reader swapped on this one builder.
    kwargs.pop("streaming", None)  # it is what this does
    builder = datasets.load_dataset_builder(str(source), config, **kwargs)
    if isinstance(builder, Parquet) and builder.config.filters is None and builder.config.on_bad_files == "error":
        builder._generate_tables = RowGroupsInTurn(builder)
    return builder.as_streaming_dataset(split=split)


class RowGroupsInTurn:
    """datasets' `Parquet._generate_tables` (same keys, same casting), reading with `ParquetFile.iter_batches`:
    each row group is read when the loop asks for it, on the caller's thread, so nothing is read ahead (memory: one
    row group) and nothing is in flight when the interpreter exits. A class, not a bound function, so that the
    stream pickles (DataLoader workers started with spawn) with the reader still swapped."""

    def __init__(self, builder: Parquet):
        self.builder = builder

    def __call__(self, files, row_groups_list) -> Iterator[tuple[Key, pa.Table]]:
        builder = self.builder
        # datasets' streaming `open` (xopen: hf://, URLs), which it patches into its Parquet module
        open_file = vars(sys.modules[type(builder).__module__]).get("open", open)
        for file_idx, (file, row_groups) in enumerate(zip(files, row_groups_list)):
            with open_file(file, "rb") as f:
                parquet_file = pq.ParquetFile(f)
                groups = list(range(parquet_file.num_row_groups)) if row_groups is None else list(row_groups)
                if not groups:
                    continue
                batch_size = builder.config.batch_size or parquet_file.metadata.row_group(groups[0]).num_rows
                batches = parquet_file.iter_batches(batch_size=batch_size, row_groups=groups,
                                                    columns=builder.config.columns)
                for batch_idx, record_batch in enumerate(batches):
                    yield Key(file_idx, batch_idx), builder._cast_table(pa.Table.from_batches([record_batch]))
