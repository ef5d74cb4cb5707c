"""Tiny fake datasets in the real on-disk formats of LoveDA, GEO-Bench v1 and the canopy task.

* LoveDA: ``<root>/{Train,Val}/{Urban,Rural}/{images_png,masks_png}/<id>.png`` (RGB / L PNGs, masks 0..7).
* GEO-Bench v1: ``<root>/{classification_v1.0,segmentation_v1.0}/<task>/`` with one ``<sample>.hdf5`` per
  sample (one 2-D dataset per band keyed by the band descriptor, a ``label`` dataset for segmentation,
  and the file attribute ``pickle`` = ``str(pickle.dumps(attr_dict))``), ``task_specs.pkl``,
  ``default_partition.json`` and an 11-key ``band_stats.json``. The pickled objects are instances of
  stub ``geobench.*`` classes registered in ``sys.modules`` only while pickling, exactly like files
  written by geobench itself (its classes are pickled by module + name + ``__dict__``).
* Canopy: ``<root>/dataset.json``, ``splits/{train,val,test}.txt``, ``images/<stem>.tif`` (uint8 RGB
  GeoTIFF) and ``chm/<stem>.tif`` (float32 metres, nodata -9999).
"""

from __future__ import annotations

import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------------------
# LoveDA
# ----------------------------------------------------------------------------------------------


def make_loveda(root: Path, n_per_scene: int = 2, size: int = 32, seed: int = 0, block: int = 8) -> Path:
    """Images whose colour encodes the class (so a probe can learn), masks 0..7 with some no-data, classes in
    `block`-pixel squares (8: finer than a 16-px token; 16: one class per token)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(8, 3))
    for split in ("Train", "Val"):
        for scene in ("Urban", "Rural"):
            img_dir = root / split / scene / "images_png"
            msk_dir = root / split / scene / "masks_png"
            img_dir.mkdir(parents=True, exist_ok=True)
            msk_dir.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_scene):
                # blocky masks so a 16-px patch grid sees structure
                blocks = rng.integers(1, 8, size=(size // block, size // block))
                mask = np.kron(blocks, np.ones((block, block), dtype=np.int64)).astype(np.uint8)
                mask[:2, :2] = 0  # a no-data corner
                img = colours[mask].astype(np.float64) + rng.normal(0, 8, size=(size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(img_dir / f"{i + 100 * (scene == 'Rural')}.png")
                Image.fromarray(mask, "L").save(msk_dir / f"{i + 100 * (scene == 'Rural')}.png")
    return root




# ----------------------------------------------------------------------------------------------
# GEO-Bench v1
# ----------------------------------------------------------------------------------------------


class _Stub:
    """Base of the stub geobench classes: instances carry attributes only."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _stub_modules() -> dict[str, types.ModuleType]:
    mods = {name: types.ModuleType(name) for name in ("geobench", "geobench.dataset", "geobench.label", "geobench.task")}
    for mod, names in {
        "geobench.dataset": ("Sentinel2", "SpectralBand", "SegmentationClasses", "HyperSpectralBands"),
        "geobench.label": ("Classification", "MultiLabelClassification"),
        "geobench.task": ("TaskSpecifications",),
    }.items():
        for n in names:
            cls = type(n, (_Stub,), {"__module__": mod, "__qualname__": n})
            setattr(mods[mod], n, cls)
    return mods


class geobench_stubs:
    """Context manager registering the stub geobench modules so pickle can name their classes."""

    def __enter__(self):
        self.mods = _stub_modules()
        self.saved = {k: sys.modules.get(k) for k in self.mods}
        sys.modules.update(self.mods)
        return self.mods

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


S2_BANDS = [
    ("01 - Coastal aerosol", ("1", "01")), ("02 - Blue", ("2", "02", "blue")), ("03 - Green", ("3", "03", "green")),
    ("04 - Red", ("4", "04", "red")), ("05 - Vegetation Red Edge", ("5", "05")), ("06 - Vegetation Red Edge", ("6", "06")),
    ("07 - Vegetation Red Edge", ("7", "07")), ("08 - NIR", ("8", "08", "NIR")), ("08A - Vegetation Red Edge", ("8A", "08A")),
    ("09 - Water vapour", ("9", "09")), ("10 - SWIR - Cirrus", ("10",)), ("11 - SWIR", ("11",)), ("12 - SWIR", ("12",)),
]
RGB3 = [("02 - Blue", ("2", "02", "blue")), ("03 - Green", ("3", "03", "green")), ("04 - Red", ("4", "04", "red"))]


