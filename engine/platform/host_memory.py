"""Host RAM as Linux reports it, for the memory plan on the CPU: how much is
available now, and how far this process's resident memory rises during a call.

Each answer is None where the kernel does not give it (no /proc, as on macOS);
the planner then falls back to the platform's fixed budget.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

MEMINFO = Path("/proc/meminfo")
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
CGROUP = Path("/sys/fs/cgroup")  # cgroup v2, as a container sees its own group


def _kib_field(path: Path, name: str) -> int | None:
    """`name:   123 kB` of a /proc file, in bytes."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    """What the container's memory limit still allows (None: no limit)."""
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def available_bytes() -> int | None:
    """RAM the kernel could hand out now without swapping: MemAvailable (free
    memory plus the page cache it can drop), within a container's limit."""
    available = _kib_field(MEMINFO, "MemAvailable")
    if available is None:
        try:  # free pages only, without the reclaimable cache: a lower bound
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    headroom = _cgroup_headroom()
    return available if headroom is None else min(available, headroom)


def resident_growth(fn: Callable[[], None]) -> int | None:
    """How far this process's resident memory rose above its level at the
    start while `fn` ran, at its highest (bytes). Linux keeps the high-water
    mark (VmHWM) and lets a process reset it (writing 5 to clear_refs,
    Linux 4.0+); without the reset the mark may predate `fn`, so the answer
    then only errs high. None where neither exists."""
    before = _kib_field(STATUS, "VmRSS")
    if before is None:
        fn()
        return None
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        pass
    fn()
    peak = _kib_field(STATUS, "VmHWM")
    after = _kib_field(STATUS, "VmRSS") or before
    return max(0, max(peak or after, after) - before)
