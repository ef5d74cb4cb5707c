"""Score a pretraining run on the held-out probes of the packaged Sentinel-2 sample (geodino.eval.sample_probe)
against random inits of the same architecture with the same normalisation (several seeds).

    geodino train recipe=small run_dir=runs/small
    python scripts/probe_sample.py runs/small                 # the EMA teacher, 3 random-init seeds
    python scripts/probe_sample.py runs/small --which student --seeds 0 1 2 3 4 --json probe.json
    python scripts/probe_sample.py runs/mine --folder /data/s2_tifs   # any Sentinel-2 GeoTIFFs with B03/B04/B08
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from geodino.data.sources.raster import find_rasters
from geodino.eval.sample_probe import compare, dense_sets, read_rasters
from geodino.models import load_backbone


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run directory or checkpoint")
    ap.add_argument("--which", default="teacher", choices=("teacher", "student"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random-init seeds (>= 3 for a spread)")
    ap.add_argument("--folder", help="probe on these Sentinel-2 GeoTIFFs (top halves fit, bottom halves score) instead "
                                     "of the packaged sample")
    ap.add_argument("--json", help="write every number to this file")
    args = ap.parse_args(argv)
    sets = dense_sets(images=read_rasters(find_rasters([args.folder]))) if args.folder else None
    result = compare(load_backbone(args.run, which=args.which), seeds=tuple(args.seeds), sets=sets,
                     retrieval=sets is None)
    d = result["dense_miou"]
    print(f"dense probe mIoU (bottom half): trained {d['trained']['miou']:.1f} | random init "
          f"{d['random_init']['mean']:.1f} ± {d['random_init']['std']:.1f} ({len(args.seeds)} seeds) | gain "
          f"{d['gain']:+.1f} -> {'beats' if d['beats_random'] else 'does NOT beat'} random init | raw pixels: patch "
          f"means {d['raw_pixels']['mean']:.1f}, flattened {d['raw_pixels']['pixels']:.1f}")
    if "view_retrieval_top1" in result:
        v = result["view_retrieval_top1"]
        print(f"view retrieval top-1: trained {100 * v['trained']:.1f}% | random init "
              f"{100 * v['random_init']['mean']:.1f} ± {100 * v['random_init']['std']:.1f}% | chance "
              f"{100 * v['chance']:.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
