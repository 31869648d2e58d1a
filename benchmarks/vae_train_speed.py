"""Time beta-VAE training on the distilled MusicCaps set: seconds per epoch and the
projected wall time of the paper's 150 epochs, for 1 and 2 torch threads and two batch
sizes; the paper setting (batch 32) with torch's default threads is the baseline that
the ratios compare against, timed in the same process.

    .venv/bin/python benchmarks/vae_train_speed.py --source ../shared/data/musiccaps/musiccaps-public.csv

Prints a table; writes nothing but a temporary run directory.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch


def time_epochs(x: torch.Tensor, tags, categories, batch_size: int, threads: int, epochs: int) -> float:
    """Mean seconds per epoch of the real training step (BetaVAE.loss + Adam) at the paper's sizes."""
    from conceptcaps_pipeline.vae.model import BetaVAE

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = BetaVAE(tags, categories)  # hidden 1024, latent 256: the paper's sizes
    optimizer = torch.optim.Adam(model.parameters(), lr=6e-5)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(order), batch_size):
            loss = model.loss(x[order[start:start + batch_size]], generator)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return (time.perf_counter() - started) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="MusicCaps CSV (or Hub id) to distil.")
    parser.add_argument("--epochs", type=int, default=3, help="Epochs timed per setting.")
    args = parser.parse_args()

    import pandas as pd
    from conceptcaps_pipeline.taxonomy import Taxonomy
    from conceptcaps_pipeline.taxonomy.distill import DistillArguments, distill
    from conceptcaps_pipeline.vae.model import multi_hot

    with tempfile.TemporaryDirectory() as run:
        distill(DistillArguments(run=run, source=args.source))
        taxonomy = Taxonomy.load(f"{run}/taxonomy.json")
        frame = pd.read_parquet(f"{run}/distilled.parquet")
    sets = [list(s) for s in frame.loc[frame["split"] == "train", "aspect_list"]]
    x = multi_hot(sets, taxonomy.tags)
    categories = [taxonomy.category_of[t] for t in taxonomy.tags]
    default_threads = torch.get_num_threads()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} default torch threads, "
          f"torch {torch.__version__}; {len(sets)} training vectors of {len(taxonomy.tags)} tags")
    settings = [("baseline: batch 32, default threads", 32, default_threads)]
    settings += [(f"batch {b}, {t} thread(s)", b, t) for b in (32, 128) for t in (1, 2)]
    baseline = None
    print(f"{'setting':<38} {'s/epoch':>8} {'150 epochs':>11} {'speed-up':>9}")
    for name, batch, threads in settings:
        seconds = time_epochs(x, taxonomy.tags, categories, batch, threads, args.epochs)
        baseline = baseline or seconds
        print(f"{name:<38} {seconds:8.2f} {seconds * 150 / 60:9.1f} m {baseline / seconds:8.2f}x")


if __name__ == "__main__":
    main()
