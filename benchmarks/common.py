"""Shared by every benchmark: peak-memory probes, fresh worker processes, timing, the machine's description.

Peak memory on CPU is the resident set's high-water mark (``VmHWM`` in ``/proc/self/status``), reset with
``/proc/self/clear_refs`` after the model is loaded so that a figure is the *extra* peak over the loaded-model
baseline. Every measured variant runs in its own fresh process (:func:`run_worker`): peaks never mix, and the
allocator starts from the same state for every variant.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT_MARKER = "BENCHMARK-RESULT "
MiB = 1 << 20


# ------------------------------------------------------------------------------------------------ memory
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_bytes() -> int:
    """The resident set size now (0 where ``/proc`` is not available)."""
    try:
        return _status_bytes("VmRSS")
    except (OSError, RuntimeError):
        return 0


def peak_rss_bytes() -> int:
    """The resident set's high-water mark since the process started or the last :func:`reset_peak_rss`."""
    try:
        return _status_bytes("VmHWM")
    except (OSError, RuntimeError):
        return 0


def reset_peak_rss() -> bool:
    """Set the high-water mark to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Extra peak over the baseline at entry, on CPU (RSS) or CUDA (``max_memory_allocated``).

    >>> with PeakMemory("cpu") as memory:
    ...     block = bytearray(1 << 20)
    >>> memory.extra >= 0
    True
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.baseline = self.peak = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            self.baseline = rss_bytes()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = peak_rss_bytes()

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.baseline)


def available_memory_bytes() -> int:
    """``MemAvailable`` from ``/proc/meminfo`` (a large number where it cannot be read)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


# ------------------------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def median(values: Sequence[float]) -> float | None:
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


# ------------------------------------------------------------------------------------------------ workers
def run_worker(spec: dict[str, Any], timeout: float | None = None, threads: int | None = None) -> dict[str, Any]:
    """Run ``benchmarks.worker`` on ``spec`` in a fresh Python process and return its JSON result.

    A worker that fails, is killed (out of memory) or runs past ``timeout`` seconds gives ``{"error": reason}``.
    """
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)]
    try:
        completed = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "timed_out": True, "timeout_s": timeout}
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
    reason = f"exit code {completed.returncode}" + (" (killed: out of memory?)" if completed.returncode < 0 else "")
    return {"error": reason + (": " + " | ".join(tail) if tail else "")}


def emit(result: dict[str, Any]) -> None:
    """Print a worker's result where :func:`run_worker` finds it."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ machine
def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    total = None
    try:
        with open("/proc/meminfo") as meminfo:
            total = int(meminfo.readline().split()[1]) * 1024
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(total / (1 << 30), 1) if total else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for package in ("lightning", "transformers", "peft", "mergekit"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:  # not installed
            info[package] = None
    return info
