"""Write RUN/release/: Parquet shards per config and split, figures, and the dataset card.

    conceptcaps build --run runs/demo
    conceptcaps build --run runs/demo --repo_id my-org/conceptcaps --max_shard_size 500MB
    conceptcaps build --run runs/demo --audio false          # captions and labels only

The rows are the `datasets` builder's (conceptcaps.py: features, configs, `make_example`), planned
once for every config (release/plan.py, release/splits.py) and written in one pass over the run's
audio shards (release/write.py): each source shard is read once and each clip goes to every config
(`default`, `audio`, `25pct`, `25pct_audio`, `10pct`, `10pct_audio`) and split that holds it, as
`RUN/release/data/<config>/<split>-NNNNN-of-NNNNN.parquet`. Then concepts.json, taxonomy.json
(with its source named by file name), LICENSE.md (which licence applies to which config, from the
models the run recorded), figures (`RUN/release/figures/`), a few example clips
(`RUN/release/examples/*.wav`) and the card (`RUN/release/README.md`, dataset_card/) are written
from the release itself and the run's manifests, so `load_dataset("RUN/release", "audio")` gives
the builder's rows and `conceptcaps push` uploads the folder as it is.

When the run was scored (`conceptcaps audio score`), the audio configs carry each row's per-label
evidence (`evidence`, aligned with `labels`) and concepts.json the per-concept agreement.

Re-running skips the Parquet shards when the captions, taxonomy, clips, evidence and data options are
unchanged, and always re-renders the card: run `conceptcaps build` again after
`conceptcaps evaluate` to put RUN/eval/metrics.json into the card. Writes
RUN/manifests/build.json.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.release.record import BUILD_RECORD, verify_release
from conceptcaps_pipeline.run_dir import (
    atomic_dir,
    check_upstream,
    file_sha256,
    read_manifest,
    remove_leftovers,
    require,
    stage,
    write_manifest,
)

logger = logging.getLogger(__name__)

STAGE = "build"
RELEASE = "release"
TEXT_CONFIGS = ("default", "25pct", "10pct")
AUDIO_CONFIGS = ("audio", "25pct_audio", "10pct_audio")
# What `conceptcaps audio score` leaves that the release carries: the per-label evidence (the audio configs'
# `evidence` column) and the per-concept agreement (concepts.json, the card's figure).
EVIDENCE = "audio_evidence/evidence.parquet"
AGREEMENT = "audio_evidence/agreement.json"


@dataclass
class BuildArguments:
    run: str = field(metadata={"help": "Run directory with captions.parquet, taxonomy.json and audio/; writes RUN/release/."})
    audio: bool = field(
        default=True, metadata={"help": "Write the audio configs (audio, 25pct_audio, 10pct_audio); false: text configs only."}
    )
    max_shard_size: str = field(
        default="128MB", metadata={"help": "Largest Parquet shard, before compression (e.g. 128MB, 500MB). Streaming reads a whole shard ahead of a slow loop, so this bounds a streaming reader's memory (docs/release.md)."}
    )
    rows_per_group: int = field(
        default=100, metadata={"help": "Rows per Parquet row group; a shard exceeds max_shard_size by at most one group."}
    )
    repo_id: str | None = field(
        default=None,
        metadata={"help": "Hub id the card's loading examples use (e.g. my-org/conceptcaps); default: the local release folder."},
    )
    revision: str = field(
        default="main",
        metadata={"help": "Hub revision (branch or tag) the card's audio players link to, with --repo_id; push to the same."},
    )
    code_url: str | None = field(default=None, metadata={"help": "Link to the code repository, for the card."})
    card_authors: str | None = field(default=None, metadata={"help": "Who is answerable for the card (names), for the card."})
    contact: str | None = field(
        default=None, metadata={"help": "How to reach the publisher; default: the Hub discussions of --repo_id."}
    )
    force: bool = field(default=False, metadata={"help": "Rewrite the Parquet shards even if they are up to date."})


def config_names(with_audio: bool) -> list[str]:
    """The configs a build writes: each text config followed by its audio twin."""
    if not with_audio:
        return list(TEXT_CONFIGS)
    return [name for pair in zip(TEXT_CONFIGS, AUDIO_CONFIGS) for name in pair]


def _data_key(args: BuildArguments, run: Path) -> dict:
    """What the Parquet shards depend on: a rebuild with the same key reuses them."""
    from importlib.util import find_spec

    from conceptcaps_pipeline.release import plan, rows, splits, write

    audio = hashlib.sha256()
    for shard in sorted((run / "audio").glob("shard-r*-*.parquet")):
        audio.update(f"{shard.name}:{shard.stat().st_size}".encode())
    # The code that decides the rows: the builder's features and rows, the plan, the splits, the writer.
    code = hashlib.sha256()
    # conceptcaps.py by its path: importing it here would close an import cycle through release.concepts.
    for path in (find_spec("conceptcaps").origin, *(m.__file__ for m in (plan, rows, splits, write))):
        code.update(file_sha256(Path(path)).encode())
    return {
        "captions": file_sha256(run / "captions.parquet"),
        "taxonomy": file_sha256(run / "taxonomy.json"),
        "audio_shards": audio.hexdigest() if args.audio else None,
        # The audio configs' `evidence` column: a rescored run rewrites the shards (no --force needed).
        "evidence": file_sha256(evidence) if args.audio and (evidence := run / EVIDENCE).is_file() else None,
        "builder": code.hexdigest(),
        "audio": args.audio,
        "max_shard_size": args.max_shard_size,
        "rows_per_group": args.rows_per_group,
    }


@contextmanager
def quiet_datasets_progress():
    """No progress bars from `datasets` inside (each config's splits would draw several under the build's bar);
    restores the previous setting on leaving."""
    from datasets.utils import logging as datasets_logging

    enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            datasets_logging.enable_progress_bar()


def write_data(args: BuildArguments, run: Path, release: Path, plan, taxonomy, evidence: dict | None = None) -> dict:
    """Write release/data/ with every config (`release` is the staged, not yet published folder) in one pass over
    the audio (release/write.py), with the `evidence` column in the audio configs when `evidence` is given
    ({id: {label: evidence}}, `rows.label_evidence`); returns {config: DatasetInfo as YAML dict}."""
    from conceptcaps_pipeline.release.write import write_configs

    with quiet_datasets_progress():
        infos = write_configs(plan, config_names(args.audio), taxonomy, release / "data",
                              max_shard_size=args.max_shard_size, rows_per_group=args.rows_per_group, run=run,
                              evidence=evidence)
    return {name: info._to_yaml_dict() for name, info in infos.items()}


def link_data(old: Path, new: Path) -> None:
    """Reuse the shards of the published release in the staged one: hard links (no copy), copies where the file
    system has none."""
    import os

    for path in sorted(old.rglob("*")):
        target = new / path.relative_to(old)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def release_files(release: str | Path) -> list[Path]:
    """Every file of a release folder, relative to it, sorted (what `push` uploads).

    Hidden paths (the temporary folder of an interrupted build) are not part of the release.
    """
    release = Path(release)
    files = (p.relative_to(release) for p in release.rglob("*") if p.is_file())
    return sorted(p for p in files if not any(part.startswith(".") for part in p.parts))


def release_statistics(release: Path, configs: list[str], unsatisfiable: dict[str, int]) -> dict:
    """Counts read back from the written shards: rows, files and bytes per config and split; ids, tags and label
    sets per split (of the default config)."""
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.release.splits import SPLITS

    rows = {c: {s: 0 for s in SPLITS} for c in configs}
    files = {c: {s: [] for s in SPLITS} for c in configs}
    size = {c: 0 for c in configs}
    for config in configs:
        for split in SPLITS:
            for path in sorted((release / "data" / config).glob(f"{split}-*.parquet")):
                rows[config][split] += pq.ParquetFile(path).metadata.num_rows
                files[config][split].append(path.relative_to(release).as_posix())
                size[config] += path.stat().st_size
    tag_counts = {s: Counter() for s in SPLITS}
    sets = {s: [] for s in SPLITS}
    ids = {s: [] for s in SPLITS}
    for split in SPLITS:
        for path in files["default"][split]:
            table = pq.read_table(release / path, columns=["id", "aspect_list"])
            for clip_id, tags in zip(table.column("id").to_pylist(), table.column("aspect_list").to_pylist()):
                tag_counts[split].update(tags)
                sets[split].append(tags)
                ids[split].append(clip_id)
    return {"rows": rows, "files": files, "bytes": size, "tag_counts": tag_counts, "aspect_lists": sets, "ids": ids,
            "unsatisfiable": unsatisfiable}


def check_arguments(args: BuildArguments) -> None:
    """--rows_per_group and --max_shard_size, before anything is read or written."""
    from datasets.utils.py_utils import convert_file_size_to_int

    if args.rows_per_group < 1:
        raise ConceptCapsError(f"--rows_per_group {args.rows_per_group}: give at least 1 row per Parquet row group.")
    try:
        size = convert_file_size_to_int(args.max_shard_size)
    except (ValueError, TypeError):
        size = None
    if not size or size <= 0:
        raise ConceptCapsError(f"--max_shard_size {args.max_shard_size!r}: give a positive size such as 500MB or 1GB.")


@stage(STAGE, check=check_arguments)
def build_release(args: BuildArguments) -> dict:
    """Run the stage: data (unless up to date), figures and card; returns the stage manifest."""
    from conceptcaps_pipeline.release.plan import load_taxonomy, plan_run
    from conceptcaps_pipeline.run_dir import write_json

    started = time.time()
    run = Path(args.run)
    require(run, "captions.parquet")
    require(run, "taxonomy.json")
    if args.audio:
        require(run, "audio")
    release = run / RELEASE
    # Captions made from attributes that changed since (vae sample --force after them) are refused, never built.
    check_upstream(run, _inputs(run))
    # What an interrupted build left: its work folder, and an unpublished or replaced release.
    for leftover in run.glob(".build-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    remove_leftovers(run, [RELEASE])
    configs = config_names(args.audio)
    # Check the whole run (captions, tags, one clip per caption) before writing anything.
    taxonomy = load_taxonomy(run)
    # Planned once for every config; the FLAC headers are checked in the one pass that writes the shards.
    plan = plan_run(run, taxonomy.tags, with_audio=args.audio)
    assignment = plan.assignment
    # The per-label evidence of `audio score`, if the run was scored; evidence of other clips is refused here.
    from conceptcaps_pipeline.release.rows import label_evidence

    evidence = label_evidence(run) if args.audio else None

    # 1. The Parquet shards, unless an identical build already wrote them (checked file by file against the
    #    record the build published with them). Everything is written into a staged copy of the release
    #    that replaces the old one in one swap: shards, card, LICENSE, concepts.json and the build record.
    key = _data_key(args, run)
    previous = read_manifest(run, STAGE) or {}
    reuse = False
    if previous.get("data_key") == key and not args.force:
        problems = verify_release(release, configs, data_only=True)
        reuse = not problems
        if problems:
            logger.warning("build: rewriting the Parquet shards: %s", "; ".join(problems[:3]))
    with atomic_dir(release) as staged:
        if reuse:
            logger.info("build: the Parquet shards in %s are up to date; re-rendering the card (--force rewrites them)",
                        release)
            link_data(release / "data", staged / "data")
            infos = previous["dataset_info"]
        else:
            infos = write_data(args, run, staged, plan, taxonomy, evidence)
        manifest = _describe(args, run, staged, configs, infos, assignment, taxonomy, key, started)
        write_json(staged / BUILD_RECORD, manifest)
    return write_manifest(run, STAGE, manifest["arguments"], inputs=_inputs(run), counts=manifest["counts"],
                          started=started, extra={k: v for k, v in manifest.items() if k in _EXTRA}, outputs=[])


_EXTRA = ("data_key", "dataset_info", "card", "release_files", "release_record", "license", "tiny_models")


def _inputs(run: Path) -> dict:
    # The evidence files too (when the run was scored): the record says what the release was built from, and
    # `check_upstream` refuses evidence that `audio score` made from older captions.
    scored = {name: run / path for name, path in (("evidence", EVIDENCE), ("agreement", AGREEMENT))
              if (run / path).is_file()}
    return {"captions": run / "captions.parquet", "taxonomy": run / "taxonomy.json", **scored}


def _describe(args, run, release, configs, infos, assignment, taxonomy, key, started) -> dict:
    """Figures, card, concepts.json and taxonomy.json into the staged `release`; returns the build manifest."""
    from conceptcaps_pipeline.dataset_card.card import public_taxonomy, stage_command, write_card
    from conceptcaps_pipeline.release.concepts import CONCEPTS_FILE, concepts_document
    from conceptcaps_pipeline.release.splits import SPLITS, SUBSETS, subset_min_positives
    from conceptcaps_pipeline.run_dir import file_record, make_manifest, write_json

    # 2. Statistics from the written release, then figures and the card.
    if assignment.unsatisfiable:
        logger.warning("build: %d tag(s) with >= 3 samples are not in every split (tag: its number of attribute sets; "
                       "fewer than 3 cannot be spread): %s", len(assignment.unsatisfiable), assignment.unsatisfiable)
    stats = release_statistics(release, configs, assignment.unsatisfiable)
    subset_rule = {name: subset_min_positives(fraction) for name, fraction in SUBSETS.items()}
    concepts = concepts_document(release, configs, list(SPLITS), taxonomy, subset_rule=subset_rule,
                                 unsatisfiable=assignment.unsatisfiable)
    from conceptcaps_pipeline.release.evidence import concepts_evidence  # per-concept label-audio agreement

    if (evidence := concepts_evidence(run)) is not None:
        concepts["evidence"] = evidence
    write_json(release / CONCEPTS_FILE, concepts)
    write_json(release / "taxonomy.json", public_taxonomy(run))
    stats["concepts"] = concepts
    from conceptcaps_pipeline.release.rows import VERSION

    write_card(run, release, infos=infos, stats=stats, repo_id=args.repo_id, revision=args.revision,
               build_command=stage_command(STAGE, {"stage": STAGE, "arguments": asdict(args)}, run),
               code_url=args.code_url, card_authors=args.card_authors, contact=args.contact, version=str(VERSION))

    from conceptcaps_pipeline.dataset_card.licence import release_licence

    licence = release_licence(run, configs)
    files = release_files(release)
    counts = {
        "configs": configs,
        "rows": stats["rows"],
        "files": len(files),
        "bytes": sum((release / f).stat().st_size for f in files),
        "unsatisfiable_tags": assignment.unsatisfiable,
    }
    logger.info("build: %s written (%d files, %.1f MB): %s", release, counts["files"], counts["bytes"] / 1e6,
                {c: stats["rows"][c] for c in ("default",)})
    return make_manifest(
        run, STAGE, asdict(args), inputs=_inputs(run), counts=counts, started=started, outputs=[],
        extra={"data_key": key, "dataset_info": infos, "card": f"RUN/{RELEASE}/README.md",
               "release_files": [str(f) for f in files], "license": licence.yaml, "tiny_models": licence.tiny_models,
               # The commit record of the release: every file's size, sha256 and row count (push checks it).
               "release_record": file_record([release / f for f in files], release, prefix="")},
    )
