"""Does `conceptcaps tcav` find a planted concept after the correction, and call nothing on a null model?

    .venv/bin/python benchmarks/tcav_calibration.py                     # 10 worlds, the docs' recipe size
    .venv/bin/python benchmarks/tcav_calibration.py --worlds 20 --n 30 --n_cavs 20
    .venv/bin/python benchmarks/tcav_calibration.py --scaling 1000 4000 16000   # time and memory per clip vs N

Each world (generation/testing/tcav_world.py) is fresh: its own clips (one-second noise, each
instrument tag a tone mixed in: piano 440 Hz, organ 880 Hz, flute 1,500 Hz, with probability
0.35; banjo given as often with no sound), its own input clips, and so its own concept sets,
random concepts and CAVs. Two hand-set classifiers (no training) hear every world: the planted
one, whose `jazz` output reads the 440 Hz band, and its null twin, whose `jazz` reads a band no
tag sounds in. The test runs at the size of the docs' recipe: 4 concepts (piano, organ, flute,
banjo) x 3 targets (jazz, rock, metal) x 2 layers (`conv`: (batch, channels, time); `mix`:
(batch, time, features)) = 24 tests, with the stage's defaults (n 50, 30 CAVs, random concepts
for the correction, FDR), through the Python API that `conceptcaps tcav` is a layer over.

Counted (95% Wilson intervals):
- power: planted piano -> jazz significant after the correction, per (world, layer);
- unrelated: organ, flute, banjo significant for any target in the planted world (their sounds
  reach no output), per test; nominal is at most alpha;
- null model: significant results of the null twin for jazz (which reads nothing a tag
  sounds in), per test; and its raw p < 0.05 share, the test's size before correction.
With --scaling: a release of N short clips per N, the activation pass timed per clip and its
peak memory measured in a fresh process (time per clip should stay flat in N, memory bounded).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # a table, not hundreds of progress bars

CONCEPTS = ("piano", "organ", "flute", "banjo")
TARGETS = ("jazz", "rock", "metal")
LAYERS = ("conv", "mix")


def share(hits: int, total: int) -> str:
    """hits/total as a percentage with a 95% Wilson interval."""
    if not total:
        return "-"
    p, z = hits / total, 1.96
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return f"{100 * p:5.1f}% [{100 * max(0, centre - half):4.1f}, {100 * min(1, centre + half):4.1f}] ({hits}/{total})"


def calibration(args) -> None:
    import numpy as np
    from conceptcaps_pipeline.tcav import TcavSettings, run
    from conceptcaps_pipeline.testing.tcav_world import ToneClassifier, tone_rows

    settings = TcavSettings(n=args.n, n_cavs=args.n_cavs, n_random=args.n_random, batch_size=50)
    counts = {"power": [0, 0], "unrelated": [0, 0], "null": [0, 0], "null_raw": [0, 0]}
    seconds, cavs, random_concepts = 0.0, 0, 0
    for world in range(args.worlds):
        rows = tone_rows(args.clips, seed=world)
        inputs = [r["audio"] for r in tone_rows(args.n_inputs, seed=10_000 + world)]
        sets = {c: np.array([c in r["aspect_list"] for r in rows]) for c in CONCEPTS}
        pool = [r["audio"] for r in rows]
        for planted in (True, False):
            started = time.time()
            document = run(ToneClassifier(planted), list(LAYERS), sets, dict.fromkeys(TARGETS, inputs), pool=pool,
                           settings=settings)
            seconds += time.time() - started
            cavs += document["cavs"]
            random_concepts = document["settings"]["n_random"]
            for r in document["results"]:
                if planted and r["concept"] == "piano" and r["target"] == "jazz":
                    counts["power"][0] += r["significant"]
                    counts["power"][1] += 1
                elif planted and r["concept"] != "piano":
                    counts["unrelated"][0] += r["significant"]
                    counts["unrelated"][1] += 1
                elif not planted and r["target"] == "jazz":
                    counts["null"][0] += r["significant"]
                    counts["null"][1] += 1
                    counts["null_raw"][0] += r["p_value"] < 0.05
                    counts["null_raw"][1] += 1
        power = counts["power"]
        print(f"# world {world}: power so far {power[0]}/{power[1]}; {time.time() - started:.0f} s for the null model",
              flush=True)
    print(f"# {args.worlds} worlds x 2 models; {len(CONCEPTS)} concepts x {len(TARGETS)} targets x {len(LAYERS)} "
          f"layers = 24 tests per run; n {args.n}, {args.n_cavs} CAVs, {random_concepts} random concepts, "
          f"{settings.correction} at {settings.alpha}; {args.clips} concept clips, {args.n_inputs} inputs per target")
    print(f"{'what is counted':<58} {'share [95% CI]'}")
    print(f"{'planted piano -> jazz significant (per world and layer)':<58} {share(*counts['power'])}")
    print(f"{'unrelated concepts significant, planted model (per test)':<58} {share(*counts['unrelated'])}")
    print(f"{'null model: jazz results significant (per test)':<58} {share(*counts['null'])}")
    print(f"{'null model: jazz raw p < 0.05 (per test, no correction)':<58} {share(*counts['null_raw'])}")
    print(f"# cost: {cavs} CAVs fitted and scored in {seconds:.0f} s of TCAV runs "
          f"({1000 * seconds / max(cavs, 1):.3f} ms per CAV, forward passes included)")


def scaling_one(count: int, clip_seconds: float, batch_size: int) -> dict:
    """Time and peak memory of the activation pass over a release of `count` clips (run in a fresh process)."""
    import resource

    import torch
    from conceptcaps_pipeline.release.concepts import load_release
    from conceptcaps_pipeline.tcav.model import (
        ActivationCache,
        Classifier,
        DatasetClips,
        Probes,
        activations,
        default_preprocess,
        output_module,
    )
    from conceptcaps_pipeline.testing.tcav_world import RATE, ToneClassifier, tone_rows, write_release

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_release(Path(tmp) / "release", {"train": tone_rows(count, 0, seconds=clip_seconds)})
        dataset = load_release(Path(tmp) / "release", "audio", "train")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model = ToneClassifier(True)
        classifier = Classifier(model, default_preprocess, RATE)
        scorer = output_module(classifier, "log_softmax")
        probes = Probes(model, ["conv"])
        probes.pool_dims = {"conv": (2,)}
        started = time.time()
        _, _, forwarded, _ = activations(scorer, probes, default_preprocess, DatasetClips(dataset), range(count),
                                            rate=RATE, length=round(clip_seconds * RATE), batch_size=batch_size,
                                            cache=ActivationCache(None, "none"), device=torch.device("cpu"))
        elapsed = time.time() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"clips": count, "forwarded": forwarded, "ms_per_clip": 1000 * elapsed / count,
            "peak_rss_mb": peak / 1024, "rss_growth_mb": (peak - before) / 1024}


def scaling(args) -> None:
    print(f"{'clips':>8} {'ms per clip':>12} {'peak RSS MB':>12} {'RSS growth MB':>14}")
    first = None
    for count in args.scaling:
        out = subprocess.run([sys.executable, __file__, "--scaling_one", str(count), "--clip_seconds",
                              str(args.clip_seconds)], capture_output=True, text=True, check=True)
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        first = first or figures
        print(f"{count:>8} {figures['ms_per_clip']:>12.2f} {figures['peak_rss_mb']:>12.0f} "
              f"{figures['rss_growth_mb']:>14.0f}   (x{figures['ms_per_clip'] / first['ms_per_clip']:.2f} time per "
              f"clip of the smallest N)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, default=10, help="Independent worlds (clips, inputs, sets).")
    parser.add_argument("--n", type=int, default=50, help="Clips per concept subset and random set.")
    parser.add_argument("--n_cavs", type=int, default=30, help="CAVs per concept and per random concept.")
    parser.add_argument("--n_random", type=int, default=0, help="Random concepts (0: the stage's default for 24 tests).")
    parser.add_argument("--clips", type=int, default=400, help="Concept clips per world.")
    parser.add_argument("--n_inputs", type=int, default=50, help="Input clips per target.")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads (1 stays fast on shared cores).")
    parser.add_argument("--scaling", type=int, nargs="*", help="Measure the activation pass at these N instead.")
    parser.add_argument("--scaling_one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--clip_seconds", type=float, default=0.25, help="Clip length for --scaling.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    if args.scaling_one:
        print(json.dumps(scaling_one(args.scaling_one, args.clip_seconds, 64)))
        return
    print(f"# torch {torch.__version__}, {args.threads} thread(s)")
    scaling(args) if args.scaling else calibration(args)
    print(f"# {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
