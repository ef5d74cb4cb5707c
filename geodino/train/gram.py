"""Gram anchoring and high-resolution adaptation (dinov3_spec.md §3.4, §5 table, §6 "How the stages
chain"; reference `ssl_meta_arch.get_gram_teacher_output`, `dinov3_vit7b16_gram_anchor.yaml`,
`dinov3_vit7b16_high_res_adapt.yaml`).

`GramMetaArch` is the pretraining meta-architecture plus a frozen *Gram teacher*: a third backbone in
eval mode that sees the same region as the student's global crops at a higher resolution
(`gram_teacher_crops`). Its patch tokens are bicubic-resized onto the student's patch grid, and the
Gram loss (MSE between the patch-similarity matrices of the student's masked global crops and the
Gram teacher) anchors the student's dense features. The Gram teacher is refreshed from the EMA
teacher after step `it` when `it + 1 >= it_first_update` and `(it + 1) % update_frequency == 0`, at most
`max_updates` times (reference: 1.01M, 1.02M, 1.03M), then stays frozen.

`MultiResolutionDataset` draws one (global, local, Gram-teacher) crop-size setting per *global batch*
from configured probabilities (the reference's homogeneous batches for high-res adaptation); the
draw depends only on (seed, batch index), so every rank and every resumed run agrees.
"""

from __future__ import annotations

import copy
import logging
import random
from typing import Any, Sequence

import torch
from torch import nn

from geodino.losses import GramLoss, resize_gram_teacher_tokens
from geodino.train.monitors import gram_agreement
from geodino.train.ssl import SSLMetaArch

log = logging.getLogger("geodino")


