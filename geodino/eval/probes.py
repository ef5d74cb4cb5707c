"""Heads trained on frozen features: linear / kNN classification probes, dense heads, regression.

* `LinearProbe`: per-dimension standardisation (train statistics) + one linear layer; cross-entropy
  (multiclass) or binary cross-entropy (multilabel); AdamW with a cosine schedule.
* `knn_scores`: DINO's weighted kNN — cosine similarity on L2-normalised features, the k = 20 nearest
  training samples vote with weight ``exp(sim / T)`` (T = 0.07); for multilabel the votes are
  averaged label vectors (a probability per label).
* `LinearSegHead`: BatchNorm + 1x1 convolution on the patch-token grid (the DINOv2/v3 linear
  segmentation head); logits are bilinearly upsampled to pixel resolution before the loss.
* `LightDecoder`: two 3x3 conv + BN + GELU stages with 2x upsampling in between, then a 1x1 conv.
* `DPTHead`: segmentation-models-pytorch's DPT decoder on the tokens of several layers (``task.layers``).
* `UperNetHead`: a multi-level neck + segmentation-models-pytorch's UperNet decoder on several layers.
* `train_dense_head`: trains either head on cached window features for segmentation (cross-entropy
  with ignored pixels) or regression (L1 on valid pixels, targets standardised by train statistics).
All run on CPU or GPU; progress bars come from geodino.eval.features.progress_bar.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geodino.errors import GeodinoError
from geodino.eval.features import progress_bar

log = logging.getLogger("geodino")


def cosine_schedule(total_steps: int, warmup: int = 0) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


# ----------------------------------------------------------------------------------------------
# Learning-rate sweep
# ----------------------------------------------------------------------------------------------

def lr_grid(task_cfg) -> list[float]:
    """``task.lrs`` (the grid), else ``[task.lr]``."""
    grid = task_cfg.get("lrs") or [task_cfg.get("lr")]
    out = [float(v) for v in grid if v is not None]
    if not out:
        raise GeodinoError("no learning rate: set task.lr or task.lrs")
    return out


def sweep_lr(lrs: Sequence[float], fit: Callable[[float], object], score: Callable[[object], float],
             higher_is_better: bool = True) -> tuple[float, object, dict[str, float]]:
    """Fit one model per learning rate, score each on validation data, keep the best (ties: the first in grid
    order; a NaN score never wins). Returns ``(best_lr, best_model, {f"{lr:g}": score})``; only the best model is
    kept in memory."""
    if not lrs:
        raise GeodinoError("empty learning-rate grid")
    curve: dict[str, float] = {}
    best_lr, best_model, best_score = None, None, None
    for lr in lrs:
        model = fit(float(lr))
        sc = float(score(model))
        curve[f"{lr:g}"] = sc
        ok = math.isfinite(sc)
        improves = best_score is None or (sc > best_score if higher_is_better else sc < best_score)
        if best_lr is None or (ok and improves):
            best_lr, best_model, best_score = float(lr), model, (sc if ok else None)
        log.info("lr sweep: lr %g -> %.4f", lr, sc)
    return best_lr, best_model, curve


# ----------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------

class LinearProbe(nn.Module):
    def __init__(self, dim: int, n_out: int, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim) if mean is None else mean.float().clone())
        self.register_buffer("std", torch.ones(dim) if std is None else std.float().clone())
        self.linear = nn.Linear(dim, n_out)
        nn.init.zeros_(self.linear.bias)
        nn.init.normal_(self.linear.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, multilabel: bool, epochs: int = 20,
                     lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 256,
                     device: torch.device | str = "cpu", seed: int = 0, progress: bool = False) -> LinearProbe:
    x = torch.as_tensor(x).float()
    y = torch.as_tensor(y)
    n, d = x.shape
    if n == 0:
        raise GeodinoError("cannot train a linear probe on an empty training split")
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    probe = LinearProbe(d, n_classes, mean, std).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, epochs * math.ceil(n / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps))
    g = torch.Generator().manual_seed(seed)
    xd, yd = x.to(device), y.to(device)
    bar = progress_bar(range(epochs), epochs, "linear probe", progress)
    for _ in bar:
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            logits = probe(xd[idx])
            if multilabel:
                loss = F.binary_cross_entropy_with_logits(logits, yd[idx].float())
            else:
                loss = F.cross_entropy(logits, yd[idx].long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return probe.eval()


@torch.no_grad()
def probe_scores(probe: LinearProbe, x: torch.Tensor, multilabel: bool, batch_size: int = 4096) -> torch.Tensor:
    dev = next(probe.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        logits = probe(torch.as_tensor(x[i:i + batch_size]).float().to(dev))
        out.append((logits.sigmoid() if multilabel else logits.softmax(1)).cpu())
    return torch.cat(out) if out else torch.zeros(0, probe.linear.out_features)


@torch.no_grad()
def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, n_classes: int, k: int = 20,
               temperature: float = 0.07, multilabel: bool = False, chunk: int = 1024,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """DINO's temperature-weighted cosine kNN; returns per-class scores [N, n_classes] (rows sum to 1)."""
    train_x = F.normalize(torch.as_tensor(train_x).float(), dim=1).to(device)
    if len(train_x) == 0:
        raise GeodinoError("cannot run kNN with an empty training split")
    train_y = torch.as_tensor(train_y).to(device)
    onehot = train_y.float() if multilabel else F.one_hot(train_y.long(), n_classes).float()
    k = min(int(k), len(train_x))
    out = []
    x = torch.as_tensor(x).float()
    for i in range(0, len(x), chunk):
        q = F.normalize(x[i:i + chunk].to(device), dim=1)
        sim, idx = (q @ train_x.T).topk(k, dim=1)
        w = (sim / temperature).exp()
        votes = (onehot[idx] * w[..., None]).sum(1)
        out.append((votes / w.sum(1, keepdim=True)).cpu())
    return torch.cat(out) if out else torch.zeros(0, n_classes)


