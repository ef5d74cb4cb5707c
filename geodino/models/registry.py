"""Named backbones, official-weight loading, band adaptation and the normalisation contract.

- `ARCHS` holds every released DINOv3 size with the constructor arguments of Meta's hub entries
  (dinov3_spec.md §1.1, §2), the SAT-493M variants, and a CPU-sized ViT for tests and quickstarts.
- `load_backbone(name_or_path, weights=None, in_chans=None)` builds a backbone by released name or
  from a geodino checkpoint; weights come from a local `.pth` / `.safetensors` (flat official keys,
  loaded with zero renaming and `torch.load(weights_only=True)`), never from the network.
- Every backbone carries a *contract* (`model.geodino_contract`): architecture kwargs, band names and
  order, normalisation mean/std and input scaling, patch size, and how its first layer was adapted.
- `export_backbone` writes the official key layout (`.pth`) or safetensors; the round trip is exact.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from geodino.data.bands import IMAGENET_MEAN, IMAGENET_STD, SAT493M_MEAN, SAT493M_STD
from geodino.errors import CheckpointError

log = logging.getLogger("geodino")

_VIT_HUB = dict(
    img_size=224,
    patch_size=16,
    in_chans=3,
    pos_embed_rope_base=100.0,
    pos_embed_rope_normalize_coords="separate",
    pos_embed_rope_rescale_coords=2,
    pos_embed_rope_dtype="fp32",
    qkv_bias=True,
    drop_path_rate=0.0,
    layerscale_init=1.0e-5,
    norm_layer="layernormbf16",
    ffn_layer="mlp",
    ffn_bias=True,
    proj_bias=True,
    n_storage_tokens=4,
    mask_k_bias=True,
    untie_global_and_local_cls_norm=False,
)


def _vit(**kw) -> dict:
    return {"family": "vit", "kwargs": {**_VIT_HUB, **kw}, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def _convnext(depths, dims) -> dict:
    return {
        "family": "convnext",
        "kwargs": dict(in_chans=3, depths=list(depths), dims=list(dims), drop_path_rate=0.0,
                       layer_scale_init_value=1e-6, patch_size=16),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }


ARCHS: dict[str, dict] = {
    "dinov3_vits16": _vit(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4),
    "dinov3_vits16plus": _vit(embed_dim=384, depth=12, num_heads=6, ffn_ratio=6, ffn_layer="swiglu"),
    "dinov3_vitb16": _vit(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4),
    "dinov3_vitl16": _vit(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4),
    "dinov3_vitl16plus": _vit(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=6, ffn_layer="swiglu"),
    "dinov3_vith16plus": _vit(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6, ffn_layer="swiglu"),
    "dinov3_vit7b16": _vit(embed_dim=4096, depth=40, num_heads=32, ffn_ratio=3, ffn_layer="swiglu64",
                           qkv_bias=False, untie_global_and_local_cls_norm=True),
    "dinov3_convnext_tiny": _convnext([3, 3, 9, 3], [96, 192, 384, 768]),
    "dinov3_convnext_small": _convnext([3, 3, 27, 3], [96, 192, 384, 768]),
    "dinov3_convnext_base": _convnext([3, 3, 27, 3], [128, 256, 512, 1024]),
    "dinov3_convnext_large": _convnext([3, 3, 27, 3], [192, 384, 768, 1536]),
    # Not released: a CPU-sized ViT (head dim 32) for tests, the quickstart and CI.
    "geodino_vit_tiny": _vit(embed_dim=96, depth=2, num_heads=3, ffn_ratio=4),
    "geodino_convnext_tiny": _convnext([1, 1, 2, 1], [24, 48, 96, 96]),
}
# SAT-493M releases: same architectures, the satellite normalisation, and (hub behaviour) untied
# global/local cls norms.
for _base in ("dinov3_vitl16", "dinov3_vit7b16"):
    _sat = copy.deepcopy(ARCHS[_base])
    _sat["kwargs"]["untie_global_and_local_cls_norm"] = True
    _sat["mean"], _sat["std"] = SAT493M_MEAN, SAT493M_STD
    ARCHS[f"{_base}_sat493m"] = _sat
ARCHS["dinov3_vitl16_lvd1689m"] = ARCHS["dinov3_vitl16"]

# Released parameter counts (millions), asserted by tests on the meta device.
RELEASED_PARAMS_M = {
    "dinov3_vits16": 21.60, "dinov3_vits16plus": 28.70, "dinov3_vitb16": 85.67, "dinov3_vitl16": 303.15,
    "dinov3_vitl16plus": 403.92, "dinov3_vith16plus": 840.63, "dinov3_vit7b16": 6716.04,
}

CONTRACT_VERSION = 1


def arch_names() -> list[str]:
    return sorted(ARCHS)


def _arch(name: str) -> dict:
    if name not in ARCHS:
        close = [a for a in ARCHS if name.replace("dinov3_", "") in a]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CheckpointError(f"unknown backbone '{name}'{hint}; known: {', '.join(arch_names())}")
    return ARCHS[name]


def build_backbone(name: str, in_chans: int | None = None, device: str | torch.device | None = None,
                   **overrides) -> nn.Module:
    """A backbone by name with random (official-scheme) init, done by the constructor (skipped on the
    meta device); `overrides` change constructor kwargs."""
    spec = _arch(name)
    kwargs = {**spec["kwargs"], **overrides}
    if in_chans is not None:
        kwargs["in_chans"] = int(in_chans)
    model = _construct(spec["family"], kwargs, device)
    model.geodino_contract = make_contract(name, spec["family"], kwargs, mean=spec["mean"], std=spec["std"])
    return model


def set_stochastic_depth(model: nn.Module, rate: float) -> nn.Module:
    """Set a backbone's training-time stochastic depth in place, as its constructor's ``drop_path_rate``
    would: the same batch-subset "sample drop" rate in every ViT block (reference), a linear 0 -> rate
    ramp over the ConvNeXt blocks (reference). A training setting, not architecture: it is not recorded
    in the contract, has no parameters and does nothing in eval mode."""
    from geodino.models.convnext import ConvNeXtBlock
    from geodino.models.vit import SelfAttentionBlock

    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    vit_blocks = [m for m in model.modules() if isinstance(m, SelfAttentionBlock)]
    for block in vit_blocks:
        block.sample_drop_ratio = rate
    conv_blocks = [m for m in model.modules() if isinstance(m, ConvNeXtBlock)]
    for i, block in enumerate(conv_blocks):
        block.drop_path = rate * i / max(len(conv_blocks) - 1, 1)
    if not vit_blocks and not conv_blocks:
        raise ValueError(f"{type(model).__name__} has no ViT or ConvNeXt blocks to set stochastic depth on")
    return model


def _construct(family: str, kwargs: dict, device=None) -> nn.Module:
    if family == "vit":
        from geodino.models.vit import dinov3_vit

        return dinov3_vit(**kwargs, device=device)
    if family == "convnext":
        from geodino.models.convnext import convnext

        if device is not None:
            with torch.device(device):
                return convnext(**kwargs)
        return convnext(**kwargs)
    raise CheckpointError(f"unknown backbone family '{family}'")


def make_contract(name: str, family: str, kwargs: dict, bands: Sequence[str] | None = None,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  input_scale: str = "divide by 255 (uint8 RGB) to [0, 1], then (x - mean) / std",
                  band_adaptation: dict | None = None) -> dict:
    in_chans = int(kwargs.get("in_chans", 3))
    if bands is None:
        bands = ["R", "G", "B"] if in_chans == 3 else [f"band_{i + 1}" for i in range(in_chans)]
    return {
        "contract_version": CONTRACT_VERSION,
        "name": name,
        "family": family,
        "kwargs": dict(kwargs),
        "patch_size": int(kwargs.get("patch_size", 16)),
        "in_chans": in_chans,
        "bands": list(bands),
        "mean": [float(m) for m in (mean if mean is not None else IMAGENET_MEAN)],
        "std": [float(s) for s in (std if std is not None else IMAGENET_STD)],
        "input_scale": input_scale,
        "band_adaptation": band_adaptation,
    }


def backbone_from_contract(contract: dict, device=None) -> nn.Module:
    model = _construct(contract["family"], dict(contract["kwargs"]), device)
    model.geodino_contract = copy.deepcopy(contract)
    return model


# ----------------------------------------------------------------------------------------------
# Weight files
# ----------------------------------------------------------------------------------------------

def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata) from a local .pth/.pt or .safetensors; never a download."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", str(path)):
        raise CheckpointError(f"{path}: geodino never downloads weights; download the file yourself and pass its local path")
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    meta: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

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
        name = getattr(model, "geodino_contract", {}).get("name", type(model).__name__)
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


def adapt_patch_embed(weight: torch.Tensor, in_chans: int, rgb_indices: Sequence[int] | None = None) -> tuple[torch.Tensor, dict]:
    """Adapt a 3-channel (RGB) first-layer kernel to `in_chans` input bands.

    Rule (DINOv3 paper's NIR inflation; FINO `expand_patch_embed`): the R, G, B filters are kept at
    the bands that hold R, G, B (`rgb_indices`, default 0, 1, 2); every other band gets the mean of
    the RGB filters; then the whole kernel is multiplied by 3 / in_chans so that an input whose bands
    all look alike produces the same activation scale as the RGB model.
    """
    out_c, c, kh, kw = weight.shape
    if c != 3:
        raise CheckpointError(f"band adaptation starts from an RGB kernel; this patch embedding has {c} input channels")
    rgb = list(rgb_indices) if rgb_indices is not None else [0, 1, 2]
    if len(rgb) != 3 or len(set(rgb)) != 3 or max(rgb) >= in_chans or min(rgb) < 0:
        raise CheckpointError(f"rgb_indices {rgb} do not name three distinct bands among {in_chans}")
    mean_filter = weight.mean(dim=1)
    new = mean_filter[:, None].repeat(1, in_chans, 1, 1).clone()
    for src, dst in enumerate(rgb):
        new[:, dst] = weight[:, src]
    scale = 3.0 / in_chans
    new = new * scale
    return new, {"rule": "rgb_kept_extra_from_rgb_mean_rescaled", "from_in_chans": 3, "in_chans": int(in_chans),
                 "rgb_indices": rgb, "scale": scale}


def _first_layer_key(family: str) -> str:
    return "patch_embed.proj.weight" if family == "vit" else "downsample_layers.0.0.weight"


def load_backbone(name_or_path: str | Path, weights: str | Path | None = None, in_chans: int | None = None,
                  bands: Sequence[str] | None = None, rgb_indices: Sequence[int] | None = None,
                  which: str = "teacher", device: str | torch.device = "cpu", **overrides) -> nn.Module:
    """A backbone by released name (optionally with a local weights file) or from a geodino checkpoint.

    - `load_backbone("dinov3_vitl16_sat493m", weights="dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth")`
    - `load_backbone("outputs/train/pretrain/<run>")` (a run directory, a `.pt` training checkpoint,
      or a geodino-exported `.safetensors`); `which` picks the EMA teacher (default) or the student.
    - `in_chans != 3` with RGB weights adapts the first layer with `adapt_patch_embed` and records the
      rule in the contract.
    """
    name = str(name_or_path)
    if name in ARCHS:
        model = build_backbone(name, in_chans=None, device="cpu", **overrides)
        contract = model.geodino_contract
        if weights is not None:
            sd, _ = read_state_dict(weights)
            load_weights_into(model, sd, source=f"weights file {weights}")
        if in_chans is not None and int(in_chans) != contract["in_chans"]:
            model = _adapt_bands(model, int(in_chans), bands, rgb_indices)
        elif bands is not None:
            model.geodino_contract["bands"] = list(bands)
        return model.to(device).eval()

    path = Path(name).expanduser()
    if not path.exists():
        raise CheckpointError(f"unknown backbone '{name}': no such file or run directory, and not a known name ({', '.join(arch_names())})")
    contract, sd = _read_geodino_backbone(path, which)
    if weights is not None:
        sd, _ = read_state_dict(weights)
    model = backbone_from_contract(contract)
    load_weights_into(model, sd, source=str(path))
    if in_chans is not None and int(in_chans) != contract["in_chans"]:
        model = _adapt_bands(model, int(in_chans), bands, rgb_indices)
    return model.to(device).eval()


def _adapt_bands(model: nn.Module, in_chans: int, bands, rgb_indices) -> nn.Module:
    contract = copy.deepcopy(model.geodino_contract)
    key = _first_layer_key(contract["family"])
    sd = model.state_dict()
    if rgb_indices is None and bands is not None:
        from geodino.data.bands import rgb_indices as find_rgb

        rgb_indices = find_rgb(bands)
    new_w, rule = adapt_patch_embed(sd[key], in_chans, rgb_indices)
    kwargs = {**contract["kwargs"], "in_chans": in_chans}
    new_model = _construct(contract["family"], kwargs)
    sd[key] = new_w
    new_model.load_state_dict(sd, strict=True)
    mean = list(contract["mean"])
    std = list(contract["std"])
    rgb = rule["rgb_indices"]
    # Extra bands take the mean RGB statistics until the user supplies per-band ones.
    m_extra, s_extra = sum(mean) / 3, sum(std) / 3
    new_mean = [m_extra] * in_chans
    new_std = [s_extra] * in_chans
    for src, dst in enumerate(rgb):
        new_mean[dst], new_std[dst] = mean[src], std[src]
    new_model.geodino_contract = make_contract(
        contract["name"], contract["family"], kwargs,
        bands=list(bands) if bands is not None else None, mean=new_mean, std=new_std,
        input_scale=contract["input_scale"], band_adaptation=rule,
    )
    return new_model


def _read_geodino_backbone(path: Path, which: str) -> tuple[dict, dict]:
    if path.suffix == ".safetensors":
        sd, meta = read_state_dict(path)
        contract = meta.get("geodino_contract")
        if contract is None:
            raise CheckpointError(f"{path} has no geodino contract in its metadata; pass a released name and weights={path}")
        return contract, sd
    from geodino.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    if "backbone" in ckpt and "contract" in ckpt:  # a standalone backbone file (e.g. a distilled student)
        return ckpt["contract"], ckpt["backbone"]
    models = ckpt.get("models")
    if not isinstance(models, dict) or "contract" not in ckpt:
        raise CheckpointError(f"{path} is not a geodino checkpoint (no 'models' / 'contract' entries)")
    if which not in ("teacher", "student"):
        raise CheckpointError(f"which must be teacher or student, got '{which}'")
    state = models.get("meta_arch", {})
    prefix = f"{which}.backbone."
    sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f"checkpoint {path} has no '{which}' backbone")
    return ckpt["contract"], sd


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights in the official DINOv3 key layout (geodino's modules use those keys)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def export_backbone(model: nn.Module, out: str | Path, fmt: str = "official") -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = official_state_dict(model)
    if fmt == "official":
        torch.save(sd, out)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        meta = {"format": "dinov3-official-keys", "geodino_contract": json.dumps(getattr(model, "geodino_contract", {}))}
        save_file(sd, str(out), metadata=meta)
    else:
        raise CheckpointError(f"unknown export format '{fmt}'; choose official or safetensors")
    return out


def run_export(cfg) -> Path:
    """`geodino export checkpoint=<run or file> format=official|safetensors [out=...]`."""
    src = Path(str(cfg.checkpoint))
    model = load_backbone(src, which=str(cfg.which))
    fmt = str(cfg.format)
    suffix = ".pth" if fmt == "official" else ".safetensors"
    out = Path(cfg.out) if cfg.out else (src if src.is_dir() else src.parent) / f"backbone_{cfg.which}{suffix}"
    export_backbone(model, out, fmt)
    n = sum(p.numel() for p in model.state_dict().values())
    print(f"wrote {out} ({fmt}, {len(model.state_dict())} keys, {n / 1e6:.2f}M values)")
    return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def contract_summary(contract: dict[str, Any]) -> str:
    return (f"{contract['name']} ({contract['family']}, patch {contract['patch_size']}, "
            f"{contract['in_chans']} bands: {', '.join(contract['bands'])})")
