"""ONNX export of a backbone's inference graph (``geodino export format=onnx``), by ``torch.onnx.export``.

The graph takes ``pixel_values`` — a normalised image batch ``[B, C, H, W]`` in the contract's band order
(``contract.normalize`` of values in [0, 1]; `geodino.transforms_for(model)` does both steps) — and returns
``cls_token`` ``[B, D]`` and ``patch_tokens`` ``[B, H/p * W/p, D]`` (the official ``x_norm_clstoken`` /
``x_norm_patchtokens``). The batch axis is dynamic; height and width are dynamic too when ``dynamic_size`` (the
default) and the exporter can keep the RoPE tables symbolic, else the graph is fixed to the example size and the
file's metadata says so. The contract goes into the model's ``metadata_props`` (``geodino_contract``, JSON).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from geodino.errors import CheckpointError
from geodino.outputs import atomic_output

log = logging.getLogger("geodino")

INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("cls_token", "patch_tokens")


class _Features(nn.Module):
    """The backbone's eval forward as two tensors (ONNX graphs return tensors, not dicts)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone.forward_features(pixel_values)
        return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def export_onnx(model: nn.Module, out: str | Path, image_size: int | None = None, dynamic_size: bool = True,
                opset: int = 18, graph: nn.Module | None = None, output_names: tuple[str, ...] = OUTPUT_NAMES,
                metadata: dict[str, str] | None = None) -> Path:
    """Write `model`'s inference graph to `out` (atomically); returns `out`. `image_size` (default: 4 patches, the
    export example) only shapes the example input. `graph` (default: the backbone's cls and patch tokens) is another
    module over ``pixel_values`` built on `model` (e.g. the segmenter's image side), with its `output_names`;
    `metadata` adds ``metadata_props``."""
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError as e:
        raise CheckpointError("format=onnx needs the onnx package: pip install onnx onnxscript") from e
    contract = getattr(model, "geodino_contract", None)
    in_chans = contract.in_chans if contract is not None else int(getattr(model, "in_chans", 3))
    stride = int(getattr(model, "token_stride", contract.patch_size if contract is not None else 16))
    size = int(image_size or 4 * stride)
    if size % stride:
        raise CheckpointError(f"image_size {size} is not a multiple of the backbone's token stride {stride}")
    wrapper = (graph if graph is not None else _Features(model)).eval()
    first = next(iter(model.parameters()), None)
    example = torch.randn(2, in_chans, size, size, device=first.device if first is not None else "cpu")
    out = Path(out)
    meta = {"geodino_contract": json.dumps(contract.to_dict() if contract is not None else {}), **(metadata or {})}
    with atomic_output(out) as tmp:
        dynamic = _export(wrapper, example, tmp, opset, dynamic_size, stride, tuple(output_names))
        meta["dynamic_size"] = json.dumps(dynamic)
        if not dynamic:
            meta["input_size"] = json.dumps([in_chans, size, size])
        _add_metadata(tmp, meta)
    return out


def _export(wrapper: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_size: bool,
            stride: int, output_names: tuple[str, ...]) -> bool:
    """Export with a dynamic batch (and size when asked and possible); True when height / width are dynamic."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    attempts = []
    if dynamic_size:
        # sizes as multiples of the token stride so that the exporter can prove the patch grid divides evenly
        gh, gw = Dim("grid_h", min=1, max=1024), Dim("grid_w", min=1, max=1024)
        attempts.append(({"pixel_values": {0: batch, 2: stride * gh, 3: stride * gw}}, True))
    attempts.append(({"pixel_values": {0: batch}}, False))
    last = None
    with torch.no_grad():
        for shapes, dyn in attempts:
            try:
                torch.onnx.export(wrapper, (example,), str(path), input_names=[INPUT_NAME],
                                  output_names=list(output_names), dynamic_shapes=shapes, opset_version=opset,
                                  dynamo=True, external_data=False, verbose=False)
                return dyn
            except Exception as e:  # noqa: BLE001 -- a dynamic size the exporter cannot keep: fall back to fixed
                last = e
                log.info("ONNX export with %s shapes failed (%s: %s); trying fixed sizes", "dynamic" if dyn else
                         "batch-dynamic", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    raise CheckpointError(f"ONNX export failed: {type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''}")


def _add_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    m = onnx.load(str(path))
    for k, v in meta.items():
        prop = m.metadata_props.add()
        prop.key, prop.value = k, v
    onnx.save(m, str(path))
