"""What the trainer watches besides the losses: collapse, dense-feature quality on held-out images, agreement
with a Gram teacher and, in distillation, how close a student is to its teacher. Every stage uses these; none
of them changes training.

- `collapse_monitor(cls, patches)`: class-token spread across the batch and effective rank of patch features;
- `gram_agreement(student_tokens, teacher_tokens)`: correlation of patch-similarity matrices;
- `heldout_images(source, n, size, contract)`: fixed normalised chips from indices training never reaches;
- `heldout_monitor(meta, images, gram_size)`: the collapse statistics (and Gram agreement) on those chips;
- `teacher_agreement(student, teacher, images)`: CKA, k-NN overlap and prototype agreement (distillation).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geodino.contract import Contract
from geodino.losses import resize_gram_teacher_tokens, sinkhorn_knopp
from geodino.losses.sinkhorn import LOCAL

HELDOUT_OFFSET = 10**12  # held-out items: indices far beyond any training index, so never trained on as such


@torch.no_grad()
def collapse_monitor(cls: torch.Tensor, patches: torch.Tensor) -> dict[str, float]:
    """Collapse monitor: class-token std across the batch (of L2-normalised tokens; a collapsed
    model gives 0, a uniform spread on the sphere ~1/sqrt(D)) and the effective rank
    (exp of the singular-value entropy) of centred patch features.

    Non-finite tokens (a diverging step) give NaN statistics, never an exception: the trainer's non-finite-loss
    guard decides what happens to the step."""
    c = F.normalize(cls.float(), dim=-1)
    cls_std = float(c.std(dim=0).mean()) if c.shape[0] > 1 else 0.0
    return {"cls_std": cls_std, "cls_std_x_sqrt_dim": cls_std * math.sqrt(c.shape[-1]),
            "patch_erank": _effective_rank(patches.float().reshape(-1, patches.shape[-1]))}


def _effective_rank(p: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of the centred rows of `p`; NaN when `p` is not finite."""
    if p.shape[0] > 2048:
        p = p[torch.linspace(0, p.shape[0] - 1, 2048, device=p.device).long()]
    p = p - p.mean(dim=0, keepdim=True)
    # singular values of p = sqrt(eigenvalues of pᵀp): a D x D problem, ~2x cheaper than the SVD of p
    gram = (p.t() @ p).double()
    if not bool(torch.isfinite(gram).all()):
        return math.nan
    try:
        s = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().float()
    except torch.linalg.LinAlgError:  # finite but too ill-conditioned for LAPACK
        return math.nan
    prob = s / s.sum().clamp_min(1e-12)
    return float(torch.exp(-(prob * prob.clamp_min(1e-12).log()).sum()))


@torch.no_grad()
def gram_agreement(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor) -> float:
    """Mean over images of the Pearson correlation between the student's and the teacher's patch
    cosine-similarity matrices (1 = the same dense similarity structure). Used as the dense-feature
    monitor in every stage that has a Gram teacher."""
    s = F.normalize(student_tokens.float(), dim=-1)
    t = F.normalize(teacher_tokens.float(), dim=-1)
    gs = (s @ s.transpose(1, 2)).flatten(1)
    gt = (t @ t.transpose(1, 2)).flatten(1)
    gs = gs - gs.mean(1, keepdim=True)
    gt = gt - gt.mean(1, keepdim=True)
    corr = (gs * gt).sum(1) / (gs.norm(dim=1) * gt.norm(dim=1)).clamp_min(1e-12)
    return float(corr.mean())


def heldout_images(source, n: int, size: int, contract: Contract, offset: int = HELDOUT_OFFSET) -> torch.Tensor:
    """n normalised images (N, C, size, size): `source[offset + i]`, centre-cropped to `size` (resized when
    smaller), normalised with the contract. For a raster source these are chips training never draws."""
    imgs = []
    for i in range(n):
        x = source[offset + i].float()
        h, w = x.shape[-2:]
        if min(h, w) < size:
            x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)[0]
        else:
            top, left = (h - size) // 2, (w - size) // 2
            x = x[:, top:top + size, left:left + size]
        imgs.append(contract.normalize(x))
    return torch.stack(imgs)


