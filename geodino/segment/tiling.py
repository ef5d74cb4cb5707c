"""Sliding-window inference with overlap blending in bounded memory.

The raster is covered by tiles of ``tile`` px with at least ``overlap`` px of overlap, the fewest that do, spread
evenly from edge to edge (every tile has full context; overlaps are all about the same). Each tile's per-class
probabilities are weighted by a ramp that falls towards the tile's inner edges (``linear`` or ``cosine``; edges on
the raster border keep weight 1) and the weighted sums are normalised by the summed weights: a weighted average,
so a model whose tiles agree gives exactly its own output and no seam.

Memory stays bounded: the tile edges cut the raster into *cells* (rectangles covered by one fixed set of tiles).
Tiles are processed in row-major order; a cell's accumulator is allocated when its first tile arrives and
finalised -- handed to ``emit`` and freed -- as soon as its last covering tile has been added. What is pending at
any time is the overlap band below the current tile row plus the overlap to the right of the current tile:
``O((overlap x width + tile x overlap) x classes)`` floats, never the full-resolution score stack.

The engine is I/O agnostic: ``read(y, x, h, w) -> (image (C, h, w) float32 in [0, 1], valid (h, w) bool)``,
``predict(image, valid) -> (K, h, w)`` class probabilities (a torch tensor or numpy array) and
``emit(y, x, probs (K, h, w) float32, valid (h, w) bool)``; geodino.segment.run plugs in rasterio windows and
geodino.segment.open_vocab in-memory arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from geodino.errors import GeodinoError

__all__ = ["Tile", "tile_starts", "tile_grid", "ramp", "tile_weights", "blend_tiles"]


@dataclass(frozen=True)
class Tile:
    row: int
    col: int
    y: int
    x: int
    h: int
    w: int


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one axis: the fewest tiles of ``tile`` px overlapping by >= ``overlap`` px, evenly spread."""
    if tile <= 0:
        raise GeodinoError(f"tile must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise GeodinoError(f"overlap must be in [0, tile) = [0, {tile}), got {overlap}")
    if size <= tile:
        return [0]
    # the fewest tiles with stride <= tile - overlap, spread evenly so every overlap is about the same size
    n = math.ceil((size - tile) / (tile - overlap)) + 1
    return sorted({round(i * (size - tile) / (n - 1)) for i in range(n)})


def tile_grid(height: int, width: int, tile: int, overlap: int) -> tuple[list[int], list[int], int, int]:
    """(row starts, column starts, tile height, tile width); tiles are ``min(tile, size)`` long."""
    return tile_starts(height, tile, overlap), tile_starts(width, tile, overlap), min(tile, height), min(tile, width)


def ramp(n: int, before: int, after: int, mode: str = "linear") -> np.ndarray:
    """1-D weights of length ``n``: rising over the first ``before`` px, falling over the last ``after`` px
    (0 = no ramp, the raster border). Two ramps of length L that overlap exactly sum to 1."""
    w = np.ones(n, dtype=np.float32)
    d = np.arange(n, dtype=np.float32)
    if mode not in ("linear", "cosine", "none"):
        raise GeodinoError(f"blend must be linear, cosine or none, got '{mode}'")
    if mode == "none":
        return w
    for length, dist in ((before, d), (after, n - 1 - d)):
        if length > 0:
            t = np.clip((dist + 0.5) / length, 0.0, 1.0)
            w = np.minimum(w, t if mode == "linear" else np.sin(0.5 * np.pi * t) ** 2)
    return np.maximum(w, 1e-6)


def _sides(starts: list[int], t: int, k: int) -> tuple[int, int]:
    """Overlap of tile ``k`` with its previous and next neighbour along one axis (0 at the raster border)."""
    before = starts[k - 1] + t - starts[k] if k > 0 else 0
    after = starts[k] + t - starts[k + 1] if k + 1 < len(starts) else 0
    return max(before, 0), max(after, 0)


def tile_weights(starts_y, starts_x, th, tw, i, j, mode="linear") -> np.ndarray:
    """(th, tw) blending weights of tile (i, j): ramps over its overlap with each neighbour."""
    (by, ay), (bx, ax) = _sides(starts_y, th, i), _sides(starts_x, tw, j)
    return ramp(th, by, ay, mode)[:, None] * ramp(tw, bx, ax, mode)[None, :]


def _segments(starts: list[int], t: int) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """Breakpoints -> segments [(a, b)], the tiles covering each, the last covering tile of each segment."""
    points = sorted(set(starts) | {s + t for s in starts})
    segs = list(zip(points[:-1], points[1:]))
    last = []
    for a, b in segs:
        cover = [k for k, s in enumerate(starts) if s <= a and b <= s + t]
        last.append(max(cover))
    return points, segs, last


def blend_tiles(height: int, width: int, tile: int, overlap: int, read: Callable, predict: Callable, emit: Callable,
                blend: str = "linear", progress: bool = False, desc: str = "segment") -> dict:
    """Run ``predict`` on every tile and ``emit`` every finished cell (see module doc). Returns statistics."""
    starts_y, starts_x, th, tw = tile_grid(height, width, tile, overlap)
    _, segs_y, last_y = _segments(starts_y, th)
    _, segs_x, last_x = _segments(starts_x, tw)
    # segments of each tile, as index ranges into segs_*
    def tile_segs(starts, t, segs):
        return [[k for k, (a, b) in enumerate(segs) if s <= a and b <= s + t] for s in starts]

    rows_of = tile_segs(starts_y, th, segs_y)
    cols_of = tile_segs(starts_x, tw, segs_x)
    weights_cache: dict[tuple, np.ndarray] = {}
    pending: dict[tuple[int, int], list] = {}
    peak_pending = 0
    n_tiles = len(starts_y) * len(starts_x)


    bar = tqdm(total=n_tiles, desc=desc, unit="tile", disable=not progress, dynamic_ncols=True)
    try:
        for i, ty in enumerate(starts_y):
            for j, tx in enumerate(starts_x):
                image, valid = read(ty, tx, th, tw)
                probs = predict(image, valid)
                if hasattr(probs, "detach"):
                    probs = probs.detach().float().cpu().numpy()
                probs = np.asarray(probs, dtype=np.float32)
                if probs.ndim != 3 or probs.shape[1:] != (th, tw):
                    raise GeodinoError(f"predict returned shape {probs.shape}, expected (classes, {th}, {tw})")
                key = (i, j)
                wkey = (_sides(starts_y, th, i), _sides(starts_x, tw, j))
                wgt = weights_cache.get(wkey)
                if wgt is None:
                    (by, ay), (bx, ax) = wkey
                    wgt = weights_cache[wkey] = ramp(th, by, ay, blend)[:, None] * ramp(tw, bx, ax, blend)[None, :]
                if not (probs.flags.c_contiguous and probs.flags.writeable):  # e.g. a broadcast view
                    probs = np.ascontiguousarray(probs).copy()
                probs *= wgt[None]  # weighted once per tile; cells then only add slices
                for a in rows_of[i]:
                    ya, yb = segs_y[a]
                    for b in cols_of[j]:
                        xa, xb = segs_x[b]
                        sl = (slice(ya - ty, yb - ty), slice(xa - tx, xb - tx))
                        cell = pending.get((a, b))
                        if cell is None:  # first tile: take its values (no zero-fill + add)
                            pending[(a, b)] = [probs[(slice(None), *sl)].copy(), wgt[sl].copy(), valid[sl].copy()]
                        else:
                            cell[0] += probs[(slice(None), *sl)]
                            cell[1] += wgt[sl]
                        if (last_y[a], last_x[b]) == key:
                            acc, wsum, v = pending.pop((a, b))
                            acc /= wsum[None]
                            emit(ya, xa, acc, v)
                peak_pending = max(peak_pending, sum(c[0].nbytes + c[1].nbytes + c[2].nbytes for c in pending.values()))
                bar.update(1)
    finally:
        bar.close()
    if pending:  # cannot happen: every cell has a last tile
        raise GeodinoError(f"internal error: {len(pending)} unfinished cells")
    return {"tiles": n_tiles, "tile_h": th, "tile_w": tw, "peak_pending_bytes": peak_pending}
