"""Scale of the CPU stages: a synthetic run of N clips, each stage in a fresh process, and its wall time,
peak RSS and bytes read, with ratios against the smallest N.

    python benchmarks/scale.py --n 100 400 --seconds 2 --out /tmp/scale            # a few minutes on 2 cores
    python benchmarks/scale.py --n 240 2400 --seconds 30 --out /tmp/scale_real     # realistic clips (~3.7 GB)
    python benchmarks/scale.py --n 2400 24000 --seconds 2 --out /tmp/scale_short

The run: `conceptcaps distill` on the real MusicCaps CSV ($MUSICCAPS_CSV, once per --out), captions
cycled from the distilled pairs (N rows), and music-like FLAC clips at --sampling_rate written through
the project's shard writer with caption fingerprints (conceptcaps_pipeline.testing.synthetic_run):
no model is needed. Stages measured (--stages): `text` (`build --audio false`: the text configs only, the baseline
that separates build's audio reads from its fixed costs), `build` (every config, split and subset; the card
included), `verify` (`audio verify`: decodes every clip), `stream` (the README's streaming example through
`conceptcaps.stream_release`, filter + take 10, in a fresh process; its exit code is printed), `export`
(`concepts export`: two tags' concept sets and 2 random sets as WAV folders, drawn from the whole train split),
`tcav` (`conceptcaps tcav` on the release with the tones-world classifier of
conceptcaps_pipeline.testing.tcav_world: a torch model, no weights to download; 2 concepts, 1 target, 10 clips
per set, 10 CAVs, 10 random concepts; its time per clip through the model is printed), `vae` (`vae sample --n N`),
`plan` (audio generate's planning: read and tokenise N captions, plan batches), `explore`, `evaluate` (the smoke
preset's tiny CLAP and BERT; CLAP embeds every clip). The last four use a small VAE and tiny models made once
in OUT/distilled.
Each runs as a child process that reports its own /proc/self/io (rchar: bytes through read() calls,
page cache included; read_bytes: from the block device) and peak RSS (VmHWM), so one stage's
imports and caches do not hide in another's. Prints one line per (N, stage) and a table of ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STREAM = """
import sys
from conceptcaps import stream_release
stream = stream_release(sys.argv[1], "audio", split="train")
names = stream.features["labels"].feature.names
rows = list(stream.filter(lambda r: len(r["labels"]) > 0).take(10))
assert len(rows) == 10 and rows[0]["audio"]["array"].size > 0
"""


# audio generate's planning without a model: its captions read, every caption tokenised (in chunks) and the
# batches planned by length, with the tiny MusicGen's tokenizer (RUN/models/musicgen).
PLAN = """
import sys
from pathlib import Path
from transformers import AutoTokenizer
from conceptcaps_pipeline.audio.generate import _read_captions, plan_all_batches
run = Path(sys.argv[1])
prompts = _read_captions(run / "captions.parquet")
batches = plan_all_batches(prompts, AutoTokenizer.from_pretrained(run / "models" / "musicgen"), 48)
assert sum(map(len, batches)) == len(prompts)
"""
SCRIPTS = {"stream": STREAM, "plan": PLAN}


def peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM). Why not ru_maxrss: Linux carries it over an exec from the
    forked copy of the parent, so a child of a parent holding 1.4 GB would report at least 1.4 GB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def child(report: str, argv: list[str]) -> int:
    """Run one stage in this process, then write its /proc/self/io and peak RSS to `report`."""
    started = time.time()
    if argv[0] in SCRIPTS:
        sys.argv = list(argv)
        exec(compile(SCRIPTS[argv[0]], argv[0], "exec"), {"__name__": f"__{argv[0]}__"})  # noqa: S102 - our own script
        code = 0
    else:
        from conceptcaps_pipeline.cli import main

        code = main(argv)
    with open("/proc/self/io") as f:
        io = {k: int(v) for k, v in (line.split(":") for line in f)}
    Path(report).write_text(json.dumps({
        "code": code, "wall_s": time.time() - started, "rchar": io["rchar"], "read_bytes": io["read_bytes"],
        "peak_rss_mb": peak_rss_mb(),
    }))
    return code


def make_run(out: Path, n: int, seconds: float, sampling_rate: int, stages) -> tuple[Path, int]:
    """OUT/run-N: the distilled base (made once) plus N captions and clips; returns (run, audio bytes)."""
    from conceptcaps_pipeline.testing.synthetic_run import write_audio, write_captions

    base = out / "distilled"
    make_base(base, models=bool(NEEDS_MODELS & set(stages)))
    run = out / f"run-{n}-{seconds:g}s"
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(base, run)
    write_captions(run, n)
    audio_bytes = write_audio(run, seconds=seconds, sampling_rate=sampling_rate)
    return run, audio_bytes


def make_base(base: Path, models: bool) -> None:
    """OUT/distilled: `distill` on the real CSV; with `models`, also a small VAE (`vae train`, 3 epochs) and the
    smoke preset's tiny models (clap, bert, musicgen) that vae sample, the planning, explore and evaluate need.
    Each is made once per --out and copied into every run."""
    cli = [sys.executable, "-m", "conceptcaps_pipeline.cli"]
    if not (base / "taxonomy.json").is_file():
        csv = os.environ.get("MUSICCAPS_CSV", str(ROOT.parent / "shared/data/musiccaps/musiccaps-public.csv"))
        subprocess.run([*cli, "distill", "--run", str(base), "--source", csv], check=True)
    if models:
        from conceptcaps_pipeline.run_all import build_tiny_model

        subprocess.run([*cli, "vae", "train", "--run", str(base), "--epochs", "3", "--num_threads", "1"], check=True)
        for name in ("clap", "bert", "musicgen"):
            build_tiny_model(name, base)


STAGES = ("text", "build", "verify", "stream", "export", "tcav", "vae", "plan", "explore", "evaluate")
NEEDS_MODELS = {"vae", "plan", "explore", "evaluate"}
# Tags every synthetic run of the MusicCaps taxonomy holds many times (the captions cycle the distilled pairs).
CONCEPTS = ("piano", "acoustic drums")


def stage_argv(stage: str, run: Path, seconds: float, n: int) -> list[str]:
    """The command line of one measured stage (in the child process)."""
    return {
        "build": ["build", "--run", str(run), "--force"],
        # the same build without the audio configs: the baseline that tells build's audio reads from the rest
        "text": ["build", "--run", str(run), "--audio", "false", "--force"],
        "verify": ["audio", "verify", "--run", str(run), "--duration", str(seconds)],
        "stream": ["stream", str(run / "release")],
        "export": ["concepts", "export", "--run", str(run), "--tags", *CONCEPTS, "--n", "10", "--n_random", "2",
                   "--dest", str(run / "concepts"), "--force"],
        "tcav": ["tcav", "--run", str(run), "--model", "conceptcaps_pipeline.testing.tcav_world:tone_classifier",
                 "--layers", "conv", "--concepts", *CONCEPTS, "--targets", "jazz", "--n", "10", "--n_cavs", "10",
                 "--n_random", "10", "--max_duration", str(min(seconds, 2.0)), "--batch_size", "16",
                 "--num_threads", "1", "--force"],
        "vae": ["vae", "sample", "--run", str(run), "--n", str(n), "--output", "scale_sample.parquet", "--force"],
        "plan": ["plan", str(run)],
        "explore": ["explore", "--run", str(run), "--force"],
        # the smoke preset's tiny metric models; CLAP embeds every clip (2 windows of 10 s per 30-s clip at most)
        "evaluate": ["evaluate", "--run", str(run), "--clap_model", str(run / "models" / "clap"),
                     "--bertscore_model", str(run / "models" / "bert"), "--mauve_model", str(run / "models" / "bert"),
                     "--max_reference_captions", "32", "--device", "cpu", "--force"],
    }[stage]


def measure(stage: str, run: Path, report: Path, seconds: float, n: int) -> dict:
    argv = stage_argv(stage, run, seconds, n)
    started = time.time()
    done = subprocess.run([sys.executable, __file__, "--child", str(report), "--", *argv], capture_output=True, text=True, check=False)
    result = json.loads(report.read_text()) if report.is_file() and done.returncode == 0 else {}
    result.update(exit=done.returncode, process_wall_s=time.time() - started)
    if done.returncode != 0:
        result["stderr_tail"] = done.stderr[-300:]
    report.unlink(missing_ok=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100, 400], help="Run sizes (clips), smallest first.")
    parser.add_argument("--seconds", type=float, default=2.0, help="Clip length (30 = MusicGen's paper clips).")
    parser.add_argument("--sampling_rate", type=int, default=32_000, help="Clip rate (MusicGen: 32 kHz).")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="Stages to measure, in order "
                        "(build first: the others read its release).")
    parser.add_argument("--out", default="/tmp/conceptcaps-scale", help="Working folder (runs are kept for a look).")
    parser.add_argument("--json", help="Also write every figure to this JSON file (list of {n, stage, ...}).")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        sys.exit(child(args.child, [a for a in rest if a != "--"]))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for n in sorted(args.n):
        started = time.time()
        run, audio_bytes = make_run(out, n, args.seconds, args.sampling_rate, args.stages)
        print(f"N={n}: synthetic run {run} ({audio_bytes / 1e6:.1f} MB of audio shards, "
              f"{time.time() - started:.0f} s to make)", flush=True)
        for stage in args.stages:
            r = measure(stage, run, out / "report.json", args.seconds, n)
            if stage == "build" and "rchar" in results.get((n, "text"), {}):
                r["audio_read"] = r["rchar"] - results[n, "text"]["rchar"]
            if stage == "tcav" and r.get("exit") == 0:
                # Every clip of the concept split (the pool the sets are drawn from) and of the input split (rated
                # for --inputs top) is read and digested; those not in the activation cache go through the model.
                scores = json.loads((run / "tcav" / "scores.json").read_text())
                r["clips"] = scores["clips"]["concept_split"] + scores["clips"]["input_split"]
                r["clips_forwarded"] = scores["clips"]["forwarded_now"]
                r["forward_s"] = scores["cost_s"]["forward"]
            r["audio_bytes"] = audio_bytes
            results[n, stage] = r
            if "rchar" in r:
                print(f"  {stage:7s} exit {r['exit']}  wall {r['wall_s']:7.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
                      f"read {r['rchar'] / 1e6:8.1f} MB ({r['rchar'] / audio_bytes:5.2f}x audio; "
                      f"{r['read_bytes'] / 1e6:.1f} MB from disk)" + per_clip(r) + audio_read(r), flush=True)
            else:
                print(f"  {stage:7s} exit {r['exit']}  {r.get('stderr_tail', '')!r}", flush=True)
    print_ratios(results, min(args.n))
    if args.json:
        Path(args.json).write_text(json.dumps([{"n": n, "stage": stage, **r} for (n, stage), r in results.items()],
                                              indent=1))


def audio_read(r: dict) -> str:
    """build's reads beyond the text-only build of the same run, per byte of source audio."""
    if "audio_read" not in r:
        return ""
    return f"  audio configs read {r['audio_read'] / 1e6:.1f} MB more than text only ({r['audio_read'] / r['audio_bytes']:.2f}x audio)"


