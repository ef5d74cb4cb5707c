"""Forward throughput and peak memory: geodino's DINOv3 ViT against timm's port with the same weights.

    python benchmarks/backbone.py                      # ViT-S/16 and ViT-B/16 at 224 and 512, 2 threads
    python benchmarks/backbone.py --archs vits16 --sizes 224 --batch 8 --repeats 5

Throughput is images/s of `forward_features` under `torch.inference_mode`: both models live in one
process and are timed alternately (best of `--repeats` rounds after a warm-up), so a load change on
the machine hits both alike. Peak memory is measured per implementation in a fresh subprocess: the
growth of the process's peak RSS during the forwards over its RSS after building the model. The outputs of both implementations are compared
(max abs difference of the normed patch tokens) so a speed-up can never hide a numerical change.
Target (issue "DINOv3 backbones exact to the reference"): geodino >= 1.0x timm on CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

TIMM_NAMES = {"vits16": "vit_small_patch16_dinov3_qkvb", "vitb16": "vit_base_patch16_dinov3_qkvb"}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(impl: str, arch: str, size: int, batch: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from geodino.models import build_backbone

    model = build_backbone(f"dinov3_{arch}").eval()
    x = torch.randn(batch, 3, size, size)
    if impl == "timm":
        import timm
        from timm.models.eva import checkpoint_filter_fn

        tm = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=0, global_pool="token").eval()
        sd = checkpoint_filter_fn({k: v.clone() for k, v in model.state_dict().items()}, tm)
        tm.load_state_dict(sd, strict=False)
        tm.rope.periods.copy_(model.state_dict()["rope_embed.periods"])  # released files hold bf16-rounded periods
        n_prefix = 1 + model.n_storage_tokens
        with torch.inference_mode():
            ref = model.forward_features(x[:1])["x_norm_patchtokens"]
            out = tm.forward_features(x[:1])[:, n_prefix:]
        diff = float((out - ref).abs().max())
        del model

        def run():
            return tm.forward_features(x)
    else:
        diff = 0.0

        def run():
            return model.forward_features(x)

    with torch.inference_mode():
        run()  # warm-up
        rss0 = _rss_mb()
        run()
    return {"impl": impl, "arch": arch, "size": size, "batch": batch, "peak_mb": max(_peak_mb() - rss0, 0.0),
            "max_abs_diff_vs_geodino": diff}


def throughput(arch: str, size: int, batch: int, repeats: int, threads: int) -> dict:
    """Both implementations in one process, timed alternately."""
    import timm
    import torch
    from timm.models.eva import checkpoint_filter_fn

    from geodino.models import build_backbone

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_backbone(f"dinov3_{arch}").eval()
    tm = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=0, global_pool="token").eval()
    tm.load_state_dict(checkpoint_filter_fn({k: v.clone() for k, v in model.state_dict().items()}, tm), strict=False)
    tm.rope.periods.copy_(model.state_dict()["rope_embed.periods"])
    x = torch.randn(batch, 3, size, size)
    runs = {"geodino": lambda: model.forward_features(x), "timm": lambda: tm.forward_features(x)}
    best = {k: float("inf") for k in runs}
    with torch.inference_mode():
        for f in runs.values():
            f()
        for _ in range(repeats):
            for k, f in runs.items():
                t = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t)
    return {k: batch / v for k, v in best.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["vits16", "vitb16"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[224, 512])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "ARCH", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        impl, arch, size = args.worker
        print(json.dumps(worker(impl, arch, int(size), args.batch, args.repeats, args.threads)))
        return
    rows = []
    for arch in args.archs:
        for size in args.sizes:
            res = {}
            speed = throughput(arch, size, args.batch, args.repeats, args.threads)
            for impl in ("timm", "geodino"):
                cmd = [sys.executable, __file__, "--worker", impl, arch, str(size), "--batch", str(args.batch),
                       "--repeats", str(args.repeats), "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                res[impl] = {**json.loads(out), "img_s": speed[impl]}
            rows.append(res)
    print(f"{'arch':<8}{'size':>6}{'batch':>7}{'timm img/s':>12}{'geodino img/s':>15}{'ratio':>8}"
          f"{'timm MiB':>10}{'geodino MiB':>13}{'max|diff|':>11}")
    for r in rows:
        t, g = r["timm"], r["geodino"]
        print(f"{g['arch']:<8}{g['size']:>6}{g['batch']:>7}{t['img_s']:>12.2f}{g['img_s']:>15.2f}"
              f"{g['img_s'] / t['img_s']:>7.2f}x{t['peak_mb']:>10.0f}{g['peak_mb']:>13.0f}{t['max_abs_diff_vs_geodino']:>11.1e}")


if __name__ == "__main__":
    main()
