"""A weighted mix of index-addressed sources, with a share of homogeneous batches.

DINOv3 trains on a curated mix and draws 10 % of its batches from ImageNet-1k alone ("homogeneous"
batches); the other batches mix every source ("heterogeneous"). Here that decision is a pure
function of the global batch index, so the data stay addressed by index (exact resume, any number
of DataLoader workers and ranks give the same stream, see geodino.train.loop.IndexedBatches):

- global batch ``b`` is homogeneous with probability ``homogeneous_fraction``, decided by a
  generator seeded with ``(seed, b)``; every rank of that step agrees. Its samples all come from
  ``homogeneous_source``;
- in a heterogeneous batch each sample slot draws its source with probability proportional to
  ``weights`` (a generator seeded with ``(seed, b, rank)``). A source with weight 0 appears only in
  homogeneous batches;
- sample ``i`` (as `IndexedBatches` numbers them: batch ``b`` on rank ``r`` holds
  ``[(b·W + r)·B, (b·W + r + 1)·B)``) reads item ``i`` of its source. Every global index is used
  once, so a RasterSource never repeats a chip and a FolderSource cycles through its files (``i % n``).

All sources of a mix must share the band layout (one batch tensor, one augmentation normalisation).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Sequence

import numpy as np
import torch

from geodino.errors import DataError


class MixPlan:
    """Which source feeds every sample slot of every batch (see the module doc)."""

    def __init__(self, names: Sequence[str], weights: Sequence[float] | Mapping[str, float], batch_size: int,
                 homogeneous_fraction: float = 0.0, homogeneous_source: str | None = None, seed: int = 0,
                 world_size: int = 1):
        self.names = [str(n) for n in names]
        if not self.names:
            raise DataError("a mix needs at least one source")
        if len(set(self.names)) != len(self.names):
            raise DataError(f"source names must be unique, got {self.names}")
        if isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(self.names))
            if unknown:
                raise DataError(f"weights name unknown source{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                                f"sources: {', '.join(self.names)}")
            weights = [float(weights.get(n, 0.0)) for n in self.names]
        w = np.asarray([float(x) for x in weights], dtype=np.float64)
        if len(w) != len(self.names):
            raise DataError(f"{len(w)} weights for {len(self.names)} sources ({', '.join(self.names)})")
        if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
            raise DataError(f"mix weights must be non-negative with a positive sum, got {w.tolist()}")
        self.weights = w / w.sum()
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        if self.batch_size < 1 or self.world_size < 1:
            raise DataError("batch_size and world_size must be positive")
        self.homogeneous_fraction = float(homogeneous_fraction)
        if not 0.0 <= self.homogeneous_fraction <= 1.0:
            raise DataError(f"homogeneous_fraction must be in [0, 1], got {homogeneous_fraction}")
        if self.homogeneous_fraction > 0:
            if homogeneous_source not in self.names:
                raise DataError(f"homogeneous_source '{homogeneous_source}' is not one of the sources "
                                f"({', '.join(self.names)})")
        self.homogeneous_source = homogeneous_source
        self.seed = int(seed)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def is_homogeneous(self, b: int) -> bool:
        """Whether global batch `b` comes from the homogeneous source alone."""
        if self.homogeneous_fraction <= 0:
            return False
        return bool(np.random.default_rng([self.seed, int(b), 1]).random() < self.homogeneous_fraction)

    def slot_sources(self, b: int, rank: int = 0) -> np.ndarray:
        """(batch_size,) source number of every sample of rank `rank`'s part of global batch `b`."""
        key = (int(b), int(rank))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if self.is_homogeneous(b):
            out = np.full(self.batch_size, self.names.index(self.homogeneous_source), dtype=np.int64)
        else:
            rng = np.random.default_rng([self.seed, int(b), int(rank), 2])
            out = rng.choice(len(self.names), size=self.batch_size, p=self.weights)
        self._cache[key] = out
        if len(self._cache) > 256:
            self._cache.popitem(last=False)
        return out

    def batch_sources(self, b: int, rank: int = 0) -> list[str]:
        """Source name of every sample of rank `rank`'s part of global batch `b`."""
        return [self.names[j] for j in self.slot_sources(b, rank)]

    def locate(self, i: int) -> tuple[int, int, int]:
        """(global batch, rank, slot) of global sample index `i`."""
        q, slot = divmod(int(i), self.batch_size)
        b, rank = divmod(q, self.world_size)
        return b, rank, slot

    def source_of(self, i: int) -> str:
        b, rank, slot = self.locate(i)
        return self.names[int(self.slot_sources(b, rank)[slot])]


