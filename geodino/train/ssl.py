"""The SSL meta-architecture of DINOv3 pretraining (dinov3_spec.md §3, §4, §6; reference
`dinov3/train/ssl_meta_arch.py`).

A student (backbone + separate DINO and iBOT heads) and an EMA teacher of the same shape. One
`forward_backward` call does what the reference's does:

1. teacher forward (eval mode, no grad) on the two unmasked global crops; DINO head on the class
   tokens, iBOT head on the patch tokens at the student's masked positions; Sinkhorn-Knopp targets
   (or softmax centring);
2. student forward of `[global_crops (masked), local_crops]` in one list call (per-block RoPE draws);
3. losses: DINO local (weight n_g·n_l / total), DINO global with the diagonal ignored
   (n_g(n_g−1) / total), KoLeo on the pre-head global class tokens of each crop (×0.1, summed over
   crops), iBOT on the masked patches; optionally Gram anchoring (added by geodino.train.gram);
4. backward of the weighted sum.

`update_ema(m)` moves every teacher parameter towards the student's (buffers are not averaged).
Each step also reports the teacher's collapse statistics (geodino.train.monitors.collapse_monitor).

The loss assembly (`SSLLosses.compute_losses`) is shared with multi-student distillation
(geodino.train.distill), as the reference's distillation meta-architecture reuses its `compute_losses`.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from geodino.losses import DINOLoss, iBOTPatchLoss, koleo_loss, koleo_loss_distributed
from geodino.models.heads import DINOHead
from geodino.train.distributed import ema_update_, reshard
from geodino.train.monitors import collapse_monitor


def _head(embed_dim: int, cfg) -> DINOHead:
    return DINOHead(
        in_dim=embed_dim,
        out_dim=int(cfg.head_n_prototypes),
        hidden_dim=int(cfg.head_hidden_dim),
        bottleneck_dim=int(cfg.head_bottleneck_dim),
        nlayers=int(cfg.head_nlayers),
    )


@torch.no_grad()
def teacher_forward(teacher: nn.ModuleDict, dino_loss, ibot_patch_loss, global_crops: torch.Tensor,
                    mask_indices: torch.Tensor, n_masked: torch.Tensor, teacher_temp: float,
                    centering: str = "sinkhorn_knopp") -> dict[str, torch.Tensor]:
    """The teacher pass of a step (shared by pretraining and distillation): unmasked global crops ->
    class and patch tokens, DINO targets on the class tokens and iBOT targets on the patches at the
    student's masked positions (Sinkhorn-Knopp, or softmax centring)."""
    out = teacher.backbone.forward_features(global_crops)
    cls = out["x_norm_clstoken"]
    patches = out["x_norm_patchtokens"]
    n_img, n_tok, dim = patches.shape
    dino_logits = teacher.dino_head(cls)
    masked_patches = patches.reshape(n_img * n_tok, dim).index_select(0, mask_indices)
    ibot_logits = teacher.ibot_head(masked_patches)
    reshard(teacher.values())  # FSDP2: an inference-only root keeps its gathered params otherwise
    if centering == "sinkhorn_knopp":
        dino_probs = dino_loss.sinkhorn_knopp_teacher(dino_logits, teacher_temp)
        ibot_probs = ibot_patch_loss.sinkhorn_knopp_teacher(ibot_logits, teacher_temp, n_masked_patches_tensor=n_masked)
    else:
        dino_probs = dino_loss.softmax_center_teacher(dino_logits, teacher_temp)
        ibot_probs = ibot_patch_loss.softmax_center_teacher(ibot_logits.unsqueeze(0), teacher_temp).squeeze(0)
        # the reference's order: centre with the running centre, then start its EMA update from this batch
        # (applied by the next softmax_center_teacher call); without it the centre stays 0 = no centring
        dino_loss.update_center(dino_logits)
        ibot_patch_loss.update_center(ibot_logits)
    return {"cls": cls, "patches": patches, "dino_logits": dino_logits, "dino_probs": dino_probs,
            "ibot_probs": ibot_probs}


@torch.no_grad()
def target_statistics(teacher: dict, teacher_temp: float) -> dict[str, float]:
    """Whether the teacher gives the student anything to learn (geodino.train.monitors.LearningMonitor):

    - ``dino_target_gap``: ln K − the mean entropy of the DINO targets (0: every target uniform, nothing to learn);
    - ``dino_logit_spread``: the spread of the teacher's DINO logits across the batch over the temperature
      (below ~0.2 Sinkhorn-Knopp returns near-uniform targets);
    - ``dino_target_prototypes``: distinct argmax prototypes among the targets (1 or 2 with a falling loss:
      collapse)."""
    q = teacher["dino_probs"].float()
    k = q.shape[-1]
    entropy = float(-(q * q.clamp_min(1e-30).log()).sum(-1).mean())
    logits = teacher["dino_logits"].float()
    spread = float(logits.std(0).mean()) / float(teacher_temp) if logits.shape[0] > 1 else 0.0
    return {"dino_target_gap": math.log(k) - entropy, "dino_logit_spread": spread,
            "dino_target_prototypes": float(q.argmax(-1).unique().numel())}


