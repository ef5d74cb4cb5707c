"""Learning benchmark (issue #18): at an equal number of images seen, do geodino's `recipe=small`, the reference
recipe and the peer a user would pick instead (LightlyTrain's DINOv2 method, a ViT of the same size, the same crop
sizes) learn features that beat a random init on held-out data?

    python benchmarks/learning.py                                  # packaged sample, 1000 steps x 32 images, RGB
    python benchmarks/learning.py --steps 300 --arms small reference
    python benchmarks/learning.py --folder /data/s2_tifs --bands all --arms small reference

Every arm trains on the top (north) half of each raster and is scored by the dense linear probe of
`geodino.eval.sample_probe` on the bottom half (patch tokens, land-cover labels from NDVI / NDWI that no arm sees
as a target), against random inits of the same architecture with the same input normalisation (``--seeds``, mean
± std) and raw pixels. One table is printed (and written to ``<out>/learning.json``) with the wall time of each arm.

Arms (``--arms``):
  small          geodino train stage=pretrain model=vit_tiny recipe=small
  reference      the same with recipe=reference (DINOv3's values, CPU-sized crops)
  lightly        LightlyTrain `method="dinov2"`, its defaults, a DINOv2 ViT of vit_tiny's size (dim 96, depth 2,
                 3 heads, patch 16, 4 registers), the same global / local crop sizes and counts, batch and steps
  lightly_small  the same with recipe=small's knobs mapped onto LightlyTrain's arguments (K 64, teacher temperature
                 0.01, momentum 0.99, LayerScale 1, LR 3e-3, short warm-ups): is the gain the recipe or the code?

LightlyTrain is the peer, not a dependency: it is installed into its own virtual environment (``--peer-env``,
created with ``--system-site-packages`` so it reuses this torch) the first time an arm needs it. It reads image
files, so the comparison runs on RGB (B04, B03, B02) by default: each 96-px training chip is written as an 8-bit
PNG (reflectance / the band's 99th percentile over the training halves), and the peer's probe feeds the held-out
chips through the same stretch and its normalisation. ``--bands all`` trains the geodino arms on every band and skips
the LightlyTrain arms.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

RGB = ("B04", "B03", "B02")
CHIP = 96          # data.chip_size of the sample config: pixels per training chip before multi-crop
GLOBAL, LOCAL, N_LOCAL = 64, 32, 4  # stage=pretrain's crops (configs/stage/pretrain.yaml)
VIT_TINY = {"embed_dim": 96, "depth": 2, "num_heads": 3, "patch_size": 16, "registers": 4}


# ----------------------------------------------------------------------------------------------------------------------
# Data and probe sets
# ----------------------------------------------------------------------------------------------------------------------


def rasters(folder: str | None) -> list[Path]:
    from geodino.data.sample import sample_sat_path
    from geodino.data.sources.raster import find_rasters

    return find_rasters([folder]) if folder else [Path(sample_sat_path())]


def probe_sets(folder: str | None):
    from geodino.eval.sample_probe import dense_sets, read_rasters

    return dense_sets(images=read_rasters(rasters(folder))) if folder else dense_sets()


# ----------------------------------------------------------------------------------------------------------------------
# geodino arms
# ----------------------------------------------------------------------------------------------------------------------


def geodino_arm(name: str, recipe: str, args, out: Path, sets) -> dict:
    from geodino.eval.sample_probe import dense_probe
    from geodino.models import load_backbone

    run_dir = out / name
    cmd = [sys.executable, "-m", "geodino.cli", "train", "stage=pretrain", "model=vit_tiny", f"recipe={recipe}",
           f"train.iterations={args.steps}", f"train.batch_size={args.batch}", f"seed={args.train_seed}",
           f"run_dir={run_dir}"] + ([f"threads={args.threads}"] if args.threads else [])
    if args.folder:
        cmd += ["data=sat", f"data.paths=[{args.folder}]", "data.rows=[0.0,0.5]", f"data.chip_size={CHIP}"]
    else:
        cmd += ["data=sample_sat"]
    if args.bands == "rgb":
        cmd += [f"data.bands=[{','.join(RGB)}]"]
    print("$", " ".join(cmd), flush=True)
    if run_dir.exists():  # checked in main before any arm runs; only --overwrite gets here with a previous run
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    backbone = load_backbone(str(run_dir), which="teacher")
    return {"arm": name, "wall_s": wall, "images_seen": args.steps * args.batch,
            "dense_miou": dense_probe(backbone, sets)["miou"], "learning": summary.get("learning"),
            "contract": backbone.geodino_contract}


def random_and_raw(contract, sets, seeds) -> dict:
    from geodino.eval.sample_probe import dense_probe, linear_probe_miou, random_init, raw_features

    (xtr, ytr), (xte, yte) = sets
    rand = [dense_probe(random_init(contract, s), sets)["miou"] for s in seeds]
    raw = linear_probe_miou(raw_features(xtr, contract, "pixels"), ytr, raw_features(xte, contract, "pixels"),
                            yte)["miou"]
    return {"random_init": rand, "raw_pixels": raw}


# ----------------------------------------------------------------------------------------------------------------------
# LightlyTrain arms (run inside the peer environment: `python learning.py --peer-run spec.json`)
# ----------------------------------------------------------------------------------------------------------------------


def write_png_chips(folder: str | None, out: Path, stride: int) -> dict:
    """Training chips (top halves, RGB) as 8-bit PNGs for the peer; returns the stretch and normalisation used."""
    from PIL import Image

    from geodino.data.sample import SENTINEL2_BANDS
    from geodino.eval.sample_probe import read_rasters

    images = [img[[SENTINEL2_BANDS.index(b) for b in RGB]] for img in read_rasters(rasters(folder))]
    tops = [img[:, : img.shape[-2] // 2] for img in images]
    hi = torch.stack([t.flatten(1).quantile(0.99, dim=1) for t in tops]).amax(0).clamp_min(1e-4)
    out.mkdir(parents=True, exist_ok=True)
    pixels, n = [], 0
    for k, top in enumerate(tops):
        u8 = ((top / hi[:, None, None]).clamp(0, 1) * 255).round().to(torch.uint8)
        for y in range(0, top.shape[-2] - CHIP + 1, stride):
            for x in range(0, top.shape[-1] - CHIP + 1, stride):
                chip = u8[:, y:y + CHIP, x:x + CHIP]
                Image.fromarray(chip.permute(1, 2, 0).numpy()).save(out / f"r{k}_y{y}_x{x}.png")
                pixels.append(chip.flatten(1).float() / 255)
                n += 1
    allpx = torch.cat(pixels, 1)
    return {"n_chips": n, "stretch": hi.tolist(), "mean": allpx.mean(1).tolist(), "std": allpx.std(1).tolist()}


def _lightly_vit(init_values):
    from lightly_train._models.dinov2_vit.dinov2_vit_src.models.vision_transformer import DinoVisionTransformer

    return DinoVisionTransformer(img_size=GLOBAL, patch_size=VIT_TINY["patch_size"], embed_dim=VIT_TINY["embed_dim"],
                                 depth=VIT_TINY["depth"], num_heads=VIT_TINY["num_heads"], mlp_ratio=4.0,
                                 init_values=init_values, num_register_tokens=VIT_TINY["registers"],
                                 drop_path_rate=0.0)


class _PeerContract:
    """Enough of a geodino contract for the sample probe: RGB bands, the PNG stretch, then the peer's normalisation."""

    bands = RGB

    def __init__(self, stretch, mean, std):
        self.stretch = torch.tensor(stretch)[:, None, None]
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def normalize(self, x):
        return ((x / self.stretch).clamp(0, 1) - self.mean) / self.std


