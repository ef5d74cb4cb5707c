"""Multi-student distillation: the meta-architecture (dinov3_spec.md §7; reference
`dinov3/train/multidist_meta_arch.py`). The stage that builds it from the config is
geodino.train.stages.distill.

`DistillMetaArch` holds

- ONE frozen teacher: an EMA teacher backbone with its DINO and iBOT heads, in eval mode, without gradients. Its
  forward runs once per step (`teacher_forward_count`) and its Sinkhorn-Knopp targets serve every student — the
  reference's "one teacher pass serves every student";
- per student (`students.<name>`): a backbone, a DINO head and an iBOT head with the *teacher's* number of
  prototypes K (the student heads are trained, as in the reference) and an EMA copy (`students_ema.<name>`,
  the reference's `model_ema`, which is what the reference dumps for evaluation).

Losses per student: the pretraining loss assembly (`geodino.train.ssl.SSLLosses.compute_losses`, as the
reference's distillation reuses its `compute_losses`), summed over students:

- DINO local and global (diagonal ignored) against the teacher's Sinkhorn-Knopp targets of the two global
  crops, with the same weights as pretraining, including `stage.dino.local_loss_weight`;
- KoLeo on the student's pre-head class tokens of the two global crops;
- iBOT: as in the reference, the student's global crops are NOT masked during distillation, so the iBOT term
  is a patch-level distillation at the positions the collate step draws (`mask_indices_list`, weights
  `masks_weight`); the teacher's patch tokens at those positions go through its iBOT head. This is why a
  ConvNeXt student (no mask token) needs no special masking. When a student's token grid differs from the
  teacher's (ConvNeXt: stride 32 against the ViT's 16), its patch-token map is resized bilinearly
  (antialiased when shrinking) onto the teacher's grid before the positions are picked
  (geodino.train.monitors.resize_patch_tokens). (The reference meant to shrink the teacher's crops by
  `teacher_to_student_resolution_scale` instead, but that code path never runs — spec §7 pitfall.)
- No Gram term.

Trainer interface (geodino.train.loop): `student_modules()` returns every student's modules as
`backbone/<student>`, `dino_head/<student>`, `ibot_head/<student>` (clipped separately); the parameter groups
follow each backbone's own protocol (layer-wise decay for a ViT, none for a ConvNeXt, as the reference).
`on_checkpoint(run_dir, step)` writes every student standalone to `<run_dir>/students/<name>.pt` (official keys +
contract; `geodino.models.load_backbone(path)` reads it), the EMA copy (`export="ema"`, the reference's choice)
or the raw student. `forward_backward` reports `loss_<term>/<student>` and `loss/<student>` besides the total
`loss`, plus per-student collapse statistics and the agreement of the student's DINO prototype with the
teacher's target.

A student may see a subset of the teacher's bands (`band_indices`): its inputs are those channels of the
teacher's normalised crops.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geodino.checkpoint import backbone_payload, save_atomic
from geodino.errors import GeodinoError
from geodino.models.heads import DINOHead
from geodino.models.weights import official_state_dict
from geodino.train.distributed import ema_update_
from geodino.train.monitors import collapse_monitor, resize_patch_tokens
from geodino.train.ssl import SSLLosses, teacher_forward

log = logging.getLogger("geodino")

# ------------------------------------------------------------------------------------------------
# The meta-architecture
# ------------------------------------------------------------------------------------------------

def _head(embed_dim: int, n_prototypes: int, cfg) -> DINOHead:
    head = DINOHead(in_dim=embed_dim, out_dim=int(n_prototypes), hidden_dim=int(cfg.head_hidden_dim),
                    bottleneck_dim=int(cfg.head_bottleneck_dim), nlayers=int(cfg.head_nlayers))
    head.init_weights()
    return head


class DistillMetaArch(SSLLosses, nn.Module):
    """One frozen teacher, several students (see the module docstring)."""

    def __init__(self, teacher: nn.ModuleDict, students: dict[str, nn.Module], stage_cfg,
                 band_indices: dict[str, list[int] | None] | None = None, process_group=None,
                 export: str = "ema", student_extra: dict | None = None):
        super().__init__()
        if not students:
            raise GeodinoError("DistillMetaArch needs at least one student")
        centering = str(stage_cfg.get("centering", "sinkhorn_knopp"))
        if centering != "sinkhorn_knopp":
            raise GeodinoError(f"stage=distill uses Sinkhorn-Knopp teacher targets (the reference's only choice), "
                               f"got stage.centering={centering}")
        if export not in ("ema", "student"):
            raise GeodinoError(f"stage.export must be ema or student, got '{export}'")
        self.teacher = teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        k_dino = int(teacher.dino_head.last_layer.out_features)
        k_ibot = int(teacher.ibot_head.last_layer.out_features)
        self.students = nn.ModuleDict({
            name: nn.ModuleDict({
                "backbone": bb,
                "dino_head": _head(int(bb.embed_dim), k_dino, stage_cfg.dino),
                "ibot_head": _head(int(bb.embed_dim), k_ibot, stage_cfg.ibot),
            })
            for name, bb in students.items()
        })
        self.students_ema = copy.deepcopy(self.students)
        for p in self.students_ema.parameters():
            p.requires_grad_(False)
        self.band_indices = {name: (None if band_indices is None else band_indices.get(name)) for name in students}
        self.init_losses(stage_cfg, k_dino, k_ibot, process_group)
        self.export = export
        self.student_extra = dict(student_extra or {})
        self.teacher_forward_count = 0  # one teacher pass per step, whatever the number of students

    # the frozen models never train: no dropout, no RoPE augmentation, no drop path
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        self.students_ema.eval()
        return self

    def student_modules(self) -> dict[str, nn.Module]:
        return {f"{part}/{name}": module for name, mods in self.students.items() for part, module in mods.items()}

    @torch.no_grad()
    def teacher_targets(self, global_crops: torch.Tensor, mask_indices: torch.Tensor, n_masked: torch.Tensor,
                        teacher_temp: float) -> dict[str, torch.Tensor]:
        """The one teacher pass of a step: unmasked global crops -> Sinkhorn-Knopp DINO / iBOT targets."""
        self.teacher_forward_count += 1
        out = teacher_forward(self.teacher, self.dino_loss, self.ibot_patch_loss, global_crops, mask_indices,
                              n_masked, teacher_temp, "sinkhorn_knopp")
        out["grid"] = int(round(math.sqrt(out["patches"].shape[1])))
        return out

    def _student_losses(self, name: str, batch: dict, teacher: dict) -> tuple[dict, dict, dict]:
        mods = self.students[name]
        idx = self.band_indices.get(name)
        global_crops = batch["collated_global_crops"]
        local_crops = batch["collated_local_crops"]
        if idx is not None:
            sel = torch.as_tensor(idx, device=global_crops.device)
            global_crops = global_crops.index_select(1, sel)
            local_crops = local_crops.index_select(1, sel) if local_crops.numel() else local_crops
        calls = self.student_calls
        inputs = [global_crops] + ([local_crops] if self.n_local > 0 else [])
        # distillation: the student's global crops are not masked (reference: masks=None)
        outs = calls.get(f"backbone/{name}", mods.backbone.forward_features)(inputs, [None] * len(inputs))
        s_global = outs[0]
        grid = teacher["grid"]
        s_patches = resize_patch_tokens(s_global["x_norm_patchtokens"], (grid, grid))
        n_img, n_tok, dim = s_patches.shape
        s_picked = s_patches.reshape(n_img * n_tok, dim).index_select(0, batch["mask_indices_list"])
        losses, weights, global_logits = self.compute_losses(
            calls.get(f"dino_head/{name}", mods.dino_head), calls.get(f"ibot_head/{name}", mods.ibot_head),
            s_global["x_norm_clstoken"], outs[1]["x_norm_clstoken"] if self.n_local > 0 else None, s_picked,
            batch, teacher)
        return losses, weights, {"cls": s_global["x_norm_clstoken"], "patches": s_global["x_norm_patchtokens"],
                                 "dino_global_logits": global_logits}

    def forward_backward(self, batch: dict[str, Any], teacher_temp: float,
                         loss_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
        """One teacher pass, then every student's forward, losses and backward (one backward per student,
        so only one student's activations are alive at a time); returns (total loss, stats)."""
        t0 = time.perf_counter()
        teacher = self.teacher_targets(batch["collated_global_crops"], batch["mask_indices_list"],
                                       batch["n_masked_patches"], teacher_temp)
        t1 = time.perf_counter()
        stats: dict[str, float] = {"time_teacher": t1 - t0}
        total = torch.zeros((), device=batch["collated_global_crops"].device)
        for name in self.students:
            ts = time.perf_counter()
            losses, weights, out = self._student_losses(name, batch, teacher)
            student_total = sum(weights[k] * v for k, v in losses.items())
            (student_total * loss_scale).backward()
            total = total + student_total.detach()
            for k, v in losses.items():
                stats[f"loss_{k}/{name}"] = float(v.detach())
            stats[f"loss/{name}"] = float(student_total.detach())
            stats[f"time_student/{name}"] = time.perf_counter() - ts
            stats.update(self.monitor(name, out, teacher))
        stats["loss"] = float(total)
        t_mon = collapse_monitor(teacher["cls"], teacher["patches"])
        stats.update({f"teacher_{k}": v for k, v in t_mon.items()})
        stats["cls_std"] = min(stats[f"cls_std/{n}"] for n in self.students)  # the progress bar's collapse figure
        return total, stats

    @torch.no_grad()
    def monitor(self, name: str, student_out: dict, teacher: dict) -> dict[str, float]:
        """Per student: class-token std and patch effective rank (collapse), and `proto_agreement`, the share
        of global crops whose DINO-head argmax equals the argmax of the teacher's target."""
        out = {f"{k}/{name}": v for k, v in collapse_monitor(student_out["cls"], student_out["patches"]).items()}
        s = student_out["dino_global_logits"].argmax(-1)
        t = teacher["dino_probs"].argmax(-1)
        out[f"proto_agreement/{name}"] = float((s == t).float().mean())
        return out

    @torch.no_grad()
    def update_ema(self, momentum: float) -> None:
        """students_ema <- m * students_ema + (1 - m) * students, parameters only (reference `update_ema`)."""
        ema_update_(self.students_ema.parameters(), self.students.parameters(), momentum)

    def export_backbone(self, name: str, which: str | None = None) -> nn.Module:
        which = which or self.export
        if which not in ("ema", "student"):
            raise GeodinoError(f"stage.export must be ema or student, got '{which}'")
        return (self.students_ema if which == "ema" else self.students)[name].backbone

    def save_students(self, run_dir: Path, step: int) -> list[Path]:
        """Every student standalone to ``<run_dir>/students/<name>.pt`` (official keys + contract)."""
        out = []
        for name in self.students:
            backbone = self.export_backbone(name)
            payload = backbone_payload(official_state_dict(backbone), backbone.geodino_contract, weights=self.export,
                                       step=int(step), **self.student_extra)
            out.append(save_atomic(payload, Path(run_dir) / "students" / f"{name}.pt"))
        return out

    def on_checkpoint(self, run_dir: Path, step: int) -> None:
        """Trainer hook after every checkpoint (main rank)."""
        self.save_students(run_dir, step)
