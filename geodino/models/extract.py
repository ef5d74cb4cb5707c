"""Frozen-backbone feature extraction: the one place that runs a backbone for its features outside training
(evaluation probes, curation embeddings, figures).

`Extractor(backbone, device, n_last_layers=1)(x) -> (cls [B, D], patch grid [B, D, gh, gw])`, float32 on the CPU,
under ``inference_mode`` (bf16 autocast on CUDA). With ``n_last_layers > 1`` the normalised outputs of the last n
blocks are concatenated (ViTs), as the DINOv2/v3 linear evaluations do for their multi-layer variants.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from geodino.errors import GeodinoError


def token_grid(n_tokens: int, h: int, w: int) -> tuple[int, int]:
    """The (rows, cols) grid of `n_tokens` patch tokens for an (h, w) input (ViT: h/p x w/p; ConvNeXt: /32)."""
    gh = max(1, round(math.sqrt(n_tokens * h / w)))
    for cand in (gh, gh - 1, gh + 1):
        if cand > 0 and n_tokens % cand == 0:
            return cand, n_tokens // cand
    raise GeodinoError(f"cannot arrange {n_tokens} patch tokens on a grid for a {h}x{w} input")


class Extractor:
    """Frozen backbone -> (cls [B, D], patch grid [B, D, gh, gw]) in float32 on the CPU.

    `n_last_layers > 1` concatenates the normalised outputs of the last n blocks (ViTs only), as the
    DINOv2/v3 linear evaluations do for their multi-layer variants.
    """

    def __init__(self, backbone: nn.Module, device: torch.device, n_last_layers: int = 1):
        self.backbone = backbone.to(device).eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.device = device
        self.n_last_layers = int(n_last_layers)
        if self.n_last_layers > 1 and not hasattr(backbone, "get_intermediate_layers"):
            raise GeodinoError(f"n_last_layers={n_last_layers} needs a ViT backbone with get_intermediate_layers")
        self.contract = backbone.geodino_contract
        self.patch_size = self.contract.patch_size
        self.token_stride = int(backbone.token_stride)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True).float()
        h, w = x.shape[-2:]
        amp = self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=amp):
            if self.n_last_layers == 1:
                out = self.backbone.forward_features(x)
                cls, patch = out["x_norm_clstoken"], out["x_norm_patchtokens"]
            else:
                outs = self.backbone.get_intermediate_layers(x, n=self.n_last_layers, return_class_token=True)
                patch = torch.cat([o[0] for o in outs], dim=-1)
                cls = torch.cat([o[1] for o in outs], dim=-1)
        b, n, d = patch.shape
        gh, gw = token_grid(n, h, w)
        patch = patch.float().transpose(1, 2).reshape(b, d, gh, gw)
        return cls.float().cpu(), patch.cpu()
