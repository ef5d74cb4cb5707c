"""LoveDA on disk (docs/eo_data.md §1), read through torchgeo's `LoveDA` dataset.

Layout (``root=`` is the folder holding ``Train``/``Val``; never downloaded)::

    <root>/{Train,Val}/{Urban,Rural}/images_png/<id>.png   1024x1024 RGB
    <root>/{Train,Val}/{Urban,Rural}/masks_png/<id>.png    single channel, same file name

torchgeo returns ``image`` float32 [3, H, W] with values 0..255 (not scaled) and ``mask`` int64 with the
raw values: 0 = no-data, 1 background, 2 building, 3 road, 4 water, 5 barren, 6 forest, 7 agriculture.
(Its ``classes`` tuple is off by one — ``classes[i - 1]`` names value i — so geodino keeps its own names.)
`LoveDATiles` serves one split as a dense tile set (geodino.eval.dense): image scaled to [0, 1], the raw mask,
the scene (urban / rural) as the tile's group. Masks are checked: a value outside 0..7 or a mask whose size
differs from its image raises a `DataError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchgeo.datasets import LoveDA

from geodino.errors import DataError, GeodinoError

CLASS_NAMES = ("no-data", "background", "building", "road", "water", "barren", "forest", "agriculture")
NUM_CLASSES = 8
IGNORE_INDEX = 0
SPLITS = {"train": "Train", "val": "Val", "test": "Test"}
SCENES = ("urban", "rural")


class LoveDATiles:
    """torchgeo `LoveDA` with validation, [0, 1] scaling and scene groups, as a dense tile set."""

    def __init__(self, root: Path, split: str, scenes, max_tiles: int | None = None):
        split = str(split)
        if split not in SPLITS:
            raise GeodinoError(f"LoveDA split '{split}' is not one of: {', '.join(SPLITS)}")
        if split == "test":
            raise GeodinoError("LoveDA's test masks are withheld (scored on CodaLab); evaluate on eval_split=val")
        scenes = [str(s).lower() for s in scenes]
        bad = [s for s in scenes if s not in SCENES]
        if bad or not scenes:
            raise GeodinoError(f"LoveDA scenes {bad or scenes} invalid; choose from: {', '.join(SCENES)}")
        missing = [str(root / SPLITS[split] / s.capitalize() / "images_png") for s in scenes
                   if not (root / SPLITS[split] / s.capitalize() / "images_png").is_dir()]
        if missing:
            raise DataError(
                f"LoveDA {split} split not found: missing {', '.join(missing)} (expected "
                f"<root>/{{Train,Val}}/{{Urban,Rural}}/{{images_png,masks_png}}/*.png)"
            )
        try:
            self.ds = LoveDA(root=str(root), split=split, scene=scenes, download=False, checksum=False)
        except Exception as e:
            raise DataError(f"LoveDA at {root} ({split}): {type(e).__name__}: {e}") from None
        if max_tiles:
            self.ds.files = self.ds.files[: int(max_tiles)]
        if not self.ds.files:
            raise DataError(f"LoveDA {split} split at {root} has no images_png/*.png files")
        self.split = split

    def __len__(self) -> int:
        return len(self.ds.files)

    def files(self) -> list[str]:
        return [p for f in self.ds.files for p in (f["image"], f["mask"])]

    def size(self, i: int) -> tuple[int, int]:
        path = self.ds.files[i]["image"]
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Exception as e:
            raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
        return h, w

    def load(self, i: int) -> dict:
        f = self.ds.files[i]
        if not Path(f["mask"]).is_file():
            raise DataError(f"{f['mask']}: mask missing for image {f['image']}")
        try:
            sample = self.ds[i]
        except Exception as e:
            raise DataError(f"{f['image']} / {f['mask']}: unreadable ({type(e).__name__}: {e})") from None
        image, mask = sample["image"], sample["mask"]
        if image.shape[-2:] != mask.shape[-2:]:
            raise DataError(f"{f['mask']}: mask is {tuple(mask.shape[-2:])} but its image is {tuple(image.shape[-2:])}")
        lo, hi = int(mask.min()), int(mask.max())
        if lo < 0 or hi >= NUM_CLASSES:
            bad = sorted({int(v) for v in torch.unique(mask) if v < 0 or v >= NUM_CLASSES})
            raise DataError(
                f"{f['mask']}: label value(s) {', '.join(map(str, bad))} outside LoveDA's 0..7 "
                f"(0 = no-data, 1..7 = {', '.join(CLASS_NAMES[1:])}); is this a LoveDA mask?"
            )
        group = "urban" if f"{Path(SPLITS[self.split]) / 'Urban'}" in f["image"] else "rural"
        return {"image": image / 255.0, "target": mask, "name": Path(f["image"]).stem, "group": group}
