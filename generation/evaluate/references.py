"""The reference clips of FAD (`conceptcaps evaluate --reference_audio`): a folder of audio files, a
dataset folder, or a Hub dataset id, read in chunks so that memory stays bounded.

    from conceptcaps_pipeline.evaluate.references import reference_clips
    description, chunks = reference_clips(EvaluateArguments(run="runs/demo", reference_audio="data/gtzan_clips"))

A wrong split, column or source fails here, with one clear error, before any long work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from conceptcaps_pipeline.errors import ConceptCapsError

if TYPE_CHECKING:  # annotations only: run.py imports this module
    from conceptcaps_pipeline.evaluate.run import EvaluateArguments

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff")  # what soundfile decodes
# A --reference_audio folder holding any of these is a dataset (datasets.load_dataset or load_from_disk),
# not a folder of clips: parquet/arrow/csv/json data files, an audiofolder's metadata.csv/jsonl.
DATASET_SUFFIXES = (".parquet", ".arrow", ".csv", ".json", ".jsonl")


def reference_clips(args: EvaluateArguments, chunk: int = 256):
    """(description, iterator of lists of audio items) of --reference_audio: file paths, or the
    {"bytes", "path"} items of a dataset's audio column, `chunk` at a time (memory stays bounded).

    A folder of audio files alone is read file by file (recursively, every clip); a folder holding
    data files (parquet, arrow, csv, json, an audiofolder's metadata) or a dataset saved with
    save_to_disk, and any other name (a Hub dataset id), are datasets: --reference_split and
    --reference_column say where the clips are. The split and column are checked, and the dataset
    loaded, here: call it before any long work."""
    source = args.reference_audio
    path = Path(source).expanduser()
    limit = args.max_reference_clips
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file())
        if not any(p.suffix.lower() in DATASET_SUFFIXES for p in found):
            files = [str(p) for p in found if p.suffix.lower() in AUDIO_SUFFIXES][:limit]
            if not files:
                raise ConceptCapsError(f"--reference_audio {source}: the folder holds no audio file "
                                       f"({', '.join(AUDIO_SUFFIXES)}) and no dataset; pass a folder of clips.")
            return f"{len(files)} audio files under {path}", (files[i : i + chunk] for i in range(0, len(files), chunk))
    elif path.exists() or source.startswith((".", "/", "~")):
        raise ConceptCapsError(f"--reference_audio {source}: not a folder of audio files, a dataset folder or a Hub "
                               f"dataset id. Pass a folder holding {', '.join(AUDIO_SUFFIXES)} files.")
    import datasets

    data = load_reference_dataset(args, path if path.is_dir() else None)
    column = args.reference_column
    data = data.select_columns([column])
    if isinstance(data.features[column], datasets.Audio):
        data = data.cast_column(column, datasets.Audio(decode=False))  # encoded bytes: the CLAP module decodes them
    n = len(data) if limit is None else min(limit, len(data))
    chunks = (list(data.select(range(i, min(i + chunk, n)))[column]) for i in range(0, n, chunk))
    return f"{n} clips of {source} ({args.reference_split})", chunks


def load_reference_dataset(args: EvaluateArguments, folder: Path | None):
    """The --reference_split of the --reference_audio dataset (a local folder, or a Hub id when `folder`
    is None), with --reference_column checked; one clear error when any of the three is wrong."""
    import datasets

    source, split, column = args.reference_audio, args.reference_split, args.reference_column

    def cannot_load(err: Exception) -> ConceptCapsError:
        return ConceptCapsError(
            f"cannot load --reference_audio {source!r} split {split!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Pass a local folder of audio files, a dataset folder, "
            f"or a Hub dataset id reachable from here (download it first where the Hub is reachable, "
            f"`hf download {source} --repo-type dataset --local-dir DIR`, then pass --reference_audio DIR).")

    def no_column(columns) -> ConceptCapsError:
        return ConceptCapsError(f"--reference_audio {source}: no column {column!r} in split {split!r} (columns: "
                                f"{', '.join(columns)}); pass --reference_column with the audio column.")

    if folder is not None and any((folder / n).exists() for n in ("state.json", "dataset_dict.json")):
        try:
            data = datasets.load_from_disk(str(folder))
        except Exception as err:  # a damaged save_to_disk folder
            raise cannot_load(err) from err
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ConceptCapsError(f"--reference_audio {source}: no split {split!r} (splits: {', '.join(data)}); "
                                       f"pass --reference_split with one of them.")
            data = data[split]
    else:
        name = str(folder) if folder is not None else source
        # The builder lists the splits (and, when the dataset card declares them, the columns) without
        # downloading the data: a wrong split or column fails before gigabytes of audio arrive.
        try:
            builder = datasets.load_dataset_builder(name)
        except Exception as err:  # not found, offline, a loading script (unsupported by datasets>=4), bad files
            raise cannot_load(err) from err
        splits = [str(s) for s in (builder.config.data_files or builder.info.splits or {})]
        if splits and split not in splits:
            raise ConceptCapsError(f"--reference_audio {source}: no split {split!r} (splits: {', '.join(splits)}); "
                                   f"pass --reference_split with one of them.")
        if builder.info.features is not None and column not in builder.info.features:
            raise no_column(builder.info.features)
        try:
            data = datasets.load_dataset(name, split=split)
        except Exception as err:  # load_dataset raises many types (offline, bad files)
            raise cannot_load(err) from err
    if column not in data.column_names:
        raise no_column(data.column_names)
    return data
