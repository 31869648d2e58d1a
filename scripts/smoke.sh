#!/usr/bin/env bash
# The main job on its embedded default: the `smoke` preset, every stage, into runs/smoke.
#   MUSICCAPS_CSV=PATH.csv bash scripts/smoke.sh    # local MusicCaps CSV (offline)
#   bash scripts/smoke.sh                          # google/MusicCaps from the Hub
#   RUN=runs/other bash scripts/smoke.sh           # another run directory
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/conceptcaps run --preset smoke --source "${MUSICCAPS_CSV:-google/MusicCaps}" --run "${RUN:-runs/smoke}" "$@"
