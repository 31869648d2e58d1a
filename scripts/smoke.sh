#!/usr/bin/env bash
# The main job on its embedded default: the `smoke` preset into runs/smoke.
#   MUSICCAPS_CSV=PATH.csv bash scripts/smoke.sh    # local MusicCaps CSV (offline)
#   bash scripts/smoke.sh                          # google/MusicCaps from the Hub
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE="${MUSICCAPS_CSV:-google/MusicCaps}"
RUN="${RUN:-runs/smoke}"
.venv/bin/conceptcaps distill --source "$SOURCE" --out "$RUN"
.venv/bin/conceptcaps vae train --run "$RUN" --epochs 30
.venv/bin/conceptcaps vae sample --run "$RUN" --n 48 --seed 0
