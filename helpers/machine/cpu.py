"""This machine's CPU: how many physical cores llama.cpp should use (hyper-threads share a core's arithmetic
units, so a thread per logical CPU only adds contention)."""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's arithmetic units)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            core = (topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus) // 2) if len(cpus) > 2 else len(cpus)
        cores.add(core)
    return max(1, len(cores))
