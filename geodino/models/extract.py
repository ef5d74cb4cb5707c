"""Frozen-backbone feature extraction: the one place that runs a backbone for its features outside training
(evaluation probes, curation embeddings, figures).

`Extractor(backbone, device, layers=1)(x) -> (cls [B, D], patch grid [B, D, gh, gw])`, float32 on the CPU,
under ``inference_mode`` (bf16 autocast on CUDA).

``layers`` picks the blocks whose tokens are returned: ``1`` is the final normalised output (``forward_features``);
an int ``n > 1`` is the last n blocks, ``"spaced:N"`` N evenly spaced blocks ending at the last (the DINOv3 dense
heads' choice: ViT-L 5/11/17/23) and a list names 0-based block indices (ViT blocks, ConvNeXt stages), each
through the final norm (``get_intermediate_layers``), concatenated along channels in the order given — the
multi-layer features of the DINOv2/v3 linear and DPT evaluations. ``layer_dims`` says how many channels each layer
takes in the concatenation, so a head can split them again (`geodino.eval.probes.DPTHead`). Every layer is put on
the grid of the input divided by the contract's patch size (ConvNeXt stages of stride 4..32 are resized
bilinearly to it, as the reference's ``patch_size`` option does).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from geodino.errors import GeodinoError


def token_grid(n_tokens: int, h: int, w: int) -> tuple[int, int]:
    """The (rows, cols) grid of `n_tokens` patch tokens for an (h, w) input (ViT: h/p x w/p; ConvNeXt: /32)."""
    gh = max(1, round(math.sqrt(n_tokens * h / w)))
    for cand in (gh, gh - 1, gh + 1):
        if cand > 0 and n_tokens % cand == 0:
            return cand, n_tokens // cand
    raise GeodinoError(f"cannot arrange {n_tokens} patch tokens on a grid for a {h}x{w} input")


def spaced_layers(n: int, n_blocks: int) -> tuple[int, ...]:
    """``n`` evenly spaced block indices ending at the last block: ViT-L (24 blocks), 4 -> (5, 11, 17, 23); ViT-7B
    (40) -> (9, 19, 29, 39), the layers the DINOv3 dense heads read. More than ``n_blocks`` gives every block."""
    n = min(int(n), int(n_blocks))
    return tuple(sorted({(i + 1) * n_blocks // n - 1 for i in range(n)}))


def normalize_layers(layers: int | Sequence[int] | str | None, n_blocks: int | None = None) -> int | tuple[int, ...]:
    """``None`` -> 1; an int n >= 1 stays; a sequence becomes a tuple of block indices (checked against the model
    by `Extractor`); ``"spaced:N"`` becomes `spaced_layers` (needs `n_blocks`)."""
    if layers is None:
        return 1
    if isinstance(layers, str):
        m = re.fullmatch(r"spaced:(\d+)", layers.strip())
        if not m or int(m.group(1)) < 1:
            raise GeodinoError(f"layers={layers!r}: a string must be 'spaced:N' (N evenly spaced blocks), N >= 1")
        if n_blocks is None:
            raise GeodinoError(f"layers={layers!r} needs the backbone's block count")
        return spaced_layers(int(m.group(1)), n_blocks)
    if isinstance(layers, int) or (isinstance(layers, float) and float(layers).is_integer()):
        n = int(layers)
        if n < 1:
            raise GeodinoError(f"layers={layers}: the last n blocks needs n >= 1")
        return n
    out = tuple(int(i) for i in layers)
    if not out:
        raise GeodinoError("layers=[]: name at least one block index")
    return out


def n_blocks(backbone: nn.Module) -> int:
    """Blocks a `layers` index can name: ViT blocks, or ConvNeXt's 4 stages."""
    if getattr(backbone, "family", "") == "convnext":
        return 4
    return int(getattr(backbone, "n_blocks", len(getattr(backbone, "blocks", []))))


class Extractor:
    """Frozen backbone -> (cls [B, D], patch grid [B, D, gh, gw]) in float32 on the CPU (see the module docstring
    for ``layers``)."""

    def __init__(self, backbone: nn.Module, device: torch.device, layers: int | Sequence[int] | None = 1):
        self.backbone = backbone.to(device).eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.device = device
        self.layers = normalize_layers(layers, n_blocks(backbone))
        self.contract = backbone.geodino_contract
        self.patch_size = self.contract.patch_size
        self.token_stride = int(backbone.token_stride)
        if self.layers != 1:
            if not hasattr(backbone, "get_intermediate_layers"):
                raise GeodinoError(f"layers={list_or_int(self.layers)} needs a backbone with get_intermediate_layers")
            nb = n_blocks(backbone)
            idx = range(nb - self.layers, nb) if isinstance(self.layers, int) else self.layers
            if not isinstance(self.layers, int) and len(set(self.layers)) != len(self.layers):
                raise GeodinoError(f"layers={list(self.layers)} names a block twice; name each block once")
            bad = [i for i in idx if not 0 <= i < nb]
            if bad:
                raise GeodinoError(f"layers={list_or_int(self.layers)}: block indices {bad} out of range for "
                                   f"{self.contract.name}, which has {nb} blocks (0..{nb - 1})")
            self.token_stride = int(self.patch_size)
        self.layer_dims: list[int] | None = None  # known after the first call

    @property
    def cache_id(self):
        """What the layer choice adds to a feature-cache key."""
        return list_or_int(self.layers)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True).float()
        amp = self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=amp):
            cls, patch, dims = features(self.backbone, x, self.layers, self.patch_size)
        self.layer_dims = dims
        return cls.float().cpu(), patch.float().cpu()


def features(backbone: nn.Module, x: torch.Tensor, layers: int | tuple[int, ...], patch_size: int
             ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(cls [B, D], patch grid [B, D, gh, gw], per-layer channel counts) with gradients where the caller allows
    them: the frozen `Extractor` and fine-tuning (`geodino.eval.finetune`) share this one path."""
    h, w = x.shape[-2:]
    if layers == 1:
        out = backbone.forward_features(x)
        cls, patch = out["x_norm_clstoken"], out["x_norm_patchtokens"]
        b, n, d = patch.shape
        gh, gw = token_grid(n, h, w)
        return cls, patch.transpose(1, 2).reshape(b, d, gh, gw), [d]
    outs = backbone.get_intermediate_layers(x, n=layers if isinstance(layers, int) else list(layers),
                                            return_class_token=True)
    grid = (h // patch_size, w // patch_size)
    grids, clss = [], []
    for p, c in outs:
        b, n, d = p.shape
        g = p.transpose(1, 2).reshape(b, d, *token_grid(n, h, w))
        if tuple(g.shape[-2:]) != grid:
            g = F.interpolate(g.float(), size=grid, mode="bilinear", align_corners=False).to(g.dtype)
        grids.append(g)
        clss.append(c)
    return torch.cat(clss, dim=-1), torch.cat(grids, dim=1), [int(g.shape[1]) for g in grids]


def list_or_int(layers):
    return layers if isinstance(layers, int) else list(layers)