class SSLLosses:
    """The loss assembly of every DINO-style meta-architecture (the reference's ``compute_losses``, which its
    multi-distillation meta-architecture reuses): DINO local and global on the class tokens against the
    teacher's targets of the two global crops, KoLeo on the global class tokens, iBOT on the patch tokens at
    the masked positions. Pretraining, Gram anchoring, high-resolution adaptation and distillation all call
    `compute_losses`; `init_losses` creates the loss modules (their centre buffers are in the checkpoints).

    Weights (dinov3_spec.md §3.5): with n_g = 2 global and n_l local crops and G = n_g(n_g−1) global pairs (n_g²
    when ``dino.global_ignore_diagonal`` is false), DINO local is
    ``dino.loss_weight · n_g·n_l / (n_g·n_l + G) · dino.local_loss_weight``, DINO global
    ``dino.loss_weight · G / (n_g·n_l + G)``, KoLeo ``dino.koleo_loss_weight`` times the sum over the two global
    crops, iBOT ``ibot.loss_weight``. Every term is computed even at weight 0, as the reference does.
    """

    def init_losses(self, stage_cfg, k_dino: int, k_ibot: int, process_group=None) -> None:
        self.cfg = stage_cfg
        self.dino_loss = DINOLoss(int(k_dino), process_group=process_group)
        self.ibot_patch_loss = iBOTPatchLoss(int(k_ibot), process_group=process_group)
        self.n_local = int(stage_cfg.crops.local_crops_number)
        n_g = 2
        # reference `compute_losses`: n_g(n_g-1) global pairs with the diagonal ignored, n_g² without
        self.global_terms = n_g * (n_g - 1) if bool(stage_cfg.dino.get("global_ignore_diagonal", True)) else n_g**2
        self.local_terms = n_g * self.n_local
        self.process_group = process_group
        # Data parallel (geodino.train.distributed): under DDP `student_calls` maps a student module name to its
        # DDP wrapper (a plain dict, so the wrappers are not registered and state-dict keys do not change).
        self.student_calls: dict[str, nn.Module] = {}

    def _world_size(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.process_group)
        return 1

    def compute_losses(self, dino_head, ibot_head, global_cls: torch.Tensor, local_cls: torch.Tensor | None,
                       masked_patches: torch.Tensor, batch: dict, teacher: dict
                       ) -> tuple[dict[str, torch.Tensor], dict[str, float], torch.Tensor]:
        """(losses, weights, DINO logits of the global crops) of one student.

        `global_cls` [2B, D] (crop-major), `local_cls` [n_l·B, D] or None, `masked_patches` [n_masked, D]: the
        student's patch tokens at ``batch["mask_indices_list"]``; `teacher` holds ``dino_probs`` / ``ibot_probs``."""
        n_global_imgs = global_cls.shape[0]
        batch_size = n_global_imgs // 2
        # One DINO-head call on global + local class tokens, like the reference (cheaper than two).
        cls_all = global_cls if local_cls is None else torch.cat([global_cls, local_cls])
        dino_logits = dino_head(cls_all)
        ibot_logits = ibot_head(masked_patches)
        teacher_probs = teacher["dino_probs"].view(2, batch_size, -1)
        losses: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        dino_w = float(self.cfg.dino.loss_weight)
        total_terms = self.global_terms + self.local_terms
        if local_cls is not None:
            s_local_logits = dino_logits[n_global_imgs:].view(self.n_local, batch_size, -1)
            losses["dino_local"] = self.dino_loss(s_local_logits, teacher_probs, ignore_diagonal=False)
            # reference `w_local`: 1 in pretraining, 0.5 in Gram anchoring and high-res adaptation
            w_local = float(self.cfg.dino.get("local_loss_weight", 1.0))
            weights["dino_local"] = dino_w * self.local_terms / total_terms * w_local
        s_global_logits = dino_logits[:n_global_imgs].view(2, batch_size, -1)
        losses["dino_global"] = self.dino_loss(
            s_global_logits, teacher_probs, ignore_diagonal=bool(self.cfg.dino.get("global_ignore_diagonal", True))
        )
        weights["dino_global"] = dino_w * self.global_terms / total_terms
        koleo_w = float(self.cfg.dino.get("koleo_loss_weight", 0.0))
        world_size = self._world_size()
        if koleo_w > 0 or batch_size >= 2:  # the reference computes (and reports) KoLeo whatever its weight
            # dino.koleo_distributed (reference `koleo_loss_distributed`, off by default): neighbours searched in
            # groups of the global batch (dino.koleo_distributed_loss_group_size, null = all); else per rank
            if world_size > 1 and bool(self.cfg.dino.get("koleo_distributed", False)):
                group_size = self.cfg.dino.get("koleo_distributed_loss_group_size", None)
                losses["koleo"] = sum(
                    koleo_loss_distributed(c, group_size=None if group_size is None else int(group_size),
                                           process_group=self.process_group)
                    for c in global_cls.chunk(2)
                ) / 2
            else:
                losses["koleo"] = sum(koleo_loss(c) for c in global_cls.chunk(2)) / 2
            weights["koleo"] = koleo_w * 2
        # As the reference, the iBOT term is always computed and added (× ibot.loss_weight), also with weight 0
        # or no masked patch (an empty term is 0): the iBOT head then gets zero gradients, not none, so AdamW still
        # decays its weights, and under DDP every rank's iBOT head takes part in every backward.
        losses["ibot"] = self.ibot_patch_loss(
            ibot_logits, teacher["ibot_probs"], batch["collated_masks"],
            n_masked_patches=int(batch["mask_indices_list"].shape[0]), masks_weight=batch["masks_weight"])
        weights["ibot"] = float(self.cfg.ibot.loss_weight)
        return losses, weights, dino_logits[:n_global_imgs]


