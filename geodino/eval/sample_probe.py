"""Two small held-out probes on the packaged Sentinel-2 sample, to check that pretraining on it
learned something (issue "The SSL trainer": features must beat the random-init backbone).

1. **View retrieval** (instance discrimination, the invariance DINO trains for): 64 chips of
   64×64 px are drawn from the sample with a seed disjoint from training; each gets two independent
   multi-crop global views (random resized crop, flip, band jitter, blur, solarize). Query = the
   class token of view A, database = class tokens of every chip's view B; the score is top-1
   retrieval accuracy (chance 1/64 = 1.6 %).
2. **Patch land cover** (dense features): every 16×16 patch of the 256×256 sample gets a label from
   its mean spectral indices (water: NDWI > 0.1; dense vegetation: NDVI > 0.5; sparse vegetation:
   NDVI > 0.25; else bare / built). A k-NN (k = 5, cosine) on the backbone's patch tokens is fitted
   on the left half of the scene and scored on the right half (balanced accuracy, spatially
   disjoint).

`compare(trained, random_init)` runs both for two backbones and returns the numbers.
"""

from __future__ import annotations

import numpy as np
import rasterio
import torch
import torch.nn.functional as F

from geodino.data.multicrop import MultiCropAugmentation
from geodino.data.sample import SENTINEL2_BANDS, sample_sat_path
from geodino.data.sources.raster import RasterSource
from geodino.losses import resize_gram_teacher_tokens
from geodino.train.monitors import gram_agreement

_CLASS_NAMES = ("water", "dense vegetation", "sparse vegetation", "bare / built")


def _read_sample() -> torch.Tensor:
    with rasterio.open(sample_sat_path()) as src:
        arr = src.read().astype(np.float32)
    return torch.from_numpy(arr / 10000.0).clamp_(0, 1)


def patch_labels(img: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """(13, H, W) reflectance -> (H/patch, W/patch) land-cover labels from mean NDVI / NDWI."""
    b = {n: i for i, n in enumerate(SENTINEL2_BANDS)}
    pooled = F.avg_pool2d(img[None], patch)[0]
    red, green, nir = pooled[b["B04"]], pooled[b["B03"]], pooled[b["B08"]]
    ndvi = (nir - red) / (nir + red).clamp_min(1e-6)
    ndwi = (green - nir) / (green + nir).clamp_min(1e-6)
    labels = torch.full(ndvi.shape, 3, dtype=torch.long)
    labels[ndvi > 0.25] = 2
    labels[ndvi > 0.5] = 1
    labels[ndwi > 0.1] = 0
    return labels


@torch.no_grad()
def land_cover_probe(backbone, k: int = 5) -> float:
    """Balanced accuracy of a cosine k-NN on patch tokens, left half -> right half."""
    img = _read_sample()
    labels = patch_labels(img)
    gh, gw = labels.shape
    x = backbone.geodino_contract.normalize(img)[None]
    backbone.eval()
    feats = F.normalize(backbone.forward_features(x)["x_norm_patchtokens"][0].float(), dim=-1).view(gh, gw, -1)
    half = gw // 2
    tr_f, tr_y = feats[:, :half].reshape(-1, feats.shape[-1]), labels[:, :half].reshape(-1)
    te_f, te_y = feats[:, half:].reshape(-1, feats.shape[-1]), labels[:, half:].reshape(-1)
    sim = te_f @ tr_f.T
    idx = sim.topk(k, dim=1).indices
    votes = F.one_hot(tr_y[idx], len(_CLASS_NAMES)).sum(1)
    pred = votes.argmax(1)
    accs = [float((pred[te_y == c] == c).float().mean()) for c in range(len(_CLASS_NAMES)) if (te_y == c).any()]
    return float(np.mean(accs))


@torch.no_grad()
def view_retrieval_probe(backbone, n_chips: int = 64, chip: int = 64, seed: int = 10_000) -> float:
    """Top-1 accuracy of retrieving a chip's second augmented view from its first."""
    contract = backbone.geodino_contract
    src = RasterSource([str(sample_sat_path())], chip_size=chip, length=n_chips, seed=seed)
    aug = MultiCropAugmentation(global_crops_size=chip, local_crops_size=16, local_crops_number=0,
                                mean=list(contract.mean), std=list(contract.std), n_bands=contract.n_bands,
                                rgb_indices=(3, 2, 1))
    views_a, views_b = [], []
    for i in range(n_chips):
        out = aug(src[i], generator=torch.Generator().manual_seed(seed + i))
        views_a.append(out["global_crops"][0])
        views_b.append(out["global_crops"][1])
    backbone.eval()
    qa = F.normalize(backbone.forward_features(torch.stack(views_a))["x_norm_clstoken"].float(), dim=-1)
    qb = F.normalize(backbone.forward_features(torch.stack(views_b))["x_norm_clstoken"].float(), dim=-1)
    hits = (qa @ qb.T).argmax(1) == torch.arange(n_chips)
    return float(hits.float().mean())


def compare(trained, random_init) -> dict:
    return {
        "view_retrieval_top1": {"trained": view_retrieval_probe(trained), "random_init": view_retrieval_probe(random_init),
                                "chance": 1 / 64},
        "land_cover_balanced_acc": {"trained": land_cover_probe(trained), "random_init": land_cover_probe(random_init),
                                    "chance": 0.25},
    }


@torch.no_grad()
def gram_agreement_heldout(student, gram_teacher, n_chips: int = 32, size: int = 64, gram_size: int = 128,
                           seed: int = 20_000) -> float:
    """Patch-similarity agreement (geodino.train.gram.gram_agreement) between a student at `size` and a
    Gram teacher at `gram_size` on held-out chips of the sample (same region, teacher tokens resized
    bicubically to the student grid, as in training)."""
    contract = student.geodino_contract
    src = RasterSource([str(sample_sat_path())], chip_size=size, length=n_chips, seed=seed)
    x = torch.stack([contract.normalize(src[i]) for i in range(n_chips)])
    xg = F.interpolate(x, size=(gram_size, gram_size), mode="bicubic", align_corners=False)
    student.eval()
    gram_teacher.eval()
    s = student.forward_features(x)["x_norm_patchtokens"]
    t = gram_teacher.forward_features(xg)["x_norm_patchtokens"]
    p = student.token_stride
    t = resize_gram_teacher_tokens(t, (size // p, size // p), (gram_size // p, gram_size // p))
    return gram_agreement(s, t)
