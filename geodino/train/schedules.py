"""Schedules of the DINOv3 loop (dinov3_spec.md §6): LR, weight decay, teacher momentum and
teacher temperature, as per-iteration arrays.

`cosine_schedule` is the reference's v1 `CosineScheduler` (linear warm-up, then cosine from base to
final); `linear_warmup_cosine_decay` is the v2 form (start -> peak linearly, cosine peak -> end, then
constant). Both are a few lines of numpy; no library offers these exact shapes.
"""

from __future__ import annotations

import math

import numpy as np


def cosine_schedule(base: float, final: float, total: int, warmup: int = 0, start_warmup: float = 0.0,
                    freeze: int = 0) -> np.ndarray:
    """`freeze` iterations at 0, then `warmup` linear from start_warmup to base, then cosine to final."""
    total = int(total)
    freeze = min(int(freeze), total)
    warmup = min(int(warmup), total - freeze)
    # a non-finite base (optim.lr=inf) gives non-finite values, quietly: the trainer's non-finite-loss guard stops
    # the run with one clear line
    with np.errstate(invalid="ignore", over="ignore"):
        parts = [np.zeros(freeze), np.linspace(start_warmup, base, warmup, endpoint=False)]
        n = total - freeze - warmup
        if n > 0:
            it = np.arange(n)
            parts.append(final + 0.5 * (base - final) * (1 + np.cos(np.pi * it / max(n, 1))))
    out = np.concatenate(parts) if parts else np.zeros(0)
    assert len(out) == total
    return out.astype(np.float64)


def linear_warmup_cosine_decay(start: float, peak: float, end: float, warmup: int, total: int,
                               cosine: int | None = None) -> np.ndarray:
    total = int(total)
    warmup = min(int(warmup), total)
    cosine = total - warmup if cosine is None else min(int(cosine), total - warmup)
    w = np.linspace(start, peak, warmup, endpoint=False)
    c = end + 0.5 * (peak - end) * (1 + np.cos(np.pi * np.arange(cosine) / max(cosine, 1)))
    rest = np.full(total - warmup - cosine, end)
    return np.concatenate([w, c, rest]).astype(np.float64)


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup: int, total: int) -> np.ndarray:
    warmup = min(int(warmup), int(total))
    return np.concatenate([np.linspace(warmup_temp, temp, warmup), np.full(int(total) - warmup, temp)])


def lr_scaled(lr: float, global_batch: int, rule: str = "none") -> float:
    """The reference's `sqrt_wrt_1024` rule multiplies by 4·sqrt(B/1024) (note the factor 4)."""
    if rule in (None, "none"):
        return lr
    if rule == "sqrt_wrt_1024":
        return lr * 4 * math.sqrt(global_batch / 1024)
    raise ValueError(f"unknown optim.scaling_rule '{rule}'; choose none or sqrt_wrt_1024")
