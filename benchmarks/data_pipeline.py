"""Data-pipeline throughput: multi-crop images/s per DataLoader worker from GeoTIFF chips, and the
curation time for a 100k x 384 embedding pool.

    python benchmarks/data_pipeline.py                      # everything, 1 thread per worker
    python benchmarks/data_pipeline.py --images 20 --pool 20000 --threads 2

Part 1 writes two temporary 1024² GeoTIFFs (tiled 256, deflate, like a COG): RGB uint8 and
13-band Sentinel-2-like uint16 with band descriptions. A `RasterSource` draws 512² chips by index and
`MultiCropAugmentation` makes 2 global 224² + 8 local 96² crops (the DINOv3 recipe). Reading and
augmenting are timed separately and together; "per worker" means one process with
`torch.set_num_threads(threads)` (DataLoader workers usually run with 1 thread), so N workers give
about N times the rate on N free cores.

Part 2 times curation on synthetic clustered embeddings (Zipf-sized Gaussian blobs on the unit
sphere, L2-normalised): resampled hierarchical k-means, balanced sampling, retrieval of 10k queries
(exact IndexFlatIP) and near-duplicate removal on the balanced selection.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

S2_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]


def write_geotiffs(root: Path, size: int = 1024, seed: int = 0) -> tuple[Path, Path]:
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    # smooth-ish texture so deflate behaves like on real imagery
    base = rng.normal(size=(size // 16, size // 16)).repeat(16, 0).repeat(16, 1)
    profile = dict(driver="GTiff", width=size, height=size, crs="EPSG:32631", transform=from_origin(600000, 5_010_240, 10, 10),
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate", nodata=0)
    rgb = np.clip(128 + 40 * base[None] + rng.normal(0, 12, size=(3, size, size)), 1, 255).astype(np.uint8)
    (root / "rgb").mkdir(exist_ok=True)
    (root / "s2").mkdir(exist_ok=True)
    with rasterio.open(root / "rgb" / "rgb.tif", "w", **profile, count=3, dtype="uint8") as dst:
        dst.write(rgb)
        for i, d in enumerate(["R", "G", "B"]):
            dst.set_band_description(i + 1, d)
    ms = np.clip(1500 + 600 * base[None] + rng.normal(0, 150, size=(13, size, size)), 1, 10000).astype(np.uint16)
    with rasterio.open(root / "s2" / "s2.tif", "w", **profile, count=13, dtype="uint16") as dst:
        dst.write(ms)
        for i, d in enumerate(S2_BANDS):
            dst.set_band_description(i + 1, d)
    return root / "rgb", root / "s2"


def time_multicrop(folder: Path, scale: float, n_bands: int, n_images: int, as_uint8: bool = False) -> dict:
    from geodino.data.multicrop import MultiCropAugmentation
    from geodino.data.sources.raster import RasterSource

    src = RasterSource([folder], chip_size=512, scale=scale, length=10**6, seed=0)
    mean = None if n_bands == 3 else [0.15] * n_bands
    std = None if n_bands == 3 else [0.05] * n_bands
    aug = MultiCropAugmentation(global_crops_size=224, local_crops_size=96, local_crops_number=8, mean=mean, std=std,
                                n_bands=n_bands, rgb_indices=None if n_bands == 3 else (3, 2, 1))

    def read(i):
        if as_uint8:
            return src.chip(i).to(torch.uint8)
        return src[i]

    read(10**5)  # open the files once (torchgeo caches the handles)
    t_read, t_aug, t_all = [], [], []
    c0 = time.process_time()
    for i in range(n_images):
        g = torch.Generator().manual_seed(i)
        t0 = time.perf_counter()
        x = read(i)
        t1 = time.perf_counter()
        out = aug(x, generator=g)
        t2 = time.perf_counter()
        t_read.append(t1 - t0)
        t_aug.append(t2 - t1)
        t_all.append(t2 - t0)
    cpu = time.process_time() - c0
    assert len(out["local_crops"]) == 8 and out["global_crops"][0].shape[-1] == 224
    med = statistics.median
    return {"read_ms": 1000 * med(t_read), "aug_ms": 1000 * med(t_aug), "total_ms": 1000 * med(t_all),
            "img_s": n_images / sum(t_all), "cpu_ms": 1000 * cpu / n_images}


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
            rows = [
                ("RGB 512² uint8 GeoTIFF, uint8 path", time_multicrop(rgb, 255.0, 3, args.images, as_uint8=True)),
                ("RGB 512² uint8 GeoTIFF, float path", time_multicrop(rgb, 255.0, 3, args.images)),
                ("13-band 512² uint16 GeoTIFF", time_multicrop(s2, 10000.0, 13, args.images)),
            ]
            print(f"\nmulti-crop (2x224 + 8x96) per worker, torch threads {args.threads}, median of {args.images} images")
            print("| input | read ms | multi-crop ms | total ms | CPU ms/image | images/s per worker | images/s from CPU time |")
            print("|---|---|---|---|---|---|---|")
            for name, r in rows:
                print(f"| {name} | {r['read_ms']:.1f} | {r['aug_ms']:.1f} | {r['total_ms']:.1f} | {r['cpu_ms']:.1f} | "
                      f"{r['img_s']:.1f} | {1000 / r['cpu_ms']:.1f} |")
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
