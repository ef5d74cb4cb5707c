"""geodino.cpu: the allocator setting keeps large freed buffers mapped, so a repeated step stops page-faulting."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, sys, torch
from geodino.cpu import keep_freed_memory
if sys.argv[1] == "on":
    assert keep_freed_memory() is True and keep_freed_memory() is True  # idempotent
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(48 * 2**20 // 4)  # 48 MB: above glibc's largest default mmap threshold (32 MiB)
    y = x * 2
    del x, y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(faults[-5:])
print(faults[2])  # the median of the last 5 rounds: one round re-faulted by memory pressure elsewhere is not the point
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_keep_freed_memory_stops_repeated_page_faults():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    default, cached = faults("off"), faults("on")
    # default glibc: every 48 MB buffer is a fresh mmap, ~12k faults per buffer, 2 buffers per round
    assert default > 2 * 10_000
    assert cached < default / 100
