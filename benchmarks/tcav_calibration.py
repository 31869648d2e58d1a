"""How often does `conceptcaps tcav` call noise significant, and does it find a planted concept?

    .venv/bin/python benchmarks/tcav_calibration.py                    # 20 repetitions of each world
    .venv/bin/python benchmarks/tcav_calibration.py --repetitions 50 --n_random 20

Two synthetic worlds (generation/testing/tcav_world.py), each a release folder plus a tiny classifier
built from a config, in a temporary directory:
- noise: noise clips, concept tags given at random, an untrained classifier. Every "significant"
  result is a false positive. For each repetition (a new seed: new concept subsets, random sets
  and random concepts; the same clips and model) the stage's statistics run with the gate off
  (--min_cav_accuracy 0) and no correction, so the share of p < alpha is the test's size: it
  should be near alpha. Printed for the default test (pooled: concept against random concepts)
  and for the TCAV paper's t-test of CAV scores against random CAV scores, in the same process.
- planted: clips whose "piano" tag is exactly the tone a trained classifier uses for "jazz".
  The share of repetitions where piano -> jazz is significant after Holm correction (with the
  gate on) is the power; "banjo" (a tag with no sound) should never be.
Prints a table; writes nothing outside the temporary directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # a table, not hundreds of progress bars

import torch


def share(hits: int, total: int) -> str:
    """hits/total as a percentage with a 95% Wilson interval."""
    if not total:
        return "-"
    p, z = hits / total, 1.96
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return f"{100 * p:5.1f}% [{100 * max(0, centre - half):4.1f}, {100 * min(1, centre + half):4.1f}] ({hits}/{total})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=20, help="Seeds per world and test.")
    parser.add_argument("--n", type=int, default=10, help="Clips per concept subset and random set.")
    parser.add_argument("--n_cavs", type=int, default=20, help="CAVs per concept in the noise world (the planted "
                                                                "world uses the stage's default).")
    parser.add_argument("--n_random", type=int, default=20, help="Random concepts per concept.")
    parser.add_argument("--clips", type=int, default=400, help="Clips in the concept split of each world.")
    parser.add_argument("--share", type=float, default=0.06,
                        help="Share of noise clips given each concept tag: few positives, as for rare tags, make "
                             "a concept's CAVs share most of their clips.")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads (1 stays fast on shared cores).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from conceptcaps_pipeline.tcav.stage import TcavArguments, experiment, prepare
    from conceptcaps_pipeline.testing.tcav_world import (
        NOISE_CONCEPTS,
        PLANTED,
        UNRELATED,
        noise_rows,
        planted_rows,
        train_planted_classifier,
        write_release,
    )
    from conceptcaps_pipeline.testing.tiny_eval_models import build_tiny_audio_classifier

    started = time.time()
    print(f"# torch {torch.__version__}, {args.threads} thread(s); {args.repetitions} repetitions per row; "
          f"n {args.n}, {args.n_random} random concepts, {args.clips} clips (noise: {args.share:.0%} hold each "
          f"concept); CAVs per concept: {args.n_cavs} (noise), "
          f"{TcavArguments.n_cavs} (planted)")
    print(f"{'world / test':<46} {'share significant [95% CI]':<34}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The noise world: the test's size.
        write_release(tmp / "noise" / "release",
                      {"train": noise_rows(args.clips, 0, share=args.share), "test": noise_rows(60, 1)})
        build_tiny_audio_classifier(tmp / "noise" / "model")
        base = TcavArguments(run=str(tmp / "noise"), model=str(tmp / "noise" / "model"),
                             layers=["hubert.encoder.layers.1"],
                             concepts=list(NOISE_CONCEPTS), targets=["jazz", "rock"], n=args.n, n_cavs=args.n_cavs,
                             n_random=args.n_random, n_inputs=30, batch_size=32, max_duration=1.0,
                             min_cav_accuracy=0.0, correction="none")
        prepared = prepare(base, tmp / "noise")
        for test in ("pooled", "ttest"):
            hits = total = 0
            for seed in range(args.repetitions):
                run_args = dataclasses.replace(base, seed=seed, test=test)
                with tempfile.TemporaryDirectory(dir=tmp) as work:
                    document = experiment(prepared, run_args, Path(work))
                hits += sum(r["p_value"] < run_args.alpha for r in document["results"])
                total += len(document["results"])
            label = "default (pooled)" if test == "pooled" else "TCAV paper (t-test, fresh random CAVs)"
            print(f"{'noise: p < 0.05, ' + label:<46} {share(hits, total)}")

        # The planted world: power, and the unrelated tag.
        rows = planted_rows(args.clips, 0)
        write_release(tmp / "planted" / "release", {"train": rows, "test": planted_rows(60, 1)})
        accuracy = train_planted_classifier(tmp / "planted" / "model", rows)
        planted = dataclasses.replace(base, run=str(tmp / "planted"), model=str(tmp / "planted" / "model"),
                                      layers=["hubert.encoder.layers.0", "hubert.encoder.layers.1"],
                                      concepts=[PLANTED, UNRELATED], n_cavs=TcavArguments.n_cavs,
                                      min_cav_accuracy=0.7, correction="holm")
        prepared = prepare(planted, tmp / "planted")
        found = {PLANTED: 0, UNRELATED: 0}
        for seed in range(args.repetitions):
            with tempfile.TemporaryDirectory(dir=tmp) as work:
                document = experiment(prepared, dataclasses.replace(planted, seed=seed), Path(work))
            for concept in found:
                found[concept] += any(r["significant"] for r in document["results"]
                                      if r["concept"] == concept and r["target"] == "jazz")
        print(f"{'planted: piano -> jazz significant (Holm)':<46} {share(found[PLANTED], args.repetitions)}"
              f"   (classifier accuracy {accuracy:.2f})")
        print(f"{'planted: banjo -> jazz significant (Holm)':<46} {share(found[UNRELATED], args.repetitions)}")
    print(f"# {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
