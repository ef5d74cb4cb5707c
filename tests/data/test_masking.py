"""Tests for geodino.data.masking.MaskingGenerator (iBOT block masking)."""

from __future__ import annotations

import random
from collections import deque

import numpy as np
import pytest

from geodino.data.masking import MaskingGenerator


def n_components(mask: np.ndarray) -> int:
    """4-connected components of a boolean mask."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    count = 0
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                count += 1
                seen[i, j] = True
                queue = deque([(i, j)])
                while queue:
                    a, b = queue.popleft()
                    for da, db in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        x, y = a + da, b + db
                        if 0 <= x < h and 0 <= y < w and mask[x, y] and not seen[x, y]:
                            seen[x, y] = True
                            queue.append((x, y))
    return count


@pytest.mark.parametrize("shape", [(14, 14), (8, 12), (4, 4)])
def test_exact_counts_for_every_target(shape):
    gen = MaskingGenerator(shape, rng=random.Random(0))
    n = shape[0] * shape[1]
    for target in range(n + 1):
        mask = gen(target)
        assert mask.shape == shape and mask.dtype == bool
        assert int(mask.sum()) == target


def test_exact_counts_with_module_rng_and_numpy_rng():
    random.seed(0)
    np.random.seed(0)
    for rng in (None, np.random.default_rng(1), np.random.RandomState(2), 3):
        gen = MaskingGenerator((16, 16), rng=rng)
        for target in (0, 1, 5, 25, 51, 77, 102, 128, 200, 256):
            assert int(gen(target).sum()) == target


def test_defaults():
    gen = MaskingGenerator((14, 14))
    assert gen.num_patches == 196 and gen.max_num_patches == 98 and gen.min_num_patches == 4
    assert gen.get_shape() == (14, 14)
    assert np.exp(gen.log_aspect_ratio[0]) == pytest.approx(0.3)
    assert np.exp(gen.log_aspect_ratio[1]) == pytest.approx(1 / 0.3)
    assert MaskingGenerator(7).get_shape() == (7, 7)
    assert not gen(0).any()


def test_block_structure_for_moderate_ratios():
    """Block masks form a few connected rectangles; a random mask of the same size has many components."""
    gen = MaskingGenerator((14, 14), rng=random.Random(1))
    rng = np.random.default_rng(0)
    block_cc, random_cc = [], []
    for target in (30, 40, 59, 78):
        for _ in range(20):
            mask = gen(target)
            block_cc.append(n_components(mask))
            rand = np.zeros(196, dtype=bool)
            rand[rng.choice(196, target, replace=False)] = True
            random_cc.append(n_components(rand.reshape(14, 14)))
    assert np.mean(block_cc) < 6
    assert np.mean(random_cc) > 3 * np.mean(block_cc)


def test_blocks_before_top_up_are_rectangles_with_bounded_aspect():
    gen = MaskingGenerator((14, 14), rng=random.Random(2))
    for _ in range(200):
        mask = np.zeros((14, 14), dtype=bool)
        delta = gen._mask(mask, 40)
        if delta == 0:
            continue
        rows, cols = np.nonzero(mask)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert h * w == delta == mask.sum()  # a single filled rectangle
        assert 1 <= delta <= 40
        assert w < 14 and h < 14
        assert max(h / w, w / h) <= 1 / 0.3 * 2  # rounding of a log-uniform aspect in [0.3, 1/0.3]


def test_reproducible():
    a = [MaskingGenerator((14, 14), rng=random.Random(5))(60) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    b = [MaskingGenerator((14, 14), rng=np.random.default_rng(5))(60) for _ in range(2)]
    assert np.array_equal(b[0], b[1])
    c = [MaskingGenerator((14, 14), rng=5)(60) for _ in range(2)]
    assert np.array_equal(c[0], c[1])
    d = []
    for _ in range(2):
        random.seed(9)
        np.random.seed(9)
        d.append(MaskingGenerator((14, 14))(60))
    assert np.array_equal(d[0], d[1])
    gen = MaskingGenerator((14, 14), rng=random.Random(5))
    assert not np.array_equal(gen(60), gen(60))


def test_errors():
    gen = MaskingGenerator((4, 4))
    with pytest.raises(ValueError, match="17"):
        gen(17)
    with pytest.raises(ValueError):
        gen(-1)
    with pytest.raises(ValueError):
        MaskingGenerator((4, 4, 4))
    with pytest.raises(TypeError):
        MaskingGenerator((4, 4), rng="seed")
