"""Check RUN/audio/ against RUN/captions.parquet: one sound, decodable clip per caption.

    conceptcaps audio verify --run runs/demo
    conceptcaps audio verify --run runs/demo --min_rms 0.001 --max_clipped_fraction 0.001
    conceptcaps audio verify --run runs/demo --repair --dry_run   # what --repair would set aside
    conceptcaps audio verify --run runs/demo --repair             # set failing clips aside, then generate

Checks, per caption id: exactly one clip (none = missing, several = duplicate); the clip was made
from the caption as it is now (stale: the caption changed, or an older clip carries no caption
fingerprint) with the run's settings (settings: clips of several settings in one run); the FLAC
bytes decode (soundfile) at the stored sampling rate; the duration is within one codec frame of
the target (`--duration`, else the one `audio generate` recorded in its manifest); no NaN/Inf;
not silent (RMS after removing any DC offset at least `--min_rms`); not clipped (at most
`--max_clipped_fraction` of the samples at full scale). Clips whose id is not a caption are
reported as unexpected. Prints a summary table and the failing ids; when anything fails, exits
with status 2 (every id and reason is in RUN/manifests/audio_verify.json).

`--repair` destroys nothing: the failing clips (and the later copies of a duplicate) are moved
with their shards to RUN/.set-aside/audio_verify/<time>/ and the shards' good clips are
written back, so `conceptcaps audio generate` makes the failing ones again; the set-aside
folder is removed by the next verify that passes. `--dry_run` shows what it would move. A
repair of more than `--max_repair_fraction` of the clips (default 5%: a wrong threshold or
--duration would otherwise empty the run) needs `--confirm_repair`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from conceptcaps_pipeline.audio.shards import INDEX_COLUMNS, decode_flac, read_shards, shard_paths
from conceptcaps_pipeline.errors import ConceptCapsError
from conceptcaps_pipeline.run_dir import read_manifest, require, stage, write_manifest

logger = logging.getLogger(__name__)

CHECKS = ("missing", "duplicate", "unexpected", "stale", "settings", "undecodable", "duration", "non_finite", "silent",
          "clipped")
STAGE = "audio_verify"


@dataclass
class VerifyArguments:
    run: str = field(metadata={"help": "Run directory with captions.parquet and audio/."})
    duration: float | None = field(
        default=None, metadata={"help": "Target seconds per clip; default: the --duration `audio generate` used."})
    frame_rate: float | None = field(
        default=None,
        metadata={"help": "Codec frames per second (the duration tolerance is one frame); default: from the "
                          "audio manifest, else 50 (EnCodec 32 kHz)."})
    min_rms: float = field(default=1e-3, metadata={"help": "Silent below this RMS (full scale = 1; 1e-3 = -60 dBFS)."})
    clip_level: float = field(default=0.999, metadata={"help": "A sample at or above this |value| counts as clipped."})
    max_clipped_fraction: float = field(default=1e-3, metadata={"help": "Most clipped samples allowed per clip."})
    repair: bool = field(default=False, metadata={"help": "Set failing and duplicate clips aside (recoverably), so that "
                                                          "`audio generate` makes them again."})
    dry_run: bool = field(default=False, metadata={"help": "With --repair: show what would be set aside, change nothing."})
    max_repair_fraction: float = field(default=0.05, metadata={"help": "Largest share of the clips --repair sets aside "
                                                                       "without --confirm_repair."})
    confirm_repair: bool = field(default=False, metadata={"help": "Let --repair set aside more than "
                                                                  "--max_repair_fraction of the clips."})


def check_clip(data: bytes, sampling_rate: int, *, target_s: float, tolerance_s: float, min_rms: float,
               clip_level: float, max_clipped_fraction: float) -> list[str]:
    """The checks one clip fails (empty when it is fine)."""
    try:
        audio, rate = decode_flac(data)
    except Exception as err:  # noqa: BLE001 - any decoder error means the same thing here
        return [f"undecodable ({type(err).__name__})"]
    if rate != sampling_rate or audio.size == 0:
        return [f"undecodable (rate {rate} Hz vs {sampling_rate} Hz stored, {audio.shape[-1]} samples)"]
    failures = []
    seconds = audio.shape[-1] / rate
    if abs(seconds - target_s) > tolerance_s + 1e-9:
        failures.append(f"duration ({seconds:.3f} s, target {target_s:.3f} +- {tolerance_s:.3f} s)")
    if not np.isfinite(audio).all():
        return failures + ["non_finite"]
    # RMS around the mean: a constant offset is silence to the ear.
    rms = float(np.sqrt(np.mean((audio - audio.mean(axis=-1, keepdims=True)) ** 2)))
    if rms < min_rms:
        failures.append(f"silent (RMS {rms:.2e} < {min_rms:.0e})")
    clipped = float(np.mean(np.abs(audio) >= clip_level))
    if clipped > max_clipped_fraction:
        failures.append(f"clipped ({clipped:.2%} of samples at full scale)")
    return failures


def _targets(args: VerifyArguments, run: Path) -> tuple[float, float]:
    """(target seconds, tolerance seconds) from the arguments or the audio manifest."""
    manifest = read_manifest(run, "audio") or {}
    codec = manifest.get("codec", {})
    frame_rate = args.frame_rate or codec.get("frame_rate") or 50.0
    duration = args.duration if args.duration is not None else manifest.get("arguments", {}).get("duration")
    if duration is None:
        raise ConceptCapsError(
            f"{run}/manifests/audio.json is missing, so the target duration is unknown: pass --duration SECONDS.")
    # The generator makes a whole number of frames: round(duration * frame_rate).
    return round(duration * frame_rate) / frame_rate, 1.0 / frame_rate


def check_arguments(args: VerifyArguments) -> None:
    checks = [
        (args.duration is None or args.duration > 0, f"--duration {args.duration}: give a positive number of seconds."),
        (args.frame_rate is None or args.frame_rate > 0, f"--frame_rate {args.frame_rate}: give a positive rate."),
        (args.min_rms >= 0, f"--min_rms {args.min_rms}: give 0 or more (1 = full scale)."),
        (0 < args.clip_level <= 1, f"--clip_level {args.clip_level}: give a level in (0, 1]."),
        (0 <= args.max_clipped_fraction <= 1, f"--max_clipped_fraction {args.max_clipped_fraction}: give a share in [0, 1]."),
        (0 <= args.max_repair_fraction <= 1, f"--max_repair_fraction {args.max_repair_fraction}: give a share in [0, 1]."),
        (not args.dry_run or args.repair, "--dry_run shows what --repair would do: pass --repair as well."),
    ]
    for ok, message in checks:
        if not ok:
            raise ConceptCapsError(message)


def check_run(args: VerifyArguments) -> None:
    """The options, and the captions and clips to check: before the lock is taken."""
    check_arguments(args)
    require(args.run, "captions.parquet")
    require(args.run, "audio")


@stage(STAGE, check=check_run, lock="audio")  # audio generate's lock: no clip is written or moved while it is checked
def verify_audio(args: VerifyArguments) -> dict:
    """Check every clip; print the summary; raise ConceptCapsError naming what fails."""
    import pyarrow.parquet as pq
    from conceptcaps_pipeline.audio.shards import caption_sha256
    from conceptcaps_pipeline.run_dir import drop_set_aside, read_table
    from tqdm.auto import tqdm

    started = time.time()
    run = Path(args.run)
    captions_path = run / "captions.parquet"
    captions = read_table(captions_path, ["id", "caption"], fix=f"re-run `conceptcaps captions generate --run {run}`")
    fingerprints = {i: caption_sha256(str(c)) for i, c in zip(captions.column("id").to_pylist(),
                                                               captions.column("caption").to_pylist())}
    wanted = set(fingerprints)
    target_s, tolerance_s = _targets(args, run)

    # The index (no audio) for the set checks; the audio is then read one shard at a time so
    # that memory stays at one shard whatever the size of the run.
    index = read_shards(run / "audio", columns=INDEX_COLUMNS)
    ids = index.column("id").to_pylist()
    shards = index.column("shard").to_pylist()
    rates = index.column("sampling_rate").to_pylist()
    made_from = index.column("caption_sha256").to_pylist()
    settings = index.column("settings").to_pylist()
    problems: dict[str, list[str]] = defaultdict(list)
    bad_rows: set[int] = set()
    for clip_id in sorted(wanted - set(ids)):
        problems[clip_id].append("missing")
    common = Counter(s for s in settings if s).most_common(1)
    usual = common[0][0] if common else None
    kept: dict[str, int] = {}
    for row, clip_id in enumerate(ids):
        if clip_id not in wanted:
            problems[clip_id].append(f"unexpected (not in captions.parquet; {shards[row]})")
            bad_rows.add(row)
            continue
        if made_from[row] != fingerprints[clip_id]:
            why = "made from an older caption" if made_from[row] else "no caption fingerprint (an older version)"
            problems[clip_id].append(f"stale ({why}; {shards[row]})")
            bad_rows.add(row)
        elif settings[row] != usual:
            problems[clip_id].append(f"settings (made with {settings[row] or 'unrecorded settings'}, the run's "
                                     f"other clips with {usual}; {shards[row]})")
            bad_rows.add(row)
        elif clip_id in kept:
            bad_rows.add(row)  # a second good copy: --repair keeps the first
        else:
            kept[clip_id] = row
    for clip_id, n in Counter(ids).items():
        if n > 1 and clip_id in wanted:
            problems[clip_id].append(f"duplicate ({n} clips)")

    seconds = 0.0
    progress = tqdm(total=index.num_rows, desc="verify", unit="clip", disable=index.num_rows < 100)
    row = 0
    for path in shard_paths(run / "audio"):
        for data in pq.read_table(path, columns=["audio"]).column("audio").to_pylist():
            failures = check_clip(data, rates[row], target_s=target_s, tolerance_s=tolerance_s,
                                  min_rms=args.min_rms, clip_level=args.clip_level,
                                  max_clipped_fraction=args.max_clipped_fraction)
            if failures:
                problems[ids[row]].extend(f"{f} in {shards[row]}" for f in failures)
                bad_rows.add(row)
            elif row not in bad_rows:
                seconds += target_s
            row += 1
            progress.update()
    progress.close()

    by_check = Counter()
    for reasons in problems.values():
        for check in {r.split(" ")[0] for r in reasons}:
            by_check[check] += 1
    summary = {
        "captions": len(wanted), "clips": index.num_rows, "ids_with_clip": len(wanted & set(ids)),
        "shards": len(shard_paths(run / "audio")), "target_s": round(target_s, 4),
        "tolerance_s": round(tolerance_s, 4), "good_audio_seconds": round(seconds, 3),
        "failing_ids": len(problems), **{check: by_check[check] for check in CHECKS},
    }
    print(_table(run, summary))
    for clip_id, reasons in sorted(problems.items())[:50]:
        print(f"  {clip_id}: {'; '.join(reasons)}")
    if len(problems) > 50:
        print(f"  ... and {len(problems) - 50} more (RUN/manifests/audio_verify.json lists them all)")
    repair = _repair_plan(index, bad_rows) if args.repair and bad_rows else {}
    moved = sum(len(v) for v in repair.values())
    if repair:
        share = moved / max(index.num_rows, 1)
        if args.dry_run:
            print(f"--repair would set aside {moved} of {index.num_rows} clips ({share:.1%}) from "
                  f"{len(repair)} shard(s): {', '.join(sorted(repair)[:10])}{' ...' if len(repair) > 10 else ''}")
        elif share > args.max_repair_fraction and not args.confirm_repair:
            raise ConceptCapsError(
                f"--repair would set aside {moved} of {index.num_rows} clips ({share:.1%}), more than "
                f"--max_repair_fraction {args.max_repair_fraction:.0%}: check the thresholds and --duration first "
                f"(`--repair --dry_run` shows the list); if that is right, add --confirm_repair."
            )
        else:
            from conceptcaps_pipeline.audio.shards import move_rows_aside

            folder = move_rows_aside(run, repair, STAGE)
            summary["repaired_clips_set_aside"] = moved
            summary["set_aside"] = str(folder.relative_to(run.resolve())) if folder else None
            logger.info("audio verify: %d clip(s) set aside in %s; run `conceptcaps audio generate` to make them "
                        "again", moved, folder)
    if not problems:
        drop_set_aside(run, STAGE)  # everything checks out: older repairs are no longer needed
    write_manifest(run, STAGE, args, inputs={"captions": captions_path}, counts=summary, started=started,
                   extra={"failing": {k: v for k, v in sorted(problems.items())}})
    if problems:
        counts = ", ".join(f"{check} {summary[check]}" for check in CHECKS if summary[check])
        if args.repair and not args.dry_run:
            fix = (f"the failing clips were set aside ({summary.get('set_aside')}): re-run `conceptcaps audio generate "
                   f"--run {run}` with the same settings to make them again")
        else:
            fix = (f"re-run `conceptcaps audio generate --run {run}` for missing and stale ids; for duplicate, "
                   f"unexpected or bad clips run `conceptcaps audio verify --run {run} --repair` first; if the "
                   f"thresholds do not suit the model, set --min_rms / --max_clipped_fraction")
        raise ConceptCapsError(f"{len(problems)} caption id(s) fail audio verification in {run / 'audio'} ({counts}; "
                               f"each id and reason above and in {run / 'manifests' / 'audio_verify.json'}): {fix}.")
    return summary


def _repair_plan(index, bad_rows: set[int]) -> dict[str, set[str]]:
    """{shard: ids to set aside}, from the bad rows of the index."""
    plan: dict[str, set[str]] = defaultdict(set)
    ids, shards = index.column("id").to_pylist(), index.column("shard").to_pylist()
    for row in bad_rows:
        plan[shards[row]].add(ids[row])
    return dict(plan)


def _table(run: Path, summary: dict) -> str:
    lines = [f"audio verify: {run}", f"  {'check':<14}{'failing ids':>12}"]
    lines += [f"  {check:<14}{summary[check]:>12}" for check in CHECKS]
    lines.append(
        f"  {summary['clips']} clips in {summary['shards']} shards for {summary['captions']} captions; "
        f"target {summary['target_s']} s +- {summary['tolerance_s']} s; {summary['good_audio_seconds']} s of good audio; "
        f"{'OK' if summary['failing_ids'] == 0 else str(summary['failing_ids']) + ' failing id(s)'}")
    return "\n".join(lines)
