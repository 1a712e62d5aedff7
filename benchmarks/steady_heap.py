"""A steady glibc heap for CPU timings of full-size models, shared by the grid benchmarks.

With glibc's defaults the same full-size render on the CPU changed speed with the allocations made before it: in the
WebUI a txt2img took 13.8 s after training and 9.0 s after a grid (4.0 M against 1.3 M minor page faults); run
alone, a 3-step render took 5.2 s or 3.1 s and switched between the two within one series of base-model renders.
That would decide a comparison instead of the ways compared. One arena, a high trim threshold, a fixed mmap threshold
and transparent huge pages keep the heap where it is. glibc reads GLIBC_TUNABLES when a process starts: a benchmark
sets it for the WebUI it starts, or runs itself again with it.
"""
from __future__ import annotations

import os
import sys

STEADY_HEAP = ("glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=8589934592:glibc.malloc.mmap_threshold=33554432"
               ":glibc.malloc.hugetlb=1")


def use_steady_heap(default_malloc: bool, rerun: bool = False) -> str:
    """Set STEADY_HEAP for child processes (or for this one, by running the script again) unless GLIBC_TUNABLES is
    set already, the system is not Linux, or `default_malloc`.

    Args:
        default_malloc (bool): keep glibc's defaults (--default-malloc).
        rerun (bool, optional): run this script again with the setting (it does not return then), defaults to
            False: only processes started from here get it.

    Returns:
        str: the heap setting in use, for the printed header.
    """
    if default_malloc or sys.platform != "linux":
        return "default"
    if "GLIBC_TUNABLES" in os.environ:
        return os.environ["GLIBC_TUNABLES"]
    os.environ["GLIBC_TUNABLES"] = STEADY_HEAP
    if rerun:
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, *sys.argv])
    return STEADY_HEAP
