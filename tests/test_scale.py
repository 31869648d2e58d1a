"""benchmarks/scale.py at a small N: the synthetic run is made, every measured stage exits 0 in its own process,
and the figures it prints (wall time, peak RSS, bytes read, ratios) are there and sane. The benchmark itself (2,400
realistic and 24,000 short clips) is not a test: docs/performance.md "Scale" has its figures and command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scale_benchmark_at_small_n(distilled_run, musiccaps_csv, tmp_path):
    out = tmp_path / "scale"
    out.mkdir()
    # The benchmark distills once per --out; hand it this session's distilled run instead of distilling again.
    shutil.copytree(distilled_run, out / "distilled")
    env = {**os.environ, "MUSICCAPS_CSV": str(musiccaps_csv), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--n", "40", "80", "--seconds", "1",
                           "--stages", "text", "build", "verify", "stream", "--out", str(out), "--json", str(tmp_path / "scale.json")],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    results = {(r["n"], r["stage"]): r for r in json.loads((tmp_path / "scale.json").read_text())}
    assert sorted(results) == [(n, stage) for n in (40, 80) for stage in ("build", "stream", "text", "verify")]
    for (n, stage), r in results.items():
        assert r["exit"] == 0 and r["code"] == 0, (n, stage, r)
        assert 0 < r["wall_s"] < 120 and 100 < r["peak_rss_mb"] < 2048, (n, stage, r)
        if stage in ("build", "verify"):
            assert r["rchar"] > r["audio_bytes"] > 0, (n, stage, r)  # every clip's bytes are read at least once
    # build's reads beyond the text-only build (the audio configs' fixed costs: torch, torchcodec, example clips;
    # then the audio), and per added clip: its bytes read once, plus the audio configs' own text columns.
    for n in (40, 80):
        assert results[n, "build"]["audio_read"] == results[n, "build"]["rchar"] - results[n, "text"]["rchar"]
    small, large = results[40, "build"], results[80, "build"]
    marginal = (large["audio_read"] - small["audio_read"]) / (large["audio_bytes"] - small["audio_bytes"])
    assert 0.9 < marginal < 1.5, (marginal, small, large)
    assert results[80, "build"]["audio_bytes"] > 1.8 * results[40, "build"]["audio_bytes"]
    # Memory is bounded by a batch: twice the clips, about the same peak (imports dominate at this size).
    for stage in ("build", "verify", "stream"):
        assert results[80, stage]["peak_rss_mb"] <= 1.3 * results[40, stage]["peak_rss_mb"], stage
    # The release of the larger run is complete: every clip in the audio config.
    manifest = json.loads((out / "run-80-1s" / "manifests" / "build.json").read_text())
    assert sum(manifest["counts"]["rows"]["audio"].values()) == 80
    lines = done.stdout.splitlines()
    assert any(line.strip().startswith("build") and "peak RSS" in line and "x audio" in line for line in lines)
    assert any("marginal read" in line for line in lines) and any("N=     80 x2.0" in line for line in lines)
