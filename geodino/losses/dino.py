"""DINO loss on the CLS token (DINOv3 spec §3.1, `dino_clstoken_loss.py: DINOLoss`).

Cross-entropy between the teacher's target distributions (Sinkhorn-Knopp in DINOv3) and the student's
``log_softmax(s / τ_s)``, summed over every (student crop, teacher crop, image) triple:

    L = −Σ_{s,t,b} Σ_k q_tbk · log p_sbk / N,   N = B·S·T, or B·S·T − B·min(S, T) with the diagonal ignored

where ``ignore_diagonal`` drops the s == t pairs (the student and teacher seeing the same global crop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .centering import SoftmaxCentering
from .sinkhorn import sinkhorn_knopp

__all__ = ["dino_loss", "DINOLoss"]


def dino_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    student_temp: float = 0.1,
    ignore_diagonal: bool = False,
) -> torch.Tensor:
    """Official DINOLoss cross-entropy.

    Args:
        student_logits: (S, B, K) student head outputs, crop-major.
        teacher_probs: (T, B, K) teacher targets (rows sum to 1); a (T·B, K) tensor as returned by
            :func:`sinkhorn_knopp` on crop-major teacher logits must be ``.view(T, B, K)`` first.
            Targets are detached: no gradient reaches the teacher.
        student_temp: τ_s.
        ignore_diagonal: skip the pairs where student crop index == teacher crop index.
    """
    if student_logits.dim() != 3 or teacher_probs.dim() != 3:
        raise ValueError(
            f"expected student (S, B, K) and teacher (T, B, K); got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_probs.shape)}"
        )
    n_student, batch, n_proto = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    if teacher_probs.shape[1:] != (batch, n_proto):
        raise ValueError(
            f"teacher_probs {tuple(teacher_probs.shape)} does not fit student_logits {tuple(student_logits.shape)}"
        )

    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    q = teacher_probs.detach().float()
    if not ignore_diagonal:
        # Σ_s log p_s paired with Σ_t q_t: one (B, K) product instead of S·T
        loss = -(log_p.sum(dim=0) * q.sum(dim=0)).sum()
        return loss / (batch * n_student * n_teacher)
    pair_loss = -torch.einsum("sbk,tbk->st", log_p, q)
    n_diag = min(n_student, n_teacher)
    off_diagonal = ~torch.eye(n_student, n_teacher, dtype=torch.bool, device=pair_loss.device)
    denominator = batch * n_student * n_teacher - batch * n_diag
    if denominator == 0:
        raise ValueError(f"ignore_diagonal with S={n_student}, T={n_teacher} leaves no crop pair")
    return pair_loss[off_diagonal].sum() / denominator


class DINOLoss(SoftmaxCentering):
    """Thin stateful wrapper: the temperature, the ``center`` buffer ([1, K], as in official checkpoints)
    for softmax centring, and the Sinkhorn-Knopp teacher over ``process_group``."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, process_group=None):
        super().__init__((1, out_dim), center_momentum=center_momentum, process_group=process_group)
        self.out_dim = out_dim
        self.student_temp = student_temp

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, ignore_diagonal: bool = False):
        return dino_loss(student_logits, teacher_probs, self.student_temp, ignore_diagonal)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3):
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations, process_group=self.process_group)
