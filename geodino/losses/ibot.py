"""iBOT masked-patch loss (DINOv3 spec §3.2, `ibot_patch_loss.py: iBOTPatchLoss.forward_masked`).

Only the masked patches are scored. With ``w_p = 1 / (number of masked patches in p's image)``:

    L = −Σ_p w_p Σ_k q_pk · log_softmax(s_p / τ_s)_k / n_images

where ``n_images`` is the number of rows of ``masks`` (every global-crop image, masked or not): each
image's masked patches are averaged, then the result is averaged over all images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .centering import SoftmaxCentering
from .sinkhorn import sinkhorn_knopp

__all__ = ["ibot_loss", "masks_weight_from_masks", "iBOTPatchLoss"]


def masks_weight_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Per masked patch, 1 / (masked patches in its image), in the order of ``masks[masks]``."""
    masks = masks.reshape(masks.shape[0], -1).bool()
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()
    return per_image.unsqueeze(-1).expand_as(masks)[masks]


def ibot_loss(
    student_logits_masked: torch.Tensor,
    teacher_probs_masked: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float = 0.1,
    n_masked_patches: int | None = None,
    masks_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Official iBOT loss over the masked patches.

    Args:
        student_logits_masked: (n, K) student head outputs of the masked patches, in the order of
            ``masks[masks]`` (image-major, then patch index).
        teacher_probs_masked: (n, K) teacher targets for the same patches (detached here).
        masks: (n_images, N) boolean patch masks of the student's global crops (or (n_images, h, w)).
        student_temp: τ_s.
        n_masked_patches: if given, only the first ``n_masked_patches`` rows are scored (the official
            code pads these tensors to an upper bound).
        masks_weight: (n,) per-patch weights; by default ``1 / masked patches of the patch's image``.
    """
    masks = masks.reshape(masks.shape[0], -1)
    log_p = F.log_softmax(student_logits_masked.float() / student_temp, dim=-1)
    per_patch = (teacher_probs_masked.detach().float() * log_p).sum(dim=-1)
    if masks_weight is None:
        masks_weight = masks_weight_from_masks(masks)
    if n_masked_patches is not None:
        per_patch = per_patch[:n_masked_patches]
        masks_weight = masks_weight[:n_masked_patches]
    if per_patch.shape[0] != masks_weight.shape[0]:
        raise ValueError(
            f"{per_patch.shape[0]} masked patch rows but {masks_weight.shape[0]} weights "
            f"(masks hold {int(masks.sum())} masked patches)"
        )
    return -(per_patch * masks_weight.float()).sum() / masks.shape[0]


class iBOTPatchLoss(SoftmaxCentering):  # noqa: N801 (the official name)
    """Thin stateful wrapper: temperature, ``center`` buffer ([1, 1, K], as in official checkpoints) and
    the Sinkhorn-Knopp teacher whose sample count is the group's number of masked patches."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, process_group=None):
        super().__init__((1, 1, patch_out_dim), center_momentum=center_momentum, process_group=process_group)
        self.patch_out_dim = patch_out_dim
        self.student_temp = student_temp

    def forward_masked(
        self,
        student_patch_tokens_masked: torch.Tensor,
        teacher_patch_tokens_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        n_masked_patches: int | None = None,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return ibot_loss(
            student_patch_tokens_masked,
            teacher_patch_tokens_masked,
            student_masks_flat,
            self.student_temp,
            n_masked_patches=n_masked_patches,
            masks_weight=masks_weight,
        )

    forward = forward_masked

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: torch.Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: torch.Tensor | None = None,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        if n_masked_patches_tensor is None:
            n_masked_patches_tensor = torch.tensor(teacher_output.shape[0], device=teacher_output.device)
        return sinkhorn_knopp(
            teacher_output,
            teacher_temp,
            n_iterations,
            process_group=self.process_group,
            n_masked_patches_tensor=n_masked_patches_tensor,
        )