class _PeerBackbone(torch.nn.Module):
    def __init__(self, vit, contract):
        super().__init__()
        self.vit, self.geodino_contract = vit, contract

    def forward_features(self, x):
        return {"x_norm_patchtokens": self.vit.forward_features(x)["x_norm_patchtokens"]}


def peer_run(spec_path: str) -> int:
    """Train one LightlyTrain arm and probe it (called in the peer environment)."""
    import lightly_train

    from geodino.eval.sample_probe import dense_probe

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    tuned = spec["arm"] == "lightly_small"
    torch.manual_seed(spec["train_seed"])
    vit = _lightly_vit(1.0 if tuned else 1e-5)
    steps_per_epoch = spec["n_chips"] // spec["batch"]
    epochs = max(1, math.ceil(spec["steps"] / steps_per_epoch))
    method_args = {}
    optim_args = {}
    if tuned:
        method_args = {"output_dim": 64, "teacher_temp_start": 0.01, "teacher_temp_end": 0.01,
                       "teacher_temp_warmup_steps": 0, "momentum_start": 0.99, "momentum_end": 0.99,
                       "warmup_steps": max(1, spec["steps"] // 10), "student_freeze_last_layer_steps": 0}
        optim_args = {"lr": 3e-3}
    transform_args = {"image_size": (GLOBAL, GLOBAL),
                      "local_view": {"num_views": N_LOCAL, "view_size": (LOCAL, LOCAL)},
                      "normalize": {"mean": spec["mean"], "std": spec["std"]}}
    t0 = time.perf_counter()
    lightly_train.train(out=spec["out"], data=spec["png_dir"], model=vit, method="dinov2", epochs=epochs,
                        batch_size=spec["batch"], num_workers=0, accelerator="cpu", devices=1,
                        seed=spec["train_seed"], overwrite=True, method_args=method_args, optim_args=optim_args,
                        transform_args=transform_args, trainer_args={"max_steps": spec["steps"]},
                        loggers={"mlflow": None, "tensorboard": None, "wandb": None})
    wall = time.perf_counter() - t0
    exported = Path(spec["out"]) / "exported_models" / "exported_last.pt"
    trained = _lightly_vit(1.0 if tuned else 1e-5)
    state = torch.load(exported, map_location="cpu", weights_only=True)
    trained.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    contract = _PeerContract(spec["stretch"], spec["mean"], spec["std"])
    sets = probe_sets(spec["folder"])
    result = {"arm": spec["arm"], "wall_s": wall, "images_seen": spec["steps"] * spec["batch"],
              "dense_miou": dense_probe(_PeerBackbone(trained, contract), sets)["miou"], "epochs": epochs}
    rand = []
    for s in spec["seeds"]:
        torch.manual_seed(s)
        rand.append(dense_probe(_PeerBackbone(_lightly_vit(1.0 if tuned else 1e-5), contract), sets)["miou"])
    result["random_init"] = rand
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    return 0


def peer_python(env: Path) -> str:
    py = env / "bin" / "python"
    if not py.exists():
        print(f"creating the peer environment {env} (LightlyTrain; reuses this torch)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "lightly-train"], check=True)
    return str(py)


def lightly_arm(name: str, args, out: Path, png: dict) -> dict:
    spec = {"arm": name, "out": str(out / name), "png_dir": str(out / "png"), "steps": args.steps,
            "batch": args.batch, "train_seed": args.train_seed, "seeds": args.seeds, "folder": args.folder,
            "threads": args.threads, "result": str(out / f"{name}.json"), **png}
    (out / f"{name}.spec.json").write_text(json.dumps(spec))
    cmd = [peer_python(Path(args.peer_env)), __file__, "--peer-run", str(out / f"{name}.spec.json")]
    print("$", " ".join(cmd), flush=True)
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads((out / f"{name}.json").read_text())


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def _ms(values) -> str:
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", help="Sentinel-2 GeoTIFFs (with B03, B04, B08) instead of the packaged sample")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bands", choices=("rgb", "all"), default="rgb")
    ap.add_argument("--arms", nargs="+", default=["small", "reference", "lightly", "lightly_small"],
                    choices=("small", "reference", "lightly", "lightly_small"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102],
                    help="random-init seeds of the probes (distinct from --train-seed, whose init the arms start from)")
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch threads of every arm (default: each tool's own default)")
    ap.add_argument("--png-stride", type=int, default=8, help="stride of the peer's PNG training chips (px)")
    ap.add_argument("--out", default="outputs/bench_learning")
    ap.add_argument("--overwrite", action="store_true", help="replace the arms' previous runs in --out")
    ap.add_argument("--peer-env", default=str(Path.home() / ".cache" / "geodino" / "lightly-env"))
    ap.add_argument("--peer-run", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer_run:
        return peer_run(args.peer_run)
    if args.bands == "all" and any(a.startswith("lightly") for a in args.arms):
        ap.error("the LightlyTrain arms read PNG files: use --bands rgb, or drop them from --arms")
    out = Path(args.out)
    existing = [str(out / a) for a in args.arms if (out / a).exists()]
    if existing and not args.overwrite:
        ap.error(f"{', '.join(existing)} exist (earlier runs): pass --overwrite to replace them, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sets = probe_sets(args.folder)
    rows, floors = [], None
    for arm in args.arms:
        if arm in ("small", "reference"):
            r = geodino_arm(arm, arm, args, out, sets)
            floors = floors or random_and_raw(r.pop("contract"), sets, args.seeds)
            r.pop("contract", None)
        else:
            if not (out / "png" / ".done.json").exists():
                png = write_png_chips(args.folder, out / "png", args.png_stride)
                (out / "png" / ".done.json").write_text(json.dumps(png))
            png = json.loads((out / "png" / ".done.json").read_text())
            r = lightly_arm(arm, args, out, png)
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "learning"}), flush=True)
    print(f"\nimages seen per arm: {args.steps * args.batch} ({args.steps} steps x {args.batch}); bands: {args.bands}; "
          f"probe: dense linear, bottom halves, mIoU")
    print(f"{'arm':<15}{'dense mIoU':>11}{'vs own random init':>22}{'DINO gap':>10}{'wall':>9}")
    for r in rows:
        own = r.get("random_init") or (floors or {}).get("random_init", [float('nan')])
        gap = (r.get("learning") or {}).get("dino_loss_below_ln_k")
        print(f"{r['arm']:<15}{r['dense_miou']:>11.1f}{_ms(own):>15} ({r['dense_miou'] - np.mean(own):+.1f})"
              f"{'' if gap is None else f'{gap:.3f}':>10}{r['wall_s'] / 60:>7.1f} m")
    if floors:
        print(f"{'random init':<15}{_ms(floors['random_init']):>11}   (geodino vit_tiny, {len(args.seeds)} seeds)")
        print(f"{'raw pixels':<15}{floors['raw_pixels']:>11.1f}")
    (out / "learning.json").write_text(json.dumps({"args": vars(args), "arms": rows, "floors": floors}, indent=2,
                                                  default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
