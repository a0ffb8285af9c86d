"""Machine resources: process memory (current and peak RSS, GPU peak allocation) and free ports."""

from __future__ import annotations

import contextlib
import resource
import socket
from pathlib import Path

import psutil
import torch


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def reset_peak_memory() -> None:
    """Restart the peak count from now (Linux RSS; CUDA allocator when a GPU is in use)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def memory_in_use_mib() -> float:
    """GPU memory allocated when on a GPU, else the process's resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    return rss_mib()


def peak_memory_mib() -> float:
    """GPU peak allocation when on a GPU, else peak resident memory of the process."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib()


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