def per_clip(r: dict) -> str:
    """tcav's time per clip it reads: its whole wall time, and its activation pass (read, digest, forward what the
    cache lacks), per clip of the concept and input splits."""
    if not r.get("clips"):
        return ""
    return (f"  {r['clips']} clips read ({r['clips_forwarded']} forwarded, the rest cached): "
            f"{1000 * r['wall_s'] / r['clips']:.2f} ms/clip whole stage, {1000 * r['forward_s'] / r['clips']:.2f} "
            f"ms/clip activation pass")


def print_ratios(results: dict, smallest: int) -> None:
    """Each stage against its figures at the smallest N; `marginal read` is the extra bytes read per extra byte of
    audio (what a stage reads per clip, without its fixed cost: imports, the card's figures and examples)."""
    print(f"\nratios against N={smallest} (N ratio, wall, peak RSS, bytes read; marginal read per added audio byte):")
    for (n, stage), r in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        base = results.get((smallest, stage), {})
        if "rchar" in r and "rchar" in base:
            added = r["audio_bytes"] - base["audio_bytes"]
            marginal = f"{(r['rchar'] - base['rchar']) / added:5.2f}" if added > 0 else "    -"
            print(f"  {stage:7s} N={n:>7d} x{n / smallest:<6.1f} wall x{r['wall_s'] / base['wall_s']:.2f}  "
                  f"RSS x{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}  read x{r['rchar'] / base['rchar']:.2f}  "
                  f"marginal read {marginal}")


if __name__ == "__main__":
    main()