def make_geobench_task(root: Path, task: str, kind: str = "cls", n_classes: int = 3, bands=RGB3,
                       n: tuple[int, int, int] = (6, 3, 3), size: int = 16, seed: int = 0,
                       band_values: dict | None = None) -> Path:
    """One fake GEO-Bench v1 task. `kind`: cls | multilabel | seg. Pixel values encode the label.

    `band_values` maps a band position to a constant value (to check band selection / channel fixes).
    """
    import datetime

    import h5py
    from affine import Affine

    bench = "segmentation_v1.0" if kind == "seg" else "classification_v1.0"
    tdir = root / bench / task
    tdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with geobench_stubs() as m:
        D, L, T = m["geobench.dataset"], m["geobench.label"], m["geobench.task"]
        infos = [D.Sentinel2(name=b, alt_names=alt, spatial_resolution=10.0, wavelength=None) for b, alt in bands]
        if kind == "seg":
            label_type = D.SegmentationClasses(name="label", spatial_resolution=10.0, n_classes=n_classes,
                                               _class_names=[f"class{i}" for i in range(n_classes)])
        elif kind == "multilabel":
            label_type = L.MultiLabelClassification(n_classes=n_classes, class_name=[f"l{i}" for i in range(n_classes)])
        else:
            label_type = L.Classification(n_classes=n_classes, _class_names=[f"c{i}" for i in range(n_classes)])
        specs = T.TaskSpecifications(dataset_name=task, benchmark_name=bench, patch_size=(size, size), n_time_steps=1,
                                     bands_info=infos, label_type=label_type, eval_loss=None, spatial_resolution=10.0)
        (tdir / "task_specs.pkl").write_bytes(pickle.dumps(specs))
        names = {"train": [], "valid": [], "test": []}
        stats: dict[str, list] = {b: [] for b, _ in bands}
        k = 0
        for split, count in zip(("train", "valid", "test"), n):
            for i in range(count):
                name = f"id_{k:04d}"
                k += 1
                names[split].append(name)
                attr = {}
                with h5py.File(tdir / f"{name}.hdf5", "w") as f:
                    if kind == "seg":
                        lab = np.kron(rng.integers(0, n_classes, size=(size // 8, size // 8)), np.ones((8, 8))).astype(np.int16)
                        level = lab.astype(np.float64)
                    elif kind == "multilabel":
                        lab = (rng.random(n_classes) < 0.5).astype(np.int64)
                        lab[k % n_classes] = 1
                        level = np.full((size, size), float(lab @ (2 ** np.arange(n_classes))))
                    else:
                        lab = int(k % n_classes)
                        level = np.full((size, size), float(lab))
                    order = []
                    for j, (info, (bname, _)) in enumerate(zip(infos, bands)):
                        data = 500 + 400 * level + rng.normal(0, 30, size=(size, size))
                        if band_values and j in band_values:
                            data = np.full((size, size), float(band_values[j]))
                        data = data.astype(np.int16)
                        f.create_dataset(bname, data=data)
                        stats[bname].append(data)
                        order.append(bname)
                        attr[bname] = {"date": datetime.date(2020, 1, 1), "date_id": 0, "spatial_resolution": 10.0,
                                       "band_info": info, "meta_info": None,
                                       "transform": Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0), "crs": None}
                    if kind == "seg":
                        f.create_dataset("label", data=lab)
                        order.append("label")
                        attr["label"] = {"date": None, "date_id": None, "spatial_resolution": 10.0, "band_info": label_type,
                                         "meta_info": None, "transform": None, "crs": None}
                    else:
                        attr["label"] = lab
                    attr["bands_order"] = order
                    f.attrs["pickle"] = str(pickle.dumps(attr))
    (tdir / "default_partition.json").write_text(json.dumps(names))
    keys = ("min", "max", "mean", "std", "median", "percentile_0_1", "percentile_1", "percentile_5", "percentile_95",
            "percentile_99", "percentile_99_9")
    band_stats = {}
    for b, arrs in stats.items():
        a = np.stack(arrs).astype(np.float64)
        vals = [a.min(), a.max(), a.mean(), a.std(), np.median(a), *np.percentile(a, [0.1, 1, 5, 95, 99, 99.9])]
        band_stats[b] = {k: float(v) for k, v in zip(keys, vals)}
    (tdir / "band_stats.json").write_text(json.dumps(band_stats))
    return tdir




# ----------------------------------------------------------------------------------------------
# Canopy height
# ----------------------------------------------------------------------------------------------


def make_canopy(root: Path, n: int = 4, size: int = 64, seed: int = 0, splits=None) -> Path:
    """uint8 RGB GeoTIFFs + float32 CHM (metres, a function of the green channel, a nodata patch)."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "chm").mkdir(parents=True, exist_ok=True)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    stems = [f"tile_{i:02d}" for i in range(n)]
    for i, stem in enumerate(stems):
        tr = from_origin(500000 + 1000 * i, 4000000, 1.0, 1.0)
        blocks = rng.integers(0, 4, size=(size // 16, size // 16))
        height = np.kron(blocks * 8.0, np.ones((16, 16)))  # 0, 8, 16, 24 m
        rgb = np.stack([60 + 2 * height, 200 - 5 * height, 80 + height]) + rng.normal(0, 4, size=(3, size, size))
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
        chm = height.astype(np.float32)
        chm[:6, :6] = -9999.0
        prof = dict(driver="GTiff", height=size, width=size, crs="EPSG:32631", transform=tr)
        with rasterio.open(root / "images" / f"{stem}.tif", "w", count=3, dtype="uint8", **prof) as dst:
            dst.write(rgb)
        with rasterio.open(root / "chm" / f"{stem}.tif", "w", count=1, dtype="float32", nodata=-9999.0, **prof) as dst:
            dst.write(chm[None])
    splits = splits or {"train": stems[:2], "val": stems[2:3], "test": stems[3:]}
    for split, names in splits.items():
        (root / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n")
    meta = {"name": "fake-canopy", "version": 1, "gsd_m": 1.0, "bands": ["red", "green", "blue"], "image_scale": 255,
            "chm_units": "m", "chm_nodata": -9999.0, "max_height_m": 96,
            "splits": {s: f"splits/{s}.txt" for s in splits}}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root




# ----------------------------------------------------------------------------------------------
# Backbones and CLI helpers
# ----------------------------------------------------------------------------------------------




def eval_argv(task: str, root: Path, tmp: Path, *extra: str) -> list[str]:
    return ["eval", task, f"root={root}", f"run_dir={tmp / 'run'}", f"cache_dir={tmp / 'cache'}", "progress=false", "threads=1",
            "n_figures=2", *extra]


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())["results"]
