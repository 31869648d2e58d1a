"""Write concept sets of a release as files: audio folders in the TCAV layout, or JSON id lists.

    conceptcaps concepts export --run runs/demo --tags piano "slow tempo" --format tcav
    conceptcaps concepts export --run runs/demo --dest sets/ --tags piano --format ids --n 50 --n_random 20
    conceptcaps concepts export --run probe --dataset my-org/conceptcaps --tags jazz --split validation
    conceptcaps concepts export --run runs/demo --tags piano --min_evidence 0.75   # positives CLAP hears piano in

Reads the `audio` config of RUN/release (or --dataset: a release folder or Hub dataset id).

`--format tcav` writes the layout that the `tcav` package and captum's TCAV tutorials read:
`OUT/<tag>/<id>.wav` (--n clips holding the tag) and `OUT/random500_<k>/<id>.wav` (--n_random
random sets of --random_size clips holding none of the exported tags), WAV at the release's
sampling rate. `--format ids` writes `OUT/concept_sets.json` with the same sets as id lists
(no audio is read). Both write `OUT/concept_sets.json`, so the sets can be traced back to the
release; the same seed gives the same sets, and the same as `concept_sets(ds, tags, ...)` in Python
(one function draws both). Random sets hold none of the exported tags and are disjoint when the
split allows; clips that are positives of two exported concepts are listed under
`shared_positives`. `--min_evidence q` draws positives only from clips whose evidence for the tag
is >= q (the release's `evidence` column, else RUN/audio_evidence/ when RUN/release is read; else
an error saying to run `conceptcaps audio score`); random sets still avoid every labelled clip, and
concept_sets.json's `evidence` says how many positives remained. Writes into a temporary folder and renames it, so
an interrupted export leaves no partial OUT.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import stage

logger = logging.getLogger(__name__)

FORMATS = ("tcav", "ids")
MARKER = "concept_sets.json"  # every export holds it: what --force may replace
RANDOM_PREFIX = "random500_"  # the name the tcav package looks for, whatever the set size


@dataclass
class ExportArguments:
    run: str = field(metadata={"help": "Run directory: reads RUN/release (unless --dataset); default --dest RUN/concepts."})
    tags: list[str] = field(default_factory=list, metadata={"help": "Taxonomy tags to export, e.g. piano 'slow tempo'."})
    format: str = field(default="tcav", metadata={"help": "tcav (<tag>/*.wav and random500_<k>/*.wav) or ids (JSON)."})
    dest: str | None = field(default=None, metadata={"help": "Folder the sets are written to (default RUN/concepts); "
                                                             "must not exist yet unless --force, which replaces only an "
                                                             "earlier export, never the run or another stage's folder."})
    # Why renamed: every other stage's --out (distill, run) names the run itself, and `--out RUN --force` read as
    # "write into the run" once replaced the whole run. --out still works for old scripts, with a warning.
    out: str | None = field(default=None, metadata={"help": "Deprecated spelling of --dest."})
    dataset: str | None = field(default=None, metadata={"help": "A release folder or Hub dataset id (default RUN/release)."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of --dataset (branch, tag or commit)."})
    split: str = field(default="train", metadata={"help": "Split the sets come from."})
    n: int = field(default=50, metadata={"help": "Clips per concept set (the paper's concept-set size: 50)."})
    n_random: int = field(default=10, metadata={"help": "Random sets (holding none of the exported tags)."})
    random_size: int | None = field(default=None, metadata={"help": "Clips per random set (default: --n)."})
    seed: int = field(default=0, metadata={"help": "The same seed gives the same sets."})
    min_evidence: float = field(default=0.0, metadata={"help": "Draw positives only from clips whose evidence for "
                                                                "the tag (its CLAP rank percentile in its category, "
                                                                "`conceptcaps audio score`) is >= this; 0: every "
                                                                "positive, no evidence read."})
    force: bool = field(default=False, metadata={"help": "Replace an existing output folder."})


def safe_name(tag: str) -> str:
    """A folder name for a tag: letters, digits, '-', '_' and '&' kept, spaces to '_' ("slow tempo" -> slow_tempo)."""
    return re.sub(r"[^\w&-]+", "_", tag.strip()).strip("_") or "tag"


def choose_sets(dataset, args: ExportArguments, evidence=None) -> dict:
    """The sets of the split: `release.concepts.choose_sets`, the function behind `concept_sets()` too.

    With --min_evidence, positives come from the clips whose evidence reaches it (`evidence`: a scored
    run directory, or None for the release's `evidence` column); the result's "evidence" says how
    many remain per tag."""
    from conceptcaps_pipeline.release.concepts import choose_sets as choose
    from conceptcaps_pipeline.release.concepts import select_by_evidence, tag_mask

    what = f" in split {args.split!r}"
    masks = {tag: tag_mask(dataset, tag) for tag in args.tags}
    eligible, report = None, None
    if args.min_evidence > 0:
        eligible, report = select_by_evidence(dataset, masks, args.min_evidence, evidence, what)
    sets = choose(masks, args.n, args.n_random, args.random_size, args.seed, what=what, eligible=eligible,
                  min_evidence=args.min_evidence)
    return {**sets, "evidence": report}


def write_wavs(dataset, indices: list[int], folder: Path, audio=None) -> int:
    """Decode the stored FLAC of each row and write `<id>.wav` (16-bit PCM) into `folder`; returns the count.

    `audio` (a `release.concepts.SplitAudio`) reads the clips from the release's Parquet files, one
    at a time as they are written (memory holds one row group); without it they come from the
    split's own audio column (a Hub dataset)."""
    import io

    import datasets
    import soundfile as sf
    from conceptcaps_pipeline.audio.shards import decode_flac

    folder.mkdir(parents=True, exist_ok=True)
    ids = dataset.select(indices)["id"]
    if audio is not None:
        stored = (audio.rows([i])[0] for i in indices)
    else:
        raw = dataset.select_columns(["audio"]).cast_column("audio", datasets.Audio(decode=False))
        stored = (raw[int(i)]["audio"] for i in indices)
    for clip_id, clip in zip(ids, stored):
        if not clip.get("bytes"):
            raise ConceptCapsError(f"clip {clip_id!r} has no stored audio bytes: rebuild the release with audio.")
        samples, rate = decode_flac(clip["bytes"])
        # Encoded in memory, then written by Python: libsndfile reports a full disk as "System error",
        # which hides ENOSPC; Python's write raises the OSError the CLI turns into one line.
        wav = io.BytesIO()
        sf.write(wav, samples.T, rate, subtype="PCM_16", format="WAV")
        (folder / f"{safe_name(clip_id)}.wav").write_bytes(wav.getbuffer())
    return len(indices)


def destination(args: ExportArguments, warn: bool = True) -> Path:
    """The folder the sets go to: --dest (or the deprecated --out), default RUN/concepts; never the run or above it."""
    if args.dest and args.out and args.dest != args.out:
        raise ConceptCapsError(f"--dest {args.dest} and --out {args.out}: --out is the deprecated spelling of --dest; "
                               f"give only --dest.")
    if args.out and not args.dest and warn:
        logger.warning("concepts export: --out is deprecated (it reads like the run directory); use --dest %s", args.out)
    out = Path(args.dest or args.out) if (args.dest or args.out) else Path(args.run) / "concepts"
    flag = "--dest" if args.dest or not args.out else "--out"
    run, where = Path(args.run).resolve(), out.resolve()
    if where == run or where in run.parents:
        raise ConceptCapsError(f"{flag} {out} is the run directory {args.run}{'' if where == run else ' or holds it'}: "
                               f"the sets need a folder of their own, e.g. --dest {Path(args.run) / 'concepts'} or "
                               f"--dest sets/.")
    return out


def check_arguments(args: ExportArguments) -> None:
    """One clear error for a bad option or a --dest it may not replace, before the lock is taken."""
    from conceptcaps_pipeline.run_dir import check_replaceable

    if args.format not in FORMATS:
        raise ConceptCapsError(f"--format {args.format!r}: use one of {', '.join(FORMATS)}.")
    if not args.tags:
        raise ConceptCapsError("--tags is required: name the concepts to export, e.g. --tags piano 'slow tempo'.")
    if args.n < 1 or args.n_random < 0 or (args.random_size is not None and args.random_size < 1):
        raise ConceptCapsError(f"--n ({args.n}) and --random_size must be positive, --n_random ({args.n_random}) >= 0.")
    from conceptcaps_pipeline.release.evidence import check_min_evidence

    check_min_evidence(args.min_evidence)
    out = destination(args)
    if out.exists() and not args.force:
        raise ConceptCapsError(f"{out} exists: pass --force to replace it, or another --dest.")
    # --force replaces only an earlier export (it holds concept_sets.json): never the run, the release or a user's folder.
    check_replaceable(out, MARKER)


@stage("concepts_export", check=check_arguments)
def export_concepts(args: ExportArguments) -> dict:
    """Run the command: choose the sets, write them atomically; returns what was written."""
    from conceptcaps_pipeline.release.concepts import load_release, load_release_lean
    from conceptcaps_pipeline.run_dir import atomic_dir, write_json

    started = time.time()
    run = Path(args.run)
    out = destination(args, warn=False)  # check_arguments warned about --out already
    source = args.dataset or str(run / "release")
    if not args.dataset and not (run / "release").is_dir():
        raise ConceptCapsError(f"{run / 'release'} not found: run `conceptcaps build --run {run}` first, or pass --dataset.")
    config = "audio" if args.format == "tcav" else "default"
    audio = None  # a local release's clips stay in its Parquet files until written (no Arrow copy of the split)
    try:
        if config == "audio":
            dataset, audio = load_release_lean(source, config, args.split, args.revision)
        else:
            dataset = load_release(source, config, args.split, args.revision)
    except (ValueError, FileNotFoundError) as err:
        raise ConceptCapsError(f"cannot read split {args.split!r} of the {config!r} config of {source}: "
                               f"{str(err).splitlines()[0]}") from err

    evidence = None
    if args.min_evidence > 0:  # the release's evidence column, else RUN/audio_evidence when RUN/release is read
        from conceptcaps_pipeline.release.concepts import run_evidence

        reads_run_release = not args.dataset or Path(args.dataset).resolve() == (run / "release").resolve()
        evidence = run_evidence(dataset, run, reads_run_release, args.min_evidence)
    sets = choose_sets(dataset, args, evidence)
    ids = dataset["id"]
    listing = {
        "source": args.dataset or "RUN/release", "revision": args.revision, "split": args.split, "seed": args.seed,
        "arguments": {k: v for k, v in asdict(args).items() if k not in ("run", "dest", "out", "force")},
        "concepts": {tag: [ids[i] for i in rows] for tag, rows in sets["concepts"].items()},
        "random": {f"{RANDOM_PREFIX}{k}": [ids[i] for i in rows] for k, rows in enumerate(sets["random"])},
        # Random sets hold none of these tags; clips that are positives of two exported concepts are listed.
        "random_excludes": sets["random_excludes"],
        "random_sets_overlap": sets["overlapping_random"],
        "shared_positives": {pair: [ids[i] for i in rows] for pair, rows in sets["shared"].items()},
        # With --min_evidence: the threshold, where the evidence came from and, per tag, the labelled
        # positives, how many reach it (what the positives were drawn from) and how many had none.
        "evidence": sets["evidence"],
    }
    clips = 0
    with atomic_dir(out, marker=MARKER) as tmp:
        if args.format == "tcav":
            for tag, rows in sets["concepts"].items():
                clips += write_wavs(dataset, rows, tmp / safe_name(tag), audio)
            for k, rows in enumerate(sets["random"]):
                clips += write_wavs(dataset, rows, tmp / f"{RANDOM_PREFIX}{k}", audio)
            listing["folders"] = {tag: safe_name(tag) for tag in sets["concepts"]}
        write_json(tmp / MARKER, listing)
    logger.info("concepts export: %d concept set(s) and %d random set(s) of split %s written to %s (%d wav files)",
                len(sets["concepts"]), len(sets["random"]), args.split, out, clips)
    result = {"out": str(out), "concepts": len(sets["concepts"]), "random": len(sets["random"]), "wav_files": clips,
              "wall_time_s": round(time.time() - started, 2)}
    if sets["evidence"]:
        result["evidence_kept"] = {tag: c["kept"] for tag, c in sets["evidence"]["concepts"].items()}
    return result
