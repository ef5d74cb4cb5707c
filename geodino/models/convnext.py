"""The DINOv3 ConvNeXt backbones (distillation students), key-compatible with the official checkpoints.

Follows the reference `ConvNeXt` of `dinov3/models/convnext.py` (itself the original ConvNeXt, arXiv 2201.03545,
plus DINO outputs), docs/dinov3_spec.md §2 and docs/libraries.md §1.6:

* stem ``Conv2d(k4, s4)`` + channels-first LayerNorm; three downsamplers ``LayerNorm`` + ``Conv2d(k2, s2)``;
* blocks ``x + drop_path(gamma * pwconv2(GELU(pwconv1(LN(dwconv7x7(x))))))`` in channels-last;
* per-sample stochastic depth with a linear ramp over all blocks (ConvNeXt's own rule, unlike the ViT);
* ``forward_features`` returns the ViT's dict: cls = global average pool of stage 4, patch tokens = the stage-4
  map flattened, both through the final ``norm`` (``[pool, tokens]``);
* ``get_intermediate_layers`` resizes maps bilinearly (antialiased) to ``H / patch_size`` when ``patch_size`` is set.

Hand-written rather than built from timm's ConvNeXt: timm names the same tensors differently (``stem``,
``conv_dw``, ``mlp.fc1``, ``head.norm``...), and the official layout is needed for strict loading with zero renaming
(including ``norms.3``, which aliases ``norm``). The model is small, so owning it costs little.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Backbone

__all__ = [
    "DinoConvNeXt",
    "convnext",
    "CONVNEXT_SIZES",
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
    "convnext_large",
]

logger = logging.getLogger(__name__)

CONVNEXT_SIZES: dict[str, dict[str, list[int]]] = {
    "tiny": {"depths": [3, 3, 9, 3], "dims": [96, 192, 384, 768]},
    "small": {"depths": [3, 3, 27, 3], "dims": [96, 192, 384, 768]},
    "base": {"depths": [3, 3, 27, 3], "dims": [128, 256, 512, 1024]},
    "large": {"depths": [3, 3, 27, 3], "dims": [192, 384, 768, 1536]},
}


def _drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    # Same draw as the reference (floor(keep + U[0,1)) per sample), so a fixed seed gives the same mask.
    if p == 0.0 or not training:
        return x
    keep = 1 - p
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep) * mask


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW tensor (the reference's ``data_format='channels_first'``)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6, device=None) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, device=device)
        self.norm = nn.LayerNorm(dim, eps=1e-6, device=device)
        self.pwconv1 = nn.Linear(dim, 4 * dim, device=device)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim, device=device)
        self.layer_scale_init_value = layer_scale_init_value
        if layer_scale_init_value > 0:
            self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init_value), device=device))
        else:
            self.gamma = None
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + _drop_path(y.permute(0, 3, 1, 2), self.drop_path, self.training)


class DinoConvNeXt(Backbone, nn.Module):
    """Official DINOv3 ConvNeXt (see module docstring). ``embed_dim`` is the stage-4 width. ``forward_features``
    takes a tensor or a list of crop groups (Backbone); ``masks`` pass through (no mask token). The reference trains
    it without layer-wise LR decay (decay 1.0) and without a patch-embedding LR multiplier."""

    family = "convnext"
    uses_layer_decay = False
    has_mask_token = False

    @property
    def token_stride(self) -> int:
        return 32  # stem 4, then three 2x downsamplers

    def __init__(
        self,
        in_chans: int = 3,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        patch_size: int | None = None,
        device: Any | None = None,
        **ignored_kwargs: Any,
    ) -> None:
        super().__init__()
        if ignored_kwargs:
            logger.warning("DinoConvNeXt ignored kwargs: %s", sorted(ignored_kwargs))
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt needs 4 stages, got depths={list(depths)}, dims={list(dims)}")
        depths, dims = list(depths), list(dims)
        self.downsample_layers = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4, device=device),
                    LayerNorm2d(dims[0], eps=1e-6, device=device),
                )
            ]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm2d(dims[i], eps=1e-6, device=device),
                    nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2, device=device),
                )
            )
        rates = [float(r) for r in np.linspace(0, drop_path_rate, sum(depths))]  # as the reference
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            self.stages.append(
                nn.Sequential(
                    *[
                        ConvNeXtBlock(dims[i], rates[cur + j], layer_scale_init_value, device=device)
                        for j in range(depths[i])
                    ]
                )
            )
            cur += depths[i]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6, device=device)
        self.head = nn.Identity()
        # norms[3] IS self.norm: the official checkpoints hold it under both names (norm.* and norms.3.*).
        self.norms = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Identity(), self.norm])

        self.in_chans = in_chans
        self.depths = depths
        self.embed_dim = self.num_features = dims[-1]
        self.embed_dims = dims
        self.n_blocks = 4
        self.n_storage_tokens = 0
        self.patch_size = patch_size
        self.input_pad_size = 4  # stem kernel = stride = 4
        # Initialise real tensors right away; skip on meta (also under `with torch.device("meta")`).
        if not self.norm.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init: Conv/Linear trunc-normal .02 with zero bias, LayerNorms reset, gamma = init value."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, ConvNeXtBlock) and m.gamma is not None:
                m.gamma.fill_(m.layer_scale_init_value)

    def forward_features_list(self, x_list: list[Tensor], masks_list: list | None) -> list[dict]:
        if masks_list is None:
            masks_list = [None] * len(x_list)
        outputs = []
        for x, masks in zip(x_list, masks_list):
            for down, stage in zip(self.downsample_layers, self.stages):
                x = stage(down(x))
            pool = x.mean([-2, -1])
            tokens = x.flatten(2).transpose(1, 2)
            x_norm = self.norm(torch.cat([pool.unsqueeze(1), tokens], dim=1))
            outputs.append(
                {
                    "x_norm_clstoken": x_norm[:, 0],
                    "x_storage_tokens": x_norm[:, 1 : self.n_storage_tokens + 1],
                    "x_norm_patchtokens": x_norm[:, self.n_storage_tokens + 1 :],
                    "x_prenorm": tokens,
                    "masks": masks,
                }
            )
        return outputs

    def _get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1) -> list[tuple[Tensor, Tensor]]:
        h, w = x.shape[-2:]
        take = list(range(4 - n, 4)) if isinstance(n, int) else list(n)
        bad = [i for i in take if not 0 <= i < 4]
        if bad:
            raise ValueError(f"stage indices {bad} out of range for ConvNeXt's 4 stages (n={n})")
        output = []
        for i in range(max(take) + 1 if take else 0):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in take:
                patches = x
                if self.patch_size is not None:
                    # Resize to the grid of a ViT with this patch size, as the reference does.
                    size = (h // self.patch_size, w // self.patch_size)
                    patches = F.interpolate(x, size=size, mode="bilinear", antialias=True)
                output.append((x.mean([-2, -1]), patches))
        return output

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ):
        """Official semantics: int ``n`` = last n stages, a sequence = stage indices; ``norms[i]`` per stage (only
        stage 4 has a real norm). Patches are ``[B, HW, C]``, or ``[B, C, h, w]`` with ``reshape``."""
        outputs = self._get_intermediate_layers(x, n)
        if norm:
            shapes = [p.shape for _, p in outputs]
            norms = list(self.norms[-n:]) if isinstance(n, int) else [self.norms[i] for i in n]
            outputs = [(nm(c), nm(p.flatten(-2, -1).permute(0, 2, 1))) for (c, p), nm in zip(outputs, norms)]
            if reshape:
                outputs = [(c, p.permute(0, 2, 1).reshape(s).contiguous()) for (c, p), s in zip(outputs, shapes)]
        elif not reshape:
            outputs = [(c, p.flatten(-2, -1).permute(0, 2, 1)) for c, p in outputs]
        patches = tuple(p for _, p in outputs)
        if return_class_token:
            return tuple(zip(patches, (c for c, _ in outputs)))
        return patches


    # -- timm's surface ----------------------------------------------------------------------------------------------
    @property
    def feature_info(self) -> list[dict]:
        return [{"num_chs": d, "reduction": 4 * 2**i, "module": f"stages.{i}"} for i, d in enumerate(self.embed_dims)]

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's ``forward_intermediates`` over the 4 stages: each stage's map ``[B, C_i, H/s_i, W/s_i]`` (``NCHW``)
        or ``[B, HW, C_i]`` (``NLC``), through ``norms[i]`` when `norm` (only stage 4 has a real norm). Returns the
        list, or ``(final map after the final norm, list)``."""
        from timm.models._features import feature_take_indices

        self._check_fmt(output_fmt)
        take, max_index = feature_take_indices(4, indices)
        last = max_index if (intermediates_only or stop_early) else 3
        out = []
        for i in range(last + 1):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in take:
                t = x.flatten(2).transpose(1, 2)
                t = self.norms[i](t) if norm else t
                out.append(t if output_fmt == "NLC" else t.transpose(1, 2).reshape(x.shape))
        if intermediates_only:
            return out
        final = self.norm(x.flatten(2).transpose(1, 2))
        return (final if output_fmt == "NLC" else final.transpose(1, 2).reshape(x.shape)), out


def convnext(size: str | None = None, **kwargs: Any) -> DinoConvNeXt:
    """Build a :class:`DinoConvNeXt`; ``size`` ('tiny'|'small'|'base'|'large') fills in depths and dims."""
    if size is not None:
        if size not in CONVNEXT_SIZES:
            raise ValueError(f"unknown ConvNeXt size {size!r}; choose from {sorted(CONVNEXT_SIZES)}")
        kwargs = {**CONVNEXT_SIZES[size], **kwargs}
    return DinoConvNeXt(**kwargs)


def convnext_tiny(**kwargs: Any) -> DinoConvNeXt:
    return convnext("tiny", **kwargs)


def convnext_small(**kwargs: Any) -> DinoConvNeXt:
    return convnext("small", **kwargs)


def convnext_base(**kwargs: Any) -> DinoConvNeXt:
    return convnext("base", **kwargs)


def convnext_large(**kwargs: Any) -> DinoConvNeXt:
    return convnext("large", **kwargs)