class GramMetaArch(SSLMetaArch):
    def __init__(self, backbone: nn.Module, stage_cfg, gram_teacher: nn.Module, process_group=None):
        super().__init__(backbone, stage_cfg, process_group=process_group)
        g = stage_cfg.gram
        self.gram_teacher = gram_teacher
        for p in self.gram_teacher.parameters():
            p.requires_grad_(False)
        # The reference's keys (ssl_meta_arch.py): gram.normalized (geodino's earlier name apply_norm is still read),
        # img_level, remove_neg, remove_only_teacher_neg, tokens_used, global_teacher_resize_method / _antialias.
        normalized = g.get("normalized", g.get("apply_norm", True))
        if bool(g.get("remove_neg", False)) and bool(g.get("remove_only_teacher_neg", False)):
            raise ValueError("stage.gram.remove_neg and remove_only_teacher_neg exclude each other (as in the reference)")
        self.gram_loss = GramLoss(apply_norm=bool(normalized), img_level=bool(g.get("img_level", True)),
                                  remove_neg=bool(g.get("remove_neg", False)),
                                  remove_only_teacher_neg=bool(g.get("remove_only_teacher_neg", False)))
        self.tokens_used = str(g.get("tokens_used", "all"))
        if self.tokens_used not in ("all", "masked", "unmasked"):
            raise ValueError(f"stage.gram.tokens_used must be all, masked or unmasked, got '{self.tokens_used}'")
        if self.tokens_used != "all" and self.gram_loss.img_level:
            raise ValueError("stage.gram.tokens_used masked / unmasked needs gram.img_level false (as the reference)")
        self.resize_method = str(g.get("global_teacher_resize_method", "bicubic"))
        self.resize_antialias = bool(g.get("global_teacher_resize_antialias", False))
        self.gram_weight = float(g.loss_weight) if bool(g.get("use_loss", True)) else 0.0
        self.rep_update = bool(g.get("rep_update", False))
        self.update_frequency = int(g.get("update_frequency", 10000))
        self.it_first_update = int(g.get("it_first_update", 10000))
        self.max_updates = int(g.get("max_updates", 3))
        self.register_buffer("gram_updates", torch.zeros((), dtype=torch.long))  # in checkpoints: resume-safe
        self.gram_teacher_forward_count = 0
        self._last_agreement = float("nan")

    def train(self, mode: bool = True):
        super().train(mode)
        self.gram_teacher.eval()
        return self

    def _gram_term(self, batch, student, teacher):
        crops = batch.get("collated_gram_teacher_crops")
        if crops is None:
            raise ValueError("stage gram needs gram teacher crops: set stage.crops.gram_teacher_crops_size")
        with torch.no_grad():
            self.gram_teacher_forward_count += 1
            target = self.gram_teacher.forward_features(crops)["x_norm_patchtokens"]
        s_tokens = student["x_norm_patchtokens"]
        patch = self.student.backbone.token_stride
        sg = (batch["collated_global_crops"].shape[-2] // patch, batch["collated_global_crops"].shape[-1] // patch)
        tg = (crops.shape[-2] // patch, crops.shape[-1] // patch)
        target = resize_gram_teacher_tokens(target, sg, tg, method=self.resize_method, antialias=self.resize_antialias)
        self._last_agreement = gram_agreement(s_tokens.detach(), target)
        if self.tokens_used != "all":  # reference: the masked (or unmasked) patches of every image, as (n, D) rows
            keep = batch["collated_masks"].bool()
            keep = keep if self.tokens_used == "masked" else ~keep
            s_tokens, target = s_tokens[keep], target[keep]
        return {"gram": (self.gram_loss(s_tokens, target), self.gram_weight)}

    def forward_backward(self, batch: dict[str, Any], teacher_temp: float, extra_losses=None, loss_scale: float = 1.0):
        total, stats = super().forward_backward(batch, teacher_temp, extra_losses=self._gram_term, loss_scale=loss_scale)
        stats["gram_agreement"] = self._last_agreement
        stats["gram_weight"] = self.gram_weight
        stats["global_crops_size"] = int(batch["collated_global_crops"].shape[-1])
        stats["local_crops_size"] = int(batch["collated_local_crops"].shape[-1]) if batch["collated_local_crops"].numel() else 0
        stats["gram_crops_size"] = int(batch["collated_gram_teacher_crops"].shape[-1])
        return total, stats

    @torch.no_grad()
    def after_step(self, step: int) -> dict:
        it = step + 1
        if (self.rep_update and it >= self.it_first_update and it % self.update_frequency == 0
                and int(self.gram_updates) < self.max_updates):
            self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())
            self.gram_updates += 1
            log.info("Gram teacher refreshed from the EMA teacher after step %d (%d/%d)", step, int(self.gram_updates),
                     self.max_updates)
        return {"gram_updates": int(self.gram_updates)}


class MultiResolutionDataset(torch.utils.data.Dataset):
    """Sample i of global batch b = i // samples_per_batch uses the crop setting drawn for b."""

    def __init__(self, source, augments: Sequence, probabilities: Sequence[float], samples_per_batch: int, seed: int = 0):
        if len(augments) != len(probabilities):
            raise ValueError(f"{len(augments)} crop settings but {len(probabilities)} probabilities")
        if any(p < 0 for p in probabilities) or sum(probabilities) <= 0:
            raise ValueError(f"probabilities {list(probabilities)} must be non-negative with a positive sum")
        self.source, self.augments = source, list(augments)
        self.probabilities = [float(p) / sum(probabilities) for p in probabilities]
        self.samples_per_batch = int(samples_per_batch)
        self.seed = int(seed)

    def __len__(self):
        return 2**62

    def setting_for_batch(self, b: int) -> int:
        return random.Random(self.seed * 7919 + 104729 * int(b)).choices(range(len(self.augments)), self.probabilities)[0]

    def __getitem__(self, i: int):
        k = self.setting_for_batch(int(i) // self.samples_per_batch)
        g = torch.Generator().manual_seed((self.seed * 2_654_435_761 + int(i)) % (2**63 - 1))
        out = self.augments[k](self.source[i], generator=g)
        out["crop_setting"] = k
        return out


def copy_backbone(backbone: nn.Module) -> nn.Module:
    out = copy.deepcopy(backbone)
    for p in out.parameters():
        p.requires_grad_(False)
    return out.eval()