@torch.no_grad()
def heldout_monitor(meta, images: torch.Tensor, gram_size: int | None = None) -> dict:
    """Dense-feature quality on fixed held-out images (normalised, (N, C, H, W)), for every stage:
    the student's class-token spread and patch effective rank, and, when the meta-architecture has a
    Gram teacher, the patch-similarity agreement between the student (at H) and the Gram teacher (at
    `gram_size`, tokens resized to the student grid)."""
    student = meta.student.backbone
    was_training = student.training
    student.eval()
    try:
        out = student.forward_features(images)
        stats = {f"heldout_{k}": v for k, v in collapse_monitor(out["x_norm_clstoken"], out["x_norm_patchtokens"]).items()}
        gram_teacher = getattr(meta, "gram_teacher", None)
        if gram_teacher is not None and gram_size:
            stride = student.token_stride
            xg = F.interpolate(images, size=(gram_size, gram_size), mode="bicubic", align_corners=False)
            t = gram_teacher.forward_features(xg)["x_norm_patchtokens"]
            g = images.shape[-1] // stride
            t = resize_gram_teacher_tokens(t, (g, g), (gram_size // stride, gram_size // stride))
            stats["heldout_gram_agreement"] = gram_agreement(out["x_norm_patchtokens"], t)
    finally:
        student.train(was_training)
    return stats


# ------------------------------------------------------------------------------------------------
# Distillation: how close is a student to its teacher
# ------------------------------------------------------------------------------------------------

def resize_patch_tokens(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[n, h*w, D] on a square grid -> [n, size[0]*size[1], D] (bilinear, antialiased when shrinking): how a
    student's token map meets the teacher's grid (ConvNeXt stride 32 against a ViT's 16)."""
    n, t, d = tokens.shape
    side = int(round(math.sqrt(t)))
    if side * side != t:
        raise ValueError(f"cannot resize {t} patch tokens: not a square grid")
    if (side, side) == tuple(size):
        return tokens
    x = tokens.transpose(1, 2).reshape(n, d, side, side)
    x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False,
                      antialias=size[0] < side or size[1] < side).to(tokens.dtype)
    return x.flatten(2).transpose(1, 2)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between [n, d1] and [n, d2] features of the same n inputs:
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F); 1 = the same geometry up to rotation and scale."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    num = (y.T @ x).pow(2).sum()
    den = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return float(num / den.clamp_min(1e-30))


def knn_overlap(x: torch.Tensor, y: torch.Tensor, k: int = 5) -> float:
    """Mean share of each sample's k nearest neighbours (cosine, itself excluded) in `x` that are also among
    its k nearest neighbours in `y` (chance about k / (n - 1))."""
    n = x.shape[0]
    k = min(k, n - 1)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)

    def nn_sets(f):
        f = F.normalize(f.double(), dim=-1)
        return (f @ f.T).masked_fill(eye, -float("inf")).topk(k, dim=1).indices

    a, b = nn_sets(x), nn_sets(y)
    hits = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).double().sum(1)
    return float((hits / k).mean())


