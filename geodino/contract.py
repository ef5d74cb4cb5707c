"""The backbone contract: what a model needs to be fed right, recorded with every backbone and checkpoint.

A `Contract` names the architecture (registry name, family and constructor kwargs, hence patch size and input
channels), the bands in the order the first layer expects them, the per-band normalisation (mean / std on values
already scaled to [0, 1]), how raw data reach [0, 1] (`input_scale`, a description, and the numbers `scale` /
`offset`: ``clip((DN + offset) / scale, 0, 1)``, `scale` None when not recorded or left to the data type), and how
the first layer was adapted from RGB weights when it was. Every backbone carries one as ``model.geodino_contract``;
checkpoints and exported files store ``contract.to_dict()`` (the on-disk layout, ``contract_version`` 1; files
written before `scale` / `offset` existed read back as None / 0), and `Contract.from_dict` reads it back with an
error that names a missing or malformed key.

This is the only place that turns scaled pixels into a backbone's input (`normalize`); a file's bands are mapped
onto the contract's band order by name in one place, geodino.data.geotiff.pick_bands (geodino.data.bands.match_bands).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from geodino.errors import CheckpointError, DataError

CONTRACT_VERSION = 1

# Normalisation of the released DINOv3 weights, on RGB scaled to [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAT493M_MEAN = (0.430, 0.411, 0.296)
SAT493M_STD = (0.213, 0.156, 0.143)

RGB_INPUT_SCALE = "divide by 255 (uint8 RGB) to [0, 1], then (x - mean) / std"


def default_band_names(in_chans: int) -> list[str]:
    return ["R", "G", "B"] if in_chans == 3 else [f"band_{i + 1}" for i in range(in_chans)]


@dataclass(frozen=True)
class Contract:
    """Architecture, bands and normalisation of a backbone (see the module docstring). Fields cannot be reassigned;
    `with_data` / `subset` make changed copies."""

    name: str
    family: str
    kwargs: dict = field(default_factory=dict)
    bands: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    input_scale: str = RGB_INPUT_SCALE
    band_adaptation: dict | None = None
    scale: float | None = None  # clip((DN + offset) / scale, 0, 1); None: not recorded / the data type's default
    offset: float = 0.0  # in DN, added before dividing (e.g. -1000 for Sentinel-2 from processing baseline 04.00)

    def __post_init__(self):
        kwargs = dict(self.kwargs)
        object.__setattr__(self, "kwargs", kwargs)
        n = int(kwargs.get("in_chans", 3))
        bands = [str(b) for b in self.bands] if self.bands else default_band_names(n)
        object.__setattr__(self, "bands", bands)
        object.__setattr__(self, "mean", [float(m) for m in self.mean])
        object.__setattr__(self, "std", [float(s) for s in self.std])
        object.__setattr__(self, "scale", None if self.scale is None else float(self.scale))
        object.__setattr__(self, "offset", float(self.offset or 0.0))
        if len(bands) != n:
            raise CheckpointError(f"contract of {self.name}: {len(bands)} band names ({', '.join(bands)}) for "
                                  f"{n} input channels")
        if len(self.mean) != n or len(self.std) != n:
            raise CheckpointError(f"contract of {self.name}: mean/std have {len(self.mean)}/{len(self.std)} values for "
                                  f"{n} bands ({', '.join(bands)})")
        if any(s <= 0 for s in self.std):
            raise CheckpointError(f"contract of {self.name}: std must be positive, got {list(self.std)}")

    # -- derived -----------------------------------------------------------------------------------
    @property
    def in_chans(self) -> int:
        return int(self.kwargs.get("in_chans", 3))

    @property
    def patch_size(self) -> int:
        return int(self.kwargs.get("patch_size", 16))

    @property
    def n_bands(self) -> int:
        return len(self.bands)

    # -- changes -----------------------------------------------------------------------------------
    def with_data(self, bands: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None, input_scale: str | None = None,
                  band_adaptation: dict | None | str = "keep", scale: float | None | str = "keep",
                  offset: float | None = None) -> "Contract":
        """A copy with the data-side fields replaced (architecture unchanged)."""
        return replace(
            self,
            bands=list(bands) if bands is not None else list(self.bands),
            mean=list(mean) if mean is not None else list(self.mean),
            std=list(std) if std is not None else list(self.std),
            input_scale=input_scale if input_scale is not None else self.input_scale,
            band_adaptation=self.band_adaptation if band_adaptation == "keep" else band_adaptation,
            scale=self.scale if scale == "keep" else scale,
            offset=self.offset if offset is None else offset,
        )

    def subset(self, indices: Sequence[int], name: str | None = None, family: str | None = None,
               kwargs: dict | None = None) -> "Contract":
        """The data side of these bands (by index), for a model with `kwargs` (default: this architecture)."""
        idx = list(indices)
        kw = dict(kwargs if kwargs is not None else self.kwargs)
        kw["in_chans"] = len(idx)
        return Contract(name or self.name, family or self.family, kw, bands=[self.bands[i] for i in idx],
                        mean=[self.mean[i] for i in idx], std=[self.std[i] for i in idx],
                        input_scale=self.input_scale, scale=self.scale, offset=self.offset)

    # -- use ---------------------------------------------------------------------------------------
    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """(…, C, H, W) values in [0, 1] in the contract's band order -> the backbone's input, (x - mean) / std."""
        if x01.shape[-3] != self.n_bands:
            raise DataError(f"{self.name} takes {self.n_bands} bands ({', '.join(self.bands)}), got an input of shape "
                            f"{tuple(x01.shape)}")
        mean = torch.tensor(self.mean, dtype=x01.dtype, device=x01.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x01.dtype, device=x01.device).view(-1, 1, 1)
        return (x01 - mean) / std

    # -- on disk -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "contract_version": CONTRACT_VERSION,
            "name": self.name,
            "family": self.family,
            "kwargs": copy.deepcopy(self.kwargs),
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "bands": list(self.bands),
            "mean": list(self.mean),
            "std": list(self.std),
            "input_scale": self.input_scale,
            "scale": self.scale,
            "offset": self.offset,
            "band_adaptation": copy.deepcopy(self.band_adaptation),
        }

    @classmethod
    def from_dict(cls, d: dict | "Contract", where: str = "contract") -> "Contract":
        if isinstance(d, Contract):
            return d
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: a contract is a mapping, got {type(d).__name__}")
        missing = [k for k in ("name", "family", "kwargs") if k not in d]
        if missing:
            raise CheckpointError(f"{where}: the contract lacks {', '.join(missing)}")
        version = int(d.get("contract_version", CONTRACT_VERSION))
        if version > CONTRACT_VERSION:
            raise CheckpointError(f"{where}: contract version {version} is newer than this geodino reads "
                                  f"({CONTRACT_VERSION}); upgrade geodino")
        kwargs = dict(d["kwargs"])
        return cls(name=str(d["name"]), family=str(d["family"]), kwargs=kwargs,
                   bands=list(d.get("bands") or []), mean=list(d.get("mean") or IMAGENET_MEAN),
                   std=list(d.get("std") or IMAGENET_STD), input_scale=str(d.get("input_scale", RGB_INPUT_SCALE)),
                   band_adaptation=d.get("band_adaptation"), scale=d.get("scale"), offset=d.get("offset") or 0.0)

    def summary(self) -> str:
        return f"{self.name} ({self.family}, patch {self.patch_size}, {self.in_chans} bands: {', '.join(self.bands)})"
