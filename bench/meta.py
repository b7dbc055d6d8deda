"""Where and with what the numbers were taken (stored in the JSON, printed above the table)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def collect(device: str) -> dict:
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device,
        "device_name": (torch.cuda.get_device_name() if device == "cuda" else cpu_model()),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        # Other work on the machine before the run started (CPU timings are sensitive to it).
        "loadavg_1min": _loadavg(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "git": _git_commit(),
    }
    try:
        import xent_ext

        meta["xent_ext_version"] = xent_ext.__version__
        meta["xent_ext_cpu_isa"] = xent_ext.cpu_isa()
    except Exception as e:  # the bench also runs without the extension (other rows only)
        meta["xent_ext_version"] = f"not importable: {e}"
    return meta
