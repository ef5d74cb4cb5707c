"""iBOT block masking, as DINOv3's ``dinov3/data/masking.py: MaskingGenerator`` (spec section 5).

``gen(n)`` returns a boolean ``(h, w)`` patch mask with **exactly** ``n`` masked patches:

1. Rectangular blocks are placed until the target is reached. Each block has an area drawn uniformly in
   ``[min_num_patches, min(remaining, max_num_patches)]`` and a log-uniform aspect ratio in
   ``[min_aspect, max_aspect]`` (default ``[0.3, 1/0.3]``). A block must be strictly narrower and shorter than the grid,
   may overlap earlier blocks, and is kept only if it adds between 1 and ``remaining`` new patches; up to 10 tries per
   block. Placement stops early when 10 tries in a row add nothing.
2. ``complete_mask_randomly`` tops the mask up with uniformly chosen unmasked patches to the exact target.

Randomness: by default the module-level ``random`` (blocks) and ``np.random`` (top-up) generators, as the reference
does (``DataLoader`` reseeds both per worker). Pass ``rng`` (a ``random.Random``, a ``numpy.random.Generator`` /
``RandomState`` or an int seed) for a reproducible, self-contained stream.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np

__all__ = ["MaskingGenerator"]


class MaskRng:
    """Uniform interface over the random sources accepted by :class:`MaskingGenerator`."""

    def __init__(self, rng: Any = None) -> None:
        if isinstance(rng, (bool, np.bool_)):
            raise TypeError("rng must be a random.Random, a numpy Generator/RandomState, an int seed or None")
        if isinstance(rng, (int, np.integer)):
            rng = random.Random(int(rng))
        self.rng = rng
        if rng is None or isinstance(rng, random.Random):
            self.kind = "py"
        elif isinstance(rng, np.random.Generator):
            self.kind = "np"
        elif isinstance(rng, np.random.RandomState):
            self.kind = "np_legacy"
        else:
            raise TypeError(
                f"rng must be a random.Random, a numpy Generator/RandomState, an int seed or None, got {type(rng)!r}"
            )

    def uniform(self, a: float, b: float) -> float:
        if self.kind == "py":
            return (self.rng or random).uniform(a, b)
        # a + (b - a) * u, like random.uniform (numpy's uniform rejects b < a, which happens when the remaining
        # count is below min_num_patches).
        u = self.rng.random() if self.kind == "np" else self.rng.random_sample()
        return a + (b - a) * float(u)

    def randint(self, a: int, b: int) -> int:
        """Integer in ``[a, b]`` inclusive (``random.randint`` semantics)."""
        if self.kind == "py":
            return (self.rng or random).randint(a, b)
        if self.kind == "np":
            return int(self.rng.integers(a, b + 1))
        return int(self.rng.randint(a, b + 1))

    def choice(self, pool: np.ndarray, k: int) -> np.ndarray:
        """``k`` distinct elements of ``pool``."""
        if self.rng is None:
            return np.random.choice(pool, size=k, replace=False)  # the reference's top-up, global numpy state
        if k == 0:
            return pool[:0]
        if self.kind == "py":
            return np.asarray(self.rng.sample(pool.tolist(), k), dtype=pool.dtype)
        return self.rng.choice(pool, size=k, replace=False)

    def shuffle(self, items: list) -> None:
        if self.kind == "py":
            (self.rng or random).shuffle(items)
        else:
            perm = self.rng.permutation(len(items))
            items[:] = [items[i] for i in perm]


class MaskingGenerator:
    """Block mask generator on an ``input_size = (h, w)`` patch grid.

    Args:
        input_size: ``(h, w)`` in patches, or an int for a square grid.
        max_num_patches: largest block area; default ``0.5 * h * w`` (as DINOv3's ``train.py``).
        min_num_patches: smallest block area (4).
        min_aspect, max_aspect: block aspect-ratio range; ``max_aspect`` defaults to ``1 / min_aspect``.
        rng: optional random source (see module docstring).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        max_num_patches: float | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        *,
        rng: Any = None,
    ) -> None:
        if isinstance(input_size, (list, tuple)):
            if len(input_size) != 2:
                raise ValueError(f"input_size={input_size!r} must be (h, w)")
            height, width = input_size
        else:
            height = width = input_size
        height, width = int(height), int(width)
        if height < 1 or width < 1:
            raise ValueError(f"input_size={input_size!r} must be positive")
        self.height, self.width = height, width
        self.num_patches = height * width
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        if min_aspect <= 0:
            raise ValueError(f"min_aspect={min_aspect} must be positive")
        max_aspect = max_aspect or 1.0 / min_aspect
        if max_aspect < min_aspect:
            raise ValueError(f"max_aspect={max_aspect} must be >= min_aspect={min_aspect}")
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self._rng = MaskRng(rng)

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}, {self.width} -> [{self.min_num_patches} ~ {self.max_num_patches}], "
            f"aspect {math.exp(self.log_aspect_ratio[0]):.3f} ~ {math.exp(self.log_aspect_ratio[1]):.3f})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _mask(self, mask: np.ndarray, max_mask_patches: float) -> int:
        """Try (up to 10 times) to add one block; return the number of newly masked patches."""
        rng = self._rng
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:  # overlap allowed, but it must add something and not overshoot
                    block[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        n = int(num_masking_patches)
        if n != num_masking_patches or not (0 <= n <= self.num_patches):
            raise ValueError(
                f"num_masking_patches={num_masking_patches!r} must be an integer in [0, {self.num_patches}] "
                f"for a {self.height}x{self.width} grid"
            )
        mask = np.zeros(self.get_shape(), dtype=bool)
        mask_count = 0
        while mask_count < n:
            max_mask_patches = min(n - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return self.complete_mask_randomly(mask, n)

    def complete_mask_randomly(self, mask: np.ndarray, num_masking_patches: int) -> np.ndarray:
        """Add uniformly chosen unmasked patches until exactly ``num_masking_patches`` are masked."""
        shape = mask.shape
        flat = mask.flatten()
        missing = int(num_masking_patches) - int(flat.sum())
        if missing < 0:
            raise ValueError(f"mask already has {int(flat.sum())} patches, more than {num_masking_patches}")
        to_add = self._rng.choice(np.flatnonzero(~flat), missing)
        flat[to_add] = True
        return flat.reshape(shape)
