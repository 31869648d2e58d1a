"""Check RUN/audio/ against RUN/captions.parquet: one sound, decodable clip per caption.

    conceptcaps audio verify --run runs/demo
    conceptcaps audio verify --run runs/demo --min-rms 0.001 --max-clipped-fraction 0.001
    conceptcaps audio verify --run runs/demo --repair      # drop failing rows, then re-run generate

Checks, per caption id: exactly one clip (none = missing, several = duplicate); the FLAC bytes
decode (soundfile) at the stored sampling rate; the duration is within one codec frame of the
target (`--duration`, else the one `audio generate` recorded in its manifest); no NaN/Inf; not
silent (RMS after removing any DC offset at least `--min_rms`); not clipped (at most
`--max_clipped_fraction` of the samples at full scale). Clips whose id is not a caption are
reported as unexpected. Prints a summary table; when anything fails, exits with status 2 and
lists the failing ids. `--repair` rewrites the shards without failing or duplicate rows (the
first clip of an id is kept), so that `conceptcaps audio generate` makes them again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio_shards import INDEX_COLUMNS, decode_flac, read_shards, shard_paths, shard_schema
from .errors import ConceptCapsError
from .run_dir import atomic_path, read_manifest, require, write_manifest

logger = logging.getLogger(__name__)

CHECKS = ("missing", "duplicate", "unexpected", "undecodable", "duration", "non_finite", "silent", "clipped")


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
    repair: bool = field(default=False, metadata={"help": "Rewrite shards without failing and duplicate rows."})


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


def verify_audio(args: VerifyArguments) -> dict:
    """Check every clip; print the summary; raise ConceptCapsError listing failing ids."""
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    started = time.time()
    run = Path(args.run)
    captions_path = require(run, "captions.parquet")
    require(run, "audio")
    caption_ids = pq.read_table(captions_path, columns=["id"]).column("id").to_pylist()
    wanted = set(caption_ids)
    target_s, tolerance_s = _targets(args, run)

    # The index (no audio) for the set checks; the audio is then read one shard at a time so
    # that memory stays at one shard whatever the size of the run.
    index = read_shards(run / "audio", columns=INDEX_COLUMNS)
    ids = index.column("id").to_pylist()
    shards = index.column("shard").to_pylist()
    rates = index.column("sampling_rate").to_pylist()
    counts = Counter(ids)
    problems: dict[str, list[str]] = defaultdict(list)
    bad_rows: set[int] = set()
    seen: set[str] = set()
    for clip_id in sorted(wanted - set(ids)):
        problems[clip_id].append("missing")
    for row, clip_id in enumerate(ids):
        if clip_id not in wanted:
            problems[clip_id].append(f"unexpected (not in captions.parquet; {shards[row]})")
            bad_rows.add(row)
            continue
        if clip_id in seen:
            bad_rows.add(row)  # the later copies of a duplicate are the ones --repair drops
        seen.add(clip_id)
    for clip_id, n in counts.items():
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
            else:
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
        "shards": len(shard_paths(run / "audio")), "target_s": round(target_s, 4), "tolerance_s": round(tolerance_s, 4),
        "good_audio_seconds": round(seconds, 3), "failing_ids": len(problems),
        **{check: by_check[check] for check in CHECKS},
    }
    print(_table(run, summary))
    if args.repair and bad_rows:
        _repair(run / "audio", shards, bad_rows)
        summary["repaired_rows_dropped"] = len(bad_rows)
    write_manifest(run, "audio verify", args, inputs={"captions": captions_path}, counts=summary,
                   started=started, extra={"failing": {k: v for k, v in sorted(problems.items())[:1000]}})
    if problems:
        listed = "\n  ".join(f"{k}: {'; '.join(v)}" for k, v in sorted(problems.items())[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        fix = ("The failing rows were dropped: re-run `conceptcaps audio generate` (with the same --model and "
               "--duration; another --seed gives new clips) to make them again."
               if args.repair else
               "Re-run `conceptcaps audio generate` for missing ids; for duplicate, unexpected or bad clips run "
               f"`conceptcaps audio verify --run {run} --repair` first. If the thresholds do not suit the model, "
               "set --min_rms / --max_clipped_fraction.")
        raise ConceptCapsError(f"{len(problems)} caption id(s) fail audio verification in {run / 'audio'}:\n  "
                               f"{listed}{more}\n{fix}")
    return summary


def _table(run: Path, summary: dict) -> str:
    lines = [f"audio verify: {run}", f"  {'check':<14}{'failing ids':>12}"]
    lines += [f"  {check:<14}{summary[check]:>12}" for check in CHECKS]
    lines.append(
        f"  {summary['clips']} clips in {summary['shards']} shards for {summary['captions']} captions; "
        f"target {summary['target_s']} s +- {summary['tolerance_s']} s; {summary['good_audio_seconds']} s of good audio; "
        f"{'OK' if summary['failing_ids'] == 0 else str(summary['failing_ids']) + ' failing id(s)'}")
    return "\n".join(lines)


def _repair(audio_dir: Path, shards: list[str], bad_rows: set[int]) -> None:
    """Rewrite every shard that holds a bad row without it (atomically); delete emptied shards.

    `shards[row]` names the file of each index row; rows of a file are contiguous and in file order.
    """
    import pyarrow.parquet as pq

    by_shard: dict[str, list[int]] = defaultdict(list)
    for row, name in enumerate(shards):
        by_shard[name].append(row)
    for name, rows in by_shard.items():
        drop = {local for local, row in enumerate(rows) if row in bad_rows}
        if not drop:
            continue
        path = audio_dir / name
        table = pq.read_table(path)
        keep = [local for local in range(table.num_rows) if local not in drop]
        if keep:
            with atomic_path(path) as tmp:
                pq.write_table(table.take(keep).cast(shard_schema()), tmp)
        else:
            path.unlink()
        logger.info("audio verify: dropped %d row(s) from %s", len(drop), path)
    logger.info("audio verify: repaired %s; run `conceptcaps audio generate` to fill the gaps", audio_dir)
