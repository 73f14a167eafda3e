"""What machine a benchmark ran on (recorded with every result) and how busy it was."""
from __future__ import annotations

import datetime
import os
import platform


def load_average() -> float:
    """1-minute load average (``/proc/loadavg``); above the core count, other work is slowing us down."""
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def library_revision() -> str | None:
    """Git commit of the checkout (with ``+modified`` when ``DeepSalRegLib`` has uncommitted changes)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "DeepSalRegLib"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+modified" if dirty else "")) if commit else None


def machine_info() -> dict:
    """Date, CPU, cores, memory, GPU, library versions and the checkout's commit."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        cpu=_cpu_model(),
        cores=os.cpu_count(),
        memory_gb=_memory_gb(),
        gpu=gpu,
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        simpleitk=_version("SimpleITK"),
        antspyx=_version("antspyx"),
        itk_elastix=_version("itk-elastix"),
        load_average=load_average(),
        revision=library_revision(),
    )
