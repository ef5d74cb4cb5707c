"""Open-vocabulary segmentation of a large synthetic raster on CPU: seconds per megapixel and peak RSS.

    python benchmarks/segment.py --size 8192 --backbone geodino_vit_tiny --classes 6 --threads 2

Writes a ``size x size`` 4-band uint8 GeoTIFF (textures of geodino.segment.synthetic, deflate), builds a dino.txt
model with a random frozen backbone (``--backbone``: any registry name, e.g. dinov3_vits16; ``--head-blocks``
trainable blocks; a 128-wide 2-layer text tower), and runs the real ``geodino segment`` path
(geodino.segment.run.segment_raster: rasterio windows, tiled inference with overlap blending, progressive
GeoTIFF writes, preview). RSS is sampled every 10 ms from /proc/self/status; the baseline is taken after the
model is loaded and one tile has run. The full-resolution float score stack (classes x H x W x 4 bytes) is printed
for comparison: the segmenter never allocates it. Weights are random: only speed and memory are measured.
The last line is ``geodino segment: <s/MP> s/MP, peak RSS <MB> MB (+<MB> MB over the loaded model)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def write_raster(path: Path, size: int, block: int = 512) -> float:
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' fake-scene builder
    from fakes.synthetic import texture_scene

    t0 = time.perf_counter()
    img, _ = texture_scene(block, block, np.random.default_rng(0), n_regions=8)
    reps = -(-size // block)
    with rasterio.open(path, "w", driver="GTiff", dtype="uint8", count=4, width=size, height=size,
                       crs="EPSG:32631", transform=from_origin(300000, 5000000, 10, 10), nodata=0, tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate", zlevel=1, BIGTIFF="IF_SAFER") as dst:
        dst.descriptions = ("R", "G", "B", "NIR")
        row = np.tile(img, (1, 1, reps))[:, :, :size]
        for y in range(0, size, block):
            h = min(block, size - y)
            dst.write(row[:, :h], window=Window(0, y, size, h))
    return time.perf_counter() - t0


def build_checkpoint(path: Path, backbone: str, head_blocks: int, embed_dim: int | None) -> Path:
    import torch

    from geodino.models import build_backbone
    from geodino.text.dinotxt import DinoTxt, DinoTxtConfig
    from geodino.text.io import save_dinotxt

    torch.manual_seed(0)
    bb = build_backbone(backbone, in_chans=4)
    bb.geodino_contract = bb.geodino_contract.with_data(bands=["R", "G", "B", "NIR"], mean=[0.4] * 4, std=[0.2] * 4)
    dim = embed_dim or 2 * int(bb.embed_dim)
    model = DinoTxt(bb, DinoTxtConfig(embed_dim=dim, head_blocks=head_blocks))
    return save_dinotxt(model, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192, help="raster side in pixels")
    ap.add_argument("--backbone", default="geodino_vit_tiny")
    ap.add_argument("--head-blocks", type=int, default=2)
    ap.add_argument("--embed-dim", type=int, default=None, help="joint embedding (default 2 x backbone dim)")
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gdal-cache-mb", type=int, default=64)
    ap.add_argument("--workdir", default=None, help="keep the raster and outputs here (default: a temp dir)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from geodino.segment.open_vocab import OpenVocabSegmenter
    from geodino.segment.run import segment_raster

    prompts = ["water", "forest", "buildings", "farmland", "road", "cloud", "bare soil", "wetland", "snow",
               "grassland", "shrubland", "sand"][: args.classes]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        src = work / f"synthetic_{args.size}.tif"
        t_write = write_raster(src, args.size)
        ckpt = build_checkpoint(work / "dinotxt.pt", args.backbone, args.head_blocks, args.embed_dim)
        seg = OpenVocabSegmenter.from_checkpoint(ckpt, device="cpu")
        seg.segment(np.zeros((4, args.tile, args.tile), np.uint8), prompts)  # warm-up
        base = _rss()
        peak = [base]
        done = threading.Event()

        def poll():
            while not done.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.01)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        summary = segment_raster(seg, src, prompts, work / "labels.tif", tile=args.tile, overlap=args.overlap,
                                 progress=True, gdal_cache_mb=args.gdal_cache_mb, overwrite=True)  # a reused --workdir
        done.set()
        th.join()
        peak_rss = max(peak[0], _rss())
        mp = args.size * args.size / 1e6
        stack = args.classes * args.size * args.size * 4
        result = {
            "size": args.size, "megapixels": round(mp, 2), "backbone": args.backbone, "classes": args.classes,
            "tile": args.tile, "overlap": args.overlap, "threads": args.threads, "tiles": summary["tiles"],
            "raster_write_s": round(t_write, 2), "seconds": round(summary["seconds"], 2),
            "seconds_per_megapixel": round(summary["seconds"] / mp, 3),
            "rss_loaded_mb": round(base / 2**20, 1), "rss_peak_mb": round(peak_rss / 2**20, 1),
            "rss_growth_mb": round((peak_rss - base) / 2**20, 1),
            "pending_cells_peak_mb": round(summary["peak_pending_bytes"] / 2**20, 1),
            "full_res_float_stack_mb": round(stack / 2**20, 1),
        }
        print(json.dumps(result, indent=2))
        print(f"geodino segment: {result['seconds_per_megapixel']:.3f} s/MP, peak RSS {result['rss_peak_mb']:.0f} MB "
              f"(+{result['rss_growth_mb']:.0f} MB over the loaded model; full-res float stack would be "
              f"{result['full_res_float_stack_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
