"""Backbone weight files: reading (official ``.pth`` / ``.pt`` state dicts, safetensors; timm and Hugging Face
layouts and folders through `geodino.models.layouts`), strict loading with errors that name the keys at fault, and
writing the official layout, safetensors with the contract, a timm folder or a Hugging Face folder.

Files are always local: a URL is refused, nothing is downloaded. ``.pth`` files are read with
``torch.load(weights_only=True)``, which cannot execute code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from geodino.checkpoint import backbone_payload, read_safetensors_file, save_safetensors
from geodino.errors import CheckpointError
from geodino.models import layouts
from geodino.models.registry import ARCHS
from geodino.outputs import atomic_output, write_errors


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata) from a local .pth/.pt or .safetensors; never a download."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", str(path)):
        raise CheckpointError(f"{path}: geodino never downloads weights; download the file yourself and pass its local path")
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    meta: dict = {}
    if path.suffix == ".safetensors":
        sd, meta = read_safetensors_file(path)
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


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(official-layout state dict, metadata, layout it was in) of a weights file (official, timm or Hugging Face
    keys, `.pth` / `.bin` / `.safetensors`) or a timm / Hugging Face folder (``config.json`` + weights). For a folder,
    ``metadata["overrides"]`` holds the constructor kwargs its config states (`layouts.folder_overrides`) and
    ``metadata["normalisation"]`` its (mean, std) when it states one."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        kind = layouts.folder_layout(p)
        if kind is None:
            raise CheckpointError(f"{p} is a folder with no timm or Hugging Face DINOv3 config.json")
        sd, meta = read_state_dict(layouts.folder_weights(p))
        meta = {**meta, "overrides": layouts.folder_overrides(p, kind),
                "normalisation": layouts.folder_normalisation(p, kind)}
    else:
        sd, meta = read_state_dict(p)
    layout = layouts.detect_layout(sd)
    return layouts.to_official(sd, layout, str(p)), meta, layout


def is_official_layout(sd) -> bool:
    """A flat dict of tensors with the official ViT or ConvNeXt keys (no geodino ``format`` / ``contract``)."""
    return (isinstance(sd, dict) and bool(sd) and all(torch.is_tensor(v) for v in sd.values())
            and (("cls_token" in sd and "patch_embed.proj.weight" in sd) or "downsample_layers.0.0.weight" in sd))


def _vit_features(sd: dict[str, torch.Tensor]) -> dict:
    """What the keys and shapes of an official ViT state dict say about its constructor arguments."""
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    proj = sd["patch_embed.proj.weight"]
    swiglu = "blocks.0.mlp.w1.weight" in sd
    hidden = sd["blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0] if blocks else 0
    return {"embed_dim": int(sd["cls_token"].shape[-1]), "depth": max(blocks) + 1 if blocks else 0,
            "in_chans": int(proj.shape[1]), "patch_size": int(proj.shape[-1]),
            "n_storage_tokens": int(sd["storage_tokens"].shape[1]) if "storage_tokens" in sd else 0,
            "swiglu": swiglu, "hidden": int(hidden),
            "qkv_bias": "blocks.0.attn.qkv.bias" in sd, "mask_k_bias": "blocks.0.attn.qkv.bias_mask" in sd,
            "proj_bias": "blocks.0.attn.proj.bias" in sd,
            "ffn_bias": f"blocks.0.mlp.{'w1' if swiglu else 'fc1'}.bias" in sd,
            "layerscale": "blocks.0.ls1.gamma" in sd, "untie_cls_and_patch_norms": "cls_norm.weight" in sd,
            "untie_global_and_local_cls_norm": "local_cls_norm.weight" in sd}


def _convnext_features(sd: dict[str, torch.Tensor]) -> dict:
    keys = [f"downsample_layers.{i}.{0 if i == 0 else 1}.weight" for i in range(4)]
    return {"dims": [int(sd[k].shape[0]) for k in keys if k in sd],
            "depths": [len({int(m.group(1)) for k in sd if (m := re.match(rf"stages\.{s}\.(\d+)\.", k))})
                       for s in range(4)],
            "in_chans": int(sd["downsample_layers.0.0.weight"].shape[1]),
            "layer_scale": "stages.0.0.gamma" in sd}


def _swiglu_hidden(dim: int, ratio: float, ffn_layer: str) -> int:
    align = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}[ffn_layer]
    d = int(dim * ratio * 2 / 3)
    return d + (-d % align)


# constructor defaults of the ViT switches the registry entries may leave out
_VIT_DEFAULTS = {"n_storage_tokens": 0, "qkv_bias": True, "mask_k_bias": False, "proj_bias": True, "ffn_bias": True,
                 "untie_cls_and_patch_norms": False, "untie_global_and_local_cls_norm": False}


def _vit_kwargs(base: dict, f: dict) -> dict:
    """`base` (a registry entry's kwargs) changed where the keys say otherwise (`_vit_features`)."""
    kw = {**base, "embed_dim": f["embed_dim"], "depth": f["depth"], "in_chans": f["in_chans"],
          "patch_size": f["patch_size"]}
    said = {k: f[k] for k in _VIT_DEFAULTS if k != "mask_k_bias" or f["qkv_bias"]}  # no bias, no bias_mask key
    kw.update({k: v for k, v in said.items() if base.get(k, _VIT_DEFAULTS[k]) != v})
    if not f["layerscale"]:
        kw["layerscale_init"] = None
    elif not kw.get("layerscale_init"):
        kw["layerscale_init"] = 1e-5
    dim, ffn = f["embed_dim"], kw.get("ffn_layer", "mlp")
    if not f["swiglu"]:
        if ffn != "mlp" or int(dim * kw.get("ffn_ratio", 4.0)) != f["hidden"]:
            kw["ffn_layer"], kw["ffn_ratio"] = "mlp", f["hidden"] / dim
    elif ffn == "mlp" or _swiglu_hidden(dim, kw.get("ffn_ratio", 4.0), ffn) != f["hidden"]:
        kw["ffn_layer"], kw["ffn_ratio"] = "swiglu", f["hidden"] * 1.5 / dim
    return kw


def infer_arch(sd: dict[str, torch.Tensor], source: str = "state dict", **overrides) -> tuple[str, dict]:
    """(registry name, constructor kwargs) of an official-layout state dict: embed dim, depth, FFN type and width,
    storage tokens, input channels, patch size and the optional parts come from the keys and shapes; what the keys
    cannot tell (a ViT's number of heads; RoPE settings, norms) from the registry entry with that embed dim and
    depth, preferring the one the keys match exactly (``dinov3_vitl16`` vs ``dinov3_vitl16_sat493m``: untied cls
    norms). `overrides` (e.g. ``num_heads``) win. A clear CheckpointError when the keys are no DINOv3 backbone or
    the heads are ambiguous."""
    if "cls_token" in sd and "patch_embed.proj.weight" in sd:
        f = _vit_features(sd)
        cands = {n: a for n, a in sorted(ARCHS.items(), key=lambda t: (len(t[0]), t[0])) if a["family"] == "vit"
                 and a["kwargs"]["embed_dim"] == f["embed_dim"] and a["kwargs"]["depth"] == f["depth"]}
        heads = {a["kwargs"]["num_heads"] for a in cands.values()}
        shape = f"a ViT with embed_dim {f['embed_dim']} and depth {f['depth']}"
        if "num_heads" not in overrides and len(heads) != 1:
            why = "no registry entry has these sizes" if not heads else f"registry entries disagree ({sorted(heads)})"
            raise CheckpointError(f"{source} is {shape}: its number of attention heads cannot be read from the "
                                  f"weights and {why}; pass num_heads=... (load_backbone(path, num_heads=N))")
        if not cands:  # sizes outside the registry: the generic ViT settings of the CPU-sized entry
            cands = {"geodino_vit_tiny": ARCHS["geodino_vit_tiny"]}
        fitted = {n: {**_vit_kwargs(a["kwargs"], f), **overrides} for n, a in cands.items()}
        exact = [n for n, kw in fitted.items() if kw == {**cands[n]["kwargs"], **overrides}]
        name = exact[0] if exact else next(iter(fitted))
        return name, fitted[name]
    if "downsample_layers.0.0.weight" in sd:
        f = _convnext_features(sd)
        cands = [n for n, a in sorted(ARCHS.items()) if a["family"] == "convnext"
                 and a["kwargs"]["dims"] == f["dims"] and a["kwargs"]["depths"] == f["depths"]]
        name = cands[0] if cands else "geodino_convnext_tiny"
        kw = {**ARCHS[name]["kwargs"], "dims": f["dims"], "depths": f["depths"], "in_chans": f["in_chans"]}
        if not f["layer_scale"]:
            kw["layer_scale_init_value"] = 0.0
        return name, {**kw, **overrides}
    raise CheckpointError(f"{source} is {describe_state_dict(sd)}")


def describe_state_dict(sd: dict[str, torch.Tensor]) -> str:
    """Guess the architecture behind an official-layout state dict (for error messages)."""
    if "cls_token" in sd and "patch_embed.proj.weight" in sd:
        f = _vit_features(sd)
        guess = [n for n, a in ARCHS.items() if a["family"] == "vit" and a["kwargs"]["embed_dim"] == f["embed_dim"]
                 and a["kwargs"]["depth"] == f["depth"] and (a["kwargs"]["ffn_layer"] != "mlp") == f["swiglu"]]
        desc = (f"a ViT with embed_dim {f['embed_dim']}, depth {f['depth']}, {'SwiGLU' if f['swiglu'] else 'MLP'} "
                f"FFN, {f['in_chans']} input channels")
        return desc + (f" (likely {' / '.join(sorted(set(guess)))})" if guess else "")
    if "downsample_layers.0.0.weight" in sd:
        f = _convnext_features(sd)
        guess = [n for n, a in ARCHS.items() if a["family"] == "convnext" and a["kwargs"]["dims"] == f["dims"]
                 and a["kwargs"]["depths"] == f["depths"]]
        return f"a ConvNeXt with dims {f['dims']}, depths {f['depths']}" + (f" (likely {guess[0]})" if guess else "")
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


EXPORT_FORMATS = ("official", "safetensors", "timm", "hf", "onnx")
FOLDER_FORMATS = ("timm", "hf")  # written as a folder (config.json + model.safetensors)


def _contract_meta(model: nn.Module) -> dict[str, str]:
    contract = getattr(model, "geodino_contract", None)
    return {"geodino_contract": json.dumps(contract.to_dict() if contract is not None else {})}


def _write_folder(out: Path, files: dict[str, object], needs_bytes: int) -> None:
    """Write a model folder whole or not at all: into a temporary sibling, then renamed (an existing `out` is
    replaced; the caller checked `overwrite`)."""
    import os
    import shutil

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with write_errors(out, needs_bytes):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for name, content in files.items():
                if isinstance(content, tuple):  # (state dict, metadata) -> safetensors
                    save_file(content[0], str(tmp / name), metadata=content[1])
                else:
                    (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def export_backbone(model: nn.Module, out: str | Path, fmt: str = "official", info: dict | None = None,
                    **onnx_options) -> Path:
    """Write a backbone, atomically (geodino.outputs: a full disk leaves no partial file and is one line), as

    - ``official``: an official-layout ``.pth`` (flat state dict; no contract);
    - ``safetensors``: official keys with the contract in the metadata (`geodino.checkpoint.save_safetensors`, a
      backbone file as safetensors; `info`: provenance kept beside it, e.g. a distilled student's teacher and step);
    - ``timm``: a folder ``timm.create_model("local-dir:<out>")`` reads (``config.json`` + ``model.safetensors``);
    - ``hf``: a folder ``transformers.DINOv3ViTModel.from_pretrained(<out>)`` reads (same two files);
    - ``onnx``: the inference graph (`geodino.models.onnx.export_onnx`; `onnx_options` go there).

    The timm and HF files keep the contract in their safetensors metadata, so `load_backbone(<out>)` gets it back."""
    if fmt not in EXPORT_FORMATS:
        raise CheckpointError(f"unknown export format '{fmt}'; choose one of {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    if fmt == "onnx":
        from geodino.models.onnx import export_onnx

        return export_onnx(model, out, **onnx_options)
    sd = official_state_dict(model)
    if fmt in FOLDER_FORMATS:
        contract = getattr(model, "geodino_contract", None)
        kwargs = dict(contract.kwargs) if contract is not None else {}
        if contract is None or contract.family not in ("vit", "convnext"):
            raise CheckpointError(f"format={fmt} exports DINOv3 ViTs and ConvNeXts with a geodino contract; this "
                                  f"backbone is {contract.family if contract is not None else type(model).__name__}")
        need = sum(v.numel() * v.element_size() for v in sd.values())
        meta = {"format": "pt", **_contract_meta(model)}
        if fmt == "timm":
            tsd, arch, model_args = layouts.official_to_timm(sd, kwargs, contract.name)
            size = (contract.in_chans, int(kwargs.get("img_size", 224)), int(kwargs.get("img_size", 224)))
            config = {"architecture": arch, "num_classes": 0, "num_features": int(model.embed_dim),
                      "global_pool": "token" if contract.family == "vit" else "avg", "model_args": model_args,
                      "pretrained_cfg": {"input_size": list(size), "mean": list(contract.mean), "std": list(contract.std),
                                         "crop_pct": 1.0, "interpolation": "bicubic", "num_classes": 0,
                                         "first_conv": "patch_embed.proj" if contract.family == "vit" else "stem.0",
                                         "classifier": "head" if contract.family == "vit" else "head.fc",
                                         "license": "dinov3-license"}}
            _write_folder(out, {"config.json": config, layouts.WEIGHTS_NAME: ({k: v.contiguous() for k, v in tsd.items()}, meta)}, need)
        else:
            hsd, config = layouts.official_to_hf(sd, kwargs)
            pre = {"image_processor_type": "DINOv3ViTImageProcessorFast", "do_resize": False, "do_center_crop": False,
                   "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                   "image_mean": list(contract.mean), "image_std": list(contract.std)}
            _write_folder(out, {"config.json": config, "preprocessor_config.json": pre,
                                layouts.WEIGHTS_NAME: ({k: v.contiguous() for k, v in hsd.items()}, meta)}, need)
        return out
    if fmt == "safetensors":  # the geodino backbone file as safetensors (official keys; contract, info as JSON)
        contract = getattr(model, "geodino_contract", None)
        if contract is None:
            raise CheckpointError(f"format=safetensors keeps the backbone's contract; this {type(model).__name__} "
                                  "has none (load or build it with geodino.load_backbone / build_backbone)")
        return save_safetensors(backbone_payload(sd, contract, **(info or {})), out)
    with atomic_output(out, needs_bytes=sum(v.numel() * v.element_size() for v in sd.values())) as tmp:
        torch.save(sd, tmp)
    return out