class MixedDataset(torch.utils.data.Dataset):
    """``dataset[i]`` = ``sources[plan.source_of(i)][i]``: deterministic in `i` (see the module doc).

    Use it wherever a single source goes, e.g.
    ``IndexedBatches(AugmentedDataset(MixedDataset(...), augment, seed), batch_size, collate, seed,
    world_size=W, rank=r)`` with the same batch size and world size as the plan.
    """

    def __init__(self, sources: Mapping[str, torch.utils.data.Dataset], weights: Sequence[float] | Mapping[str, float],
                 batch_size: int, homogeneous_fraction: float = 0.0, homogeneous_source: str | None = None,
                 seed: int = 0, world_size: int = 1):
        self.sources = dict(sources)
        self.plan = MixPlan(list(self.sources), weights, batch_size, homogeneous_fraction, homogeneous_source, seed,
                            world_size)
        layouts = {n: list(getattr(s, "band_names", [])) or None for n, s in self.sources.items()}
        known = {n: l for n, l in layouts.items() if l is not None}
        if len({tuple(l) for l in known.values()}) > 1:
            detail = "; ".join(f"{n}: {', '.join(l)}" for n, l in known.items())
            raise DataError(f"sources in a mix must share one band layout, got {detail}")
        self.band_names = next(iter(known.values())) if known else None

    @property
    def n_bands(self) -> int | None:
        return None if self.band_names is None else len(self.band_names)

    def __len__(self) -> int:
        return 2**62  # addressed by index; IndexedBatches never asks for the length

    def source_of(self, i: int) -> str:
        return self.plan.source_of(i)

    def __getitem__(self, i: int):
        return self.sources[self.plan.source_of(i)][int(i)]

    def item_with_mask(self, i: int):
        """Item `i` with its valid-pixel mask (geodino.data.stats), from its source."""
        src = self.sources[self.plan.source_of(i)]
        if hasattr(src, "item_with_mask"):
            return src.item_with_mask(int(i))
        x = src[int(i)]
        return x, torch.ones(x.shape[1:], dtype=torch.bool)

    def preview(self, size: int = 160, multiple: int = 16) -> torch.Tensor:
        """The first source's preview image (for figures)."""
        return next(iter(self.sources.values())).preview(size, multiple)


def mix_sources(infos: Mapping[str, object], weights, batch_size: int, homogeneous_fraction: float = 0.0,
                homogeneous_source: str | None = None, seed: int = 0, world_size: int = 1) -> MixedDataset:
    """A MixedDataset from `build_source` results (SourceInfo); all must share bands and normalisation."""
    infos = dict(infos)
    first_name, first = next(iter(infos.items()))
    for name, info in infos.items():
        if list(info.band_names) != list(first.band_names):
            raise DataError(f"source {name} has bands {', '.join(info.band_names)} but {first_name} has "
                            f"{', '.join(first.band_names)}; a mix needs one band layout")
        if not np.allclose(info.mean, first.mean) or not np.allclose(info.std, first.std):
            raise DataError(f"source {name} is normalised with mean {info.mean} / std {info.std} but {first_name} with "
                            f"{first.mean} / {first.std}; give the sources of a mix one normalisation "
                            "(data.mean/std or data.stats_file)")
    return MixedDataset({n: i.source for n, i in infos.items()}, weights, batch_size, homogeneous_fraction,
                        homogeneous_source, seed, world_size)
