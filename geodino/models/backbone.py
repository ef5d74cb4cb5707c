"""What every geodino backbone offers the code above it: the official entry points and an explicit protocol.

A backbone implements ``forward_features_list(xs, masks)`` (a list of crop groups in, one output dict per group out)
and has a ``head``; `Backbone` provides the official ``forward_features`` and ``forward`` on top, and declares what
training and evaluation need to know instead of guessing with ``getattr``:

- ``family``: ``"vit"`` or ``"convnext"``;
- ``token_stride``: input pixels per output patch token (ViT: the patch size; ConvNeXt: 32, stem 4 and three 2x
  downsamplers);
- ``uses_layer_decay``: whether layer-wise LR decay applies (the reference: yes for ViTs, 1.0 — i.e. none — for
  ConvNeXt), with ``layer_id(name)`` / ``n_layer_ids`` the reference's layer ids (``patch_embed`` and the learned
  tokens 0, ``blocks.i`` i + 1, the rest L + 1) and ``is_patch_embed(name)`` for the patch-embedding LR multiplier;
- ``has_mask_token``: whether masked tokens can be fed (iBOT masking of the student).

timm's surface, so that code written for timm models takes a geodino backbone: ``pretrained_cfg`` / ``default_cfg``
(the data config, from the contract: `timm.data.resolve_data_config(model=...)` reads it), ``feature_info``
(channels and reduction of each block / stage) and ``forward_intermediates`` with timm's signature (in each family).
"""

from __future__ import annotations

from torch import Tensor

_OUTPUT_FMTS = ("NCHW", "NLC")


class Backbone:
    """Mixin: ``forward_features`` / ``forward`` over ``forward_features_list``, plus the backbone protocol."""

    family: str = ""
    uses_layer_decay: bool = False
    has_mask_token: bool = False

    @property
    def token_stride(self) -> int:
        raise NotImplementedError

    @property
    def n_layer_ids(self) -> int:
        """The largest layer id (L + 1 for L blocks)."""
        return 0

    def layer_id(self, name: str) -> int:
        return self.n_layer_ids

    def is_patch_embed(self, name: str) -> bool:
        return False

    @property
    def pretrained_cfg(self) -> dict:
        """timm's data config, from ``geodino_contract``: input size, mean / std over the contract's bands, no crop.
        The scaling to [0, 1] (`contract.scale` / `offset`) is geodino's: `geodino.transforms_for(model)`."""
        c = getattr(self, "geodino_contract", None)
        size = int(c.kwargs.get("img_size", 224)) if c is not None else 224
        in_chans = c.in_chans if c is not None else int(getattr(self, "in_chans", 3))
        cfg = {"input_size": (in_chans, size, size), "crop_pct": 1.0, "crop_mode": "center",
               "interpolation": "bicubic", "num_classes": 0, "classifier": "head",
               "first_conv": "patch_embed.proj" if self.family == "vit" else "downsample_layers.0.0",
               "fixed_input_size": False, "license": "dinov3-license"}
        if c is not None:
            cfg.update(mean=tuple(c.mean), std=tuple(c.std), architecture=c.name, bands=tuple(c.bands),
                       scale=c.scale, offset=c.offset)
        return cfg

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    @staticmethod
    def _check_fmt(output_fmt: str) -> None:
        if output_fmt not in _OUTPUT_FMTS:
            raise ValueError(f"output_fmt must be one of {', '.join(_OUTPUT_FMTS)}, got {output_fmt!r}")

    def forward_features(self, x: Tensor | list[Tensor], masks: Tensor | list | None = None):
        """Tensor in -> one output dict; list of crop groups (with a list of masks or None) -> list of dicts."""
        if isinstance(x, Tensor):
            return self.forward_features_list([x], [masks])[0]
        return self.forward_features_list(list(x), None if masks is None else list(masks))

    def forward(self, *args, is_training: bool = False, **kwargs):
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])
