"""The exact input transform of a backbone, from its contract: `transforms_for(model)` (also ``geodino.transforms_for``).

Raw data (digital numbers, any dtype) -> ``clip((DN + offset) / scale, 0, 1)`` (the contract's `scale` / `offset`;
when the contract records no scale, the data type's default of `geodino.data.geotiff.default_scale`: 255 for 8-bit,
10000 for other integers, 1 for floats) -> ``(x - mean) / std`` (`Contract.normalize`). One implementation of each
step is reused: `geotiff.Scaling` and `Contract.normalize`.

The transform is an ``nn.Module`` (so it moves to a device and batches), takes a tensor or numpy array
``[..., C, H, W]`` in the contract's band order, or a torchgeo sample dict (its ``"image"`` is transformed).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from geodino.contract import Contract
from geodino.data.geotiff import Scaling, default_scale


class InputTransform(nn.Module):
    """``contract.normalize(clip((x + offset) / scale, 0, 1))``; `scale` None: by the input's dtype."""

    def __init__(self, contract: Contract, scale: float | None = None, offset: float | None = None):
        super().__init__()
        self.contract = contract
        self.scale = scale if scale is not None else contract.scale
        self.offset = float(offset if offset is not None else contract.offset)

    def scaling(self, dtype) -> Scaling:
        scale = self.scale if self.scale is not None else default_scale(dtype)
        why = "contract" if self.scale is not None else f"{np.dtype(dtype).name} default"
        return Scaling(float(scale), self.offset, why)

    def forward(self, x):
        if isinstance(x, dict):  # a torchgeo sample
            return {**x, "image": self(x["image"])}
        if isinstance(x, np.ndarray):
            dtype, x = x.dtype, torch.from_numpy(np.ascontiguousarray(x))
        else:
            dtype = _numpy_dtype(x.dtype)
        x01 = self.scaling(dtype).apply(x.to(torch.float32))
        return self.contract.normalize(x01)

    def extra_repr(self) -> str:
        s = f"{self.scale:g}" if self.scale is not None else "by dtype"
        return (f"clip((x + {self.offset:g}) / {s}, 0, 1), then (x - mean) / std over {self.contract.n_bands} bands "
                f"({', '.join(self.contract.bands)})")


def _numpy_dtype(dtype: torch.dtype):
    return torch.empty((), dtype=dtype).numpy().dtype if dtype != torch.bfloat16 else np.dtype("float32")


def transforms_for(model_or_contract, scale: float | None = None, offset: float | None = None) -> InputTransform:
    """The input transform of a backbone (or a `Contract`); `scale` / `offset` override the contract's numbers."""
    contract = model_or_contract if isinstance(model_or_contract, Contract) else \
        getattr(model_or_contract, "geodino_contract", None)
    if contract is None:
        raise TypeError(f"{type(model_or_contract).__name__} carries no geodino contract (load it with "
                        "geodino.load_backbone)")
    return InputTransform(contract, scale, offset)
