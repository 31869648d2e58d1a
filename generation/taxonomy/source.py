"""Read a tagged caption source (MusicCaps by default) into validated rows.

`--source` is a local CSV path or a Hub dataset id (`google/MusicCaps`). Each row needs
`ytid`, `aspect_list` (a Python-literal list of strings) and `caption`. Rows whose
`aspect_list` cannot be parsed are collected with their ytid and line number: the caller
either refuses them (the default) or skips them and records them in its manifest.
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from pathlib import Path

from conceptcaps_pipeline.errors import ConceptCapsError

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("ytid", "aspect_list", "caption")
HUB_DEFAULT = "google/MusicCaps"


@dataclass
class SourceRow:
    ytid: str
    caption: str
    aspect_list: list[str]


@dataclass
class BadRow:
    ytid: str
    line: int
    field: str
    value: str
    reason: str

    def describe(self) -> str:
        return f"line {self.line} (ytid {self.ytid!r}): field {self.field!r} = {self.value[:60]!r}: {self.reason}"


def _is_local(source: str) -> bool:
    return source.endswith((".csv", ".CSV")) or Path(source).exists() or "/" not in source or source.startswith((".", "/", "~"))


def _read_csv(path: Path) -> list[dict]:
    import pandas as pd

    if not path.exists():
        raise ConceptCapsError(
            f"source file {path} not found. Pass --source with the path of musiccaps-public.csv "
            f"(e.g. ../shared/data/musiccaps/musiccaps-public.csv) or the Hub id {HUB_DEFAULT}."
        )
    if path.stat().st_size == 0:
        raise ConceptCapsError(f"source file {path} is empty: it needs a header row with {list(REQUIRED_COLUMNS)} and data rows.")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConceptCapsError(
            f"source file {path} is not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at offset {err.start}): "
            f"re-encode it as UTF-8 (e.g. `iconv -f LATIN1 -t UTF-8`)."
        ) from None
    except Exception as err:  # pandas raises several types for a malformed CSV
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConceptCapsError(f"source file {path} is not a readable CSV ({reason}): check its quoting and delimiter.") from err
    _check_columns(list(frame.columns), str(path))
    if frame.empty:
        raise ConceptCapsError(f"source file {path} has a header but no data rows.")
    return frame.to_dict("records")


def _read_hub(repo_id: str) -> list[dict]:
    import datasets

    try:
        dataset = datasets.load_dataset(repo_id, split="train")
    except Exception as err:
        raise ConceptCapsError(
            f"could not load the Hub dataset {repo_id!r} ({type(err).__name__}: {err}). Offline, or without "
            f"access, pass a local CSV instead: --source PATH/musiccaps-public.csv "
            f"(or set MUSICCAPS_CSV for the README commands)."
        ) from err
    _check_columns(dataset.column_names, repo_id)
    rows = dataset.to_list()
    if not rows:
        raise ConceptCapsError(f"Hub dataset {repo_id!r} has no rows in its train split.")
    return rows


def _check_columns(columns: list[str], where: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ConceptCapsError(
            f"source {where} lacks column(s) {missing}; found {columns}. A source needs {list(REQUIRED_COLUMNS)} "
            f"(MusicCaps names), one row per clip, aspect_list as a Python-literal list of tags."
        )


MAX_FIELD_CHARS = 10_000  # a tag list longer than this is not a MusicCaps aspect_list


def _parse_aspects(value) -> list[str]:
    if isinstance(value, list):  # the Hub copy may already hold lists
        parsed = value
    else:
        text = str(value)
        if len(text) > MAX_FIELD_CHARS:
            raise ValueError(f"{len(text)} characters, more than {MAX_FIELD_CHARS}")
        parsed = ast.literal_eval(text)
    if not isinstance(parsed, (list, tuple)) or not all(isinstance(t, str) for t in parsed):
        raise ValueError("not a list of strings")
    return [t.strip() for t in parsed if t.strip()]


def read_source(source: str) -> tuple[list[SourceRow], list[BadRow]]:
    """Read every row; return the good ones and the unparsable ones (never dropped silently)."""
    raw_rows = _read_csv(Path(source).expanduser()) if _is_local(source) else _read_hub(source)
    rows, bad = [], []
    for number, raw in enumerate(raw_rows, start=2):  # line 1 is the CSV header
        ytid = str(raw.get("ytid") or "").strip()
        caption = str(raw.get("caption") or "").strip()
        if not ytid:
            bad.append(BadRow("", number, "ytid", "", "empty id"))
            continue
        try:
            aspects = _parse_aspects(raw.get("aspect_list"))
        except (ValueError, SyntaxError, RecursionError, MemoryError, TypeError) as err:
            reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0][:80]
            bad.append(BadRow(ytid, number, "aspect_list", str(raw.get("aspect_list")), f"unparsable ({reason})"))
            continue
        if not caption:
            bad.append(BadRow(ytid, number, "caption", "", "empty caption"))
            continue
        rows.append(SourceRow(ytid=ytid, caption=caption, aspect_list=aspects))
    return rows, bad
