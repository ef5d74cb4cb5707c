"""Axial 2-D rotary position embedding of the DINOv3 backbone.

Follows the reference `RopePositionEmbedding` (`dinov3/layers/rope_position_encoding.py`) and the rotate-half
application of `dinov3/layers/attention.py`, as written up in docs/dinov3_spec.md §1.4:

* one persistent buffer ``periods`` of shape ``(head_dim // 4,)``, base form ``base ** (4j / head_dim)`` or the
  geometric min/max form; it is persistent so official state dicts load ``rope_embed.periods`` directly
  (released checkpoints hold bf16-rounded periods, and the loaded values are the ones used afterwards);
* 0.5-centred patch coordinates normalised per axis ("separate"), or by min/max(H, W), mapped to [-1, 1];
* train-time coordinate augmentation (shift, then jitter, then rescale), drawn with the same calls in the same
  order as the reference, so a given torch seed gives the same draws;
* ``angle = 2*pi*coord / period`` laid out ``[rows (hd/4) | cols (hd/4)]`` and tiled twice to ``head_dim``.

Written by hand rather than by subclassing timm's ``RotaryEmbeddingDinoV3``: that class keeps ``periods`` as a
*non-persistent* fp32 buffer that it recomputes at init and again whenever the module is cast to a lower
precision, and it builds coordinates in fp32 regardless of the RoPE dtype. Matching the official key layout
(persistent, loaded, possibly bf16 periods) and the official bf16-RoPE numerics would mean overriding most of it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["RopePositionEmbedding", "apply_rope", "rope_rotate_half"]


class RopePositionEmbedding(nn.Module):
    """RoPE sin/cos tables for an ``H x W`` patch grid (see module docstring)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: Literal["min", "max", "separate"] = "separate",
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % (4 * num_heads) != 0:
            raise ValueError(
                f"RoPE needs embed_dim divisible by 4*num_heads, got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        both_periods = min_period is not None and max_period is not None
        if (base is None and not both_periods) or (base is not None and both_periods):
            raise ValueError(
                "RoPE needs exactly one of `base` or (`min_period`, `max_period`); "
                f"got base={base}, min_period={min_period}, max_period={max_period}"
            )
        for name, value, low in (("shift_coords", shift_coords, 0.0), ("jitter_coords", jitter_coords, 1.0),
                                 ("rescale_coords", rescale_coords, 1.0)):
            if value is not None and not (math.isfinite(value) and value >= low):
                raise ValueError(f"{name} must be a finite number >= {low} (or None), got {value!r}")
        if normalize_coords not in ("min", "max", "separate"):
            raise ValueError(f"normalize_coords must be 'min', 'max' or 'separate', got {normalize_coords!r}")
        self.head_dim = embed_dim // num_heads
        self.base = base
        self.min_period = min_period
        self.max_period = max_period
        self.normalize_coords = normalize_coords
        self.shift_coords = shift_coords
        self.jitter_coords = jitter_coords
        self.rescale_coords = rescale_coords
        # Coordinates and angles are computed in this dtype, as the reference does (`pos_embed_rope_dtype`).
        self.dtype = dtype if dtype is not None else torch.float32
        self.register_buffer(
            "periods", torch.empty(self.head_dim // 4, device=device, dtype=self.dtype), persistent=True
        )
        self.reset_parameters()

    @property
    def has_augmentation(self) -> bool:
        """True when a training-mode call draws random numbers (and so must be repeated per block)."""
        return self.shift_coords is not None or self.jitter_coords is not None or self.rescale_coords is not None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)compute ``periods`` exactly as the reference ``_init_weights`` does (same dtype, same op order)."""
        dd = {"device": self.periods.device, "dtype": self.dtype}
        n = self.head_dim // 4
        if self.base is not None:
            periods = self.base ** (2 * torch.arange(n, **dd) / (self.head_dim // 2))
        else:
            ratio = self.max_period / self.min_period
            periods = ratio ** torch.linspace(0, 1, n, **dd)  # [1, max/min]
            periods = (periods / ratio) * self.max_period  # [min, max], same op order as the reference
        self.periods.copy_(periods)

    # The reference calls this `_init_weights`; keep the name so code written against it works.
    _init_weights = reset_parameters

    def _coords(self, H: int, W: int) -> Tensor:
        dd = {"device": self.periods.device, "dtype": self.dtype}
        if self.normalize_coords == "max":
            denom_h = denom_w = max(H, W)
        elif self.normalize_coords == "min":
            denom_h = denom_w = min(H, W)
        else:  # separate: each axis spans (-1, 1) whatever the aspect ratio
            denom_h, denom_w = H, W
        coords_h = torch.arange(0.5, H, **dd) / denom_h
        coords_w = torch.arange(0.5, W, **dd) / denom_w
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)  # [HW, 2]
        coords = 2.0 * coords - 1.0
        if self.training:
            # Same calls, same order as the reference so a fixed seed gives identical draws.
            if self.shift_coords is not None:
                shift_hw = torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)
                coords = coords + shift_hw[None, :]
            if self.jitter_coords is not None:
                jmax = math.log(self.jitter_coords)
                jitter_hw = torch.empty(2, **dd).uniform_(-jmax, jmax).exp()
                coords = coords * jitter_hw[None, :]
            if self.rescale_coords is not None:
                rmax = math.log(self.rescale_coords)
                rescale = torch.empty(1, **dd).uniform_(-rmax, rmax).exp()
                coords = coords * rescale
        return coords

    def forward(self, *, H: int, W: int) -> tuple[Tensor, Tensor]:
        """Return ``(sin, cos)``, each ``(H*W, head_dim)``; augmented only when ``self.training``."""
        coords = self._coords(H, W)
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # [HW, 2, hd/4]
        angles = angles.flatten(1, 2).tile(2)  # [HW, hd]
        return torch.sin(angles), torch.cos(angles)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, base={self.base}, min_period={self.min_period}, "
            f"max_period={self.max_period}, normalize_coords={self.normalize_coords!r}, "
            f"shift={self.shift_coords}, jitter={self.jitter_coords}, rescale={self.rescale_coords}, dtype={self.dtype}"
        )


def rope_rotate_half(x: Tensor) -> Tensor:
    """``[a, b] -> [-b, a]`` over the last dim (halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate the last ``sin.shape[-2]`` tokens of ``x`` (``[..., N, head_dim]``, tokens on dim -2).

    The first ``N - HW`` tokens (cls and storage) pass through unchanged. ``x`` may hold q and k stacked on a
    leading dim, so both are rotated in one call. As in the reference, ``x`` is cast to the RoPE dtype for the
    rotation (prefix included) and cast back afterwards.
    """
    n_rot = sin.shape[-2]
    prefix = x.shape[-2] - n_rot
    if prefix < 0:
        raise ValueError(f"RoPE tables cover {n_rot} tokens but the input has only {x.shape[-2]}")
    in_dtype = x.dtype
    x = x.to(sin.dtype)
    xr = x[..., prefix:, :] if prefix else x
    out = xr * cos + rope_rotate_half(xr) * sin
    if prefix:
        out = torch.cat((x[..., :prefix, :], out), dim=-2)
    return out.to(in_dtype)