@torch.no_grad()
def teacher_agreement(student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                      band_indices: Sequence[int] | None = None, teacher_temp: float = 0.07) -> dict[str, float]:
    """How close a student is to the teacher on `images` (normalised, the teacher's bands).

    `student` / `teacher` are backbones, or {backbone, dino_head, ibot_head} ModuleDicts.

    - `cls_cka`, `patch_cka`: linear CKA between the backbones' class tokens, and between their patch tokens
      (the student's resized to the teacher's grid, as in training); `cls_knn5`: overlap of the 5 nearest
      neighbours of each image under the two class-token spaces. These compare feature spaces of any widths.
    - with heads, in the space the two share (the K prototypes): `dino_ce` / `ibot_ce`, the cross-entropy
      of the student's DINO / iBOT prototype distribution (student temperature 0.1) against the teacher's
      Sinkhorn-Knopp targets over `images` (class tokens / every patch), i.e. the training objective on
      unaugmented held-out images (ln K for a student that knows nothing), and `dino_top1` / `ibot_top1`,
      how often the student's top prototype is the teacher's (chance 1 / K).
    """
    def parts(m):
        return (m["backbone"], m["dino_head"], m["ibot_head"]) if isinstance(m, nn.ModuleDict) else (m, None, None)

    s_bb, s_dino, s_ibot = parts(student)
    t_bb, t_dino, t_ibot = parts(teacher)
    was = [(m, m.training) for m in (student, teacher)]
    student.eval()
    teacher.eval()
    t = t_bb.forward_features(images)
    x = images if band_indices is None else images[:, list(band_indices)]
    s = s_bb.forward_features(x)
    tp = t["x_norm_patchtokens"]
    grid = int(round(math.sqrt(tp.shape[1])))
    sp = resize_patch_tokens(s["x_norm_patchtokens"], (grid, grid))
    out = {"cls_cka": linear_cka(s["x_norm_clstoken"], t["x_norm_clstoken"]),
           "patch_cka": linear_cka(sp.reshape(-1, sp.shape[-1]), tp.reshape(-1, tp.shape[-1])),
           "cls_knn5": knn_overlap(s["x_norm_clstoken"], t["x_norm_clstoken"], 5)}
    if s_dino is not None and t_dino is not None:
        for name, sh, th, sf, tf in (("dino", s_dino, t_dino, s["x_norm_clstoken"], t["x_norm_clstoken"]),
                                     ("ibot", s_ibot, t_ibot, sp.reshape(-1, sp.shape[-1]), tp.reshape(-1, tp.shape[-1]))):
            q = sinkhorn_knopp(th(tf).float(), teacher_temp, process_group=LOCAL)
            logp = F.log_softmax(sh(sf).float() / 0.1, dim=-1)
            out[f"{name}_ce"] = float(-(q * logp).sum(-1).mean())
            out[f"{name}_top1"] = float((logp.argmax(-1) == q.argmax(-1)).float().mean())
    for m, mode in was:
        m.train(mode)
    return out


# ------------------------------------------------------------------------------------------------
# Is the run learning?
# ------------------------------------------------------------------------------------------------

class LearningMonitor:
    """Says when a DINO-style run is not learning, once, with the measured cause and the knobs to turn; the
    verdict goes to summary.json.

    At a user's scale (a few thousand steps, batch 8-64) DINOv3's reference recipe can sit in its uniform-target
    phase for the whole run: with LayerScale 1e-5 every class token starts alike, the teacher's logits spread less
    than its temperature across the batch, and Sinkhorn-Knopp then spreads the batch evenly over the K prototypes,
    so every target is uniform, the DINO loss stays at ln K and the features do not improve (docs/learning.md).
    Each step reports ``dino_target_gap`` (ln K − the targets' entropy) and ``dino_target_prototypes``; after the
    teacher-temperature warm-up, `patience` consecutive steps with a gap below `min_gap` mean "not learning", and
    `patience` steps with at most 2 distinct target prototypes mean collapse."""

    def __init__(self, n_prototypes: int, warmup_steps: int = 0, patience: int = 100, min_gap: float = 0.005,
                 logger: logging.Logger | None = None):
        self.ln_k = math.log(int(n_prototypes))
        self.warmup_steps = int(warmup_steps)
        self.patience = int(patience)
        self.min_gap = float(min_gap)
        self.log = logger or logging.getLogger("geodino")
        self.uniform_streak = self.collapse_streak = self.seen = 0
        self.fired: str | None = None
        self.recent: list[dict] = []

    def __call__(self, step: int, row: dict) -> None:
        if "dino_target_gap" not in row:
            return
        self.recent = (self.recent + [row])[-20:]
        if step < self.warmup_steps:
            return
        self.seen += 1
        gap = float(row["dino_target_gap"])
        self.uniform_streak = self.uniform_streak + 1 if gap < self.min_gap else 0
        few = float(row.get("dino_target_prototypes", 3)) <= 2
        self.collapse_streak = self.collapse_streak + 1 if few else 0
        if self.fired is None and self.uniform_streak >= self.patience:
            self.fired = "not learning"
            self.log.warning(
                "step %d: not learning — for %d steps the teacher's DINO targets have stayed uniform (entropy within "
                "%.3f of ln K = %.2f; teacher logit spread / temperature %.2f), so the DINO and iBOT terms sit at ln K. "
                "At small scale change: recipe=small, or fewer prototypes (stage.dino/ibot.head_n_prototypes=64), a lower "
                "teacher temperature (ema.teacher_temp=0.01 ema.warmup_teacher_temp=0.01), LayerScale 1.0 for shallow "
                "models (+model.kwargs.layerscale_init=1.0), a larger batch (train.batch_size>=32), a constant EMA "
                "momentum (ema.momentum=0.99 ema.final_momentum=0.99); see docs/learning.md",
                step, self.patience, gap, self.ln_k, float(row.get("dino_logit_spread", float("nan"))))
        if self.fired is None and self.collapse_streak >= self.patience:
            self.fired = "collapsed"
            self.log.warning(
                "step %d: collapse — for %d steps every teacher target has picked at most 2 prototypes: the features "
                "carry no information about the image. Raise the teacher temperature or use Sinkhorn-Knopp centring "
                "(stage.centering=sinkhorn_knopp), lower the LR", step, self.patience)

    def summary(self) -> dict:
        """The verdict: ``learned`` (the DINO loss at least 0.05 below ln K over the last steps, no collapse), the
        averages it is based on, and why."""
        if not self.recent:
            return {}
        mean = lambda key: float(np.mean([r[key] for r in self.recent if key in r]))  # noqa: E731
        loss_gap = self.ln_k - mean("loss_dino_global")
        out = {"dino_loss_below_ln_k": loss_gap, "target_entropy_gap": mean("dino_target_gap"),
               "target_prototypes": mean("dino_target_prototypes"), "ln_k": self.ln_k}
        if self.fired is not None:
            out.update(learned=False, verdict=self.fired)
        elif loss_gap >= 0.05:
            out.update(learned=True, verdict="learning")
        elif self.seen < self.patience:
            out.update(learned=False, verdict="undecided: the run is shorter than train.learning_patience")
        else:
            out.update(learned=False, verdict="not learning: the DINO loss stays at ln K")
        return out