class SSLMetaArch(SSLLosses, nn.Module):
    """Student + EMA teacher with DINO / iBOT heads and the DINOv3 losses."""

    def __init__(self, backbone: nn.Module, stage_cfg, process_group=None):
        super().__init__()
        embed_dim = int(backbone.embed_dim)
        self.embed_dim = embed_dim
        self.student = nn.ModuleDict(
            {"backbone": backbone, "dino_head": _head(embed_dim, stage_cfg.dino), "ibot_head": _head(embed_dim, stage_cfg.ibot)}
        )
        self.student.dino_head.init_weights()
        self.student.ibot_head.init_weights()
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.init_losses(stage_cfg, stage_cfg.dino.head_n_prototypes, stage_cfg.ibot.head_n_prototypes, process_group)
        self.centering = str(stage_cfg.get("centering", "sinkhorn_knopp"))
        if self.centering not in ("sinkhorn_knopp", "softmax"):
            raise ValueError(f"stage.centering must be sinkhorn_knopp or softmax, got '{self.centering}'")
        self.teacher_forward_count = 0  # asserted by tests: one teacher pass per step

    # The teacher never trains: no dropout, no RoPE augmentation, no local_cls_norm (spec §1.4).
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_targets(self, global_crops: torch.Tensor, mask_indices: torch.Tensor, n_masked: torch.Tensor,
                        teacher_temp: float) -> dict[str, torch.Tensor]:
        self.teacher_forward_count += 1
        return teacher_forward(self.teacher, self.dino_loss, self.ibot_patch_loss, global_crops, mask_indices,
                               n_masked, teacher_temp, self.centering)

    def forward_backward(self, batch: dict[str, Any], teacher_temp: float, extra_losses=None,
                         loss_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
        """One step's forward and backward; returns (total loss, per-term values)."""
        global_crops = batch["collated_global_crops"]
        mask_indices = batch["mask_indices_list"]

        t0 = time.perf_counter()
        teacher = self.teacher_targets(global_crops, mask_indices, batch["n_masked_patches"], teacher_temp)
        t1 = time.perf_counter()

        inputs, input_masks = [global_crops], [batch["collated_masks"]]
        if self.n_local > 0:
            inputs.append(batch["collated_local_crops"])
            input_masks.append(None)
        calls = self.student_calls
        outs = calls.get("backbone", self.student.backbone.forward_features)(inputs, input_masks)
        s_global = outs[0]
        s_patches = s_global["x_norm_patchtokens"]
        n_img, n_tok, dim = s_patches.shape
        s_masked = s_patches.reshape(n_img * n_tok, dim).index_select(0, mask_indices)
        losses, weights, _ = self.compute_losses(
            calls.get("dino_head", self.student.dino_head), calls.get("ibot_head", self.student.ibot_head),
            s_global["x_norm_clstoken"], outs[1]["x_norm_clstoken"] if self.n_local > 0 else None, s_masked,
            batch, teacher)
        if extra_losses is not None:
            for name, (value, weight) in extra_losses(batch=batch, student=s_global, teacher=teacher).items():
                losses[name], weights[name] = value, weight

        total = sum(weights[k] * v for k, v in losses.items())
        t2 = time.perf_counter()
        (total * loss_scale).backward()
        t3 = time.perf_counter()
        stats = {f"loss_{k}": float(v.detach()) for k, v in losses.items()}
        stats["loss"] = float(total.detach())
        stats.update(time_teacher=t1 - t0, time_student_forward=t2 - t1, time_backward=t3 - t2)
        stats.update(collapse_monitor(teacher["cls"], teacher["patches"]))
        stats.update(target_statistics(teacher, teacher_temp))
        return total.detach(), stats

    @torch.no_grad()
    def update_ema(self, momentum: float) -> None:
        ema_update_(self.teacher.parameters(), self.student.parameters(), momentum)

    def student_modules(self) -> dict[str, nn.Module]:
        return dict(self.student.items())
