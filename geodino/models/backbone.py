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
"""

from __future__ import annotations

from torch import Tensor


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
