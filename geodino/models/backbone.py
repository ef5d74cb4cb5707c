"""What the ViT and ConvNeXt backbones share: the official single-tensor / list-of-crops entry points.

A backbone implements ``forward_features_list(xs, masks)`` (a list of crop groups in, one output dict per
group out) and has a ``head``; this mixin provides the official ``forward_features`` and ``forward`` on top.
"""

from __future__ import annotations

from torch import Tensor


class CropListForward:
    """``forward_features`` / ``forward`` of the official backbones, on top of ``forward_features_list``."""

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
