"""The build record of a release: RELEASE/.build.json, written by `conceptcaps build` in the same swap as
the release's files, and the check of a release folder against it.

    from conceptcaps_pipeline.release.record import verify_release
    problems = verify_release(Path("runs/demo/release"))     # [] when the folder is what the build wrote

Its own module so that readers of a release (concept sets, push) need not import the build stage.
"""

from __future__ import annotations

from pathlib import Path

BUILD_RECORD = ".build.json"  # the build manifest, published inside the release in the same swap as its files


def verify_release(release: Path, configs: list[str] | None = None, *, data_only: bool = False) -> list[str]:
    """What differs between `release` and the build record published in it (missing, extra or changed files);
    one phrase per file, empty when it is the complete release a build wrote."""
    from conceptcaps_pipeline.run_dir import check_record

    path = release / BUILD_RECORD
    if not release.is_dir():
        return [f"{release} is missing"]
    if not path.is_file():
        return [f"{path} is missing (a release from before build records, or an interrupted build)"]
    try:
        import json

        record = json.loads(path.read_text(encoding="utf-8"))["release_record"]
        assert isinstance(record, dict)
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        return [f"{path} is not a build record"]
    if data_only:
        record = {k: v for k, v in record.items() if k.startswith("data/")}
        folders = ["data"]
    else:
        folders = ["."]
    problems = check_record(record, release, prefix="", folders=folders)
    if configs is not None:
        missing = [c for c in configs if not any(k.startswith(f"data/{c}/") for k in record)]
        problems += [f"config {c} has no shard" for c in missing]
    return problems
