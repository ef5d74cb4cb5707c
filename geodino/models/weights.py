"""Backbone weight files: reading (official ``.pth`` / ``.pt`` state dicts, safetensors), strict loading with
errors that name the keys at fault, and writing the official layout or safetensors with the contract.

Files are always local: a URL is refused, nothing is downloaded. ``.pth`` files are read with
``torch.load(weights_only=True)``, which cannot execute code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from geodino.errors import CheckpointError
from geodino.models.registry import ARCHS


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata) from a local .pth/.pt or .safetensors; never a download."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", str(path)):
        raise CheckpointError(f"{path}: geodino never downloads weights; download the file yourself and pass its local path")
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    meta: dict = {}
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
        if "geodino_contract" in meta:
            meta["geodino_contract"] = json.loads(meta["geodino_contract"])
        return sd, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path} as a weights file with torch.load(weights_only=True): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    # Official teacher dumps nest the backbone as {'teacher': {'backbone.*': ...}}; released hub
    # files are flat. Accept both (the nesting is a container, not a renaming of the keys).
    for key in ("teacher", "model_ema", "model", "state_dict"):
        if key in obj and isinstance(obj[key], dict) and not torch.is_tensor(obj[key]):
            obj = obj[key]
            break
    if obj and all(k.startswith("backbone.") for k in obj if isinstance(k, str)):
        obj = {k[len("backbone."):]: v for k, v in obj.items()}
    return obj, meta


def describe_state_dict(sd: dict[str, torch.Tensor]) -> str:
    """Guess the architecture behind an official-layout state dict (for error messages)."""
    if "cls_token" in sd and "patch_embed.proj.weight" in sd:
        dim = sd["cls_token"].shape[-1]
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        depth = max(blocks) + 1 if blocks else 0
        swiglu = any(".mlp.w1." in k for k in sd)
        in_ch = sd["patch_embed.proj.weight"].shape[1]
        guess = [n for n, a in ARCHS.items() if a["family"] == "vit" and a["kwargs"]["embed_dim"] == dim
                 and a["kwargs"]["depth"] == depth and (a["kwargs"]["ffn_layer"] != "mlp") == swiglu]
        desc = f"a ViT with embed_dim {dim}, depth {depth}, {'SwiGLU' if swiglu else 'MLP'} FFN, {in_ch} input channels"
        return desc + (f" (likely {' / '.join(sorted(set(guess)))})" if guess else "")
    if "downsample_layers.0.0.weight" in sd:
        dims = [sd[f"downsample_layers.{i}.{0 if i == 0 else 1}.weight"].shape[0] for i in range(4)
                if f"downsample_layers.{i}.{0 if i == 0 else 1}.weight" in sd]
        depths = [len({int(m.group(1)) for k in sd if (m := re.match(rf"stages\.{s}\.(\d+)\.", k))}) for s in range(4)]
        guess = [n for n, a in ARCHS.items() if a["family"] == "convnext" and a["kwargs"]["dims"] == dims
                 and a["kwargs"]["depths"] == depths]
        return f"a ConvNeXt with dims {dims}, depths {depths}" + (f" (likely {guess[0]})" if guess else "")
    keys = list(sd)[:5]
    return f"not a DINOv3 backbone layout (first keys: {', '.join(keys)})"


def load_weights_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Strict load with a clear error naming missing / unexpected / mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape_bad = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
                 if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape_bad:
        contract = getattr(model, "geodino_contract", None)
        name = contract.name if contract is not None else type(model).__name__
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({', '.join(unexpected[:6])}{', ...' if len(unexpected) > 6 else ''})")
        if shape_bad:
            parts.append(f"{len(shape_bad)} shape mismatch(es) ({'; '.join(shape_bad[:4])})")
        raise CheckpointError(
            f"{source} does not fit {name}: {'; '.join(parts)}. The file looks like {describe_state_dict(sd)}"
        )
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights in the official DINOv3 key layout (geodino's modules use those keys)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


EXPORT_FORMATS = ("official", "safetensors")


def export_backbone(model: nn.Module, out: str | Path, fmt: str = "official") -> Path:
    """Write a backbone as an official-layout ``.pth`` or a safetensors file with its contract in the metadata."""
    if fmt not in EXPORT_FORMATS:
        raise CheckpointError(f"unknown export format '{fmt}'; choose {' or '.join(EXPORT_FORMATS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = official_state_dict(model)
    if fmt == "official":
        torch.save(sd, out)
    else:
        contract = getattr(model, "geodino_contract", None)
        meta = {"format": "dinov3-official-keys",
                "geodino_contract": json.dumps(contract.to_dict() if contract is not None else {})}
        save_file(sd, str(out), metadata=meta)
    return out
