"""Building backbones: by registry name, from a contract, or from a file (released weights, a geodino training
run or checkpoint, an exported backbone), with band adaptation of RGB weights and training-time stochastic depth.

`load_backbone(name_or_path, weights=None, in_chans=None)` is the one entry point users call; every backbone it
returns carries its `Contract` as ``model.geodino_contract``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from geodino.checkpoint import Checkpoint, safetensors_format
from geodino.contract import Contract, default_band_names
from geodino.data.bands import rgb_indices as find_rgb
from geodino.errors import CheckpointError
from geodino.models.convnext import ConvNeXtBlock, convnext
from geodino.models.layouts import fill_derived, folder_layout, to_official
from geodino.models.registry import ARCHS, arch, arch_names, canonical_name, is_arch
from geodino.models.vit import SelfAttentionBlock, dinov3_vit
from geodino.models.weights import infer_arch, is_official_layout, load_weights_into, read_state_dict, read_weights

log = logging.getLogger("geodino")


def construct(family: str, kwargs: dict, device=None) -> nn.Module:
    """The bare module of a family with these constructor kwargs (random official init, skipped on meta)."""
    if family == "vit":
        return dinov3_vit(**kwargs, device=device)
    if family == "convnext":
        if device is not None:
            with torch.device(device):
                return convnext(**kwargs)
        return convnext(**kwargs)
    raise CheckpointError(f"unknown backbone family '{family}'")


def default_contract(name: str, kwargs: dict) -> Contract:
    """The registry's contract for `name` with these kwargs: its normalisation on RGB; other band counts get
    the mean of the RGB statistics for every band (the band-adaptation rule) until data statistics replace them."""
    spec = arch(name)
    n = int(kwargs.get("in_chans", 3))
    mean, std = tuple(spec["mean"]), tuple(spec["std"])
    if n != len(mean):
        mean, std = (sum(mean) / len(mean),) * n, (sum(std) / len(std),) * n
    return Contract(name, spec["family"], dict(kwargs), bands=default_band_names(n), mean=mean, std=std)


def build_backbone(name: str, in_chans: int | None = None, device: str | torch.device | None = None,
                   **overrides) -> nn.Module:
    """A backbone by name with random (official-scheme) init, done by the constructor (skipped on the
    meta device); `overrides` change constructor kwargs. timm and Hugging Face names are aliases
    (`registry.canonical_name`)."""
    name = canonical_name(name)
    spec = arch(name)
    kwargs = {**spec["kwargs"], **overrides}
    if in_chans is not None:
        kwargs["in_chans"] = int(in_chans)
    model = construct(spec["family"], kwargs, device)
    model.geodino_contract = default_contract(name, kwargs)
    return model


def backbone_from_contract(contract: Contract, device=None) -> nn.Module:
    model = construct(contract.family, dict(contract.kwargs), device)
    model.geodino_contract = contract
    return model


def set_stochastic_depth(model: nn.Module, rate: float) -> nn.Module:
    """Set a backbone's training-time stochastic depth in place, as its constructor's ``drop_path_rate``
    would: the same batch-subset "sample drop" rate in every ViT block (reference), a linear 0 -> rate
    ramp over the ConvNeXt blocks (reference). A training setting, not architecture: it is not recorded
    in the contract, has no parameters and does nothing in eval mode."""
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


def adapt_bands(model: nn.Module, in_chans: int, bands: Sequence[str] | None = None,
                rgb_indices: Sequence[int] | None = None) -> nn.Module:
    """A copy of an RGB backbone taking `in_chans` bands (`adapt_patch_embed`); the contract keeps the RGB
    statistics at the RGB bands and gives every other band their mean, until data statistics replace them."""
    contract = model.geodino_contract
    key = _first_layer_key(contract.family)
    sd = model.state_dict()
    if rgb_indices is None and bands is not None:
        rgb_indices = find_rgb(bands)
    new_w, rule = adapt_patch_embed(sd[key], in_chans, rgb_indices)
    kwargs = {**contract.kwargs, "in_chans": in_chans}
    new_model = construct(contract.family, kwargs)
    sd[key] = new_w
    new_model.load_state_dict(sd, strict=True)
    m_extra, s_extra = sum(contract.mean) / 3, sum(contract.std) / 3
    new_mean, new_std = [m_extra] * in_chans, [s_extra] * in_chans
    for src, dst in enumerate(rule["rgb_indices"]):
        new_mean[dst], new_std[dst] = contract.mean[src], contract.std[src]
    new_model.geodino_contract = Contract(
        contract.name, contract.family, kwargs, bands=list(bands) if bands is not None else default_band_names(in_chans),
        mean=new_mean, std=new_std, input_scale=contract.input_scale, band_adaptation=rule, scale=contract.scale,
        offset=contract.offset,
    )
    return new_model


def load_backbone(name_or_path: str | Path, weights: str | Path | None = None, in_chans: int | None = None,
                  bands: Sequence[str] | None = None, rgb_indices: Sequence[int] | None = None,
                  which: str = "teacher", device: str | torch.device = "cpu", **overrides) -> nn.Module:
    """A backbone by released name (optionally with a local weights file) or from a geodino file.

    - `load_backbone("dinov3_vitl16_sat493m", weights="dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth")`; `weights`
      may hold official, timm (``vit_*_patch16_dinov3``) or Hugging Face (``DINOv3ViTModel``) keys, told apart by
      the keys (`layouts.detect_layout`), or be a timm / Hugging Face folder; timm names and Hugging Face model ids
      are aliases of the registry names (``vit_large_patch16_dinov3.sat493m``, ``facebook/dinov3-vits16-pretrain-lvd1689m``)
    - `load_backbone("hf_folder/")`, `load_backbone("timm_folder/")`, `load_backbone("model.safetensors")`: a
      transformers / timm folder or a weights file in any of the three layouts; the architecture comes from the
      folder's config or the keys, the normalisation from the folder (timm ``pretrained_cfg``, HF
      ``preprocessor_config.json``) or the registry
    - `load_backbone("outputs/train/pretrain/<run>")` (a run directory, a `.pt` training checkpoint, a backbone
      file such as a distilled student, or a geodino-exported `.safetensors`); `which` picks the EMA teacher
      (default) or the student of a training checkpoint.
    - `load_backbone("backbone.pth")`: an official-layout file (``geodino export format=official``, a released
      ``.pth``) has no contract; the architecture is read off its keys (`weights.infer_arch`; `overrides` such as
      ``num_heads`` fill in what the keys cannot tell) and the registry's normalisation is assumed.
    - `in_chans != 3` with RGB weights adapts the first layer with `adapt_patch_embed` and records the
      rule in the contract.

    A registry name without `weights` is a randomly initialised backbone: that is logged as a warning, once per
    call (`build_backbone` is the quiet way to start a model from scratch).
    """
    name = str(name_or_path)
    # a registry name always means the registry; an alias (timm name, HF model id) only when no such path exists
    # (an HF download folder is often named after the model id)
    if name in ARCHS or (is_arch(name) and not Path(name).expanduser().exists()):
        name = canonical_name(name)
        model = build_backbone(name, in_chans=None, device="cpu", **overrides)
        if weights is not None:
            sd, meta, _ = read_weights(weights)
            _check_folder_config(model, meta.get("overrides") or {}, weights)
            load_weights_into(model, fill_derived(sd, model), source=f"weights file {weights}")
        else:
            log.warning("backbone %s loaded without weights=: its weights are RANDOM (the official initialisation, "
                        "not the %s); pass weights=<local .pth or .safetensors> for a trained backbone", name,
                        "released model" if name.startswith("dinov3_") else "result of any training")
        if in_chans is not None and int(in_chans) != model.geodino_contract.in_chans:
            model = adapt_bands(model, int(in_chans), bands, rgb_indices)
        elif bands is not None:
            model.geodino_contract = model.geodino_contract.with_data(bands=list(bands))
        return model.to(device).eval()

    path = Path(name).expanduser()
    if not path.exists():
        raise CheckpointError(f"unknown backbone '{name}': no such file or run directory, and not a known name ({', '.join(arch_names())})")
    contract, sd = read_geodino_backbone(path, which, **overrides)
    if weights is not None:
        sd, _, _ = read_weights(weights)
    model = backbone_from_contract(contract)
    load_weights_into(model, fill_derived(sd, model), source=str(path))
    if in_chans is not None and int(in_chans) != contract.in_chans:
        model = adapt_bands(model, int(in_chans), bands, rgb_indices)
    return model.to(device).eval()


def _check_folder_config(model: nn.Module, said: dict, source) -> None:
    """A timm / HF folder's config must agree with the named architecture on what its weights cannot show (heads,
    RoPE base, norm): else the load would succeed and compute something else."""
    kwargs = model.geodino_contract.kwargs
    differ = [f"{k}={v!r} (the name says {kwargs.get(k)!r})" for k, v in said.items() if k in kwargs and kwargs[k] != v]
    if differ:
        raise CheckpointError(f"{source}: its config.json says {', '.join(differ)}; load it by its path alone "
                              f"(load_backbone('{source}')) or pass the matching name")


def read_geodino_backbone(path: Path, which: str = "teacher", **overrides) -> tuple[Contract, dict]:
    """(contract, official-key weights) of a geodino-exported safetensors file or timm / HF folder (contract in the
    metadata), any geodino checkpoint file (also as safetensors: a student, a dino.txt model), or a state dict /
    folder in the official, timm or Hugging Face layout (architecture from the folder's config and the keys:
    `official_contract`)."""
    if path.is_file() and path.suffix == ".safetensors" and safetensors_format(path):
        ckpt = Checkpoint.open(path)
        return ckpt.contract, ckpt.backbone_state(which)
    if path.suffix in (".safetensors", ".bin") or (path.is_dir() and folder_layout(path)):
        sd, meta, layout = read_weights(path)
        contract = meta.get("geodino_contract")
        if contract:
            return Contract.from_dict(contract, where=str(path)), sd
        contract = official_contract(sd, str(path), **{**meta.get("overrides", {}), **overrides})
        norm = meta.get("normalisation")
        if norm and len(norm[0]) == len(norm[1]) == contract.in_chans:
            contract = contract.with_data(mean=norm[0], std=norm[1])
        return contract, sd
    if path.is_file() and path.suffix == ".pth":  # the official layout's suffix: read it without running code
        try:
            sd, _ = read_state_dict(path)
        except CheckpointError:
            sd = None  # not a plain state dict: a geodino checkpoint saved under a .pth name
        if isinstance(sd, dict) and sd and all(torch.is_tensor(v) for v in sd.values()):
            sd = to_official(sd, source=str(path))
        if is_official_layout(sd):
            return official_contract(sd, str(path), **overrides), sd
    ckpt = Checkpoint.open(path)
    if path.is_file() and not ckpt.has_contract and isinstance(ckpt.raw, dict) and ckpt.raw \
            and all(torch.is_tensor(v) for v in ckpt.raw.values()):
        sd = to_official(ckpt.raw, source=str(path))
        if is_official_layout(sd):
            return official_contract(sd, str(path), **overrides), sd
    if not ckpt.has_contract or not (ckpt.is_backbone_file or ckpt.is_training or ckpt.is_dinotxt):
        raise CheckpointError(f"{path} is not a geodino checkpoint (no 'models' / 'contract' entries)")
    return ckpt.contract, ckpt.backbone_state(which)


def official_contract(sd: dict[str, torch.Tensor], source: str, **overrides) -> Contract:
    """The contract of an official-layout state dict: the architecture read off its keys (`weights.infer_arch`),
    the registry's normalisation for it (logged, with the other registry names the same weights fit)."""
    name, kwargs = infer_arch(sd, source, **overrides)
    same = [n for n, a in ARCHS.items() if n != name and a["kwargs"] == ARCHS[name]["kwargs"]
            and (a["mean"], a["std"]) != (ARCHS[name]["mean"], ARCHS[name]["std"])]
    log.log(logging.WARNING if same else logging.INFO,
            "%s has no geodino contract: architecture %s read off its keys, its normalisation assumed%s "
            "(geodino export format=safetensors keeps the contract)", source, name,
            f"; for {', '.join(same)} use load_backbone('{same[0]}', weights='{source}')" if same else "")
    return default_contract(name, kwargs)
