"""Dense (per-pixel) evaluation: sliding windows over tiles, cached window features, stitching.

A *tile set* is any sequence of tiles (LoveDA 1024² PNGs, GEO-Bench segmentation samples, canopy
GeoTIFF pairs) that can say a tile's size cheaply and load it as
``{'image': float [C, H, W] in [0, 1], 'target': [H, W], 'valid': bool [H, W] (regression),
'name': str, 'group': str}``.

`extract_windows` cuts each tile into ``window``-sized crops every ``stride`` pixels (the last window
is snapped to the tile edge; tiles smaller than a window are padded at the bottom/right), normalises
them with the backbone contract, runs the frozen backbone and stores the patch-token grid of every
window with the window's targets (padding marked ``-1`` / invalid). `predict_tiles` runs a trained
head on the stored windows and averages overlapping window outputs (class probabilities, or heights)
back into full tiles, which is the usual sliding-window inference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from geodino.errors import GeodinoError
from geodino.eval.features import FeatureCache, FeatureSet, pad_to, progress_bar
from geodino.models.extract import Extractor

log = logging.getLogger("geodino")


class TileSet(Protocol):
    def __len__(self) -> int: ...
    def size(self, i: int) -> tuple[int, int]: ...
    def load(self, i: int) -> dict: ...


class TileSubset:
    """Some tiles of a tile set, by index (a validation hold-out cut from a training split)."""

    def __init__(self, tiles: TileSet, indices: Sequence[int]):
        self.tiles = tiles
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def size(self, i: int) -> tuple[int, int]:
        return self.tiles.size(self.indices[i])

    def load(self, i: int) -> dict:
        return self.tiles.load(self.indices[i])


def holdout(tiles: TileSet, fraction: float, seed: int = 0) -> tuple[TileSubset, TileSubset]:
    """(train, held-out) subsets: a seeded random ``fraction`` of the tiles (at least one, and at least one left)."""
    n = len(tiles)
    if n < 2:
        raise GeodinoError(f"cannot hold out validation tiles from a split of {n} tile(s); set task.val_split")
    if not 0.0 < fraction < 1.0:
        raise GeodinoError(f"task.val_fraction={fraction} must be in (0, 1)")
    k = min(n - 1, max(1, int(round(fraction * n))))
    perm = np.random.default_rng(seed).permutation(n)
    return TileSubset(tiles, sorted(perm[k:])), TileSubset(tiles, sorted(perm[:k]))


def starts(n: int, window: int, stride: int) -> list[int]:
    if n <= window:
        return [0]
    out = list(range(0, n - window + 1, stride))
    if out[-1] != n - window:
        out.append(n - window)
    return out


def window_positions(h: int, w: int, window: int, stride: int) -> list[tuple[int, int]]:
    return [(y, x) for y in starts(h, window, stride) for x in starts(w, window, stride)]


def check_window(window: int, stride: int, patch: int) -> None:
    if window <= 0 or stride <= 0:
        raise GeodinoError(f"window ({window}) and stride ({stride}) must be positive")
    if window % patch:
        raise GeodinoError(f"window {window} is not a multiple of the backbone's patch size {patch}")
    if stride > window:
        raise GeodinoError(f"stride {stride} > window {window} would leave pixels without a prediction")


class _Loader(torch.utils.data.Dataset):
    def __init__(self, tiles: TileSet):
        self.tiles = tiles

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> dict:
        return self.tiles.load(i)


def iterate_tiles(tiles: TileSet, num_workers: int = 0) -> Iterator[dict]:
    if num_workers and num_workers > 0:
        dl = torch.utils.data.DataLoader(_Loader(tiles), batch_size=None, shuffle=False, num_workers=num_workers)
        yield from dl
    else:
        for i in range(len(tiles)):
            yield tiles.load(i)


@dataclass
class DenseSpec:
    """How tiles are cut into windows (inputs are normalised with the extractor's backbone contract)."""

    kind: str                 # "seg" | "reg"
    window: int
    stride: int
    batch_size: int = 8
    num_workers: int = 0
    progress: bool = False


def extract_windows(extractor: Extractor, tiles: TileSet, spec: DenseSpec, cache: FeatureCache, task: str,
                    key: str, desc: str = "features") -> FeatureSet:
    """Window features + targets for every tile (cached under `key`)."""
    hit = cache.get(task, key)
    if hit is not None:
        return hit
    check_window(spec.window, spec.stride, extractor.patch_size)
    n_tiles = len(tiles)
    if n_tiles == 0:
        raise GeodinoError(f"{desc}: no tiles")
    sizes = [tiles.size(i) for i in range(n_tiles)]
    positions = [window_positions(h, w, spec.window, spec.stride) for h, w in sizes]
    n = sum(len(p) for p in positions)
    win = spec.window
    # one dry run to learn the feature shape
    probe = torch.zeros(1, extractor.contract.in_chans, win, win)
    _, g = extractor(probe)
    d, gh, gw = g.shape[1:]
    writer = cache.writer(task, key)
    try:
        feats = writer.array("feats", (n, d, gh, gw), np.float16)
        if spec.kind == "seg":
            targets = writer.array("targets", (n, win, win), np.int16)
            valid = None
        else:
            targets = writer.array("targets", (n, win, win), np.float32)
            valid = writer.array("valid", (n, win, win), np.bool_)
        index = writer.array("index", (n, 3), np.int32)
        tile_hw = writer.array("tile_hw", (n_tiles, 2), np.int32)
        names, groups = [], []
        batch: list[torch.Tensor] = []
        slots: list[int] = []
        k = 0

        def flush():
            if not batch:
                return
            _, patch = extractor(torch.stack(batch))
            feats[slots[0]:slots[-1] + 1] = patch.numpy().astype(np.float16)
            batch.clear()
            slots.clear()

        for t, sample in enumerate(progress_bar(iterate_tiles(tiles, spec.num_workers), n_tiles, desc, spec.progress)):
            img = sample["image"].float()
            h, w = img.shape[-2:]
            if (h, w) != tuple(sizes[t]):
                raise GeodinoError(f"tile {sample.get('name', t)}: size {h}x{w} differs from the header's {sizes[t]}")
            names.append(str(sample.get("name", t)))
            groups.append(str(sample.get("group", "")))
            tile_hw[t] = (h, w)
            x = extractor.contract.normalize(img)
            tgt = torch.as_tensor(sample["target"])
            val = torch.as_tensor(sample["valid"]).bool() if spec.kind == "reg" else None
            for y0, x0 in positions[t]:
                crop = x[:, y0:y0 + win, x0:x0 + win]
                batch.append(pad_to(crop, win, win, 0.0))
                slots.append(k)
                tc = tgt[y0:y0 + win, x0:x0 + win]
                if spec.kind == "seg":
                    targets[k] = pad_to(tc.long()[None], win, win, -1)[0].numpy().astype(np.int16)
                else:
                    targets[k] = pad_to(tc.float()[None], win, win, 0.0)[0].numpy()
                    valid[k] = pad_to(val[y0:y0 + win, x0:x0 + win][None].float(), win, win, 0.0)[0].numpy() > 0.5
                index[k] = (t, y0, x0)
                k += 1
                if len(batch) >= spec.batch_size:
                    flush()
        flush()
        meta = {"n": n, "n_tiles": n_tiles, "names": names, "groups": groups, "window": win, "stride": spec.stride,
                "kind": spec.kind, "dim": int(d), "grid": [int(gh), int(gw)],
                "layer_dims": list(extractor.layer_dims or [int(d)])}
        return writer.finish(meta)
    except BaseException:
        writer.abort()
        raise


def predict_tiles(fs: FeatureSet, predict: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor], n_out: int,
                  batch_size: int = 16, device: torch.device | str = "cpu") -> Iterator[dict]:
    """Yield ``{'tile', 'name', 'group', 'output' [K, H, W], 'target' [H, W], 'valid' [H, W] | None}`` per tile."""
    feats, targets, index, tile_hw = fs["feats"], fs["targets"], fs["index"], fs["tile_hw"]
    valid = fs["valid"] if "valid" in fs else None
    win = int(fs.meta["window"])
    n = len(feats)
    cur = -1
    acc = cnt = tgt = val = None

    def finish(t):
        h, w = (int(v) for v in tile_hw[t])
        out = acc[:, :h, :w] / cnt[:h, :w].clamp_min(1)
        return {"tile": t, "name": fs.meta["names"][t], "group": fs.meta["groups"][t], "output": out,
                "target": tgt[:h, :w], "valid": None if val is None else val[:h, :w]}

    for i in range(0, n, batch_size):
        j = min(n, i + batch_size)
        x = torch.from_numpy(np.array(feats[i:j])).to(device).float()
        out = predict(x, (win, win)).float().cpu()
        for b in range(j - i):
            t, y0, x0 = (int(v) for v in index[i + b])
            if t != cur:
                if cur >= 0:
                    yield finish(cur)
                cur = t
                h, w = (int(v) for v in tile_hw[t])
                ch, cw = max(h, win), max(w, win)
                acc = torch.zeros(n_out, ch, cw)
                cnt = torch.zeros(ch, cw)
                tgt = torch.zeros(ch, cw, dtype=torch.long if fs.meta["kind"] == "seg" else torch.float32)
                val = None if valid is None else torch.zeros(ch, cw, dtype=torch.bool)
            acc[:, y0:y0 + win, x0:x0 + win] += out[b]
            cnt[y0:y0 + win, x0:x0 + win] += 1
            tw = torch.from_numpy(np.array(targets[i + b]))
            tgt[y0:y0 + win, x0:x0 + win] = tw.long() if fs.meta["kind"] == "seg" else tw.float()
            if val is not None:
                val[y0:y0 + win, x0:x0 + win] = torch.from_numpy(np.array(valid[i + b]))
    if cur >= 0:
        yield finish(cur)
