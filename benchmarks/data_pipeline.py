"""Data-pipeline throughput: images/s per DataLoader worker for torchgeo window reads against the chip store, each
with the DINOv3 multi-crop, and the curation time for a 100k x 384 embedding pool.

    python benchmarks/data_pipeline.py                      # everything, 1 thread per worker
    python benchmarks/data_pipeline.py --images 20 --skip-curation
    python benchmarks/data_pipeline.py --folder /data/s2_tiles --sizes 256   # also a folder of your GeoTIFFs

Part 1 writes two temporary 2048² GeoTIFFs (tiled 256, deflate, like a COG): RGB uint8 and 13-band
Sentinel-2-like uint16 with band descriptions. For each of RGB and 13 bands and each chip size (256², 512²) it
times, in one run:

* **torchgeo windows**: `RasterSource` (torchgeo `RasterDataset` random windows by index, what `data=sat` trains
  from) reading a chip;
* **chip store**: the same chips cut once with `write_chip_store` (`geodino curate action=chip`) and read from
  the memory-mapped shards (`data=chips`);
* each followed by `MultiCropAugmentation` (2 global 224² + 8 local 96² crops, the DINOv3 recipe) as a loader
  worker runs it, and, when a GPU is present, the store read with the multi-crop on the GPU
  (`data.augment_on=gpu`: the worker only reads).

"Per worker" is one process with `torch.set_num_threads(threads)` (loader workers run with 1 thread). The rate is
computed from the process's CPU time per image, which is what a worker on a free core achieves and is robust to
other load on a shared machine; the wall-clock median is printed beside it. The last column is the number of such
workers that feed `--target` images/s.

Part 2 times curation on synthetic clustered embeddings (Zipf-sized Gaussian blobs on the unit
sphere, L2-normalised): resampled hierarchical k-means, balanced sampling, retrieval of 10k queries
(exact IndexFlatIP) and near-duplicate removal on the balanced selection.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

S2_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]


def write_geotiffs(root: Path, size: int = 2048, seed: int = 0) -> tuple[Path, Path]:
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    # smooth-ish texture so deflate behaves like on real imagery
    base = rng.normal(size=(size // 16, size // 16)).repeat(16, 0).repeat(16, 1)
    profile = dict(driver="GTiff", width=size, height=size, crs="EPSG:32631",
                   transform=from_origin(600000, 5_010_240, 10, 10), tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate", nodata=0)
    (root / "rgb").mkdir(exist_ok=True)
    (root / "s2").mkdir(exist_ok=True)
    rgb = np.clip(128 + 40 * base[None] + rng.normal(0, 12, size=(3, size, size)), 1, 255).astype(np.uint8)
    with rasterio.open(root / "rgb" / "rgb.tif", "w", **profile, count=3, dtype="uint8") as dst:
        dst.write(rgb)
        for i, d in enumerate(["R", "G", "B"]):
            dst.set_band_description(i + 1, d)
    del rgb
    with rasterio.open(root / "s2" / "s2.tif", "w", **profile, count=13, dtype="uint16") as dst:
        for b in range(13):  # band by band: the whole cube would be 100 MB of float64 noise
            band = np.clip(1500 + 600 * base + rng.normal(0, 150, size=(size, size)), 1, 10000).astype(np.uint16)
            dst.write(band, b + 1)
            dst.set_band_description(b + 1, S2_BANDS[b])
    return root / "rgb", root / "s2"


def _augment(n_bands: int, device: str = "cpu"):
    from geodino.data.multicrop import MultiCropAugmentation

    if n_bands == 3:
        return MultiCropAugmentation(global_crops_size=224, local_crops_size=96, local_crops_number=8)
    return MultiCropAugmentation(global_crops_size=224, local_crops_size=96, local_crops_number=8,
                                 mean=[0.15] * n_bands, std=[0.05] * n_bands, n_bands=n_bands, rgb_indices=(3, 2, 1))


def _time(fn, n: int, first: int = 0) -> dict:
    """CPU ms / image (the process, all threads) and the wall-clock median of `fn(i)` over n images."""
    fn(first + 10**5)  # open files, warm caches and the allocator
    walls = []
    c0 = time.process_time()
    for i in range(first, first + n):
        t0 = time.perf_counter()
        fn(i)
        walls.append(time.perf_counter() - t0)
    cpu = (time.process_time() - c0) / n
    return {"cpu_ms": 1000 * cpu, "wall_ms": 1000 * statistics.median(walls)}


def time_sources(folder: Path, n_bands: int, size: int, n_images: int, workdir: Path) -> list[tuple[str, dict]]:
    """Rows for one input: torchgeo windows and the chip store, read only and read + multi-crop."""
    from geodino.data.sources.chips import ChipStore, write_chip_store
    from geodino.data.sources.raster import RasterSource

    raster = RasterSource([folder], chip_size=size, length=10**6, seed=0)
    store_dir = workdir / f"store_{folder.name}_{size}"
    if not store_dir.exists():
        write_chip_store(raster, store_dir, n_images + 1)
    store = ChipStore(store_dir)
    aug = _augment(n_bands)
    gen = lambda i: torch.Generator().manual_seed(i)  # noqa: E731
    rows = [
        ("torchgeo windows: read", _time(lambda i: raster[i], n_images)),
        ("torchgeo windows: read + multi-crop", _time(lambda i: aug(raster[i], generator=gen(i)), n_images)),
        ("chip store: read", _time(lambda i: store[i], n_images)),
        ("chip store: read + multi-crop", _time(lambda i: aug(store[i], generator=gen(i)), n_images)),
    ]
    if torch.cuda.is_available():
        gpu_aug = _augment(n_bands)

        def on_gpu(i):
            out = gpu_aug(store[i].cuda(non_blocking=True), generator=gen(i))
            torch.cuda.synchronize()
            return out

        rows.append(("chip store: read, multi-crop on the GPU (GPU time)", _time(on_gpu, n_images)))
    return rows


def print_feed_table(results: list[tuple[str, list[tuple[str, dict]]]], threads: int, target: float) -> None:
    print(f"\nread + multi-crop (2x224 + 8x96) per loader worker, torch threads {threads}; "
          f"workers for {target:g} img/s from the CPU rate")
    print("| input | path | CPU ms / image | wall ms (median) | img/s per worker | workers for "
          f"{target:g} img/s | vs torchgeo |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in results:
        base = {k.split(":")[1]: r["cpu_ms"] for k, r in rows if k.startswith("torchgeo")}
        for path, r in rows:
            rate = 1000 / r["cpu_ms"]
            kind = path.split(":")[1]
            ratio = base.get(kind, base.get(" read + multi-crop")) / r["cpu_ms"] if path.startswith("chip") else 1.0
            print(f"| {name} | {path} | {r['cpu_ms']:.1f} | {r['wall_ms']:.1f} | {rate:.1f} | "
                  f"{math.ceil(target / rate)} | {ratio:.1f}x |")


def clustered_pool(n: int, d: int, n_blobs: int = 2000, seed: int = 0) -> np.ndarray:
    """Zipf-sized Gaussian blobs on the unit sphere (a long-tailed, web-like pool)."""
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, n_blobs + 1) ** 1.1
    sizes = rng.multinomial(n, w / w.sum())
    centres = rng.normal(size=(n_blobs, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    lab = np.repeat(np.arange(n_blobs), sizes)
    x = centres[lab] + rng.normal(0, 0.5 / np.sqrt(d), size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[rng.permutation(n)]


class _Timer:
    """Wall and process CPU seconds of a block (CPU / threads ~ the wall time on an idle machine)."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def time_curation(n: int, d: int, levels: list[int], steps: list[int], sizes: list[int], n_select: int,
                  n_queries: int, workdir: Path) -> list[tuple[str, float, float, str]]:
    from geodino.data import curation as cur

    rows = []
    with _Timer() as t:
        x = clustered_pool(n, d)
        np.save(workdir / "pool.npy", x)
        x = np.load(workdir / "pool.npy", mmap_mode="r")  # as `geodino curate` reads it
    rows.append(("make + save pool (memmap)", t.wall, t.cpu, f"{n} x {d} float32"))

    with _Timer() as t:
        tree = cur.hierarchical_kmeans(x, levels, n_resampling_steps=steps, sample_size=sizes, seed=0)
    rows.append(("hierarchical k-means", t.wall, t.cpu, f"levels {levels}, r {steps}, s {sizes}, 20 iters"))

    with _Timer() as t:
        sel = cur.balanced_sample(tree, n_select, strategy="r", seed=0)
    rows.append(("balanced sampling", t.wall, t.cpu, f"{len(sel)} of {n}"))
    top = tree.point_labels(tree.n_levels - 1)
    before = np.bincount(top, minlength=levels[-1]) / n
    after = np.bincount(top[sel], minlength=levels[-1]) / len(sel)
    rows.append(("  largest top cluster share", 0.0, 0.0, f"{before.max():.1%} -> {after.max():.1%}"))

    q = clustered_pool(n_queries, d, seed=1)
    with _Timer() as t:
        union = cur.retrieve(x, q, k=10, index="flat")
    rows.append(("retrieval (flat, k=10)", t.wall, t.cpu, f"{n_queries} queries -> {len(union)} items"))

    with _Timer() as t:
        union_ivf = cur.retrieve(x, q, k=10, index="ivf", nprobe=16)
    recall = len(np.intersect1d(union, union_ivf)) / max(len(union), 1)
    rows.append(("retrieval (ivf, nprobe 16)", t.wall, t.cpu, f"train+add+search; union overlap with flat {recall:.1%}"))

    with _Timer() as t:
        keep = cur.deduplicate(x[sel], threshold=0.95)
    rows.append(("dedup of the selection", t.wall, t.cpu, f"{len(sel)} -> {len(keep)} (cos >= 0.95)"))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=30, help="images timed per row")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="chip sides")
    ap.add_argument("--target", type=float, default=500.0, help="images/s to feed (workers column)")
    ap.add_argument("--folder", default=None, help="also a folder of your own GeoTIFFs")
    ap.add_argument("--pool", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--levels", type=int, nargs="+", default=[1000, 100])
    ap.add_argument("--resampling-steps", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--resampling-size", type=int, nargs="+", default=[10, 5])
    ap.add_argument("--select", type=int, default=20_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--faiss-threads", type=int, default=None, help="OpenMP threads for faiss (default: all cores)")
    ap.add_argument("--skip-multicrop", action="store_true")
    ap.add_argument("--skip-curation", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_multicrop:
            rgb, s2 = write_geotiffs(tmp)
            inputs = [("RGB uint8", rgb, 3), ("13-band uint16", s2, 13)]
            if args.folder:
                from geodino.data.sources.raster import RasterSource

                n = RasterSource([args.folder], chip_size=min(args.sizes), length=1).n_bands
                inputs.append((f"{args.folder} ({n} bands)", Path(args.folder), n))
            results = []
            for name, folder, n_bands in inputs:
                for size in args.sizes:
                    results.append((f"{name} {size}²", time_sources(folder, n_bands, size, args.images, tmp)))
            print_feed_table(results, args.threads, args.target)
        if not args.skip_curation:
            import faiss

            # torch.set_num_threads above also lowers the shared OpenMP pool; curation uses every core
            n_threads = args.faiss_threads or os.cpu_count()
            faiss.omp_set_num_threads(n_threads)
            torch.set_num_threads(n_threads)
            rows = time_curation(args.pool, args.dim, args.levels, args.resampling_steps, args.resampling_size,
                                 args.select, args.queries, tmp)
            print(f"\ncuration of a {args.pool} x {args.dim} pool (faiss OpenMP threads {faiss.omp_get_max_threads()})")
            print("| step | wall s | CPU s | detail |")
            print("|---|---|---|---|")
            total = total_cpu = 0.0
            for name, wall, cpu, detail in rows:
                total, total_cpu = total + wall, total_cpu + cpu
                print(f"| {name} | {wall:.2f} | {cpu:.2f} | {detail} |" if wall else f"| {name} | | | {detail} |")
            print(f"| total | {total:.2f} | {total_cpu:.2f} | |")
            print(f"load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
