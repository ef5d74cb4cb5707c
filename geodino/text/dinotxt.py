"""dino.txt: a frozen geodino backbone aligned with a text tower (dinov3_spec.md §8).

Vision side (``visual_model``, official layout):

* ``visual_model.backbone`` -- any geodino ViT (official keys, any band count); frozen and run in eval mode under
  ``no_grad``. Its last-layer tokens (``get_intermediate_layers(n=patch_token_layer, return_class_token,
  return_extra_tokens)``, final norm applied) are concatenated as ``[cls, storage_1..R, patches]``;
* ``visual_model.head`` -- the trainable ``VisionHead``: ``blocks.*`` (geodino ``SelfAttentionBlock``: SwiGLU
  FFN aligned to 64 with ratio 4, no qkv bias, LayerScale 1e-5, LayerNorm eps 1e-5, **no RoPE**), ``ln_final``
  and ``linear_projection`` (bias-free ``Linear(D -> embed_dim / 2)`` when ``2 D != embed_dim`` or
  ``use_linear_projection``, else Identity), applied to every token;
* image embedding ``[head cls || mean(head patches)]``.

Text side (``text_model``): open_clip's ``TextTransformer`` (causal mask, argmax = EOT pooling, final LN, bias-free
projection to ``embed_dim``) with the CLIP BPE tokenizer that ships in the open_clip wheel. The official text
attention has no qkv bias; open_clip's ``in_proj_bias`` is kept at zero and frozen so that the two stay identical.

``logit_scale`` is learnable (init ln(1/0.07), clamped to [0, ln 100] after each step by the trainer); the loss
is open_clip's symmetric ``ClipLoss`` on L2-normalised embeddings.

``DinoTxt.from_official`` / ``to_official_state_dict`` convert to and from the official checkpoint layout
(``visual_model.backbone.*``, ``visual_model.head.*``, ``text_model.backbone.*``, ``text_model.head.*``,
``logit_scale``); the conversion is exact (tests/text/test_dinotxt_reference.py).
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip import ClipLoss
from open_clip.tokenizer import SimpleTokenizer, default_bpe
from open_clip.transformer import TextTransformer
from torch import Tensor, nn

from geodino.contract import Contract
from geodino.errors import CheckpointError, GeodinoError
from geodino.models.vit import SelfAttentionBlock, SwiGLUFFN, dinov3_vit, init_weights_vit
from geodino.models.weights import load_weights_into, read_state_dict

__all__ = [
    "DinoTxtConfig",
    "VisionHead",
    "VisionTower",
    "DinoTxt",
    "build_text_tower",
    "get_tokenizer",
    "contrastive_loss",
    "official_to_native",
    "native_to_official",
    "INIT_LOGIT_SCALE",
    "MAX_LOGIT_SCALE",
    "OFFICIAL_VITL_TEXT_CONFIG",
]

INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class DinoTxtConfig:
    """Everything that shapes a dino.txt model besides its backbone (official names in the comments)."""

    embed_dim: int = 256  # embed_dim: the joint embedding, [cls || mean patch] after the projection
    head_blocks: int = 2  # vision_model_num_head_blocks
    head_drop_path: float = 0.0  # vision_model_head_blocks_drop_path
    head_ffn_ratio: float = 4.0
    use_class_token: bool = True  # vision_model_use_class_token
    use_patch_tokens: bool = True  # vision_model_use_patch_tokens
    use_linear_projection: bool = False  # vision_model_use_linear_projection
    patch_tokens_pooler: str = "mean"  # vision_model_patch_tokens_pooler_type: mean | max
    patch_token_layer: int = 1  # vision_model_patch_token_layer
    freeze_backbone: bool = True  # vision_model_freeze_backbone
    # text tower (text_kwargs of the official TextTransformer)
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_mlp_ratio: float = 4.0
    context_length: int = 77
    vocab_size: int = 49408
    text_pool: str = "argmax"  # text_model_tokens_pooler_type
    # geodino: keep the word-embedding table (vocab_size x text_width, most of a small text tower's parameters) at
    # its initialisation, so a small caption set trains the transformer, not 49408 rows it mostly never sees
    freeze_token_embedding: bool = False
    init_logit_scale: float = INIT_LOGIT_SCALE
    freeze_logit_scale: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DinoTxtConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"unknown dino.txt config keys: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_official(cls, dinotxt_config: dict, text_kwargs: dict) -> "DinoTxtConfig":
        """From the official ``dinotxt_config`` and text ``TextTransformer`` kwargs (as in the fixture)."""
        c, t = dict(dinotxt_config), dict(text_kwargs)
        if int(c.get("text_model_num_head_blocks", 0)) != 0:
            raise CheckpointError("official text heads with extra transformer blocks are not supported (0 in the release)")
        if not c.get("text_model_use_linear_projection", True):
            raise CheckpointError("text_model_use_linear_projection=False is not supported")
        if not t.get("is_causal", True):
            raise CheckpointError("a non-causal official text transformer is not supported")
        if t.get("ls_init_value") is not None:
            raise CheckpointError("official text transformers with LayerScale are not supported")
        return cls(
            embed_dim=int(c["embed_dim"]),
            head_blocks=int(c.get("vision_model_num_head_blocks", 2)),
            head_drop_path=float(c.get("vision_model_head_blocks_drop_path", 0.0)),
            use_class_token=bool(c.get("vision_model_use_class_token", True)),
            use_patch_tokens=bool(c.get("vision_model_use_patch_tokens", True)),
            use_linear_projection=bool(c.get("vision_model_use_linear_projection", False)),
            patch_tokens_pooler=str(c.get("vision_model_patch_tokens_pooler_type", "mean")),
            patch_token_layer=int(c.get("vision_model_patch_token_layer", 1)),
            freeze_backbone=bool(c.get("vision_model_freeze_backbone", True)),
            text_width=int(t["dim"]),
            text_layers=int(t["num_layers"]),
            text_heads=int(t["num_heads"]),
            text_mlp_ratio=float(t.get("ffn_ratio", 4.0)),
            context_length=int(t.get("context_length", 77)),
            vocab_size=int(t.get("vocab_size", 49408)),
            text_pool=str(c.get("text_model_tokens_pooler_type", "argmax")),
            init_logit_scale=float(c.get("init_logit_scale", INIT_LOGIT_SCALE)),
            freeze_logit_scale=bool(c.get("freeze_logit_scale", False)),
        )


#: The released dino.txt model on the ViT-L/16 LVD1689M backbone (``dinov3_vitl16_dinotxt_...-a442d8f5.pth``).
OFFICIAL_VITL_TEXT_CONFIG = DinoTxtConfig(
    embed_dim=2048, head_blocks=2, head_drop_path=0.3, text_width=1280, text_layers=24, text_heads=20,
)


# ---------------------------------------------------------------------------------------------------------------
# Vision
# ---------------------------------------------------------------------------------------------------------------
class VisionHead(nn.Module):
    """Trainable blocks on the frozen backbone tokens, ``ln_final`` and the optional projection (official keys)."""

    def __init__(self, input_dim: int, embed_dim: int, num_heads: int, num_blocks: int = 2, drop_path: float = 0.0,
                 ffn_ratio: float = 4.0, use_class_token: bool = True, use_patch_tokens: bool = True,
                 use_linear_projection: bool = False) -> None:
        super().__init__()

        norm = partial(nn.LayerNorm, eps=1e-5)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(
                input_dim, num_heads, ffn_ratio=ffn_ratio, qkv_bias=False, proj_bias=True, ffn_bias=True,
                drop_path=drop_path, norm_layer=norm, ffn_layer=partial(SwiGLUFFN, align_to=64), init_values=1e-5,
            )
            for _ in range(num_blocks)
        )
        self.ln_final = norm(input_dim) if num_blocks > 0 else nn.Identity()
        multiplier = 2 if (use_class_token and use_patch_tokens) else 1
        if multiplier * input_dim != embed_dim or use_linear_projection:
            if embed_dim % multiplier:
                raise GeodinoError(f"embed_dim {embed_dim} must be divisible by {multiplier} ([cls || patch] halves)")
            self.linear_projection = nn.Linear(input_dim, embed_dim // multiplier, bias=False)
        else:
            self.linear_projection = nn.Identity()
        self.input_dim = input_dim
        self.token_dim = embed_dim // multiplier
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            init_weights_vit(m)

    def forward(self, tokens: Tensor) -> Tensor:
        for blk in self.blocks:
            tokens = blk(tokens)  # no RoPE in the head (rope=None)
        return self.linear_projection(self.ln_final(tokens))


class VisionTower(nn.Module):
    """``visual_model``: frozen backbone + ``VisionHead``; image embedding ``[cls || pooled patches]``."""

    def __init__(self, backbone: nn.Module, cfg: DinoTxtConfig) -> None:
        super().__init__()
        if not hasattr(backbone, "get_intermediate_layers") or not hasattr(backbone, "n_storage_tokens"):
            raise GeodinoError(f"dino.txt needs a ViT backbone; got {type(backbone).__name__}")
        if not (cfg.use_class_token or cfg.use_patch_tokens):
            raise GeodinoError("dino.txt needs the class token, the patch tokens or both")
        if cfg.patch_tokens_pooler not in ("mean", "max"):
            raise GeodinoError(f"patch_tokens_pooler must be mean or max, got '{cfg.patch_tokens_pooler}'")
        self.backbone = backbone
        self.head = VisionHead(
            int(backbone.embed_dim), cfg.embed_dim, int(backbone.num_heads), cfg.head_blocks, cfg.head_drop_path,
            cfg.head_ffn_ratio, cfg.use_class_token, cfg.use_patch_tokens, cfg.use_linear_projection,
        )
        self.cfg = cfg
        self.freeze_backbone = cfg.freeze_backbone
        if self.freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen: no drop path, no RoPE augmentation
        return self

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_size)

    @property
    def in_chans(self) -> int:
        return int(self.backbone.in_chans)

    def get_backbone_features(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(cls [B, D], patches [B, N, D], storage [B, R, D]) of the backbone, final norm applied."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            out = self.backbone.get_intermediate_layers(
                images, n=self.cfg.patch_token_layer, return_class_token=True, return_extra_tokens=True, norm=True
            )
        return out[-1][1], out[0][0], out[0][2]

    def get_class_and_patch_tokens(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(head cls [B, E'], head patches [B, N, E'], backbone patches [B, N, D])."""
        cls, patches, storage = self.get_backbone_features(images)
        tokens = torch.cat([cls.unsqueeze(1), storage, patches], dim=1)
        out = self.head(tokens)
        r = 1 + storage.shape[1]
        return out[:, 0], out[:, r:], patches

    def pool(self, cls: Tensor, patches: Tensor) -> Tensor:
        feats = []
        if self.cfg.use_class_token:
            feats.append(cls)
        if self.cfg.use_patch_tokens:
            feats.append(patches.mean(dim=1) if self.cfg.patch_tokens_pooler == "mean" else patches.amax(dim=1))
        return torch.cat(feats, dim=-1)

    def forward(self, images: Tensor) -> Tensor:
        cls, patches, _ = self.get_class_and_patch_tokens(images)
        return self.pool(cls, patches)


