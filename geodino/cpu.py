"""CPU runtime settings that change speed, never results.

`keep_freed_memory()` stops glibc from handing large freed buffers back to the kernel. By default glibc
serves every allocation above a (dynamic, at most 32 MiB) threshold with its own ``mmap`` and ``munmap``s it
on free, and trims the top of the heap past 128 KiB. A training step allocates and frees the same large
activations every time (at the reference ViT-S head sizes the iBOT logits alone are 273 × 65536 floats,
72 MB), so every step pays a fresh page fault and a kernel page-zeroing for each 4 KiB of them: ~17,000
faults for one 72 MB tensor, which made a log-softmax 3× and a head matmul 1.5-2× slower than on warm
memory. With the mmap threshold raised and trimming off, freed buffers stay in the heap and are reused
(the same policy as PyTorch's CUDA caching allocator, or the jemalloc / tcmalloc preloads that CPU
performance guides recommend). Stock PyTorch has no caching CPU allocator and an ``LD_PRELOAD`` has to be
in place before the interpreter starts, so this uses glibc's own ``mallopt`` at run time.

The cost: the process keeps its peak heap mapped (RSS does not shrink after a large step), and the heap
takes a few steps to reach its steady size. Nothing happens on non-glibc systems.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

log = logging.getLogger("geodino")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache  # a process-wide setting: applied once, the answer remembered
def keep_freed_memory() -> bool:
    """Keep large freed buffers mapped for reuse (glibc ``mallopt``); True when in effect. Idempotent."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # 1 GiB: any activation of a CPU-sized run comes from the heap; 2^31 - 1: never trim the heap top
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if not ok:
        log.debug("mallopt refused the allocator settings; CPU buffers are returned to the kernel as usual")
    return ok


def apply_run_settings(cfg, device) -> None:
    """What a CLI verb does on a CPU ``torch.device``: the allocator cache unless ``cpu_malloc_cache`` is false."""
    if device.type == "cpu" and cfg.get("cpu_malloc_cache", True):
        keep_freed_memory()
