"""Frozen-backbone feature extraction with an on-disk cache.

The backbone runs once per (backbone, dataset, split, transform); its outputs are written as ``.npy``
arrays (memory-mapped when read back) under ``<cache_dir>/<task>/<key>/`` so several heads (kNN,
linear, light decoder) can be compared without running the backbone again. The key hashes

* the backbone *fingerprint*: the SHA-256 of its contract (architecture, bands, mean/std, patch size)
  plus a digest of its weights (two backbones with the same contract but different weights never
  share features),
* the dataset identity (task, root, the sample files with their sizes and modification times),
* the split and the transform (window, stride, bands, scaling, mean/std, layers used, dtype).

An entry is written into a temporary folder and renamed into place when complete, so an interrupted
extraction is never read back. Inputs are normalised by the caller with the backbone contract
(``extractor.contract.normalize``: ``(x - mean) / std`` on images already scaled to [0, 1]).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from geodino.contract import Contract

log = logging.getLogger("geodino")

CACHE_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# Fingerprints and keys
# ----------------------------------------------------------------------------------------------

def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def contract_hash(contract: Contract) -> str:
    return _sha(contract.to_dict())[:16]


@torch.no_grad()
def weights_digest(model: nn.Module, samples: int = 4096) -> str:
    """A cheap digest of every tensor: name, shape, float64 sum and a strided sample of the values."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        if t.numel() == 0:
            continue
        flat = t.reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(flat[::step].float().cpu().numpy().tobytes())
        h.update(np.float64(flat.double().sum().item()).tobytes())
    return h.hexdigest()[:16]


def backbone_fingerprint(model: nn.Module) -> str:
    """The feature-cache identity of a backbone: its contract and a digest of its weights (computed every time,
    so a model whose weights changed never hits a stale cache)."""
    return f"{contract_hash(model.geodino_contract)}-{weights_digest(model)}"


def files_identity(paths: Sequence[str | Path]) -> str:
    """Hash of (name, size, mtime) of the files a split reads: edited data invalidates the cache."""
    items = []
    for p in paths:
        try:
            st = os.stat(p)
            items.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:
            items.append((str(p), -1, -1))
    return _sha(sorted(items))[:16]


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------

class FeatureSet:
    """Named arrays (memory-mapped when cached) plus a JSON-able meta dict."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict, path: Path | None = None, hit: bool = False):
        self.arrays = arrays
        self.meta = meta
        self.path = path
        self.hit = hit

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def __len__(self) -> int:
        return int(self.meta.get("n", 0))


class FeatureWriter:
    """Creates the arrays of one cache entry (memmaps in a temporary folder, or RAM when disabled)."""

    def __init__(self, final: Path | None):
        self.final = final
        self.tmp = None if final is None else final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        if self.tmp is not None:
            self.tmp.mkdir(parents=True, exist_ok=True)
        self.arrays: dict[str, np.ndarray] = {}

    def array(self, name: str, shape: Sequence[int], dtype) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        if self.tmp is None or 0 in shape:
            arr = np.zeros(shape, dtype=dtype)
        else:
            arr = np.lib.format.open_memmap(self.tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        self.arrays[name] = arr
        return arr

    def finish(self, meta: dict) -> FeatureSet:
        meta = {**meta, "cache_format": CACHE_FORMAT, "arrays": sorted(self.arrays)}
        if self.tmp is None:
            return FeatureSet(self.arrays, meta)
        for arr in self.arrays.values():
            if isinstance(arr, np.memmap):
                arr.flush()
        small = {k: v for k, v in self.arrays.items() if not isinstance(v, np.memmap)}
        for k, v in small.items():
            np.save(self.tmp / f"{k}.npy", v)
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        self.arrays.clear()
        try:
            os.replace(self.tmp, self.final)
        except OSError:  # another process finished the same entry first: keep theirs
            shutil.rmtree(self.tmp, ignore_errors=True)
        return _open_entry(self.final, hit=False)

    def abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _open_entry(path: Path, hit: bool) -> FeatureSet:
    meta = json.loads((path / "meta.json").read_text())
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
    return FeatureSet(arrays, meta, path=path, hit=hit)


class FeatureCache:
    """On-disk cache of extracted features; `root=None` keeps everything in memory."""

    def __init__(self, root: str | Path | None):
        self.root = None if root is None else Path(root)

    @property
    def enabled(self) -> bool:
        return self.root is not None

    @staticmethod
    def key(**parts) -> str:
        return _sha({"format": CACHE_FORMAT, **parts})[:24]

    def _entry(self, task: str, key: str) -> Path | None:
        return None if self.root is None else self.root / task / key

    def get(self, task: str, key: str) -> FeatureSet | None:
        path = self._entry(task, key)
        if path is None or not (path / "meta.json").is_file():
            return None
        try:
            fs = _open_entry(path, hit=True)
        except Exception as e:  # a damaged entry is re-extracted, never trusted
            log.warning("feature cache entry %s is unreadable (%s); extracting again", path, e)
            shutil.rmtree(path, ignore_errors=True)
            return None
        log.info("feature cache hit: %s", path)
        return fs

    def writer(self, task: str, key: str) -> FeatureWriter:
        path = self._entry(task, key)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        return FeatureWriter(path)


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    """The eval progress bar (tqdm, transient): feature extraction, probe and head training."""
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# Padding and the frozen extractor
# ----------------------------------------------------------------------------------------------

def pad_to(x: torch.Tensor, h: int, w: int, value: float = 0.0) -> torch.Tensor:
    """Pad the last two dims at the bottom/right to (h, w)."""
    ph, pw = h - x.shape[-2], w - x.shape[-1]
    if ph < 0 or pw < 0:
        raise ValueError(f"cannot pad {tuple(x.shape[-2:])} to {(h, w)}")
    if ph == 0 and pw == 0:
        return x
    return torch.nn.functional.pad(x, (0, pw, 0, ph), value=value)


def round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)