# ---------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------
def build_text_tower(cfg: DinoTxtConfig) -> nn.Module:
    """open_clip ``TextTransformer``: causal, argmax pooling, bias-free projection to ``embed_dim``; the attention
    ``in_proj_bias`` (absent from the official model) is zero and frozen; the token embedding is frozen too with
    ``cfg.freeze_token_embedding``."""
    if cfg.vocab_size < 49408:
        raise GeodinoError(f"text vocab_size {cfg.vocab_size} is smaller than the CLIP BPE tokenizer's 49408 ids")
    if cfg.text_width % cfg.text_heads:
        raise GeodinoError(f"text width {cfg.text_width} is not divisible by {cfg.text_heads} heads")
    tower = TextTransformer(
        context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width, heads=cfg.text_heads,
        layers=cfg.text_layers, mlp_ratio=cfg.text_mlp_ratio, ls_init_value=None, output_dim=cfg.embed_dim,
        pool_type=cfg.text_pool, proj_type="linear", proj_bias=False,
    )
    for blk in tower.transformer.resblocks:
        with torch.no_grad():
            blk.attn.in_proj_bias.zero_()
        blk.attn.in_proj_bias.requires_grad_(False)
    if cfg.freeze_token_embedding:
        tower.token_embedding.weight.requires_grad_(False)
    return tower


