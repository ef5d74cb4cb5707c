"""Named backbones: every released DINOv3 size with the constructor arguments of Meta's hub entries
(dinov3_spec.md §1.1, §2), the SAT-493M variants, and CPU-sized models for tests and quickstarts.

The registry only names architectures and their default normalisation; building a model is
`geodino.models.builder`, reading and writing weight files `geodino.models.weights` (the split timm uses between
``_registry``, ``_builder`` and its weight I/O).
"""

from __future__ import annotations

import copy
import re

from geodino.contract import IMAGENET_MEAN, IMAGENET_STD, SAT493M_MEAN, SAT493M_STD
from geodino.errors import CheckpointError
from geodino.models.convnext import CONVNEXT_SIZES

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
    **{f"dinov3_convnext_{size}": _convnext(**spec) for size, spec in CONVNEXT_SIZES.items()},
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


# timm's names of the released ViTs (`vit_*_patch16_dinov3[_qkvb][.tag]`), accepted as aliases; the reverse map
# names the timm architecture an export targets (geodino.models.layouts).
TIMM_ARCHS = {
    "dinov3_vits16": "vit_small_patch16_dinov3",
    "dinov3_vits16plus": "vit_small_plus_patch16_dinov3",
    "dinov3_vitb16": "vit_base_patch16_dinov3",
    "dinov3_vitl16": "vit_large_patch16_dinov3",
    "dinov3_vitl16_sat493m": "vit_large_patch16_dinov3",
    "dinov3_vith16plus": "vit_huge_plus_patch16_dinov3",
    "dinov3_vit7b16": "vit_7b_patch16_dinov3",
    "dinov3_vit7b16_sat493m": "vit_7b_patch16_dinov3",
}
_TIMM_ALIASES = {t: n for n, t in TIMM_ARCHS.items() if not n.endswith("_sat493m")}
_TIMM_ALIASES.update({f"{TIMM_ARCHS[n]}.sat493m": n for n in TIMM_ARCHS if n.endswith("_sat493m")})


def canonical_name(name) -> str:
    """The registry name behind an alias: timm's (``vit_large_patch16_dinov3_qkvb.sat493m``) or the Hugging Face
    model id (``facebook/dinov3-vitl16-pretrain-sat493m``); other names come back unchanged."""
    n = str(name)
    if n in ARCHS:
        return n
    t = n.replace("_qkvb", "")
    if t in _TIMM_ALIASES:
        return _TIMM_ALIASES[t]
    base, _, tag = t.partition(".")
    if base in _TIMM_ALIASES and tag in ("", "lvd1689m"):
        return _TIMM_ALIASES[base]
    m = re.fullmatch(r"convnext_(tiny|small|base|large)\.dinov3_lvd1689m", n)
    if m:
        return f"dinov3_convnext_{m.group(1)}"
    m = re.fullmatch(r"(?:[\w-]+/)?dinov3-([a-z0-9]+(?:-[a-z]+)?)-pretrain-(lvd1689m|sat493m)", n)
    if m:
        cand = "dinov3_" + m.group(1).replace("-", "_") + ("_sat493m" if m.group(2) == "sat493m" else "")
        if cand in ARCHS:
            return cand
    return n


def arch_names() -> list[str]:
    return sorted(ARCHS)


def is_arch(name) -> bool:
    return canonical_name(name) in ARCHS


def arch(name: str) -> dict:
    """The registry entry (family, constructor kwargs, default mean/std) of a named backbone (or an alias:
    `canonical_name`)."""
    name = canonical_name(name)
    if name not in ARCHS:
        close = [a for a in ARCHS if name.replace("dinov3_", "") in a]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CheckpointError(f"unknown backbone '{name}'{hint}; known: {', '.join(arch_names())}")
    return ARCHS[name]
