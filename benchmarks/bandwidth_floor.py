"""Shared pieces of the throughput benchmarks: counting host ops, the memory-bandwidth floor, devices.

    from bandwidth_floor import OpCounter, device_bandwidth, describe_device

A decode step of a large model on a GPU cannot be faster than the time to read its weights and
the KV cache it attends to once from device memory: that time is the floor, and a benchmark's
"ratio to floor" is measured time over floor time (1.0 = at the floor). `OpCounter` counts the
aten operations Python dispatches (each one is one or more kernel launches on a GPU: the host
work CUDA graphs remove) and the ones that make the host wait for the device (syncs).
"""

from __future__ import annotations

import os
import platform
import time

# Peak memory bandwidth of common accelerators (bytes/s), from their data sheets.
GPU_BANDWIDTH = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12,
                 "A100": 1.56e12, "L40S": 0.864e12, "A10G": 0.6e12}
SYNC_OPS = ("_local_scalar_dense", "item", "nonzero", "is_nonzero", "masked_select")


class OpCounter:
    """Count the aten ops dispatched inside `with OpCounter() as ops:` (ops.total, ops.syncs)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.total += 1
                name = func.__name__.split(".")[0]
                if name in SYNC_OPS:
                    counter.syncs += 1
                return func(*args, **(kwargs or {}))

        self.total = self.syncs = 0
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def per_step(run, short: int, long: int) -> tuple[float, float]:
    """(ops, syncs) per decode step: the difference between a `long`- and a `short`-step run, per step."""
    counts = []
    for steps in (short, long):
        with OpCounter() as ops:
            run(steps)
        counts.append((ops.total, ops.syncs))
    return ((counts[1][0] - counts[0][0]) / (long - short), (counts[1][1] - counts[0][1]) / (long - short))


def device_bandwidth(device) -> tuple[float, str]:
    """(bytes/s, where the figure comes from): a GPU's data-sheet bandwidth, or a measured CPU copy rate."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_BANDWIDTH.items():
            if key in name:
                return value, f"data sheet of {name}"
        return 2.0e12, f"{name}: not in the table, 2 TB/s assumed"
    data = torch.empty(64 * 2**20, dtype=torch.float32)  # 256 MB
    out = torch.empty_like(data)
    out.copy_(data)
    started = time.perf_counter()
    for _ in range(5):
        out.copy_(data)
    seconds = (time.perf_counter() - started) / 5
    return 2 * data.numel() * 4 / seconds, "measured: copy of 256 MB (read + write)"


def describe_device(device) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"CPU {cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch thread(s)"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text += f"; GPU {props.name}, {props.total_memory / 2**30:.0f} GiB"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{text}; load average {load:.2f}; torch {torch.__version__}"


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
