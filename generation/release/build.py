"""Write RUN/release/: Parquet shards per config and split, figures, and the dataset card.

    conceptcaps build --run runs/demo
    conceptcaps build --run runs/demo --repo_id my-org/conceptcaps --max_shard_size 500MB
    conceptcaps build --run runs/demo --audio false          # captions and labels only

The rows come from the `datasets` builder in conceptcaps.py, the one place that reads a run:
each config (`default`, `audio`, `25pct`, `25pct_audio`, `10pct`, `10pct_audio`) is prepared
with `ConceptCaps(config_name=..., data_dir=RUN).download_and_prepare(file_format="parquet",
max_shard_size=...)` and its shards are moved to
`RUN/release/data/<config>/<split>-NNNNN-of-NNNNN.parquet`. Then concepts.json, taxonomy.json
(with its source named by file name), LICENSE.md (which licence applies to which config, from the
models the run recorded), figures (`RUN/release/figures/`), a few example clips
(`RUN/release/examples/*.wav`) and the card (`RUN/release/README.md`, dataset_card/) are written
from the release itself and the run's manifests, so `load_dataset("RUN/release", "audio")` gives
the builder's rows and `conceptcaps push` uploads the folder as it is.

Re-running skips the Parquet shards when the captions, taxonomy, clips and data options are
unchanged, and always re-renders the card: run `conceptcaps build` again after
`conceptcaps evaluate` to put RUN/eval/metrics.json into the card. Writes
RUN/manifests/build.json.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import atomic_dir, file_sha256, read_manifest, require, stage, write_manifest

logger = logging.getLogger(__name__)

STAGE = "build"
RELEASE = "release"
TEXT_CONFIGS = ("default", "25pct", "10pct")
AUDIO_CONFIGS = ("audio", "25pct_audio", "10pct_audio")


@dataclass
class BuildArguments:
    run: str = field(metadata={"help": "Run directory with captions.parquet, taxonomy.json and audio/; writes RUN/release/."})
    audio: bool = field(
        default=True, metadata={"help": "Write the audio configs (audio, 25pct_audio, 10pct_audio); false: text configs only."}
    )
    max_shard_size: str = field(
        default="500MB", metadata={"help": "Largest Parquet shard, before compression (e.g. 500MB, 1GB)."}
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


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def _data_key(args: BuildArguments, run: Path) -> dict:
    """What the Parquet shards depend on: a rebuild with the same key reuses them."""
    import conceptcaps

    audio = hashlib.sha256()
    for shard in sorted((run / "audio").glob("shard-r*-*.parquet")):
        audio.update(f"{shard.name}:{shard.stat().st_size}".encode())
    builder_code = Path(conceptcaps.__file__)
    return {
        "captions": file_sha256(run / "captions.parquet"),
        "taxonomy": file_sha256(run / "taxonomy.json"),
        "audio_shards": audio.hexdigest() if args.audio else None,
        "builder": file_sha256(builder_code),
        "audio": args.audio,
        "max_shard_size": args.max_shard_size,
        "rows_per_group": args.rows_per_group,
    }


def _prepare_config(name: str, run: Path, data_dir: Path, work: Path, args: BuildArguments):
    """Prepare one config with the builder as Parquet; move its shards to data_dir/<name>/. Returns its DatasetInfo."""
    from conceptcaps import ConceptCaps

    # Why writer_batch_size: the builder checks the shard size only after each written batch,
    # so the batch (= the Parquet row group) bounds how far a shard can exceed max_shard_size.
    builder = ConceptCaps(config_name=name, data_dir=str(run), cache_dir=str(work / "cache"),
                          writer_batch_size=args.rows_per_group)
    prepared = work / name
    builder.download_and_prepare(output_dir=str(prepared), file_format="parquet", max_shard_size=args.max_shard_size)
    target = data_dir / name
    target.mkdir(parents=True)
    for split, info in builder.info.splits.items():
        # The builder names shards <name>-<split>[-NNNNN-of-NNNNN].parquet; one name scheme here.
        found = sorted(prepared.glob(f"{builder.dataset_name}-{split}*.parquet"))
        for index, path in enumerate(found):
            shutil.move(path, target / shard_name(split, index, len(found)))
        if not found:
            raise ConceptCapsError(f"config {name}: the builder wrote no shard for split {split} ({info.num_examples} rows).")
    return builder.info


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


def write_data(args: BuildArguments, run: Path, release: Path) -> dict:
    """Write release/data/ with every config, atomically; returns {config: DatasetInfo as YAML dict}."""
    from tqdm.auto import tqdm

    infos = {}
    release.mkdir(parents=True, exist_ok=True)
    with atomic_dir(release / "data") as data_dir, tempfile.TemporaryDirectory(prefix=".build-", dir=run) as work, \
            quiet_datasets_progress():
        for name in tqdm(config_names(args.audio), desc="build", unit="config"):
            info = _prepare_config(name, run, data_dir, Path(work), args)
            infos[name] = info._to_yaml_dict()
    return infos


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

    from conceptcaps import SPLITS

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
    from conceptcaps import SPLITS, SUBSETS, load_taxonomy, plan_run, subset_min_positives
    from conceptcaps_pipeline.dataset_card.card import public_taxonomy, stage_command, write_card

    from conceptcaps_pipeline.release.concepts import CONCEPTS_FILE, concepts_document
    from conceptcaps_pipeline.run_dir import remove_leftovers, write_json

    started = time.time()
    run = Path(args.run)
    require(run, "captions.parquet")
    require(run, "taxonomy.json")
    if args.audio:
        require(run, "audio")
    release = run / RELEASE
    # What an interrupted build left: its work folder, and half-written release files.
    for leftover in run.glob(".build-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if release.is_dir():
        remove_leftovers(release, ["data", "README.md", "concepts.json", "taxonomy.json", "LICENSE.md", "figures",
                                   "examples"])
    configs = config_names(args.audio)
    # Check the whole run (captions, tags, one clip per caption) before writing anything.
    taxonomy = load_taxonomy(run)
    assignment = plan_run(run, taxonomy.tags, with_audio=args.audio, check_headers=args.audio).assignment

    # 1. The Parquet shards, unless an identical build already wrote them.
    key = _data_key(args, run)
    previous = read_manifest(run, STAGE) or {}
    up_to_date = (previous.get("data_key") == key and (release / "data").is_dir()
                  and all((release / "data" / c).is_dir() for c in configs))
    if up_to_date and not args.force:
        logger.info("build: the Parquet shards in %s are up to date; re-rendering the card (--force rewrites them)", release)
        infos = previous["dataset_info"]
    else:
        infos = write_data(args, run, release)

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
    from conceptcaps import VERSION

    card = write_card(run, release, infos=infos, stats=stats, repo_id=args.repo_id, revision=args.revision,
                      build_command=stage_command(STAGE, {"stage": STAGE, "arguments": asdict(args)}, run),
                      code_url=args.code_url, card_authors=args.card_authors, contact=args.contact,
                      version=str(VERSION))

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
    return write_manifest(
        run, STAGE, asdict(args), inputs={"captions": run / "captions.parquet", "taxonomy": run / "taxonomy.json"},
        counts=counts, started=started,
        extra={"data_key": key, "dataset_info": infos, "card": str(card), "release_files": [str(f) for f in files],
               "license": licence.yaml, "tiny_models": licence.tiny_models},
    )
