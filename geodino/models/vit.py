"""The DINOv3 Vision Transformer backbone, native and key-compatible with the official checkpoints.

Follows the reference `DinoVisionTransformer` (`dinov3/models/vision_transformer.py`, `dinov3/layers/*`) as
written up in docs/dinov3_spec.md §1 (modules, tokens, outputs, RoPE) and §2 (checkpoint keys):

* token layout ``[cls, storage_1..R, patch_1..HW]``; pre-norm blocks ``x + ls1(attn(norm1 x))``,
  ``x + ls2(mlp(norm2 x))``; fused qkv whose key bias is masked by a persistent ``bias_mask`` buffer;
  axial RoPE on the patch tokens of q and k; MLP (``fc1/fc2``) or SwiGLU (``w1/w2/w3``) FFN;
* iBOT mask-token injection before the prefix tokens are concatenated;
* list-of-crops forward (token-wise layers on the concatenation, attention per crop group), with a fresh RoPE
  draw per block and per crop group in training (the reference calls ``rope_embed`` inside the block loop);
* stochastic depth as the reference "sample drop": each residual branch runs on a random batch subset and is
  added back with ``index_add`` scaled by ``B / subset`` (same rate for every block);
* untied cls/patch and global/local cls norms; official output dict and ``get_intermediate_layers``.

Parameter and buffer names are exactly the official ones, so ``load_state_dict(official_sd, strict=True)`` works
with no renaming and ``state_dict()`` is the official layout. timm layers are used where their key names already
match (``Mlp`` -> ``fc1/fc2``, ``LayerScale`` -> ``gamma``); the rest (masked-bias qkv, SwiGLU sizing, the block
list forward) has no timm counterpart with these names and is written here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import LayerScale, Mlp
from torch import Tensor, nn

from .backbone import Backbone
from .rope import RopePositionEmbedding, apply_rope

__all__ = ["DinoVisionTransformer", "dinov3_vit", "SwiGLUFFN", "LinearKMaskedBias", "SelfAttention"]

logger = logging.getLogger(__name__)

Rope = tuple[Tensor, Tensor] | None

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """``Conv2d(k=p, s=p)`` patchifier (official key ``patch_embed.proj``); returns ``[B, H/p, W/p, D]``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, device=None) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, device=device)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Official PatchEmbed init: U(+-sqrt(1/(in_chans*p^2))) for weight and bias.
        bound = math.sqrt(1.0 / (self.in_chans * self.patch_size**2))
        nn.init.uniform_(self.proj.weight, -bound, bound)
        if self.proj.bias is not None:
            nn.init.uniform_(self.proj.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class LinearKMaskedBias(nn.Linear):
    """Fused qkv Linear whose effective bias is ``bias * bias_mask`` (``bias_mask`` = 0 over the key third).

    ``bias_mask`` is a persistent buffer because the official checkpoints carry it. The key part of ``bias`` is
    kept (and loaded) but has no effect and receives a zero gradient.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if out_features % 3 != 0:
            raise ValueError(f"masked-k-bias qkv needs out_features divisible by 3, got {out_features}")
        if self.bias is not None:
            self.register_buffer("bias_mask", torch.empty_like(self.bias), persistent=True)
            self.reset_bias_mask()
        else:
            self.bias_mask = None

    @torch.no_grad()
    def reset_bias_mask(self) -> None:
        if self.bias_mask is not None:
            o = self.out_features
            self.bias_mask.fill_(1)
            self.bias_mask[o // 3 : 2 * o // 3].fill_(0)

    def effective_bias(self) -> Tensor | None:
        if self.bias is None:
            return None
        return self.bias * self.bias_mask.to(self.bias.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.effective_bias())


class SwiGLUFFN(nn.Module):
    """``w3(silu(w1 x) * w2 x)`` with the official hidden size ``int(h * 2/3)`` rounded up to ``align_to``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        bias: bool = True,
        align_to: int = 8,
        device=None,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        d = int(hidden_features * 2 / 3)
        hidden = d + (-d % align_to)
        self.hidden_features = hidden
        self.w1 = nn.Linear(in_features, hidden, bias=bias, device=device)
        self.w2 = nn.Linear(in_features, hidden, bias=bias, device=device)
        self.w3 = nn.Linear(hidden, out_features, bias=bias, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def _mlp(in_features: int, hidden_features: int, bias: bool = True, device=None) -> nn.Module:
    # timm's Mlp has exactly the official keys (fc1, fc2) and the exact-erf GELU.
    return Mlp(in_features, hidden_features, act_layer=nn.GELU, bias=bias, device=device)


_FFN_LAYERS = {
    "mlp": _mlp,
    "swiglu": partial(SwiGLUFFN, align_to=8),
    "swiglu32": partial(SwiGLUFFN, align_to=32),
    "swiglu64": partial(SwiGLUFFN, align_to=64),
    "swiglu128": partial(SwiGLUFFN, align_to=128),
}

_NORM_LAYERS = {
    "layernorm": partial(nn.LayerNorm, eps=1e-6),
    # The name is historical: it is a plain fp32 LayerNorm with eps 1e-5 (spec §1.1).
    "layernormbf16": partial(nn.LayerNorm, eps=1e-5),
    "rmsnorm": partial(nn.RMSNorm, eps=1e-5),
}


def _rope_qk(qk: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """RoPE on stacked ``[2, B, heads, N, hd]`` q/k; the result equals :func:`apply_rope` (official formula).

    It writes ``x1*cos1 - x2*sin1 | x2*cos2 + x1*sin2`` (the rotate-half formula expanded per half) straight into
    one output buffer: 4 element-wise passes over half the width instead of the ~6 full-width passes (neg, cat,
    2 mul, add, prefix cat) of the literal formula, and as many again in its autograd backward. With gradients it
    runs as :class:`_RopeQK`, whose backward is the transposed rotation written the same way. Learnable or
    differently typed tables fall back to the literal formula.
    """
    if sin.requires_grad or cos.requires_grad or qk.dtype != sin.dtype:
        return apply_rope(qk, sin, cos)
    if qk.requires_grad and torch.is_grad_enabled():
        return _RopeQK.apply(qk, sin, cos)
    return _rotate(qk, sin, cos)


def _rotate(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """``x1*cos1 - x2*sin1 | x2*cos2 + x1*sin2`` on the last ``sin.shape[-2]`` tokens; prefix tokens are copied."""
    n_rot = sin.shape[-2]
    prefix = x.shape[-2] - n_rot
    if prefix < 0:
        raise ValueError(f"RoPE tables cover {n_rot} tokens but the input has only {x.shape[-2]}")
    half = x.shape[-1] // 2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if prefix:
        out[..., :prefix, :].copy_(x[..., :prefix, :])
    x, o = x[..., prefix:, :], out[..., prefix:, :]
    x1, x2, o1, o2 = x[..., :half], x[..., half:], o[..., :half], o[..., half:]
    torch.mul(x1, cos[:, :half], out=o1)
    o1.addcmul_(x2, sin[:, :half], value=-1)
    torch.mul(x2, cos[:, half:], out=o2)
    o2.addcmul_(x1, sin[:, half:])
    return out


class _RopeQK(torch.autograd.Function):
    """RoPE with a hand-written backward. The rotation is linear in ``x``; its transpose
    (``g1*cos1 + g2*sin2 | g2*cos2 - g1*sin1``) is the same rotation with the sine table's halves swapped and
    negated, so the backward reuses :func:`_rotate` (no saved activations, 4 half-width passes). Written by hand
    because autograd of the literal formula stores and replays every intermediate of neg/cat/mul/add."""

    @staticmethod
    def forward(ctx, qk: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
        ctx.save_for_backward(sin, cos)
        return _rotate(qk, sin, cos)

    @staticmethod
    def backward(ctx, grad: Tensor):
        sin, cos = ctx.saved_tensors
        half = sin.shape[-1] // 2
        sin_t = -torch.cat((sin[:, half:], sin[:, :half]), dim=-1)
        return _rotate(grad, sin_t, cos), None, None


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused qkv, RoPE on patch tokens and SDPA (official ``SelfAttention``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        mask_k_bias: bool = False,
        device=None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        linear = LinearKMaskedBias if mask_k_bias else nn.Linear
        self.qkv = linear(dim, 3 * dim, bias=qkv_bias, device=device)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device)

    def attend(self, qkv: Tensor, rope: Rope) -> Tensor:
        """``qkv [B, N, 3D]`` -> attention output ``[B, N, D]`` (before ``proj``)."""
        B, N, C3 = qkv.shape
        # [3, B, heads, N, hd] as strided views: no copy until RoPE or SDPA needs one.
        qkv = qkv.view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            qk = _rope_qk(qkv[:2], rope[0], rope[1])  # q and k rotated together, prefix tokens untouched
            q, k = qk[0], qk[1]
        else:
            q, k = qkv[0], qkv[1]
        x = F.scaled_dot_product_attention(q, k, qkv[2])
        return x.transpose(1, 2).reshape(B, N, C3 // 3)

    def forward(self, x: Tensor, rope: Rope = None) -> Tensor:
        return self.proj(self.attend(self.qkv(x), rope))


def _cat_tokens(xs: Sequence[Tensor]) -> Tensor:
    """Flatten ``[B_i, N_i, D]`` tensors to rows and concatenate them: ``[sum B_i N_i, D]``."""
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs], dim=0)


def _split_tokens(flat: Tensor, like: Sequence[Tensor] | Sequence[torch.Size]) -> list[Tensor]:
    shapes = [t.shape if isinstance(t, Tensor) else t for t in like]
    sizes = [s[0] * s[1] for s in shapes]
    return [c.view(s[0], s[1], -1) for c, s in zip(flat.split(sizes, dim=0), shapes)]


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block with LayerScale and batch-subset stochastic depth (official ``SelfAttentionBlock``).

    Works on a list of token tensors (crop groups of different sizes): norms, qkv, proj and FFN run once on the
    concatenated tokens, attention runs per group with that group's RoPE tables.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer=_NORM_LAYERS["layernorm"],
        ffn_layer=_mlp,
        init_values: float | None = None,
        mask_k_bias: bool = False,
        device=None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim, device=device)
        self.attn = SelfAttention(
            dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, mask_k_bias=mask_k_bias, device=device
        )
        self.ls1 = LayerScale(dim, init_values=init_values, device=device) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim, device=device)
        self.mlp = ffn_layer(dim, int(dim * ffn_ratio), bias=ffn_bias, device=device)
        self.ls2 = LayerScale(dim, init_values=init_values, device=device) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path

    # -- token-wise pieces, applied to [T, D] rows or [B, N, D] tensors alike --------------------------------------
    def _attn_branch(self, xs: list[Tensor], ropes: list[Rope]) -> list[Tensor]:
        """``attn(norm1(x))`` for every group (no LayerScale); qkv/proj/norm on the concatenation if several."""
        if len(xs) == 1:
            return [self.attn(self.norm1(xs[0]), ropes[0])]
        qkv = self.attn.qkv(self.norm1(_cat_tokens(xs)))
        outs = [self.attn.attend(t, r) for t, r in zip(_split_tokens(qkv, xs), ropes)]
        return _split_tokens(self.attn.proj(_cat_tokens(outs)), xs)

    def _ffn_branch(self, xs: list[Tensor]) -> list[Tensor]:
        """``mlp(norm2(x))`` for every group (no LayerScale), on the concatenation if several."""
        if len(xs) == 1:
            return [self.mlp(self.norm2(xs[0]))]
        return _split_tokens(self.mlp(self.norm2(_cat_tokens(xs))), xs)

    @staticmethod
    def _residual(x: Tensor, y: Tensor, ls: nn.Module) -> Tensor:
        # x + gamma * y in one pass (addcmul) instead of two (mul, add).
        if isinstance(ls, LayerScale):
            return torch.addcmul(x, y, ls.gamma)
        return x + ls(y)

    def forward(self, x_or_list: Tensor | list[Tensor], rope_or_list: Rope | list[Rope] = None):
        if isinstance(x_or_list, Tensor):
            return self.forward_list([x_or_list], [rope_or_list])[0]
        if rope_or_list is None:
            rope_or_list = [None] * len(x_or_list)
        return self.forward_list(list(x_or_list), list(rope_or_list))

    def forward_list(self, xs: list[Tensor], ropes: list[Rope]) -> list[Tensor]:
        if self.training and self.sample_drop_ratio > 0.0:
            return self._forward_list_sample_drop(xs, ropes)
        xs = [self._residual(x, r, self.ls1) for x, r in zip(xs, self._attn_branch(xs, ropes))]
        return [self._residual(x, r, self.ls2) for x, r in zip(xs, self._ffn_branch(xs))]

    def _forward_list_sample_drop(self, xs: list[Tensor], ropes: list[Rope]) -> list[Tensor]:
        # Reference "sample drop": each branch sees max(int(B(1-p)), 1) random samples and its output is added
        # back with index_add scaled by B/subset. RNG order as the reference: all attention subsets, then all FFN
        # subsets. RoPE tables have no batch dim, so they need no indexing.
        bs = [x.shape[0] for x in xs]
        subset = [max(int(b * (1 - self.sample_drop_ratio)), 1) for b in bs]
        scale = [b / s for b, s in zip(bs, subset)]
        idx1 = [torch.randperm(b, device=x.device)[:s] for x, b, s in zip(xs, bs, subset)]
        res1 = self._attn_branch([x[i] for x, i in zip(xs, idx1)], ropes)
        xs = [
            torch.index_add(x, 0, i, self.ls1(r).to(x.dtype), alpha=a) for x, i, r, a in zip(xs, idx1, res1, scale)
        ]
        idx2 = [torch.randperm(b, device=x.device)[:s] for x, b, s in zip(xs, bs, subset)]
        res2 = self._ffn_branch([x[i] for x, i in zip(xs, idx2)])
        return [
            torch.index_add(x, 0, i, self.ls2(r).to(x.dtype), alpha=a) for x, i, r, a in zip(xs, idx2, res2, scale)
        ]


# ----------------------------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------------------------
def init_weights_vit(module: nn.Module) -> None:
    # Official `init_weights_vit`, applied to every submodule.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, LinearKMaskedBias):
            module.reset_bias_mask()
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm, LayerScale, PatchEmbed, RopePositionEmbedding)):
        module.reset_parameters()


