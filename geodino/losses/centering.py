"""Softmax centring of teacher logits (DINO v1/v2 style; DINOv3 spec §3.1).

DINOv3 always uses Sinkhorn-Knopp targets (`SSLMetaArch` asserts `train.centering == "sinkhorn_knopp"`),
but the official `DINOLoss` / `iBOTPatchLoss` still carry the centre buffer and its EMA, and checkpoints
hold `dino_loss.center` / `ibot_patch_loss.center`. This module keeps that state so those checkpoints
load and the centring path stays available:

* ``softmax((t − c) / τ_t)`` over the prototypes;
* ``update_center(t)`` starts an all-reduce of the batch sum (async when distributed);
  ``apply_center_update()`` finishes it: ``c ← m·c + (1 − m)·mean_batch(t)``, the mean over the
  whole process group. ``softmax_center_teacher`` applies a pending update before centring, as the
  official code does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .sinkhorn import process_group_for

__all__ = ["softmax_center", "SoftmaxCentering"]


def softmax_center(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """softmax((teacher_logits − center) / teacher_temp) over the last dim, in fp32, without gradients."""
    center = center.reshape(-1).float()
    return F.softmax((teacher_logits.detach().float() - center) / teacher_temp, dim=-1)


class SoftmaxCentering(nn.Module):
    """Base for the loss modules: a ``center`` buffer of ``center_shape`` and its momentum EMA."""

    def __init__(self, center_shape: tuple[int, ...], center_momentum: float = 0.9, process_group=None):
        super().__init__()
        self.center_momentum = center_momentum
        self.process_group = process_group
        self.register_buffer("center", torch.zeros(*center_shape))
        self._pending = None  # (summed batch [1, K] fp32, count [1] fp64, async work handle or None)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float, update_centers: bool = True):
        if update_centers:
            self.apply_center_update()
        return softmax_center(teacher_logits, self.center, teacher_temp)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """Start the centre update from this step's teacher logits (..., K); finished lazily."""
        flat = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
        # sum and count travel in one message; fp64 keeps the count exact
        stats = torch.cat([flat.sum(dim=0).double(), flat.new_tensor([flat.shape[0]], dtype=torch.float64)])
        group = process_group_for(self.process_group)
        handle = dist.all_reduce(stats, group=group, async_op=True) if group is not None else None
        self._pending = (stats, handle)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        if self._pending is None:
            return
        stats, handle = self._pending
        self._pending = None
        if handle is not None:
            handle.wait()
        if float(stats[-1]) <= 0:  # no samples in the whole group (e.g. no masked patch this step)
            return
        batch_center = (stats[:-1] / stats[-1]).float().reshape(self.center.shape).to(self.center.device)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
