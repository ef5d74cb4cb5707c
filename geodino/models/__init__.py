"""DINOv3 backbones (ViT, ConvNeXt), the DINO projection head and RoPE, with the official key layout."""

from .convnext import DinoConvNeXt, convnext
from .heads import DINOHead
from .rope import RopePositionEmbedding
from .vit import DinoVisionTransformer, dinov3_vit

__all__ = [
    "DinoVisionTransformer",
    "dinov3_vit",
    "DinoConvNeXt",
    "convnext",
    "DINOHead",
    "RopePositionEmbedding",
]
