"""Sinkhorn-Knopp teacher targets (DINOv3 spec §3.1, `dino_clstoken_loss.py: sinkhorn_knopp_teacher`).

The official routine works in the linear domain: ``Q = exp(t / τ)ᵀ`` with no max-subtraction, then three
rounds of "divide every prototype by its all-reduced total, then by K; divide every sample by its total,
then by B", and finally ``Q *= B``. On logits with ``|t / τ| ≳ 88`` its ``exp`` overflows to ``inf`` and
the targets become NaN; with the global max subtracted first, samples whose logits all lie far below the
global maximum underflow to zero and the per-sample division becomes ``0 / 0``.

This version runs the *same* iteration in the log domain. It keeps the scaling vectors ``a`` (one per
prototype) and ``b`` (one per sample) with ``Q_mk = exp(t_mk / τ − max + a_k + b_m)`` and updates them
with log-sum-exps, so nothing can overflow or underflow to an empty row/column:

* the global max of ``t / τ`` (all-reduced with MAX, so every rank shifts by the same constant) is
  subtracted before anything is exponentiated;
* the reference's first step (divide by the global sum) only multiplies Q by a constant, which the
  first prototype normalisation removes exactly, so it is folded away;
* prototype normalisation is a log-sum-exp over the samples of the whole process group (column maxima
  all-reduced with MAX, shifted sums all-reduced with SUM);
* sample normalisation is local (each sample's K prototypes live on one rank); the last one together
  with the final ``Q *= B`` is exactly a row softmax.

In exact arithmetic the result equals the official one; on the reference tensors it agrees to <1e-6
relative. It is always computed in fp32 and never carries gradients.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["sinkhorn_knopp"]


def _process_group(process_group):
    """The group to reduce over, or None when running in one process (no collective calls at all)."""
    if dist.is_available() and dist.is_initialized():
        return process_group if process_group is not None else dist.group.WORLD
    return None


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _logsumexp_over_samples(y: torch.Tensor, group) -> torch.Tensor:
    """log Σ_m exp(y_mk) over the samples of every rank in ``group``; y is (M_local, K), returns (K,)."""
    if y.shape[0] > 0:
        col_max = y.amax(dim=0)
    else:  # a rank may hold no samples (e.g. no masked patches); it must still join the collectives
        col_max = y.new_full((y.shape[1],), -math.inf)
    col_max = _all_reduce(col_max, dist.ReduceOp.MAX, group)
    shifted_sum = y.sub_(col_max).exp_().sum(dim=0)  # y is a temporary
    shifted_sum = _all_reduce(shifted_sum, dist.ReduceOp.SUM, group)
    return col_max + shifted_sum.log_()


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    process_group=None,
    n_masked_patches_tensor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sinkhorn-Knopp teacher probabilities, numerically stable, in fp32.

    Args:
        teacher_logits: (M, K) teacher head outputs, one row per sample (CLS token of a crop, or a
            masked patch for iBOT), K prototypes. Any float dtype; the computation is fp32.
        teacher_temp: teacher temperature τ_t.
        n_iterations: Sinkhorn iterations (3 in every official config); must be ≥ 1.
        process_group: the group whose samples share one transport problem. Defaults to WORLD when
            torch.distributed is initialised; ignored (and no collective is issued) otherwise.
        n_masked_patches_tensor: iBOT variant, this rank's number of masked patches; the total sample
            count ``B`` is its all-reduced sum (the official code all-reduces the caller's tensor in
            place; here it is copied). By default ``B`` is the all-reduced row count.

    Returns:
        (M, K) fp32 probabilities. Each row sums to 1; over the whole group each prototype's column
        sums to ``B / K`` (up to the last, row-wise, normalisation).

    Note: ``B`` and ``K`` only rescale Q uniformly, so the output does not depend on their values; they
    are kept so the intermediate Q matches the reference's scale.
    """
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits must be (samples, prototypes), got shape {tuple(teacher_logits.shape)}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    group = _process_group(process_group)

    x = teacher_logits.detach().float() / teacher_temp  # a fresh fp32 tensor, safe to modify in place
    n_local, n_prototypes = x.shape

    global_max = x.amax() if n_local > 0 else x.new_tensor(-math.inf)
    global_max = _all_reduce(global_max, dist.ReduceOp.MAX, group)
    x.sub_(global_max)

    if n_masked_patches_tensor is not None:
        count = n_masked_patches_tensor.detach().reshape(()).to(device=x.device, dtype=torch.float64).clone()
    else:
        count = torch.tensor(float(n_local), dtype=torch.float64, device=x.device)
    count = _all_reduce(count, dist.ReduceOp.SUM, group)
    log_b = torch.log(count).float()
    log_k = math.log(n_prototypes)

    b = torch.zeros(n_local, 1, dtype=torch.float32, device=x.device)  # per-sample log scale
    a = None  # per-prototype log scale
    for it in range(n_iterations):
        # each prototype gets total mass 1/K over all samples of the group
        a = -(_logsumexp_over_samples(x + b, group) + log_k)
        if it < n_iterations - 1:
            # each sample gets total mass 1/B (local: a sample's K prototypes live on this rank)
            b = -(torch.logsumexp(x + a, dim=1, keepdim=True) + log_b)
    # the last sample normalisation followed by Q *= B is a row softmax; written out because the fused
    # CPU softmax kernel uses a low-accuracy exp (~2e-6 relative error at K = 65536)
    x.add_(a)
    x.sub_(x.amax(dim=1, keepdim=True)).exp_()
    return x.div_(x.sum(dim=1, keepdim=True))
