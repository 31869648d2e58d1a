"""The manifests of a run, in pipeline order: what the dataset card and its licence are made from.

    from conceptcaps_pipeline.dataset_card.manifests import read_manifests
    manifests = read_manifests(Path("runs/demo"))   # {"distill": {...}, "vae_train": {...}, ...}

Its own module because both card.py and licence.py read them: neither imports the other for it.
"""

from __future__ import annotations

from pathlib import Path

from conceptcaps_pipeline.stages import STAGES

# Pipeline order of the manifests in RUN/manifests/: the stage table's order, by manifest name.
ORDER = {entry.record: i for i, entry in enumerate(STAGES)}


def read_manifests(run: Path) -> dict[str, dict]:
    """RUN/manifests/*.json by file stem, in pipeline order (unknown stages last, by name)."""
    from conceptcaps_pipeline.run_dir import read_json

    found = {p.stem: read_json(p, fix=f"delete it and re-run `conceptcaps {p.stem.replace('_', ' ')} --force`")
             for p in sorted((Path(run) / "manifests").glob("*.json"))}
    return dict(sorted(found.items(), key=lambda kv: (ORDER.get(kv[0], len(ORDER)), kv[0])))