# ----------------------------------------------------------------------------------------------
# Dense heads
# ----------------------------------------------------------------------------------------------

class LinearSegHead(nn.Module):
    """BatchNorm + 1x1 conv on the patch-token grid. On features of several layers (``task.layers``) the grid holds
    their concatenation, so this is the DINOv2/v3 linear head on concatenated layers."""

    def __init__(self, dim: int, n_out: int):
        super().__init__()
        self.n_out = int(n_out)
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, n_out, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


class LightDecoder(nn.Module):
    def __init__(self, dim: int, n_out: int, hidden: int = 128):
        super().__init__()
        self.n_out = int(n_out)
        h2 = max(16, hidden // 2)
        self.stage1 = nn.Sequential(nn.Conv2d(dim, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.GELU())
        self.stage2 = nn.Sequential(nn.Conv2d(hidden, h2, 3, padding=1, bias=False), nn.BatchNorm2d(h2), nn.GELU())
        self.out = nn.Conv2d(h2, n_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.stage2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.out(x)


class DPTHead(nn.Module):
    """A DPT head (Ranftl et al. 2021, the head of the DINOv3 paper's dense evaluations) on the tokens of several
    layers: segmentation-models-pytorch's `DPTDecoder` (reassemble each layer at 1/4, 1/8, 1/16, 1/32 of the input,
    fuse from coarse to fine) and a conv + BN + ReLU + 1x1 output block at 1/2 of the input.

    smp's decoder serves as is for a frozen DINOv3 backbone: it takes a list of ``[B, C_i, h, w]`` grids with their
    channel counts, so a ViT's blocks and ConvNeXt's stages (all put on the patch grid by the `Extractor`) fit.
    Two things are done here: the cached features hold the layers concatenated along channels, so the head splits
    them by ``layer_dims``; and the decoder's coarsest stage halves the grid, whose fusion needs the grid to
    halve exactly, so an odd grid (e.g. GEO-Bench's 400-px samples: 25x25 tokens) is padded at the bottom/right
    and the output cropped back. Prefix tokens are not used (``readout='ignore'``): cached dense features keep
    patch tokens only. Channel widths scale with ``hidden`` (smp's defaults are ``hidden=256``: intermediate
    256/512/1024/1024, fusion 256).
    """

    def __init__(self, layer_dims: Sequence[int], n_out: int, hidden: int = 256):
        super().__init__()
        from segmentation_models_pytorch.decoders.dpt.decoder import DPTDecoder

        self.layer_dims = [int(d) for d in layer_dims]
        self.n_out = int(n_out)
        k = len(self.layer_dims)
        widths = [hidden * m for m in (1, 2, 4, 4)] + [hidden * 4] * max(0, k - 4)
        self.decoder = DPTDecoder(encoder_out_channels=self.layer_dims, encoder_output_strides=[16] * k,
                                  encoder_has_prefix_tokens=False, readout="ignore",
                                  intermediate_channels=widths[:k], fusion_channels=hidden)
        self.out = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                                 nn.ReLU(inplace=True), nn.Conv2d(hidden, n_out, 1))
        # stages beyond the third downsample by 2 each: the grid must divide by 2^(k-3)
        self.multiple = 2 ** max(0, k - 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != sum(self.layer_dims):
            raise GeodinoError(f"DPT head built for layers of {self.layer_dims} channels (sum {sum(self.layer_dims)}) "
                               f"got features with {x.shape[1]} channels")
        h, w = x.shape[-2:]
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        feats = list(torch.split(x, self.layer_dims, dim=1))
        y = self.out(self.decoder(feats, [None] * len(feats)))  # 8x the token grid
        return y[..., : h * 8, : w * 8]


class UperNetHead(nn.Module):
    """UperNet (Xiao et al. 2018; the LoveDA head of the DINOv3 paper) on the tokens of several layers: a
    multi-level neck (per layer a 1x1 conv to ``hidden`` channels, then bilinear resizing by 4, 2, 1, 1/2, ... of the
    token grid, as mmsegmentation's ViT + UperNet does) builds the pyramid a plain ViT lacks, and
    segmentation-models-pytorch's `UPerNetDecoder` (PSP on the coarsest level, FPN, fusion at the finest) decodes
    it; a 1x1 conv gives the classes at 4x the token grid. Written around smp's decoder because smp's UPerNet model
    needs a hierarchical encoder, while the frozen DINOv3 ViT gives single-scale tokens."""

    def __init__(self, layer_dims: Sequence[int], n_out: int, hidden: int = 256):
        super().__init__()
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

        self.layer_dims = [int(d) for d in layer_dims]
        self.n_out = int(n_out)
        k = len(self.layer_dims)
        self.scales = [4.0 / 2 ** i for i in range(k)]
        self.neck = nn.ModuleList([nn.Conv2d(d, hidden, 1) for d in self.layer_dims])
        # smp skips its first two (1/1, 1/2) entries: two placeholders, then our k levels
        self.decoder = UPerNetDecoder(encoder_channels=[0, 0] + [hidden] * k, encoder_depth=max(3, k + 1),
                                      decoder_channels=hidden)
        self.out = nn.Conv2d(hidden, n_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != sum(self.layer_dims):
            raise GeodinoError(f"UperNet head built for layers of {self.layer_dims} channels "
                               f"(sum {sum(self.layer_dims)}) got features with {x.shape[1]} channels")
        h, w = x.shape[-2:]
        levels = []
        for f, conv, s in zip(torch.split(x, self.layer_dims, dim=1), self.neck, self.scales):
            size = (max(1, math.ceil(h * s)), max(1, math.ceil(w * s)))
            levels.append(F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False))
        return self.out(self.decoder([x, x] + levels))


DENSE_HEADS = ("linear", "light_decoder", "dpt", "upernet")


def _split_dims(dim: int, layer_dims: Sequence[int] | None) -> list[int]:
    dims = list(layer_dims) if layer_dims else [dim]
    if sum(dims) != dim:
        raise GeodinoError(f"layer_dims {dims} do not add up to the feature width {dim}")
    return dims


def build_dense_head(kind: str, dim: int, n_out: int, hidden: int = 128,
                     layer_dims: Sequence[int] | None = None) -> nn.Module:
    """`kind` on features of `dim` channels (`layer_dims`: how the layers split them; DPT needs it)."""
    if kind == "linear":
        return LinearSegHead(dim, n_out)
    if kind in ("light_decoder", "decoder"):
        return LightDecoder(dim, n_out, hidden)
    if kind == "dpt":
        return DPTHead(_split_dims(dim, layer_dims), n_out, hidden)
    if kind == "upernet":
        return UperNetHead(_split_dims(dim, layer_dims), n_out, hidden)
    raise GeodinoError(f"unknown head '{kind}'; choose one of: {', '.join(DENSE_HEADS)}")


class DenseModel(nn.Module):
    """A dense head plus the output transform: bilinear upsampling, class masking / target de-standardisation."""

    def __init__(self, head: nn.Module, kind: str, allowed_classes: Sequence[int] | None = None,
                 target_mean: float = 0.0, target_std: float = 1.0):
        super().__init__()
        self.head = head
        self.kind = kind
        n_out = head.n_out
        mask = torch.zeros(n_out, dtype=torch.bool)
        if allowed_classes is None:
            mask[:] = True
        else:
            mask[list(allowed_classes)] = True
        self.register_buffer("allowed", mask)
        self.register_buffer("t_mean", torch.tensor(float(target_mean)))
        self.register_buffer("t_std", torch.tensor(float(target_std)))

    def logits(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.head(feats), size=size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Seg: class probabilities [B, K, H, W] (never a masked class); reg: metres [B, 1, H, W] (>= 0)."""
        out = self.logits(feats, size)
        if self.kind == "seg":
            out = out.masked_fill(~self.allowed.view(1, -1, 1, 1), float("-inf"))
            return out.softmax(1)
        return (out * self.t_std + self.t_mean).clamp_min(0.0)


def dense_loss(model: DenseModel, out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None,
               ignore_index: int | None) -> torch.Tensor | None:
    """Seg: cross-entropy ignoring `ignore_index` and padding (-1); reg: L1 on standardised heights at valid
    pixels. None when a batch has nothing to learn from. Shared by cached-feature and image training."""
    if model.kind == "seg":
        t = target.long()
        if ignore_index is not None:
            t = t.masked_fill(t == ignore_index, -1)
        if not bool((t >= 0).any()):
            return None
        return F.cross_entropy(out, t, ignore_index=-1)
    v = valid.bool()
    if not bool(v.any()):
        return None
    z = (target.float() - model.t_mean) / model.t_std
    return (out[:, 0] - z).abs()[v].mean()


def dense_step(model: DenseModel, out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None,
               ignore_index: int | None, opt, sched) -> float | None:
    """One optimiser step on `dense_loss` (skipped, returning None, when the batch has nothing to learn from); the
    step of both cached-feature and image training."""
    loss = dense_loss(model, out, target, valid, ignore_index)
    if loss is None:
        return None
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def train_dense_head(model: DenseModel, feats: np.ndarray, targets: np.ndarray, valid: np.ndarray | None = None,
                     ignore_index: int | None = None, epochs: int = 10, lr: float = 1e-3, weight_decay: float = 1e-4,
                     batch_size: int = 8, device: torch.device | str = "cpu", seed: int = 0,
                     progress: bool = False, desc: str = "head") -> DenseModel:
    """Train on cached windows: feats [N, D, gh, gw], targets [N, win, win] (seg: int, -1 = padding)."""
    n = len(feats)
    if n == 0:
        raise GeodinoError("no training windows to fit the head on")
    size = tuple(int(s) for s in targets.shape[-2:])
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, epochs * math.ceil(n / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps, warmup=min(100, steps // 10)))
    g = torch.Generator().manual_seed(seed)
    bar = progress_bar(range(epochs), epochs, desc, progress)
    last = float("nan")
    for _ in bar:
        perm = torch.randperm(n, generator=g).numpy()
        for i in range(0, n, batch_size):
            idx = np.sort(perm[i:i + batch_size])
            if len(idx) < 2 and n >= 2:  # BatchNorm needs more than one sample per channel
                idx = np.sort(np.unique(np.concatenate([idx, perm[:1]])))
            x = torch.from_numpy(np.array(feats[idx])).to(device).float()
            t = torch.from_numpy(np.array(targets[idx])).to(device)
            out = model.logits(x, size)
            v = None if valid is None else torch.from_numpy(np.array(valid[idx])).to(device)
            value = dense_step(model, out, t, v, ignore_index, opt, sched)
            last = last if value is None else value
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{last:.4f}")
    log.info("%s: trained %d epochs on %d windows, last loss %.4f", desc, epochs, n, last)
    return model.eval()
