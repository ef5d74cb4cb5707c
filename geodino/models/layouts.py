"""Weight layouts of the other DINOv3 ViT implementations, to and from the official one geodino uses:

* ``timm``: timm's ``Eva`` models ``vit_*_patch16_dinov3[_qkvb]`` (``reg_token``, ``gamma_1/2``, ``q_bias`` /
  ``v_bias``, SwiGLU ``fc1_g`` / ``fc1_x`` / ``fc2``); a timm folder is ``config.json`` (``architecture``,
  ``model_args``, ``pretrained_cfg``) + ``model.safetensors``, what ``timm.create_model("local-dir:<folder>")``
  reads;
* ``hf``: Hugging Face transformers' ``DINOv3ViTModel`` (``embeddings.*``, ``[model.]layer.N.attention.q/k/v/o_proj``,
  ``layer_scale1.lambda1``, ``mlp.up/down[/gate]_proj``); an HF folder is ``config.json`` (``model_type:
  dinov3_vit``) + ``model.safetensors``, what ``DINOv3ViTModel.from_pretrained(<folder>)`` reads.

ConvNeXt: timm's ``convnext_*`` (``stem``, ``stages.i.downsample`` / ``blocks.j.conv_dw`` / ``mlp.fc1``,
``head.norm``) and transformers' ``DINOv3ConvNextModel`` (``[model.]stages.i.downsample_layers`` / ``layers.j``,
``layer_norm``).

`detect_layout(sd)` tells them apart by their keys; `to_official` / `from_official` rename (and split / fuse qkv).
The tables are written here because neither library converts back to the official layout (timm's
``checkpoint_filter_fn`` only maps official -> timm, onto a built model; transformers ships a one-way conversion
script), and geodino must read and write all three without either library installed. What the official layout
holds and the others cannot (untied cls / patch norms, RoPE min/max periods, a LayerNorm eps timm's DINOv3 models do
not use) is refused with an error that names it; training-only parts (``mask_token``, ``local_cls_norm``) are
dropped on export and the mask token reads back as zeros.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from geodino.errors import CheckpointError
from geodino.models.registry import TIMM_ARCHS

log = logging.getLogger("geodino")

LAYOUTS = ("official", "timm", "hf")
WEIGHTS_NAME = "model.safetensors"
# training-time RoPE coordinate augmentation: official kwarg <-> HF config key
_HF_ROPE_AUGMENTATION = (("pos_embed_rope_shift_coords", "pos_embed_shift"),
                         ("pos_embed_rope_jitter_coords", "pos_embed_jitter"),
                         ("pos_embed_rope_rescale_coords", "pos_embed_rescale"))


# ------------------------------------------------------------------------------------------------
# detection
# ------------------------------------------------------------------------------------------------
def detect_layout(sd: dict) -> str:
    """``official``, ``timm`` or ``hf``, from the keys (an unknown layout reads as ``official``: the strict load
    then names the keys at fault)."""
    keys = list(sd)
    if any(k.startswith("embeddings.patch_embeddings.") for k in keys) or \
            any(re.match(r"(model\.)?stages\.0\.downsample_layers\.0\.", k) for k in keys):
        return "hf"
    if "stem.0.weight" in sd and any(".blocks.0.conv_dw." in k for k in keys):
        return "timm"
    if "reg_token" in sd or any(re.search(r"\.(gamma_[12]|attn\.[qv]_bias|mlp\.fc1_[gx]\.weight)$", k) for k in keys):
        return "timm"
    if "cls_token" in sd and "patch_embed.proj.weight" in sd and "mask_token" not in sd and "storage_tokens" not in sd \
            and not any(k.endswith(".ls1.gamma") for k in keys):
        return "timm"  # a timm model without registers and layer scale: official files always carry mask_token
    return "official"


def _blocks(sd: dict, prefix: str) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))})


def _masked_qkv_bias(q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor | None, dim: int,
                     like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The official fused ``qkv.bias`` (+ ``bias_mask`` when the key bias is absent: the official masked k bias)."""
    if q is None and k is None and v is None:
        return {}
    z = torch.zeros(dim, dtype=like.dtype)
    out = {"bias": torch.cat([q if q is not None else z, k if k is not None else z, v if v is not None else z])}
    if k is None:
        out["bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)]).to(like.dtype)
    return out


# ------------------------------------------------------------------------------------------------
# to the official layout
# ------------------------------------------------------------------------------------------------
def to_official(sd: dict[str, torch.Tensor], layout: str | None = None, source: str = "state dict"
                ) -> dict[str, torch.Tensor]:
    """`sd` in the official layout (a no-op for official files). ``rope_embed.periods`` is not included for timm /
    HF files (neither stores it; it follows from the architecture: `fill_derived`)."""
    layout = layout or detect_layout(sd)
    if layout == "official":
        return sd
    if layout == "timm":
        return _timm_to_official(sd, source)
    if layout == "hf":
        return _hf_to_official(sd, source)
    raise CheckpointError(f"unknown weight layout '{layout}'; known: {', '.join(LAYOUTS)}")


def _timm_convnext_to_official(sd: dict, source: str) -> dict:
    out, dropped = {}, []
    for k, v in sd.items():
        if k.startswith("head.") and not k.startswith("head.norm."):
            dropped.append(k)
            continue
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.", r"stages.\1.", k)
        k = k.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc1.", ".pwconv1.").replace(".mlp.fc2.", ".pwconv2.")
        if k.startswith("head.norm."):
            k = k[len("head."):]
        if k.endswith(("pwconv1.weight", "pwconv2.weight")) and v.ndim == 4:  # timm's conv_mlp variant: 1x1 convs
            v = v[:, :, 0, 0]
        out[k] = v
    if dropped:
        log.info("%s: timm keys with no official counterpart dropped: %s", source, ", ".join(dropped[:6]))
    return _with_convnext_norms(out)


def _with_convnext_norms(out: dict) -> dict:
    """The official files hold the final norm twice (``norm.*`` and ``norms.3.*``, one module)."""
    for part in ("weight", "bias"):
        if f"norm.{part}" in out:
            out[f"norms.3.{part}"] = out[f"norm.{part}"]
    return out


#: Hugging Face ConvNeXt block parameter names -> the official ones (the reverse mapping reads it backwards).
_HF_CONVNEXT_BLOCK_NAMES = (("depthwise_conv", "dwconv"), ("layer_norm", "norm"), ("pointwise_conv1", "pwconv1"),
                            ("pointwise_conv2", "pwconv2"))


def _rename(name: str, pairs) -> str:
    for old, new in pairs:
        name = name.replace(old, new)
    return name


def _hf_convnext_to_official(sd: dict, source: str) -> dict:
    out = {}
    for k, v in sd.items():
        k0 = k
        k = re.sub(r"^model\.", "", k)
        m = re.match(r"stages\.(\d+)\.downsample_layers\.(\d+)\.(.+)$", k)
        if m:
            out[f"downsample_layers.{m.group(1)}.{m.group(2)}.{m.group(3)}"] = v
            continue
        m = re.match(r"stages\.(\d+)\.layers\.(\d+)\.(.+)$", k)
        if m:
            rest = _rename(m.group(3), _HF_CONVNEXT_BLOCK_NAMES)
            out[f"stages.{m.group(1)}.{m.group(2)}.{rest}"] = v
            continue
        if k.startswith("layer_norm."):
            out["norm." + k.split(".", 1)[1]] = v
            continue
        raise CheckpointError(f"{source}: Hugging Face ConvNeXt key {k0} has no official counterpart")
    return _with_convnext_norms(out)


def _timm_to_official(sd: dict, source: str) -> dict:
    if "stem.0.weight" in sd:
        return _timm_convnext_to_official(sd, source)
    out, dropped = {}, []
    swiglu = any(".mlp.fc1_g." in k for k in sd)
    for k, v in sd.items():
        if k.startswith(("head.", "fc_norm.", "rope.")) or k.endswith((".q_bias", ".v_bias")):
            if not k.endswith((".q_bias", ".v_bias")):
                dropped.append(k)
            continue
        k = k.replace("reg_token", "storage_tokens")
        k = re.sub(r"\.gamma_1$", ".ls1.gamma", k)
        k = re.sub(r"\.gamma_2$", ".ls2.gamma", k)
        if swiglu:
            k = k.replace(".mlp.fc1_g.", ".mlp.w1.").replace(".mlp.fc1_x.", ".mlp.w2.").replace(".mlp.fc2.", ".mlp.w3.")
        out[k] = v
    if dropped:
        log.info("%s: timm keys with no official counterpart dropped: %s", source, ", ".join(dropped[:6]))
    if "cls_token" not in out:
        raise CheckpointError(f"{source} has timm-style keys but no cls_token; not a timm DINOv3 ViT")
    dim = out["cls_token"].shape[-1]
    for i in _blocks(out, "blocks."):
        p = f"blocks.{i}.attn."
        q, v = sd.get(p + "q_bias"), sd.get(p + "v_bias")
        if q is None and v is None and (p + "qkv.bias") not in out:
            # timm's vit_*_dinov3 (no `_qkvb`) have no q/v bias: the released weights' biases are zero
            q = torch.zeros(dim, dtype=out[p + "qkv.weight"].dtype)
        if (p + "qkv.bias") not in out:
            for name, t in _masked_qkv_bias(q, None, v, dim, out[p + "qkv.weight"]).items():
                out[p + "qkv." + name] = t
    out["mask_token"] = torch.zeros(1, dim, dtype=out["cls_token"].dtype)  # pretraining only; timm has none
    return out


def _hf_to_official(sd: dict, source: str) -> dict:
    if any(re.match(r"(model\.)?stages\.", k) for k in sd):
        return _hf_convnext_to_official(sd, source)
    sd = {re.sub(r"^model\.layer\.", "layer.", k): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    top = {"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "storage_tokens",
           "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.bias": "patch_embed.proj.bias", "norm.weight": "norm.weight",
           "norm.bias": "norm.bias"}
    for k, o in top.items():
        if k in sd:
            out[o] = sd[k]
    if "cls_token" not in out:
        raise CheckpointError(f"{source} has Hugging Face DINOv3 keys but no embeddings.cls_token")
    if "storage_tokens" in out and out["storage_tokens"].shape[1] == 0:
        del out["storage_tokens"]
    dim = out["cls_token"].shape[-1]
    mask = sd.get("embeddings.mask_token")
    out["mask_token"] = mask.reshape(1, dim) if mask is not None else torch.zeros(1, dim, dtype=out["cls_token"].dtype)
    gated = any(".mlp.gate_proj." in k for k in sd)
    known = set(top) | {"embeddings.mask_token"}
    for i in _blocks(sd, "layer."):
        s, d = f"layer.{i}.", f"blocks.{i}."
        a = s + "attention."
        ws = [sd[a + f"{n}_proj.weight"] for n in "qkv"]
        out[d + "attn.qkv.weight"] = torch.cat(ws, 0)
        q, k, v = (sd.get(a + f"{n}_proj.bias") for n in "qkv")
        for name, t in _masked_qkv_bias(q, k, v, dim, ws[0]).items():
            out[d + "attn.qkv." + name] = t
        ren = {"norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj"}
        ren.update({"mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w2", "mlp.down_proj": "mlp.w3"} if gated else
                   {"mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"})
        for src, dst in ren.items():
            for part in ("weight", "bias"):
                if s + f"{src}.{part}" in sd:
                    out[d + f"{dst}.{part}"] = sd[s + f"{src}.{part}"]
        for n in (1, 2):
            if s + f"layer_scale{n}.lambda1" in sd:
                out[d + f"ls{n}.gamma"] = sd[s + f"layer_scale{n}.lambda1"]
        known |= {k for k in sd if k.startswith(s)}
    extra = [k for k in sd if k not in known]
    if extra:
        raise CheckpointError(f"{source}: Hugging Face keys with no official counterpart: {', '.join(extra[:6])}")
    return out


def fill_derived(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`sd` with the buffers that follow from the architecture alone (``rope_embed.periods``) taken from `model`
    when the file does not store them (timm and HF files)."""
    own = model.state_dict()
    return {**{k: own[k] for k in ("rope_embed.periods",) if k in own and k not in sd}, **sd}


# ------------------------------------------------------------------------------------------------
# from the official layout
# ------------------------------------------------------------------------------------------------
def _vit_checks(sd: dict, kwargs: dict, target: str) -> None:
    if "cls_norm.weight" in sd:
        raise CheckpointError(f"{target} has no separate cls-token norm; this backbone unties its cls and patch norms "
                              "(untie_cls_and_patch_norms=True)")
    if kwargs.get("pos_embed_rope_min_period") is not None or kwargs.get("pos_embed_rope_max_period") is not None:
        raise CheckpointError(f"{target} sets RoPE frequencies by a base only; this backbone uses min/max periods")
    if kwargs.get("pos_embed_rope_normalize_coords", "separate") != "separate":
        raise CheckpointError(f"{target} normalises RoPE coordinates per axis ('separate'); this backbone uses "
                              f"'{kwargs.get('pos_embed_rope_normalize_coords')}'")
    if "patch_embed.proj.weight" not in sd:
        raise CheckpointError(f"{target} export covers DINOv3 ViTs; this backbone is not one (no patch_embed.proj)")


def _qkv_parts(sd: dict, p: str, dim: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(q, k, v) biases of a fused qkv; k is None when masked (the official ``bias_mask``)."""
    b = sd.get(p + "qkv.bias")
    if b is None:
        return None, None, None
    q, k, v = b[:dim], b[dim:2 * dim], b[2 * dim:]
    if p + "qkv.bias_mask" in sd:
        k = None
    return q, k, v


def _ffn(sd: dict, dim: int) -> tuple[bool, int]:
    swiglu = "blocks.0.mlp.w1.weight" in sd
    return swiglu, int(sd["blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0])


def _convnext_sizes(sd: dict) -> tuple[list[int], list[int], int]:
    dims = [int(sd[f"downsample_layers.{i}.{0 if i == 0 else 1}.weight"].shape[0]) for i in range(4)]
    depths = [len(_blocks(sd, f"stages.{i}.")) for i in range(4)]
    return dims, depths, int(sd["downsample_layers.0.0.weight"].shape[1])


def _official_convnext_to_timm(sd: dict, kwargs: dict, name: str) -> tuple[dict, str, dict]:
    out = {}
    for k, v in sd.items():
        if k.startswith("norms."):
            continue
        k = re.sub(r"^downsample_layers\.0\.", "stem.", k)
        k = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", k)
        k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        k = k.replace(".dwconv.", ".conv_dw.").replace(".pwconv1.", ".mlp.fc1.").replace(".pwconv2.", ".mlp.fc2.")
        if k.startswith("norm."):
            k = "head." + k
        out[k] = v
    dims, depths, in_chans = _convnext_sizes(sd)
    size = name.rsplit("_", 1)[-1] if name.startswith("dinov3_convnext_") else "tiny"
    ls = float(kwargs.get("layer_scale_init_value", 1e-6)) if "stages.0.0.gamma" in sd else None
    return out, f"convnext_{size}", {"depths": depths, "dims": dims, "in_chans": in_chans, "ls_init_value": ls,
                                     "num_classes": 0}


def _official_convnext_to_hf(sd: dict, kwargs: dict) -> tuple[dict, dict]:
    out = {}
    dims, depths, in_chans = _convnext_sizes(sd)
    for k, v in sd.items():
        if k.startswith("norms."):
            continue
        m = re.match(r"downsample_layers\.(\d+)\.(\d+)\.(.+)$", k)
        if m:
            out[f"stages.{m.group(1)}.downsample_layers.{m.group(2)}.{m.group(3)}"] = v
            continue
        m = re.match(r"stages\.(\d+)\.(\d+)\.(.+)$", k)
        if m:
            rest = _rename(m.group(3), [(official, hf) for hf, official in _HF_CONVNEXT_BLOCK_NAMES])
            out[f"stages.{m.group(1)}.layers.{m.group(2)}.{rest}"] = v
            continue
        if k.startswith("norm."):
            out["layer_norm." + k.split(".", 1)[1]] = v
    for i, dim in enumerate(dims):  # HF always has layer scale: identity (ones) for a backbone without one
        for j in range(depths[i]):
            out.setdefault(f"stages.{i}.layers.{j}.gamma", torch.ones(dim))
    config = {"architectures": ["DINOv3ConvNextModel"], "model_type": "dinov3_convnext", "hidden_sizes": dims,
              "depths": depths, "num_channels": in_chans, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
              "layer_scale_init_value": float(kwargs.get("layer_scale_init_value") or 1.0), "drop_path_rate": 0.0,
              "image_size": 224, "torch_dtype": "float32"}
    return out, config


def official_to_timm(sd: dict[str, torch.Tensor], kwargs: dict, name: str = "") -> tuple[dict, str, dict]:
    """(timm state dict, timm architecture, timm ``model_args``) of an official-layout ViT or ConvNeXt built with
    `kwargs`."""
    if "downsample_layers.0.0.weight" in sd:
        return _official_convnext_to_timm(sd, kwargs, name)
    _vit_checks(sd, kwargs, "timm's DINOv3 Eva")
    if kwargs.get("norm_layer", "layernormbf16") != "layernormbf16":
        raise CheckpointError(f"timm's DINOv3 models use LayerNorm eps 1e-5; this backbone has norm_layer="
                              f"{kwargs.get('norm_layer')}")
    dim = int(sd["cls_token"].shape[-1])
    depth = len(_blocks(sd, "blocks."))
    swiglu, hidden = _ffn(sd, dim)
    biases = {i: _qkv_parts(sd, f"blocks.{i}.attn.", dim) for i in range(depth)}
    if any(k is not None and bool(k.any()) for _, k, _ in biases.values()):
        raise CheckpointError("timm's DINOv3 Eva has no key bias; this backbone has an unmasked, non-zero one")
    qkvb = any(q is not None and (bool(q.any()) or bool(v.any())) for q, _, v in biases.values())
    out = {}
    for k, v in sd.items():
        if k in ("mask_token", "rope_embed.periods") or k.startswith("local_cls_norm.") or ".qkv.bias" in k:
            continue
        k = k.replace("storage_tokens", "reg_token").replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        k = k.replace(".mlp.w1.", ".mlp.fc1_g.").replace(".mlp.w2.", ".mlp.fc1_x.").replace(".mlp.w3.", ".mlp.fc2.")
        out[k] = v
    if qkvb:
        for i, (q, _, v) in biases.items():
            out[f"blocks.{i}.attn.q_bias"], out[f"blocks.{i}.attn.v_bias"] = q, v
    base = TIMM_ARCHS.get(name) or ("vit_small_plus_patch16_dinov3" if swiglu else "vit_small_patch16_dinov3")
    ratio = hidden / dim
    if int(dim * ratio) != hidden:  # float rounding: timm takes int(dim * mlp_ratio)
        ratio = (hidden + 0.5) / dim
    model_args = {
        "embed_dim": dim, "depth": depth, "num_heads": int(kwargs["num_heads"]), "mlp_ratio": ratio,
        "in_chans": int(sd["patch_embed.proj.weight"].shape[1]), "patch_size": int(sd["patch_embed.proj.weight"].shape[-1]),
        "num_reg_tokens": int(sd["storage_tokens"].shape[1]) if "storage_tokens" in sd else 0,
        "qkv_bias": qkvb, "init_values": float(kwargs.get("layerscale_init") or 1e-5) if "blocks.0.ls1.gamma" in sd else None,
        "rope_temperature": float(kwargs.get("pos_embed_rope_base", 100.0)), "num_classes": 0,
    }
    if swiglu:
        model_args.update(swiglu_mlp=True, swiglu_align_to=1)  # the exact hidden width; SwiGLU's fc1_g / fc1_x keys
    return out, base + ("_qkvb" if qkvb else ""), model_args


def official_to_hf(sd: dict[str, torch.Tensor], kwargs: dict) -> tuple[dict, dict]:
    """(HF state dict, HF ``config.json`` dict) of an official-layout ViT or ConvNeXt built with `kwargs`."""
    if "downsample_layers.0.0.weight" in sd:
        return _official_convnext_to_hf(sd, kwargs)
    _vit_checks(sd, kwargs, "transformers' DINOv3ViTModel")
    dim = int(sd["cls_token"].shape[-1])
    depth = len(_blocks(sd, "blocks."))
    swiglu, hidden = _ffn(sd, dim)
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": sd["mask_token"].reshape(1, 1, dim),
           "embeddings.register_tokens": sd.get("storage_tokens", torch.zeros(1, 0, dim)),
           "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
           "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
    if "patch_embed.proj.bias" in sd:
        out["embeddings.patch_embeddings.bias"] = sd["patch_embed.proj.bias"]
    has = {"q": False, "k": False, "v": False}
    for i in range(depth):
        s, d = f"blocks.{i}.", f"layer.{i}."
        for n, w in zip("qkv", sd[s + "attn.qkv.weight"].chunk(3, 0)):
            out[d + f"attention.{n}_proj.weight"] = w
        for n, b in zip("qkv", _qkv_parts(sd, s + "attn.", dim)):
            if b is not None:
                out[d + f"attention.{n}_proj.bias"], has[n] = b, True
        ren = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj"}
        ren.update({"mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.up_proj", "mlp.w3": "mlp.down_proj"} if swiglu else
                   {"mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj"})
        for src, dst in ren.items():
            for part in ("weight", "bias"):
                if s + f"{src}.{part}" in sd:
                    out[d + f"{dst}.{part}"] = sd[s + f"{src}.{part}"]
        for n in (1, 2):  # HF always has layer scale: identity (ones) for a backbone without one
            out[d + f"layer_scale{n}.lambda1"] = sd.get(s + f"ls{n}.gamma", torch.ones(dim))
    eps = {"layernormbf16": 1e-5, "layernorm": 1e-6}.get(kwargs.get("norm_layer", "layernormbf16"))
    if eps is None:
        raise CheckpointError(f"transformers' DINOv3ViTModel uses LayerNorm; this backbone has norm_layer="
                              f"{kwargs.get('norm_layer')}")
    config = {
        "architectures": ["DINOv3ViTModel"], "model_type": "dinov3_vit", "hidden_size": dim,
        "num_hidden_layers": depth, "num_attention_heads": int(kwargs["num_heads"]), "intermediate_size": hidden,
        "hidden_act": "silu" if swiglu else "gelu", "use_gated_mlp": swiglu, "layer_norm_eps": eps,
        "rope_theta": float(kwargs.get("pos_embed_rope_base", 100.0)), "image_size": int(kwargs.get("img_size", 224)),
        "patch_size": int(sd["patch_embed.proj.weight"].shape[-1]),
        "num_channels": int(sd["patch_embed.proj.weight"].shape[1]),
        "query_bias": has["q"], "key_bias": has["k"], "value_bias": has["v"],
        "proj_bias": "blocks.0.attn.proj.bias" in sd,
        "mlp_bias": f"blocks.0.mlp.{'w1' if swiglu else 'fc1'}.bias" in sd,
        "layerscale_value": float(kwargs.get("layerscale_init") or 1.0),
        "num_register_tokens": int(sd["storage_tokens"].shape[1]) if "storage_tokens" in sd else 0,
        **{theirs: None if kwargs.get(ours) is None else float(kwargs[ours])
           for ours, theirs in _HF_ROPE_AUGMENTATION},
        "drop_path_rate": 0.0, "torch_dtype": "float32",
    }
    return out, config


# ------------------------------------------------------------------------------------------------
# folders (timm local-dir, Hugging Face save_pretrained)
# ------------------------------------------------------------------------------------------------
def folder_layout(path: Path) -> str | None:
    """``hf`` / ``timm`` for a folder holding such a model's ``config.json``, else None."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        d = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {cfg}: {e}") from e
    if str(d.get("model_type", "")).startswith("dinov3"):
        return "hf"
    if "architecture" in d:
        return "timm"
    return None


def folder_weights(path: Path) -> Path:
    """The weights file of an HF / timm folder (``model.safetensors``; ``pytorch_model.bin`` read safely)."""
    for name in (WEIGHTS_NAME, "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if (Path(path) / name).is_file():
            return Path(path) / name
    shards = sorted(Path(path).glob("model-*-of-*.safetensors"))
    if shards:
        raise CheckpointError(f"{path} holds a sharded checkpoint ({len(shards)} files); geodino reads one "
                              "model.safetensors")
    raise CheckpointError(f"{path} has a config.json but no {WEIGHTS_NAME}")


def folder_overrides(path: Path, layout: str) -> dict:
    """Constructor kwargs the folder's config says and the weights cannot (heads, RoPE base, norm eps, rescale)."""
    d = json.loads((Path(path) / "config.json").read_text())
    if layout == "hf":
        if str(d.get("model_type")) == "dinov3_convnext":
            return {}  # every size is in the weights
        if str(d.get("model_type")) != "dinov3_vit":
            raise CheckpointError(f"{path}: model_type {d.get('model_type')}; geodino reads transformers' dinov3_vit "
                                  "and dinov3_convnext folders")
        kw = {"num_heads": int(d.get("num_attention_heads", 12)), "pos_embed_rope_base": float(d.get("rope_theta", 100.0)),
              "img_size": int(d.get("image_size", 224))}
        eps = float(d.get("layer_norm_eps", 1e-5))
        kw["norm_layer"] = "layernorm" if abs(eps - 1e-6) < 1e-12 else "layernormbf16"
        for ours, theirs in _HF_ROPE_AUGMENTATION:
            if theirs in d:
                kw[ours] = d[theirs]
        return kw
    args = {**(d.get("model_args") or {})}
    kw = {}
    if "num_heads" in args:
        kw["num_heads"] = int(args["num_heads"])
    if "rope_temperature" in args:
        kw["pos_embed_rope_base"] = float(args["rope_temperature"])
    return kw


def folder_normalisation(path: Path, layout: str) -> tuple[list[float], list[float]] | None:
    """(mean, std) a folder states: timm's ``pretrained_cfg``, or HF's ``preprocessor_config.json``."""
    if layout == "timm":
        cfg = json.loads((Path(path) / "config.json").read_text()).get("pretrained_cfg") or {}
        mean, std = cfg.get("mean"), cfg.get("std")
    else:
        pre = Path(path) / "preprocessor_config.json"
        d = json.loads(pre.read_text()) if pre.is_file() else {}
        mean, std = d.get("image_mean"), d.get("image_std")
    return (list(mean), list(std)) if mean and std else None