class DinoVisionTransformer(Backbone, nn.Module):
    """DINOv3 ViT with the official constructor arguments, key names and outputs (see module docstring)."""

    family = "vit"
    uses_layer_decay = True
    has_mask_token = True

    @property
    def token_stride(self) -> int:
        return int(self.patch_size)

    @property
    def n_layer_ids(self) -> int:
        return self.n_blocks + 1

    def layer_id(self, name: str) -> int:
        """The reference's layer id of a parameter (dinov3 ``param_groups.get_vit_lr_decay_rate``)."""
        if name.startswith(("patch_embed", "cls_token", "storage_tokens", "mask_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.n_blocks + 1

    def is_patch_embed(self, name: str) -> bool:
        return name.startswith("patch_embed")

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        pos_embed_rope_base: float | None = 100.0,
        pos_embed_rope_min_period: float | None = None,
        pos_embed_rope_max_period: float | None = None,
        pos_embed_rope_normalize_coords: Literal["min", "max", "separate"] = "separate",
        pos_embed_rope_shift_coords: float | None = None,
        pos_embed_rope_jitter_coords: float | None = None,
        pos_embed_rope_rescale_coords: float | None = None,
        pos_embed_rope_dtype: str = "bf16",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = None,
        norm_layer: str = "layernorm",
        ffn_layer: str = "mlp",
        ffn_bias: bool = True,
        proj_bias: bool = True,
        n_storage_tokens: int = 0,
        mask_k_bias: bool = False,
        untie_cls_and_patch_norms: bool = False,
        untie_global_and_local_cls_norm: bool = False,
        device: Any | None = None,
        **ignored_kwargs: Any,
    ) -> None:
        super().__init__()
        if ignored_kwargs:
            # The reference warns and ignores unknown kwargs (configs carry extras); do the same.
            logger.warning("DinoVisionTransformer ignored kwargs: %s", sorted(ignored_kwargs))
        if norm_layer not in _NORM_LAYERS:
            raise ValueError(f"norm_layer must be one of {sorted(_NORM_LAYERS)}, got {norm_layer!r}")
        if ffn_layer not in _FFN_LAYERS:
            raise ValueError(f"ffn_layer must be one of {sorted(_FFN_LAYERS)}, got {ffn_layer!r}")
        if pos_embed_rope_dtype not in _DTYPES:
            raise ValueError(f"pos_embed_rope_dtype must be one of {sorted(_DTYPES)}, got {pos_embed_rope_dtype!r}")
        norm_cls = _NORM_LAYERS[norm_layer]

        self.num_features = self.embed_dim = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.img_size = img_size  # nominal only: there is no learned position table
        self.in_chans = in_chans
        self.n_storage_tokens = n_storage_tokens
        self.grad_checkpointing = False

        # Registration order reproduces the official state_dict key order.
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, device=device))
        if n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(torch.empty(1, n_storage_tokens, embed_dim, device=device))
        else:
            self.storage_tokens = None
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim, device=device))
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, device=device)
        self.rope_embed = RopePositionEmbedding(
            embed_dim,
            num_heads,
            base=pos_embed_rope_base,
            min_period=pos_embed_rope_min_period,
            max_period=pos_embed_rope_max_period,
            normalize_coords=pos_embed_rope_normalize_coords,
            shift_coords=pos_embed_rope_shift_coords,
            jitter_coords=pos_embed_rope_jitter_coords,
            rescale_coords=pos_embed_rope_rescale_coords,
            dtype=_DTYPES[pos_embed_rope_dtype],
            device=device,
        )
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(
                embed_dim,
                num_heads,
                ffn_ratio=ffn_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=drop_path_rate,  # the same rate for every block (no linear ramp), as the reference
                norm_layer=norm_cls,
                ffn_layer=_FFN_LAYERS[ffn_layer],
                init_values=layerscale_init,
                mask_k_bias=mask_k_bias,
                device=device,
            )
            for _ in range(depth)
        )
        self.norm = norm_cls(embed_dim, device=device)
        self.untie_cls_and_patch_norms = untie_cls_and_patch_norms
        self.cls_norm = norm_cls(embed_dim, device=device) if untie_cls_and_patch_norms else None
        self.untie_global_and_local_cls_norm = untie_global_and_local_cls_norm
        # Used only in training, for list entry 1 (local crops); never at eval, but it is in the checkpoints.
        self.local_cls_norm = norm_cls(embed_dim, device=device) if untie_global_and_local_cls_norm else None
        self.head = nn.Identity()

        # Initialise real tensors right away (the reference leaves them empty until init_weights); skip on meta,
        # also when built under `with torch.device("meta")`.
        if not self.cls_token.is_meta:
            self.init_weights()

    # -- init -------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init: cls/storage N(0, .02), mask token 0, Linear trunc-normal .02 with zero bias, norms reset,
        LayerScale to its init value, patch embed U(+-sqrt(1/(C p^2))), RoPE periods recomputed, k-bias masked."""
        nn.init.normal_(self.cls_token, std=0.02)
        if self.storage_tokens is not None:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            init_weights_vit(m)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (``torch.utils.checkpoint``, RNG state preserved for sample drop)."""
        self.grad_checkpointing = enable

    # -- tokens -----------------------------------------------------------------------------------------------------
    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        if x.ndim != 4:
            raise ValueError(f"expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"input shape {tuple(x.shape)}: height {h} and width {w} must be multiples of patch_size {p} "
                "(crop or pad the image first)"
            )
        img_shape = tuple(x.shape)
        x = self.patch_embed(x)
        B, H, W, _ = x.shape
        x = x.flatten(1, 2)
        if masks is not None:
            if masks.shape != (B, H * W):
                raise ValueError(f"masks must have shape {(B, H * W)} for input {img_shape}, got {tuple(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            cls_token = self.cls_token
        else:
            # Numerically a no-op that keeps mask_token in the graph (needed by FSDP/compile, as the reference).
            cls_token = self.cls_token + 0 * self.mask_token
        prefix = [cls_token.expand(B, -1, -1)]
        if self.storage_tokens is not None:
            prefix.append(self.storage_tokens.expand(B, -1, -1))
        return torch.cat([*prefix, x], dim=1), (H, W)

    def _ropes(self, hw_list: list[tuple[int, int]], cache: dict | None) -> list[Rope]:
        # Without augmentation the tables are deterministic: compute once per forward and shape (cache dict).
        # With augmentation in training, every call draws anew, as the reference does per block and per group.
        # Symbolic sizes (torch.export / ONNX with a dynamic height and width) are not hashable: no cache then.
        if cache is None or not all(type(v) is int for hw in hw_list for v in hw):
            return [self.rope_embed(H=H, W=W) for H, W in hw_list]
        out = []
        for hw in hw_list:
            if hw not in cache:
                cache[hw] = self.rope_embed(H=hw[0], W=hw[1])
            out.append(cache[hw])
        return out

    def _run_blocks(self, xs: list[Tensor], hw_list: list[tuple[int, int]]) -> list[Tensor]:
        cache = None if (self.training and self.rope_embed.has_augmentation) else {}
        for blk in self.blocks:
            ropes = self._ropes(hw_list, cache)
            if self.grad_checkpointing and torch.is_grad_enabled():
                xs = torch.utils.checkpoint.checkpoint(blk.forward_list, xs, ropes, use_reentrant=False)
            else:
                xs = blk.forward_list(xs, ropes)
        return xs

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward_features_list(self, x_list: list[Tensor], masks_list: list[Tensor | None] | None) -> list[dict]:
        if masks_list is None:
            masks_list = [None] * len(x_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"got {len(x_list)} inputs but {len(masks_list)} masks")
        xs, hw_list = [], []
        for x, m in zip(x_list, masks_list):
            t, hw = self.prepare_tokens_with_masks(x, m)
            xs.append(t)
            hw_list.append(hw)
        xs = self._run_blocks(xs, hw_list)

        r = self.n_storage_tokens + 1
        outputs = []
        for idx, (x, masks) in enumerate(zip(xs, masks_list)):
            if self.untie_cls_and_patch_norms or self.untie_global_and_local_cls_norm:
                if self.untie_global_and_local_cls_norm and self.training and idx == 1:
                    x_cls_reg = self.local_cls_norm(x[:, :r])  # entry 1 = local crops, training only
                elif self.untie_cls_and_patch_norms:
                    x_cls_reg = self.cls_norm(x[:, :r])
                else:
                    x_cls_reg = self.norm(x[:, :r])
                x_patch = self.norm(x[:, r:])
            else:
                x_norm = self.norm(x)
                x_cls_reg, x_patch = x_norm[:, :r], x_norm[:, r:]
            outputs.append(
                {
                    "x_norm_clstoken": x_cls_reg[:, 0],
                    "x_storage_tokens": x_cls_reg[:, 1:],
                    "x_norm_patchtokens": x_patch,
                    "x_prenorm": x,
                    "masks": masks,
                }
            )
        return outputs

    # -- intermediate layers ----------------------------------------------------------------------------------------
    def _get_intermediate_layers_not_chunked(self, x: Tensor, n: int | Sequence[int] = 1) -> list[Tensor]:
        depth = len(self.blocks)
        take = list(range(depth - n, depth)) if isinstance(n, int) else list(n)
        bad = [i for i in take if not 0 <= i < depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range for a depth-{depth} model (n={n})")
        tokens, hw = self.prepare_tokens_with_masks(x)
        last = max(take) if take else -1
        kept = []
        cache = None if (self.training and self.rope_embed.has_augmentation) else {}
        for i, blk in enumerate(self.blocks[: last + 1]):
            tokens = blk.forward_list([tokens], self._ropes([hw], cache))[0]
            if i in take:
                kept.append(tokens)
        return kept

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ):
        """Official semantics: int ``n`` = the last n blocks, a sequence = those 0-based block indices.

        Each output goes through the final norm (``cls_norm`` for the prefix when untied, never ``local_cls_norm``).
        Returns a tuple of patch tensors ``[B, HW, D]`` (``[B, D, H/p, W/p]`` with ``reshape``), or tuples
        ``(patches, cls)``, ``(patches, storage)`` or ``(patches, cls, storage)`` per the flags.
        """
        outputs = self._get_intermediate_layers_not_chunked(x, n)
        r = self.n_storage_tokens + 1
        if norm:
            outputs = [self._norm_tokens(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        extra_tokens = [out[:, 1:r] for out in outputs]
        outputs = [out[:, r:] for out in outputs]
        if reshape:
            B, _, h, w = x.shape
            p = self.patch_size
            outputs = [o.reshape(B, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous() for o in outputs]
        if return_class_token and return_extra_tokens:
            return tuple(zip(outputs, class_tokens, extra_tokens))
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        if return_extra_tokens:
            return tuple(zip(outputs, extra_tokens))
        return tuple(outputs)


    def _norm_tokens(self, tokens: Tensor) -> Tensor:
        """The final norm at inference: ``cls_norm`` on the prefix tokens when untied, ``norm`` elsewhere."""
        if self.untie_cls_and_patch_norms:
            r = self.n_storage_tokens + 1
            return torch.cat((self.cls_norm(tokens[:, :r]), self.norm(tokens[:, r:])), dim=1)
        return self.norm(tokens)

    # -- timm's surface ----------------------------------------------------------------------------------------------
    @property
    def feature_info(self) -> list[dict]:
        return [{"num_chs": self.embed_dim, "reduction": self.patch_size, "module": f"blocks.{i}"}
                for i in range(self.n_blocks)]

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's ``forward_intermediates``: the patch tokens after the blocks `indices` (int n: the last n; None:
        all; negative indices count from the end), ``[B, D, H/p, W/p]`` (``NCHW``) or ``[B, HW, D]`` (``NLC``),
        through the final norm when `norm`; with `return_prefix_tokens` each is ``(patches, [cls, storage])``.
        Returns the list, or ``(final tokens [B, 1 + R + HW, D] after the final norm, list)``."""
        from timm.models._features import feature_take_indices

        self._check_fmt(output_fmt)
        take, max_index = feature_take_indices(self.n_blocks, indices)
        tokens, (h, w) = self.prepare_tokens_with_masks(x)
        cache = None if (self.training and self.rope_embed.has_augmentation) else {}
        last = max_index if (intermediates_only or stop_early) else self.n_blocks - 1
        r = self.n_storage_tokens + 1
        out = []
        for i, blk in enumerate(self.blocks[: last + 1]):
            tokens = blk.forward_list([tokens], self._ropes([(h, w)], cache))[0]
            if i in take:
                t = self._norm_tokens(tokens) if norm else tokens
                patches = t[:, r:]
                if output_fmt == "NCHW":
                    patches = patches.reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
                out.append((patches, t[:, :r]) if return_prefix_tokens else patches)
        if intermediates_only:
            return out
        return self._norm_tokens(tokens), out


def dinov3_vit(**kwargs: Any) -> DinoVisionTransformer:
    """Build a :class:`DinoVisionTransformer` from the official constructor kwargs."""
    return DinoVisionTransformer(**kwargs)
