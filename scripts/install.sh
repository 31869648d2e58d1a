#!/usr/bin/env bash
# Install ConceptCaps into ./.venv on a fresh Debian/Ubuntu machine: FFmpeg (for the
# datasets Audio feature via torchcodec) and Chromium (for the explorer's browser test) if
# missing, the CPU build of torch 2.13.0, and the project with its test tools. Safe to
# re-run: finished steps are skipped by pip/apt.
#
#   bash scripts/install.sh                 # CPU machine (default)
#   CONCEPTCAPS_TORCH=cuda bash scripts/install.sh   # GPU machine: keep pip's CUDA torch
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v ffmpeg >/dev/null 2>&1; then
  echo "install: FFmpeg not found; installing it from Debian packages" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg >/dev/null
fi

# Chromium from Debian packages for the explorer's browser test (tests/test_explore.py drives
# it with the playwright package; no browser build is downloaded). CONCEPTCAPS_CHROMIUM names
# another Chromium binary instead.
if [ -z "${CONCEPTCAPS_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
    && ! command -v chromium-browser >/dev/null 2>&1; then
  echo "install: Chromium not found; installing it from Debian packages (browser test of the explorer)" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)

if [ "${CONCEPTCAPS_TORCH:-cpu}" = "cpu" ]; then
  # A bare `torch` would pull several GB of CUDA packages; 2.13.0 resolves to the CPU
  # build here, and torchcodec 0.13.0 is the last release that works with CPU torch 2.13.
  "${PIP[@]}" "torch==2.13.0"
  "${PIP[@]}" -e ".[dev]" -c scripts/constraints-cpu.txt
else
  "${PIP[@]}" -e ".[dev,quant]"
fi
echo "install: done ($(.venv/bin/python -c 'import torch, transformers, datasets; print("torch", torch.__version__, "transformers", transformers.__version__, "datasets", datasets.__version__)'))" >&2