@functools.lru_cache(maxsize=8)
def get_tokenizer(context_length: int = 77) -> SimpleTokenizer:
    """open_clip's CLIP BPE ``SimpleTokenizer`` (vocabulary file inside the open_clip wheel; nothing downloaded),
    built once per context length."""
    return SimpleTokenizer(context_length=context_length)


def tokenizer_settings(context_length: int = 77) -> dict:
    """What a checkpoint records about its tokenizer (rebuilt by :func:`get_tokenizer`)."""
    vocab = Path(default_bpe())
    digest = hashlib.sha256(vocab.read_bytes()).hexdigest() if vocab.is_file() else None
    return {"type": "open_clip.SimpleTokenizer", "vocab_file": vocab.name, "vocab_sha256": digest,
            "context_length": int(context_length), "vocab_size": 49408, "clean": "lower"}


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class DinoTxt(nn.Module):
    """``visual_model`` (frozen backbone + head), ``text_model`` (open_clip) and ``logit_scale``."""

    def __init__(self, backbone: nn.Module, cfg: DinoTxtConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or DinoTxtConfig()
        self.cfg = cfg
        self.visual_model = VisionTower(backbone, cfg)
        self.text_model = build_text_tower(cfg)
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)),
                                        requires_grad=not cfg.freeze_logit_scale)

    # -- properties -----------------------------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return self.visual_model.backbone

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def patch_dim(self) -> int:
        """Width of the head patch tokens (= the second half of the text embedding with [cls || patch])."""
        return self.visual_model.head.token_dim

    def tokenize(self, texts: str | Sequence[str]) -> Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return get_tokenizer(self.cfg.context_length)(list(texts))

    # -- encoders -------------------------------------------------------------------------------------------------
    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        feats = self.visual_model(images)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_image_with_patch_tokens(self, images: Tensor, normalize: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(image features, head patch tokens [B, N, E'], backbone patch tokens [B, N, D])."""
        cls, patches, backbone_patches = self.visual_model.get_class_and_patch_tokens(images)
        feats = self.visual_model.pool(cls, patches)
        return (F.normalize(feats, dim=-1) if normalize else feats), patches, backbone_patches

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        if tokens.shape[-1] != self.cfg.context_length:
            raise GeodinoError(f"tokens have length {tokens.shape[-1]}, the text tower takes {self.cfg.context_length}")
        feats = self.text_model(tokens)
        return F.normalize(feats, dim=-1) if normalize else feats

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(normalised image features, normalised text features, exp(logit_scale))."""
        return self.encode_image(images, normalize=True), self.encode_text(tokens, normalize=True), self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def trainable_modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"vision_head": self.visual_model.head, "text": self.text_model}
        if not self.cfg.freeze_backbone:
            mods["backbone"] = self.visual_model.backbone
        return mods

    # -- official layout ------------------------------------------------------------------------------------------
    @classmethod
    def from_official(cls, state_dict: dict[str, Tensor] | str | Path, backbone: nn.Module | None = None,
                      vit_kwargs: dict | None = None, text_kwargs: dict | None = None,
                      dinotxt_config: dict | None = None, cfg: DinoTxtConfig | None = None) -> "DinoTxt":
        """A model from an official dino.txt state dict (or a local ``.pth``), e.g. ``dinotxt_narrow.pt``.

        The backbone comes from ``backbone`` (its weights are replaced by ``visual_model.backbone.*`` when the file
        has them; the released head+text file has none, load it on top of the hub ViT-L) or from ``vit_kwargs``.
        The shape comes from ``cfg`` or ``dinotxt_config`` + ``text_kwargs``, else the released ViT-L config.
        """
        if not isinstance(state_dict, dict):
            state_dict, _ = read_state_dict(state_dict)
        sd = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in state_dict.items()}
        if cfg is None:
            if dinotxt_config is None and text_kwargs is None:
                cfg = replace(OFFICIAL_VITL_TEXT_CONFIG)  # the released ViT-L dino.txt
            elif dinotxt_config is None or text_kwargs is None:
                raise CheckpointError("from_official needs both dinotxt_config and text_kwargs (or neither, for the "
                                      "released ViT-L model)")
            else:
                cfg = DinoTxtConfig.from_official(dinotxt_config, text_kwargs)
        bb_sd = {k[len("visual_model.backbone."):]: v for k, v in sd.items() if k.startswith("visual_model.backbone.")}
        if backbone is None:
            if vit_kwargs is None:
                raise CheckpointError("from_official needs a backbone module or the backbone's vit_kwargs")
            backbone = dinov3_vit(**vit_kwargs)
            backbone.geodino_contract = Contract("dinotxt_backbone", "vit", dict(vit_kwargs))
        if bb_sd:
            load_weights_into(backbone, bb_sd, source="visual_model.backbone.* of the dino.txt state dict")
        model = cls(backbone, cfg)
        native = official_to_native({k: v for k, v in sd.items() if not k.startswith("visual_model.backbone.")},
                                    cfg.text_layers)
        own = model.state_dict()
        expected = {k for k in own if not k.startswith("visual_model.backbone.")}
        missing = sorted(expected - set(native))
        unexpected = sorted(set(native) - expected)
        bad = [f"{k} {tuple(native[k].shape)} vs {tuple(own[k].shape)}" for k in expected & set(native)
               if native[k].shape != own[k].shape]
        if missing or unexpected or bad:
            raise CheckpointError(
                "the dino.txt state dict does not fit the model: "
                + "; ".join(p for p in (
                    f"missing {', '.join(missing[:6])}" if missing else "",
                    f"unexpected {', '.join(unexpected[:6])}" if unexpected else "",
                    f"shape mismatch {'; '.join(bad[:4])}" if bad else "") if p)
            )
        model.load_state_dict(native, strict=False)
        return model

    def to_official_state_dict(self, include_backbone: bool = True) -> dict[str, Tensor]:
        """The official key layout (the inverse of :meth:`from_official`)."""
        return native_to_official(self.state_dict(), self.cfg.text_layers, include_backbone=include_backbone)


_TEXT_BLOCK_MAP = [
    ("attention_norm.", "ln_1."),
    ("ffn_norm.", "ln_2."),
    ("attention.qkv.weight", "attn.in_proj_weight"),
    ("attention.proj.", "attn.out_proj."),
    ("feed_forward.fc1.", "mlp.c_fc."),
    ("feed_forward.fc2.", "mlp.c_proj."),
]


def official_to_native(sd: dict[str, Tensor], text_layers: int) -> dict[str, Tensor]:
    """Official dino.txt keys -> this module's keys (vision keys are identical; the text tower is renamed)."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("visual_model.") or k == "logit_scale":
            out[k] = v
        elif k == "text_model.head.linear_projection.weight":
            out["text_model.text_projection"] = v.t().contiguous()
        elif k.startswith("text_model.backbone."):
            rest = k[len("text_model.backbone."):]
            m = re.match(r"blocks\.(\d+)\.(.*)", rest)
            if m:
                tail = m.group(2)
                for a, b in _TEXT_BLOCK_MAP:
                    if tail.startswith(a):
                        tail = b + tail[len(a):]
                        break
                else:
                    raise CheckpointError(f"unknown official text block key {k}")
                out[f"text_model.transformer.resblocks.{m.group(1)}.{tail}"] = v
            else:
                out[f"text_model.{rest}"] = v
        else:
            raise CheckpointError(f"unknown official dino.txt key {k}")
    # the official qkv has no bias: open_clip's in_proj_bias is zero
    for i in range(text_layers):
        w = out.get(f"text_model.transformer.resblocks.{i}.attn.in_proj_weight")
        if w is not None:
            out.setdefault(f"text_model.transformer.resblocks.{i}.attn.in_proj_bias", torch.zeros(w.shape[0], dtype=w.dtype))
    return out


def native_to_official(sd: dict[str, Tensor], text_layers: int, include_backbone: bool = True) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("visual_model.backbone."):
            if include_backbone:
                out[k] = v
        elif k.startswith("visual_model.") or k == "logit_scale":
            out[k] = v
        elif k == "text_model.text_projection":
            out["text_model.head.linear_projection.weight"] = v.t().contiguous()
        elif k.startswith("text_model."):
            rest = k[len("text_model."):]
            m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", rest)
            if m:
                tail = m.group(2)
                if tail == "attn.in_proj_bias":
                    if v.abs().max() > 0:
                        raise CheckpointError(f"{k} is not zero: the official text attention has no qkv bias")
                    continue
                for a, b in _TEXT_BLOCK_MAP:
                    if tail.startswith(b):
                        tail = a + tail[len(b):]
                        break
                out[f"text_model.backbone.blocks.{m.group(1)}.{tail}"] = v
            elif rest == "attn_mask":
                continue
            else:
                out[f"text_model.backbone.{rest}"] = v
    return out


# ---------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------
def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale_exp: Tensor) -> Tensor:
    """Symmetric InfoNCE on normalised features (open_clip ``ClipLoss``):
    ``mean_i -(2 s_ii - LSE_row_i - LSE_col_i) / 2`` with ``s = exp(logit_scale) î·t̂``."""
    return ClipLoss()(image_features, text_features, logit_scale_exp.squeeze())
