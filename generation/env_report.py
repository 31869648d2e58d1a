"""`conceptcaps env`: the versions, devices and paths a bug report needs (like `accelerate env`).

    conceptcaps env
    conceptcaps env --json          # machine-readable, e.g. to attach to an issue

Paste its output into a bug report: package versions, the accelerator (CUDA devices and
their memory, or CPU cores and torch threads), FFmpeg for audio decoding, and the paths the
pipeline reads (the installed package, presets, the default taxonomy, the Hugging Face cache).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

# The distributions whose versions change what the pipeline does.
PACKAGES = ("conceptcaps", "torch", "transformers", "datasets", "huggingface-hub", "trl", "peft", "accelerate",
            "evaluate", "bitsandbytes", "vllm", "torchcodec", "soundfile", "captum", "numpy", "pyarrow", "safetensors",
            "tokenizers")

# Environment variables that change where things are read from or how much runs at once.
VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "CUDA_VISIBLE_DEVICES",
             "OMP_NUM_THREADS", "CONCEPTCAPS_NUM_THREADS", "CONCEPTCAPS_LOG_LEVEL")


@dataclass
class EnvArguments:
    json: bool = field(default=False, metadata={"help": "Print one JSON object instead of the readable list."})


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> dict:
    import torch

    report = {"cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda or "no (CPU build of torch)"}
    if torch.cuda.is_available():
        report["gpus"] = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
                          for i in range(torch.cuda.device_count())]
        report["bf16"] = torch.cuda.is_bf16_supported()
    else:
        report["gpus"] = []
    return report


def _ffmpeg() -> str:
    path = shutil.which("ffmpeg")
    if path is None:
        return "not found (audio decoding through torchcodec needs the FFmpeg libraries: apt-get install ffmpeg)"
    first = subprocess.run([path, "-version"], capture_output=True, text=True, check=False).stdout.splitlines()
    return f"{first[0].split(' Copyright')[0] if first else 'unknown version'} ({path})"


def _paths() -> dict:
    from conceptcaps_pipeline.taxonomy import DEFAULT_TAXONOMY
    from huggingface_hub import constants

    package = Path(__file__).resolve().parent
    return {"package": str(package), "presets": str(package / "presets"), "taxonomy": str(DEFAULT_TAXONOMY),
            "hf_hub_cache": constants.HF_HUB_CACHE, "working_directory": os.getcwd()}


def collect() -> dict:
    """Everything `conceptcaps env` reports, as one mapping."""
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": {name: _version(name) for name in PACKAGES},
        "devices": _devices(),
        "ffmpeg": _ffmpeg(),
        "paths": _paths(),
        "environment": {name: os.environ[name] for name in VARIABLES if name in os.environ},
    }


def format_report(report: dict) -> str:
    """The report as the `- key: value` list that `accelerate env` and `transformers env` print."""
    lines = ["Copy-and-paste the text below in your bug report.", ""]
    for key, value in report.items():
        if isinstance(value, dict):
            lines.append(f"- {key}:")
            items = [f"    - {k}: {(', '.join(v) or 'none') if isinstance(v, list) else v}" for k, v in value.items()]
            lines += items or ["    (none)"]
        else:
            lines.append(f"- {key}: {value}")
    return "\n".join(lines)


def env_report(args: EnvArguments) -> dict:
    """Print the report (the CLI's output, not a log line) and return it."""
    report = collect()
    sys.stdout.write((json.dumps(report, indent=2) if args.json else format_report(report)) + "\n")
    return report