class DataWaitMonitor:
    """Warns once when the training loop waits on its data loader for more than `fraction` of the step time (over
    `window` steps, after `skip` warm-up steps), naming the remedies. The wait (``time_data`` in metrics.jsonl) is
    idle accelerator time only when something else produces the data: on a GPU, or with loader workers; a CPU run
    without workers augments in the loop itself, so it is not watched (`active` False)."""

    def __init__(self, fraction: float, num_workers: int, device: torch.device | str, cpus: int,
                 window: int = 20, skip: int = 3, logger: logging.Logger | None = None):
        self.fraction, self.num_workers, self.cpus = float(fraction), int(num_workers), int(cpus)
        self.window, self.skip = int(window), int(skip)
        self.active = self.fraction > 0 and (torch.device(device).type != "cpu" or self.num_workers > 0)
        self.log = logger or logging.getLogger("geodino")
        self.waits: deque[tuple[float, float]] = deque(maxlen=self.window)  # (time_data, time_step) per step
        self.fired = False
        self.seen = 0

    def __call__(self, step: int, row: dict) -> None:
        if not self.active or "time_data" not in row:
            return
        self.seen += 1
        if self.seen <= self.skip:  # worker start-up and the first batches' prefetch
            return
        self.waits.append((float(row["time_data"]), float(row["time_step"])))
        if self.fired or len(self.waits) < self.window:
            return
        wait, total, share = self._share()
        if share > self.fraction:
            self.fired = True
            self.log.warning(
                "step %d: the trainer waited on data for %.0f%% of each step over the last %d steps (%.3f s of %.3f s): "
                "raise train.num_workers (now %d; %d cores here), train from a chip store (geodino curate action=chip, "
                "then data=chips data.paths=[<store>]), or multi-crop on the GPU (data.augment_on=gpu); "
                "train.data_wait_warn=0 silences this", step, 100 * share, self.window, wait / self.window,
                total / self.window, self.num_workers, self.cpus)

    def _share(self) -> tuple[float, float, float]:
        """(data wait, step time, their ratio) summed over the window."""
        wait, total = sum(w for w, _ in self.waits), sum(t for _, t in self.waits)
        return wait, total, wait / max(total, 1e-9)

    def summary(self) -> dict:
        if not self.waits:
            return {}
        return {"data_wait_share": self._share()[2], "warned": self.fired}
