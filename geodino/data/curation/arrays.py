"""Array helpers of the curation modules: float32 copies, L2 normalisation and row chunks.

Every curation function accepts in-memory arrays as well as ``np.memmap`` / ``np.load(..., mmap_mode='r')``
arrays; `chunks` bounds how many rows are read (and copied to float32) at a time.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

CHUNK = 65536  # rows per read of a (memmapped) pool: assignment, index building, search


def as_float32(x) -> np.ndarray:
    """A C-contiguous float32 array of `x` (a copy only when needed; a memmap slice is read here)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def l2_normalize(x, eps: float = 1e-12) -> np.ndarray:
    """Rows of `x` scaled to unit L2 norm, in float32 (all-zero rows stay zero)."""
    x = as_float32(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive row ranges of at most `size` covering ``range(n)``."""
    for s in range(0, n, size):
        yield s, min(s + size, n)
