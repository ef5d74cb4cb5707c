"""DINOv3 backbones (ViT, ConvNeXt), the DINO projection head and RoPE, with the official key layout; the
registry of named sizes (`registry`), building and loading (`builder`) and weight files (`weights`)."""

from .backbone import Backbone
from .builder import (
                      adapt_bands,
                      adapt_patch_embed,
                      backbone_from_contract,
                      build_backbone,
                      load_backbone,
                      set_stochastic_depth,
)
from .convnext import DinoConvNeXt, convnext
from .heads import DINOHead
from .registry import ARCHS, arch_names
from .rope import RopePositionEmbedding
from .vit import DinoVisionTransformer, dinov3_vit
from .weights import export_backbone, load_weights_into, official_state_dict, read_state_dict

__all__ = [
    "ARCHS",
    "Backbone",
    "DINOHead",
    "DinoConvNeXt",
    "DinoVisionTransformer",
    "RopePositionEmbedding",
    "adapt_bands",
    "adapt_patch_embed",
    "arch_names",
    "backbone_from_contract",
    "build_backbone",
    "convnext",
    "dinov3_vit",
    "export_backbone",
    "load_backbone",
    "load_weights_into",
    "official_state_dict",
    "read_state_dict",
    "set_stochastic_depth",
]
