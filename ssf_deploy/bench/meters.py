"""The meters every pass reads, in a leaf module (no other bench module imported): peak memory
per device, the resident set, the glibc setting that makes the CPU peak follow live tensors.
Timing is :mod:`ssf_deploy.runtime.timing`, the package's one timing loop."""
from __future__ import annotations

import gc
from typing import Optional

import torch

from ..errors import SSFDeployError

__all__ = ["MB", "Peak", "rss", "mmap_big_blocks"]

MB = 1024.0 * 1024.0


class Peak:
    """Peak memory of a region, in bytes, with the device's trustworthy counter.

    On CPU the peak is relative to ``baseline``: the resident size before the row's model
    existed, so weights count as they do in ``max_memory_allocated``.
    """

    def __init__(self, device: torch.device, baseline: Optional[int] = None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.baseline = 0 if self.cuda else (rss() if baseline is None else baseline)

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            gc.collect()
            _reset_hwm()

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return float(torch.cuda.max_memory_allocated(self.device))
        return float(max(0, _status("VmHWM") - self.baseline))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise SSFDeployError(f"/proc/self/status has no {key}: CPU peak memory needs Linux")


def rss() -> int:
    return _status("VmRSS")


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError as e:
        raise SSFDeployError(f"cannot reset the peak-RSS counter ({e}); CPU peak memory "
                             f"needs a Linux kernel with /proc/self/clear_refs") from e


def mmap_big_blocks() -> None:
    """Ask glibc to mmap (and unmap on free) every block >= 64 KiB, so RSS tracks live tensors.

    For memory passes only: it makes every large allocation a system call and a page-fault
    storm, so a process that has called it must never be used for timing. Without glibc the
    CPU peak would silently include freed blocks: refused in one line instead.
    """
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 64 * 1024) and libc.mallopt(-1, 128 * 1024)   # MMAP, TRIM
    except (OSError, AttributeError) as e:
        raise SSFDeployError(f"CPU peak memory needs glibc's mallopt (libc.so.6): "
                             f"{e}") from e
    if not ok:
        raise SSFDeployError("glibc refused mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD): CPU "
                             "peak memory would count freed blocks")
