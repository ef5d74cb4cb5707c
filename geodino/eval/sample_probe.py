"""Held-out probes on the packaged Sentinel-2 sample: did pretraining on it learn anything? (docs/learning.md)

The sample's training config (``data=sample_sat``) draws chips from the top (north) half of the 256 × 256 scene
only; the probes test on the bottom half, so no test pixel was ever a training pixel.

1. **Dense linear probe** (the main one; patch tokens, scored by mIoU). Every 16 × 16 patch gets a land-cover label
   from its mean reflectance, a quantity the model never sees as a target: water if NDWI > 0.1, else dense
   vegetation if NDVI > 0.5, else sparse vegetation if NDVI > 0.25, else bare / built / marsh. Chips of 64 px at a
   stride of 8 px: 225 training chips inside the top half and 225 test chips inside the bottom half (3600 patches
   each). A multinomial logistic regression on z-scored frozen patch tokens (full-batch L-BFGS, L2 1e-4) is fitted
   on the top half and scored on the bottom half: mIoU over the 4 classes.
2. **View retrieval** (class tokens): 64 held-out chips from the bottom half, two independent training
   augmentations each; top-1 retrieval of view B from view A (chance 1/64).

Both compare the backbone with random initialisations of the same architecture fed the *same* normalisation
(several seeds, mean ± std reported), and the dense probe also with raw pixels (patch-mean bands, flattened
patch pixels). `compare(trained)` returns every number and whether the trained backbone wins by at least
`margin` mIoU and by more than two seed spreads.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from geodino.data.geotiff import read_scaled
from geodino.data.multicrop import MultiCropAugmentation
from geodino.data.sample import SENTINEL2_BANDS, sample_sat_path
from geodino.data.sample.landcover import LAND_COVER_CLASSES, land_cover
from geodino.errors import DataError
from geodino.models import backbone_from_contract

CLASS_NAMES = LAND_COVER_CLASSES
PATCH = 16


def read_sample() -> torch.Tensor:
    """The sample scene (13, 256, 256) as reflectance in [0, 1] (the data config's scaling)."""
    x, _, _ = read_scaled(sample_sat_path())
    return torch.from_numpy(x)


#: Bands the land-cover labels are computed from (NDVI, NDWI); a raster without them cannot be probed.
LABEL_BANDS = ("B03", "B04", "B08")


def read_rasters(paths) -> list[torch.Tensor]:
    """Sentinel-2 GeoTIFFs -> [(13, H, W) reflectance in `SENTINEL2_BANDS` order], scaled as the data configs do.

    Bands are matched by their descriptions; a band a file lacks is left at 0 (a backbone whose contract asks for it
    is refused by `_inputs`). Files without B03, B04 and B08 are refused: the labels need them."""
    out = []
    for path in paths:
        x, _, info = read_scaled(path)
        names = [str(n).upper() for n in info["bands"]]
        missing = [b for b in LABEL_BANDS if b not in names]
        if missing:
            raise DataError(f"{path}: the sample probes need Sentinel-2 bands {', '.join(LABEL_BANDS)} (for NDVI / "
                            f"NDWI labels); its bands are {', '.join(names)} (missing {', '.join(missing)})")
        full = torch.zeros(len(SENTINEL2_BANDS), *x.shape[-2:])
        for i, name in enumerate(names):
            if name in SENTINEL2_BANDS:
                full[SENTINEL2_BANDS.index(name)] = torch.from_numpy(x[i])
        out.append(full)
    return out


def patch_labels(img: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """(13, H, W) reflectance -> (H/patch, W/patch) land-cover labels of the patches' mean reflectance
    (geodino.data.sample.landcover: the one rule)."""
    b = {n: i for i, n in enumerate(SENTINEL2_BANDS)}
    pooled = F.avg_pool2d(img[None], patch)[0]
    return land_cover(pooled[b["B04"]], pooled[b["B03"]], pooled[b["B08"]])


def _windows(img: torch.Tensor, rows: tuple[int, int], chip: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = img.shape[-1]
    pos = [(y, x) for y in range(rows[0], rows[1] - chip + 1, stride) for x in range(0, width - chip + 1, stride)]
    chips = torch.stack([img[:, y:y + chip, x:x + chip] for y, x in pos])
    return chips, torch.stack([patch_labels(c) for c in chips])


def dense_sets(chip: int = 64, stride: int = 8, images: list[torch.Tensor] | None = None,
               max_chips: int = 900, seed: int = 0) -> tuple[tuple, tuple]:
    """((train chips, labels) from the top halves, (test chips, labels) from the bottom halves).

    `images` default to the packaged sample (225 chips per half); other rasters (`read_rasters`) are cut the same
    way, and each half keeps at most `max_chips` chips (a fixed random subset) so large scenes stay fast."""
    halves = ([], [])
    for img in images if images is not None else [read_sample()]:
        half = img.shape[-2] // 2
        if half < chip or img.shape[-1] < chip:
            raise DataError(f"a raster of {tuple(img.shape[-2:])} px is too small for {chip}-px probe chips in each "
                            "half")
        halves[0].append(_windows(img, (0, half), chip, stride))
        halves[1].append(_windows(img, (half, img.shape[-2]), chip, stride))
    g = torch.Generator().manual_seed(seed)
    out = []
    for parts in halves:
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if len(x) > max_chips:
            keep = torch.randperm(len(x), generator=g)[:max_chips].sort().values
            x, y = x[keep], y[keep]
        out.append((x, y))
    return out[0], out[1]


def _inputs(x: torch.Tensor, contract) -> torch.Tensor:
    unknown = [b for b in contract.bands if b not in SENTINEL2_BANDS]
    if unknown:
        raise DataError(f"the sample probes feed Sentinel-2 bands; the backbone's contract asks for {unknown}")
    idx = [SENTINEL2_BANDS.index(b) for b in contract.bands]
    return contract.normalize(x[:, idx])


@torch.no_grad()
def patch_features(backbone, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """(N, C, H, W) sample chips -> (N, tokens, D) frozen patch tokens (normalised with the backbone's contract)."""
    backbone.eval()
    xs = _inputs(x, backbone.geodino_contract)
    return torch.cat([backbone.forward_features(xs[i:i + batch])["x_norm_patchtokens"].float()
                      for i in range(0, len(xs), batch)])


def raw_features(x: torch.Tensor, contract, mode: str = "mean") -> torch.Tensor:
    """Raw-pixel baselines on the same grid: patch-mean bands, or every pixel of the patch flattened."""
    xs = _inputs(x, contract)
    if mode == "mean":
        return F.avg_pool2d(xs, PATCH).flatten(2).transpose(1, 2)
    return F.unfold(xs, PATCH, stride=PATCH).transpose(1, 2)


def _fit(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, iters: int = 200) -> torch.Tensor:
    xb = torch.cat([x, torch.ones(len(x), 1)], 1)
    w = torch.zeros(xb.shape[1], n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xb @ w, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def linear_probe_miou(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                      test_labels: torch.Tensor, l2: float = 1e-4) -> dict:
    """Logistic regression on z-scored features (fitted on train), mIoU / accuracy / per-class IoU on test."""
    d = train_feats.shape[-1]
    xtr, ytr = train_feats.reshape(-1, d), train_labels.reshape(-1)
    xte, yte = test_feats.reshape(-1, d), test_labels.reshape(-1)
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    w = _fit((xtr - mu) / sd, ytr, len(CLASS_NAMES), l2)
    pred = (torch.cat([(xte - mu) / sd, torch.ones(len(xte), 1)], 1) @ w).argmax(1)
    ious = []
    for c in range(len(CLASS_NAMES)):
        if (yte == c).any():
            union = ((pred == c) | (yte == c)).sum().item()
            ious.append(((pred == c) & (yte == c)).sum().item() / union if union else 0.0)
    return {"miou": 100 * float(np.mean(ious)), "accuracy": 100 * float((pred == yte).float().mean()),
            "iou": [round(100 * v, 1) for v in ious]}


def dense_probe(backbone, sets=None) -> dict:
    (xtr, ytr), (xte, yte) = sets or dense_sets()
    return linear_probe_miou(patch_features(backbone, xtr), ytr, patch_features(backbone, xte), yte)


@torch.no_grad()
def view_retrieval(backbone, n_chips: int = 64, chip: int = 64, seed: int = 10_000) -> float:
    """Top-1 accuracy of retrieving a held-out chip's second augmented view from its first (bottom half)."""
    contract = backbone.geodino_contract
    img = read_sample()[[SENTINEL2_BANDS.index(b) for b in contract.bands]]
    half, w = img.shape[-2] // 2, img.shape[-1]
    g = torch.Generator().manual_seed(seed)
    ys = torch.randint(half, img.shape[-2] - chip + 1, (n_chips,), generator=g)
    xs = torch.randint(0, w - chip + 1, (n_chips,), generator=g)
    rgb = [contract.bands.index(b) for b in ("B04", "B03", "B02")] if {"B04", "B03", "B02"} <= set(contract.bands) \
        else None
    aug = MultiCropAugmentation(global_crops_size=chip, local_crops_size=16, local_crops_number=0,
                                mean=list(contract.mean), std=list(contract.std), n_bands=contract.n_bands,
                                rgb_indices=rgb if contract.n_bands != 3 else None)
    views = [aug(img[:, y:y + chip, x:x + chip], generator=torch.Generator().manual_seed(seed + i))["global_crops"]
             for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist()))]
    backbone.eval()
    qa = F.normalize(backbone.forward_features(torch.stack([v[0] for v in views]))["x_norm_clstoken"].float(), dim=-1)
    qb = F.normalize(backbone.forward_features(torch.stack([v[1] for v in views]))["x_norm_clstoken"].float(), dim=-1)
    return float(((qa @ qb.T).argmax(1) == torch.arange(n_chips)).float().mean())


def random_init(contract, seed: int):
    """A freshly initialised backbone of the same architecture, fed the same normalisation (the contract)."""
    torch.manual_seed(seed)
    return backbone_from_contract(contract)


def _stats(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": [round(v, 2) for v in values]}


def compare(trained, seeds=(0, 1, 2), margin: float = 5.0, raw: bool = True, sets=None,
            retrieval: bool = True) -> dict:
    """Every probe for `trained` against random inits (`seeds`) with the same normalisation, and the verdict:
    ``beats_random`` when the dense-probe mIoU exceeds the random mean by at least `margin` and by more than two
    seed standard deviations. `sets` (from `dense_sets`) default to the packaged sample; `retrieval=False` skips the
    view-retrieval probe (it draws its chips from the packaged sample)."""
    sets = sets or dense_sets()
    contract = trained.geodino_contract
    dense = dense_probe(trained, sets)
    randoms = [dense_probe(random_init(contract, s), sets) for s in seeds]
    rand = _stats([r["miou"] for r in randoms])
    gain = dense["miou"] - rand["mean"]
    out = {"dense_miou": {"trained": dense, "random_init": rand, "gain": gain,
                          "beats_random": bool(gain >= margin and gain > 2 * rand["std"])}}
    if retrieval:
        out["view_retrieval_top1"] = {
            "trained": view_retrieval(trained),
            "random_init": _stats([view_retrieval(random_init(contract, s)) for s in seeds]), "chance": 1 / 64}
    if raw:
        (xtr, ytr), (xte, yte) = sets
        out["dense_miou"]["raw_pixels"] = {
            mode: linear_probe_miou(raw_features(xtr, contract, mode), ytr, raw_features(xte, contract, mode), yte)["miou"]
            for mode in ("mean", "pixels")}
    return out
