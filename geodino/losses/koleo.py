"""KoLeo regulariser (DINOv3 spec §3.3, `koleo_loss.py: KoLeoLoss` and `KoLeoLossDistributed`).

Applied to the student's pre-head ``x_norm_clstoken`` of each global crop separately. Per sample:
L2-normalise, find the nearest other sample by inner product, and take ``−log(‖x̂_i − x̂_j‖ + eps)``;
the loss is the mean. The distance is ``torch.nn.PairwiseDistance(2, eps)``, which adds ``eps`` to the
difference before the norm, exactly as the reference. Always fp32 with autocast disabled.

lightly's ``KoLeoLoss`` computes the same thing (the tests check it against this module), but it is not
a declared dependency (it only arrives with torchgeo), importing ``lightly.loss`` costs ~4 s, and the
grouped distributed form below needs the same core anyway, so the few lines are written here.

The distributed form all-gathers the features with autograd, cuts the global batch (rank-major) into
groups of ``group_size`` consecutive samples and lets every sample look for its neighbours only within
its own group, excluding itself; ``topk`` neighbours each contribute a term.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather  # autograd-aware

from .sinkhorn import process_group_for

__all__ = ["koleo_loss", "koleo_loss_distributed", "KoLeoLoss", "KoLeoLossDistributed"]


def _koleo_terms(x: torch.Tensor, candidates: torch.Tensor, allowed: torch.Tensor, topk: int, eps: float):
    """−log(distance + eps) of each row of x to its top-k allowed candidates; x and candidates normalised."""
    with torch.no_grad():
        dots = x @ candidates.t()
        dots.masked_fill_(~allowed, float("-inf"))
        nn_idx = dots.topk(topk, dim=1).indices  # (B, topk)
    neighbours = candidates[nn_idx]  # (B, topk, D); gradients reach the neighbours too, as in the reference
    distances = F.pairwise_distance(x.unsqueeze(1).expand_as(neighbours), neighbours, p=2, eps=eps)
    return -(distances + eps).log()


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo loss of one batch of features (B, D), B ≥ 2."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs (B >= 2, D) features, got shape {tuple(x.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        allowed = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        return _koleo_terms(x, x, allowed, 1, eps).mean()


def koleo_loss_distributed(
    x: torch.Tensor,
    group_size: int | None = 16,
    topk: int = 1,
    eps: float = 1e-8,
    process_group=None,
) -> torch.Tensor:
    """Grouped KoLeo over the batch of the whole process group (``KoLeoLossDistributed``).

    Args:
        x: this rank's features (B_local, D); every rank must pass the same B_local.
        group_size: samples per neighbour-search group, consecutive in the gathered (rank-major) batch;
            must divide the global batch. ``None`` means one group holding the whole global batch.
            In one process the "global batch" is ``x`` itself, cut into groups the same way.
        topk: neighbours per sample (1 in every official config).
        process_group: defaults to WORLD when torch.distributed is initialised.

    Returns this rank's loss: the mean over its own samples and their ``topk`` neighbours. Averaging it
    over ranks (as DDP does with the gradients) gives the mean over the global batch.
    """
    if x.dim() != 2:
        raise ValueError(f"koleo_loss_distributed needs (B, D) features, got shape {tuple(x.shape)}")
    group = process_group_for(process_group)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        if group is not None:
            gathered = torch.cat(all_gather(x, group=group), dim=0)
            offset = dist.get_rank(group) * x.shape[0]
        else:
            gathered, offset = x, 0
        n_global = gathered.shape[0]
        size = n_global if group_size is None else int(group_size)
        if size < 2 or n_global % size != 0:
            raise ValueError(f"KoLeo group size {group_size} must be >= 2 and divide the global batch {n_global}")
        if topk < 1 or topk > size - 1:
            raise ValueError(f"koleo topk={topk} needs 1 <= topk <= group size - 1 = {size - 1}")

        # only the groups this rank's samples belong to are searched
        lo = offset // size * size
        hi = -(-(offset + x.shape[0]) // size) * size
        candidates = gathered[lo:hi]
        rows = torch.arange(offset, offset + x.shape[0], device=x.device)
        cols = torch.arange(lo, hi, device=x.device)
        allowed = (rows[:, None] // size == cols[None, :] // size) & (rows[:, None] != cols[None, :])
        return _koleo_terms(x, candidates, allowed, topk, eps).mean()


class KoLeoLoss(torch.nn.Module):
    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return koleo_loss(x, self.eps)


class KoLeoLossDistributed(torch.nn.Module):
    def __init__(self, topk: int = 1, loss_group_size: int | None = None, eps: float = 1e-8, process_group=None):
        super().__init__()
        self.topk = topk
        self.loss_group_size = loss_group_size
        self.eps = eps
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return koleo_loss_distributed(x, self.loss_group_size, self.topk, self.eps, self.process_group)
