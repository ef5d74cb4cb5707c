"""Gram anchoring loss (DINOv3 spec §3.4, `gram_loss.py: GramLoss`, `ssl_meta_arch.get_gram_teacher_output`).

MSE between the student's and the Gram teacher's patch-similarity matrices ``G = X Xᵀ``:

* ``apply_norm``: L2-normalise every patch token first (``gram.normalized``);
* ``img_level``: one (P, P) matrix per image, else one (B·P)² matrix over the flattened batch;
* ``remove_neg``: clamp negative similarities to 0 in both matrices;
  ``remove_only_teacher_neg``: clamp the teacher's negatives only. (The reference also writes
  ``student_sim[(student_sim < 0) & (target_sim < 0)] = 0``, but after clamping the target, so that mask is
  always empty and the student matrix stays as it is; geodino computes what the reference computes.)
  Both options are off in every official config.

The teacher is a target: it is detached, so no gradient reaches it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gram_loss", "GramLoss", "resize_gram_teacher_tokens"]


def _gram(feats: torch.Tensor, apply_norm: bool, img_level: bool) -> torch.Tensor:
    feats = feats.float()
    if apply_norm:
        feats = F.normalize(feats, dim=-1)
    if not img_level and feats.dim() == 3:
        feats = feats.flatten(0, 1)
    return feats @ feats.transpose(-1, -2)


def gram_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    img_level: bool = True,
    remove_neg: bool = True,
    apply_norm: bool = True,
    remove_only_teacher_neg: bool = False,
) -> torch.Tensor:
    """Gram loss between student and teacher patch features, both (B, P, D) (or (P, D))."""
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same images and "
            "patches (resize the teacher grid with resize_gram_teacher_tokens first)"
        )
    if img_level and student.dim() != 3:
        raise ValueError(f"img_level Gram loss needs (B, P, D) features, got {tuple(student.shape)}")
    target = _gram(teacher.detach(), apply_norm, img_level)
    sim = _gram(student, apply_norm, img_level)
    if remove_neg:
        target = target.clamp(min=0.0)
        sim = sim.clamp(min=0.0)
    elif remove_only_teacher_neg:
        target = target.clamp(min=0.0)
    return F.mse_loss(sim, target)


class GramLoss(torch.nn.Module):
    def __init__(self, apply_norm: bool = True, img_level: bool = True, remove_neg: bool = True,
                 remove_only_teacher_neg: bool = False):
        super().__init__()
        self.apply_norm = apply_norm
        self.img_level = img_level
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg

    def forward(self, output_feats: torch.Tensor, target_feats: torch.Tensor, img_level: bool | None = None):
        img_level = self.img_level if img_level is None else img_level
        return gram_loss(output_feats, target_feats, img_level, self.remove_neg, self.apply_norm,
                         self.remove_only_teacher_neg)


def resize_gram_teacher_tokens(
    teacher_tokens: torch.Tensor,
    student_grid: tuple[int, int],
    teacher_grid: tuple[int, int] | None = None,
    method: str = "bicubic",
    antialias: bool = False,
) -> torch.Tensor:
    """Resample the Gram teacher's patch tokens (B, h·w, D) onto the student's patch grid (B, H·W, D).

    As ``get_gram_teacher_output``: tokens → (B, D, h, w) → ``F.interpolate(mode=method,
    align_corners=False, antialias=antialias)`` → back to tokens. ``teacher_grid`` defaults to a square grid.
    """
    batch, n_tokens, dim = teacher_tokens.shape
    if teacher_grid is None:
        side = int(round(n_tokens**0.5))
        teacher_grid = (side, side)
    if teacher_grid[0] * teacher_grid[1] != n_tokens:
        raise ValueError(f"teacher grid {teacher_grid} does not hold {n_tokens} tokens")
    if tuple(teacher_grid) == tuple(student_grid):
        return teacher_tokens
    grid = teacher_tokens.transpose(1, 2).reshape(batch, dim, *teacher_grid)
    align = False if method in ("linear", "bilinear", "bicubic", "trilinear") else None
    grid = F.interpolate(grid, size=tuple(student_grid), mode=method, align_corners=align, antialias=antialias)
    return grid.flatten(2).transpose(1, 2)
