"""The stated land-cover rule of the packaged Sentinel-2 sample (one implementation): per pixel (or per patch of
mean reflectance), from Sentinel-2 reflectance in [0, 1],

* **water** if NDWI = (B03 - B08) / (B03 + B08) > 0.1, else
* **dense vegetation** if NDVI = (B08 - B04) / (B08 + B04) > 0.5, else
* **sparse vegetation** if NDVI > 0.25, else
* **bare or built-up land** (bare soil, roads, buildings, also some marsh and the bright cloud near the centre).

The held-out probes (geodino.eval.sample_probe) score patches with it; the caption sample and its labelled
open-vocabulary folder (scripts/make_sample_captions.py) name and label pixels with it. These are spectral-index
classes, not surveyed ground truth.
"""

from __future__ import annotations

import numpy as np
import torch

#: Class names in label order (0..3); also the caption sample's class words.
LAND_COVER_CLASSES: tuple[str, ...] = ("water", "dense vegetation", "sparse vegetation", "bare or built-up land")
NDWI_WATER = 0.1
NDVI_DENSE = 0.5
NDVI_SPARSE = 0.25


def land_cover(red, green, nir):
    """Per-element class indices (0..3, `LAND_COVER_CLASSES`) from red (B04), green (B03) and NIR (B08) reflectance
    (numpy arrays or torch tensors of one shape; the result has the same kind, dtype int64)."""
    if isinstance(red, torch.Tensor):
        return torch.from_numpy(land_cover(red.cpu().numpy(), green.cpu().numpy(), nir.cpu().numpy()))
    red, green, nir = (np.asarray(a, dtype=np.float64) for a in (red, green, nir))
    ndvi = (nir - red) / np.maximum(nir + red, 1e-6)
    ndwi = (green - nir) / np.maximum(green + nir, 1e-6)
    labels = np.full(ndvi.shape, 3, dtype=np.int64)
    labels[ndvi > NDVI_SPARSE] = 2
    labels[ndvi > NDVI_DENSE] = 1
    labels[ndwi > NDWI_WATER] = 0
    return labels
