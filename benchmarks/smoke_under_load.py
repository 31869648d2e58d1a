"""The smoke run's wall time on idle cores and with two busy processes sharing them, in one run.

    .venv/bin/python benchmarks/smoke_under_load.py --source ../shared/data/musiccaps/musiccaps-public.csv

Runs `conceptcaps run --preset smoke` twice into temporary run directories: first alone, then
while two processes spin on the CPU (as other jobs on a shared machine would), and prints both
wall times, each stage's, and the ratio. The stages choose their torch thread counts from the
cores other processes leave free (generation/cli.py `cpu_threads`), so the ratio stays small.
Not a test: it prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def smoke(source: str, run: Path) -> tuple[float, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "CONCEPTCAPS_NUM_THREADS")}
    env["CONCEPTCAPS_LOG_LEVEL"] = "WARNING"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "conceptcaps_pipeline.cli", "run", "--preset", "smoke", "--source", source, "--run",
                    str(run)], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    stages = json.loads((run / "manifests" / "run.json").read_text())["counts"]["stage_wall_time_s"]
    return seconds, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "musiccaps" / "musiccaps-public.csv"))
    parser.add_argument("--busy", type=int, default=2, help="spinning processes during the second run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"# {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} before the idle run", flush=True)
        idle, idle_stages = smoke(args.source, Path(tmp) / "idle")
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        try:
            time.sleep(5)
            loaded, loaded_stages = smoke(args.source, Path(tmp) / "loaded")
        finally:
            for process in spinners:
                process.kill()
    print(f"{'stage':<20}{'idle s':>9}{'loaded s':>10}{'ratio':>7}")
    for stage in idle_stages:
        print(f"{stage:<20}{idle_stages[stage]:>9.1f}{loaded_stages[stage]:>10.1f}"
              f"{loaded_stages[stage] / max(idle_stages[stage], 1e-9):>7.2f}")
    print(f"{'whole run':<20}{idle:>9.1f}{loaded:>10.1f}{loaded / idle:>7.2f}   ({args.busy} busy processes)")


if __name__ == "__main__":
    main()
