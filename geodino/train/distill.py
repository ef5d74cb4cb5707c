"""Multi-student distillation (dinov3_spec.md §7; reference `dinov3/train/multidist_meta_arch.py`).

    geodino train stage=distill teacher=<pretrain / gram / highres run or checkpoint> students=[vit_tiny,convnext_tiny]

`DistillMetaArch` holds

- ONE frozen teacher: the EMA teacher backbone of the `teacher=` training checkpoint with its DINO and iBOT
  heads, in eval mode, without gradients. Its forward runs once per step (`teacher_forward_count`) and its
  Sinkhorn-Knopp targets serve every student — the reference's "one teacher pass serves every student";
- per student (`students.<name>`): a backbone, a DINO head and an iBOT head with the *teacher's* number of
  prototypes K (the student heads are trained, as in the reference) and an EMA copy (`students_ema.<name>`,
  the reference's `model_ema`, which is what the reference dumps for evaluation).

Losses per student (spec §3, §7 "Distillation behaviour"), summed over students:

- DINO local (weight n_g·n_l / total) and global (n_g(n_g−1) / total, diagonal ignored) against the
  teacher's Sinkhorn-Knopp targets of the two global crops;
- KoLeo (×0.1, summed over the two global crops) on the student's pre-head class tokens;
- iBOT: as in the reference, the student's global crops are NOT masked during distillation, so the iBOT term
  is a patch-level distillation at the positions the collate step draws (`mask_indices_list`, weights
  `masks_weight`); the teacher's patch tokens at those positions go through its iBOT head. This is why a
  ConvNeXt student (no mask token) needs no special masking. When a student's token grid differs from the
  teacher's (ConvNeXt: stride 32 against the ViT's 16), its patch-token map is resized bilinearly
  (antialiased when shrinking) onto the teacher's grid before the positions are picked — the same rule as
  `DinoConvNeXt.get_intermediate_layers(patch_size=16)`. (The reference meant to shrink the teacher's crops by
  `teacher_to_student_resolution_scale` instead, but that code path never runs — spec §7 pitfall.)
- No Gram term.

Trainer interface (geodino.train.loop): `student_modules()` returns every student's modules under names
that keep `param_groups` and the per-module gradient clipping right — `backbone/<student>` for a ViT
(layer-wise decay `optim.layerwise_decay`, `patch_embed_lr_mult`), `convnext/<student>` for a ConvNeXt
backbone (the name does not start with "backbone", so every parameter gets LR multiplier 1.0: the
reference's layer-wise decay of 1.0 for ConvNeXt, and ConvNeXt has no `patch_embed`), and
`dino_head/<student>`, `ibot_head/<student>`. `forward_backward` reports `loss_<term>/<student>` and
`loss/<student>` besides the total `loss`; `monitor` adds per-student collapse statistics and the agreement
of the student's DINO prototype with the teacher's target.

Bands: the teacher sees the data's bands, which must be the teacher's own (same names and order); its
normalisation is reused. A student may see a subset through `stage.band_mapping` — a list of teacher band
names (for every student) or `{student: [band names]}` — and its inputs are those channels of the teacher's
normalised crops. Anything else is a GeodinoError that names both band lists.

Outputs: each student is written standalone to `<run_dir>/students/<name>.pt` = {"backbone": official keys,
"contract": its contract (architecture, bands, the teacher's mean/std)} at every checkpoint and at the end;
`geodino.models.registry.load_backbone(path)` reads it. `stage.export` picks the EMA copy (default, as the
reference) or the raw student. The training checkpoint holds the teacher too (the reference drops
`teacher.*` from its checkpoints), so a run directory resumes on its own and `load_backbone(<run dir>)` gives
the teacher.

Distributed: under `torchrun` every rank holds every student and the teacher; each student module is its own
`DistributedDataParallel` (train.parallel=ddp only). The reference instead puts each student on its own
disjoint process subgroup (`multidistillation.students[].ranks_range`), shards the teacher over the world and
scatters the teacher's outputs to the subgroups; that layout is not implemented yet.

`teacher_agreement` is the "closer to the teacher" metric, computed in every run on `stage.agreement_images`
held-out chips (summary.json, at initialisation and at the end, for the student and its EMA):

- in the space student and teacher share — the teacher's K prototypes, which is what distillation aligns —
  `dino_top1` / `ibot_top1` (how often the student's top DINO / iBOT prototype for a chip / patch is the one
  the teacher's Sinkhorn-Knopp targets pick; chance 1/K) and `dino_ce` / `ibot_ce` (the cross-entropy to
  those targets: the training objective on unaugmented held-out chips);
- between the backbones, whose feature spaces have their own widths and bases: linear CKA of the class
  tokens (`cls_cka`) and of the patch tokens on the teacher's grid (`patch_cka`), and the overlap of 5-nearest
  neighbour sets of the class tokens (`cls_knn5`). With the near-random teachers a CPU can pretrain these
  start high (two random networks of one family agree on input statistics, CKA ~0.9) and do not rise in a
  short run; they are reported, not asserted.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from geodino.errors import GeodinoError
from geodino.losses import DINOLoss, iBOTPatchLoss, koleo_loss, koleo_loss_distributed
from geodino.models.heads import DINOHead
from geodino.train.loop import Trainer
from geodino.train.ssl import collapse_monitor, teacher_forward

log = logging.getLogger("geodino")

TEACHER_STAGES = ("pretrain", "gram", "highres")
HEAD_KEYS = ("head_n_prototypes", "head_hidden_dim", "head_bottleneck_dim", "head_nlayers")


# ------------------------------------------------------------------------------------------------
# Names, bands, teacher
# ------------------------------------------------------------------------------------------------

def _model_configs() -> dict[str, dict]:
    """configs/model/<stem>.yaml -> {"name": registry name, "kwargs": {...}}."""
    import yaml

    from geodino.cli import configs_dir

    out = {}
    for p in sorted((configs_dir() / "model").glob("*.yaml")):
        doc = yaml.safe_load(p.read_text()) or {}
        if doc.get("name"):
            out[p.stem] = {"name": str(doc["name"]), "kwargs": dict(doc.get("kwargs") or {})}
    return out


def resolve_students(students) -> dict[str, dict]:
    """`students=` entries -> {entry: {"name": registry name, "kwargs": constructor overrides}}.

    An entry is a `model=` config name (configs/model/*.yaml, e.g. vit_tiny -> geodino_vit_tiny,
    convnext_tiny -> dinov3_convnext_tiny) or a registry name (e.g. geodino_convnext_tiny)."""
    from geodino.models.registry import ARCHS

    if students is None:
        students = []
    if isinstance(students, str):
        students = [students]
    students = [str(s) for s in students]
    configs = _model_configs()
    choices = f"model configs: {', '.join(sorted(configs))}; registry names: {', '.join(sorted(ARCHS))}"
    if not students:
        raise GeodinoError(f"stage=distill needs at least one student: pass students=[name,...] ({choices})")
    out: dict[str, dict] = {}
    for s in students:
        if s in out:
            raise GeodinoError(f"student '{s}' is listed twice in students={students}")
        if "." in s or "/" in s or not s:
            raise GeodinoError(f"student name '{s}' must be a model config or registry name ({choices})")
        if s in configs:
            out[s] = configs[s]
        elif s in ARCHS:
            out[s] = {"name": s, "kwargs": {}}
        else:
            raise GeodinoError(f"unknown student '{s}'; choose {choices}")
    return out


def check_data_bands(data_name: str, data_bands: Sequence[str], teacher: str, teacher_bands: Sequence[str]) -> None:
    if list(data_bands) != list(teacher_bands):
        raise GeodinoError(
            f"data={data_name} has bands [{', '.join(data_bands)}] but teacher={teacher} was trained on "
            f"[{', '.join(teacher_bands)}]: the teacher must see its own bands; a student can use a subset of them "
            "through stage.band_mapping=[<teacher band names>]"
        )


def resolve_band_mapping(mapping, teacher_bands: Sequence[str], students: Sequence[str]) -> dict[str, list[int] | None]:
    """`stage.band_mapping` -> per student the teacher-band indices of its inputs (None: all teacher bands).

    `mapping`: None (every student sees the teacher's bands), a list of teacher band names (every student),
    or {student: list of names} (students not listed see the teacher's bands)."""
    teacher_bands = list(teacher_bands)
    if mapping is None:
        return {s: None for s in students}
    if OmegaConf.is_config(mapping):
        mapping = OmegaConf.to_container(mapping, resolve=True)
    if isinstance(mapping, dict):
        unknown = [k for k in mapping if k not in students]
        if unknown:
            raise GeodinoError(f"stage.band_mapping names students {unknown} that are not in students={list(students)}")
        per = {s: mapping.get(s) for s in students}
    elif isinstance(mapping, (list, tuple)):
        per = {s: list(mapping) for s in students}
    else:
        raise GeodinoError(f"stage.band_mapping must be a list of teacher band names or {{student: [names]}}, got {mapping!r}")
    out: dict[str, list[int] | None] = {}
    for s, names in per.items():
        if names is None:
            out[s] = None
            continue
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            raise GeodinoError(f"stage.band_mapping for student '{s}' must be a non-empty list of band names, got {names!r}")
        names = [str(n) for n in names]
        missing = [n for n in names if n not in teacher_bands]
        if missing:
            raise GeodinoError(
                f"stage.band_mapping for student '{s}' asks for bands [{', '.join(names)}] but the teacher's bands are "
                f"[{', '.join(teacher_bands)}] ({', '.join(missing)} missing)"
            )
        if len(set(names)) != len(names):
            raise GeodinoError(f"stage.band_mapping for student '{s}' repeats a band: [{', '.join(names)}]")
        idx = [teacher_bands.index(n) for n in names]
        out[s] = None if idx == list(range(len(teacher_bands))) else idx
    return out


def load_teacher_checkpoint(teacher) -> dict:
    """The `teacher=` training checkpoint, with clear errors for a missing or unsuitable one."""
    from geodino.train.checkpoint import load_checkpoint

    if not teacher:
        raise GeodinoError(
            f"stage=distill needs a teacher: pass teacher=<run directory or checkpoint> of a {' / '.join(TEACHER_STAGES)} run"
        )
    ckpt = load_checkpoint(teacher)
    models = ckpt.get("models") if isinstance(ckpt, dict) else None
    if (not isinstance(ckpt, dict) or ckpt.get("format") != "geodino-train-checkpoint" or "contract" not in ckpt
            or not isinstance(models, dict)):
        raise GeodinoError(
            f"teacher={teacher} is not a geodino training checkpoint; distillation needs the teacher's DINO and iBOT "
            f"heads, which only the checkpoint of a {' / '.join(TEACHER_STAGES)} run holds (a run directory or its "
            "checkpoints/step_*.pt)"
        )
    stage = ckpt.get("stage")
    if stage not in TEACHER_STAGES:
        raise GeodinoError(f"teacher={teacher} is a '{stage}' run; the teacher must be a {' / '.join(TEACHER_STAGES)} run")
    state = models.get("meta_arch", {})
    for part in ("backbone", "dino_head", "ibot_head"):
        if not any(k.startswith(f"teacher.{part}.") for k in state):
            raise GeodinoError(f"teacher={teacher} has no teacher {part} weights (keys teacher.{part}.*)")
    return ckpt


def teacher_head_cfg(ckpt: dict) -> dict[str, dict]:
    """The teacher's DINO / iBOT head sizes, read off its weights (K, bottleneck, hidden, layers)."""
    state = ckpt["models"]["meta_arch"]
    out = {}
    for head in ("dino", "ibot"):
        prefix = f"teacher.{head}_head."
        last = state[prefix + "last_layer.weight"]
        linears = sorted(int(k[len(prefix) + 4:].split(".")[0]) for k in state
                         if k.startswith(prefix + "mlp.") and k.endswith("weight") and k[len(prefix) + 4:][0].isdigit())
        if linears:
            hidden = int(state[f"{prefix}mlp.{linears[0]}.weight"].shape[0]) if len(linears) > 1 else int(last.shape[1])
            n_layers = len(linears)
        else:  # nlayers 1: mlp is a single Linear
            hidden, n_layers = int(last.shape[1]), 1
        out[head] = {"head_n_prototypes": int(last.shape[0]), "head_bottleneck_dim": int(last.shape[1]),
                     "head_hidden_dim": hidden, "head_nlayers": n_layers}
    return out


def teacher_from_checkpoint(ckpt: dict) -> nn.ModuleDict:
    """{backbone, dino_head, ibot_head} of the checkpoint's EMA teacher, frozen and in eval mode."""
    from geodino.models.registry import load_weights_into
    from geodino.train.run import _backbone_from_init

    backbone = _backbone_from_init(ckpt, "teacher")
    heads = teacher_head_cfg(ckpt)
    state = ckpt["models"]["meta_arch"]
    mods = {"backbone": backbone}
    for head in ("dino", "ibot"):
        h = heads[head]
        module = DINOHead(int(backbone.embed_dim), h["head_n_prototypes"], h["head_hidden_dim"],
                          h["head_bottleneck_dim"], h["head_nlayers"])
        prefix = f"teacher.{head}_head."
        load_weights_into(module, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                          source=f"the teacher {head} head of the checkpoint")
        mods[f"{head}_head"] = module
    teacher = nn.ModuleDict(mods)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def build_student(registry_name: str, kwargs: dict, teacher_contract: dict, band_indices: list[int] | None) -> nn.Module:
    """A randomly initialised student on the teacher's (or the mapped) bands, with its contract."""
    from geodino.models.registry import build_backbone, make_contract

    tb = list(teacher_contract["bands"])
    idx = list(range(len(tb))) if band_indices is None else list(band_indices)
    model = build_backbone(registry_name, in_chans=len(idx), **kwargs)
    base = model.geodino_contract
    model.geodino_contract = make_contract(
        base["name"], base["family"], base["kwargs"], bands=[tb[i] for i in idx],
        mean=[teacher_contract["mean"][i] for i in idx], std=[teacher_contract["std"][i] for i in idx],
        input_scale=teacher_contract.get("input_scale", base["input_scale"]),
    )
    return model


def _stride(backbone: nn.Module) -> int:
    """Input pixels per output token."""
    if hasattr(backbone, "downsample_layers"):  # ConvNeXt: stem 4, then three 2x downsamplers
        return 32
    return int(getattr(backbone, "patch_size", 16))


def _resize_tokens(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[n, h*w, D] on a square grid -> [n, size[0]*size[1], D] (bilinear, antialiased when shrinking)."""
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


# ------------------------------------------------------------------------------------------------
# The meta-architecture
# ------------------------------------------------------------------------------------------------

def _head(embed_dim: int, n_prototypes: int, cfg) -> DINOHead:
    head = DINOHead(in_dim=embed_dim, out_dim=int(n_prototypes), hidden_dim=int(cfg.head_hidden_dim),
                    bottleneck_dim=int(cfg.head_bottleneck_dim), nlayers=int(cfg.head_nlayers))
    head.init_weights()
    return head


class DistillMetaArch(nn.Module):
    """One frozen teacher, several students (see the module docstring)."""

    def __init__(self, teacher: nn.ModuleDict, students: dict[str, nn.Module], stage_cfg,
                 band_indices: dict[str, list[int] | None] | None = None, process_group=None):
        super().__init__()
        if not students:
            raise GeodinoError("DistillMetaArch needs at least one student")
        self.cfg = stage_cfg
        centering = str(stage_cfg.get("centering", "sinkhorn_knopp"))
        if centering != "sinkhorn_knopp":
            raise GeodinoError(f"stage=distill uses Sinkhorn-Knopp teacher targets (the reference's only choice), "
                               f"got stage.centering={centering}")
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
        self.dino_loss = DINOLoss(k_dino, process_group=process_group)
        self.ibot_patch_loss = iBOTPatchLoss(k_ibot, process_group=process_group)
        self.n_local = int(stage_cfg.crops.local_crops_number)
        n_g = 2
        self.global_terms = n_g * (n_g - 1)
        self.local_terms = n_g * self.n_local
        self.teacher_forward_count = 0  # one teacher pass per step, whatever the number of students
        self.process_group = process_group
        self.student_calls: dict[str, nn.Module] = {}  # module key -> DDP wrapper (see wrap_students)

    # the frozen models never train: no dropout, no RoPE augmentation, no drop path
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        self.students_ema.eval()
        return self

    def _world_size(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.process_group)
        return 1

    @staticmethod
    def module_key(part: str, student: str, backbone: nn.Module | None = None) -> str:
        if part == "backbone" and backbone is not None and hasattr(backbone, "downsample_layers"):
            return f"convnext/{student}"
        return f"{part}/{student}"

    def student_modules(self) -> dict[str, nn.Module]:
        out = {}
        for name, mods in self.students.items():
            for part, module in mods.items():
                out[self.module_key(part, name, module if part == "backbone" else None)] = module
        return out

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
        n_global_imgs = global_crops.shape[0]
        batch_size = n_global_imgs // 2
        calls = self.student_calls
        bb_key = self.module_key("backbone", name, mods.backbone)
        inputs = [global_crops] + ([local_crops] if self.n_local > 0 else [])
        # distillation: the student's global crops are not masked (reference: masks=None)
        outs = calls.get(bb_key, mods.backbone.forward_features)(inputs, [None] * len(inputs))
        s_global = outs[0]
        s_cls = s_global["x_norm_clstoken"]
        grid = teacher["grid"]
        s_patches = _resize_tokens(s_global["x_norm_patchtokens"], (grid, grid))
        n_img, n_tok, dim = s_patches.shape
        mask_indices = batch["mask_indices_list"]
        s_picked = s_patches.reshape(n_img * n_tok, dim).index_select(0, mask_indices)

        cls_all = s_cls if self.n_local == 0 else torch.cat([s_cls, outs[1]["x_norm_clstoken"]])
        dino_logits = calls.get(f"dino_head/{name}", mods.dino_head)(cls_all)
        ibot_logits = calls.get(f"ibot_head/{name}", mods.ibot_head)(s_picked)

        teacher_probs = teacher["dino_probs"].view(2, batch_size, -1)
        losses: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        dino_w = float(self.cfg.dino.loss_weight)
        total_terms = self.global_terms + self.local_terms
        if self.n_local > 0:
            s_local = dino_logits[n_global_imgs:].view(self.n_local, batch_size, -1)
            losses["dino_local"] = self.dino_loss(s_local, teacher_probs, ignore_diagonal=False)
            weights["dino_local"] = dino_w * self.local_terms / total_terms
        s_glob_logits = dino_logits[:n_global_imgs].view(2, batch_size, -1)
        losses["dino_global"] = self.dino_loss(
            s_glob_logits, teacher_probs, ignore_diagonal=bool(self.cfg.dino.get("global_ignore_diagonal", True)))
        weights["dino_global"] = dino_w * self.global_terms / total_terms
        koleo_w = float(self.cfg.dino.get("koleo_loss_weight", 0.0))
        world_size = self._world_size()
        if koleo_w > 0:
            if world_size > 1:
                group_size = self.cfg.dino.get("koleo_distributed_loss_group_size", None)
                losses["koleo"] = sum(
                    koleo_loss_distributed(c, group_size=None if group_size is None else int(group_size),
                                           process_group=self.process_group)
                    for c in s_cls.chunk(2)) / 2
            else:
                losses["koleo"] = sum(koleo_loss(c) for c in s_cls.chunk(2)) / 2
            weights["koleo"] = koleo_w * 2
        ibot_w = float(self.cfg.ibot.loss_weight)
        if ibot_w > 0 and (mask_indices.numel() > 0 or world_size > 1):
            losses["ibot"] = self.ibot_patch_loss(
                ibot_logits, teacher["ibot_probs"], batch["collated_masks"],
                n_masked_patches=int(batch["n_masked_patches"].sum()), masks_weight=batch["masks_weight"])
            weights["ibot"] = ibot_w
        return losses, weights, {"cls": s_cls, "patches": s_global["x_norm_patchtokens"],
                                 "dino_global_logits": dino_logits[:n_global_imgs]}

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
        with torch.no_grad():
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
        from geodino.train.distributed import ema_update_

        ema_update_(self.students_ema.parameters(), self.students.parameters(), momentum)

    def export_backbone(self, name: str, which: str = "ema") -> nn.Module:
        if which not in ("ema", "student"):
            raise GeodinoError(f"stage.export must be ema or student, got '{which}'")
        return (self.students_ema if which == "ema" else self.students)[name].backbone


# ------------------------------------------------------------------------------------------------
# The "closer to the teacher" metric
# ------------------------------------------------------------------------------------------------

def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between [n, d1] and [n, d2] features of the same n inputs:
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F); 1 = the same geometry up to rotation and scale."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    num = (y.T @ x).pow(2).sum()
    den = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return float(num / den.clamp_min(1e-30))


def _sinkhorn_local(logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp targets (spec §3.1) over these rows only: no process-group reduction, so the metric
    can run on one rank."""
    q = torch.exp((logits.double() - logits.double().max()) / temp).T  # [K, M]
    q /= q.sum()
    k, m = q.shape
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True) * k
        q /= q.sum(dim=0, keepdim=True) * m
    return (q * m).T.float()


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
    sp = _resize_tokens(s["x_norm_patchtokens"], (grid, grid))
    out = {"cls_cka": linear_cka(s["x_norm_clstoken"], t["x_norm_clstoken"]),
           "patch_cka": linear_cka(sp.reshape(-1, sp.shape[-1]), tp.reshape(-1, tp.shape[-1])),
           "cls_knn5": knn_overlap(s["x_norm_clstoken"], t["x_norm_clstoken"], 5)}
    if s_dino is not None and t_dino is not None:
        for name, sh, th, sf, tf in (("dino", s_dino, t_dino, s["x_norm_clstoken"], t["x_norm_clstoken"]),
                                     ("ibot", s_ibot, t_ibot, sp.reshape(-1, sp.shape[-1]), tp.reshape(-1, tp.shape[-1]))):
            q = _sinkhorn_local(th(tf).float(), teacher_temp)
            logp = F.log_softmax(sh(sf).float() / 0.1, dim=-1)
            out[f"{name}_ce"] = float(-(q * logp).sum(-1).mean())
            out[f"{name}_top1"] = float((logp.argmax(-1) == q.argmax(-1)).float().mean())
    for m, mode in was:
        m.train(mode)
    return out


def heldout_images(source, n: int, size: int, mean: Sequence[float], std: Sequence[float],
                   offset: int = 1_000_000_000) -> torch.Tensor:
    """n normalised images `source[offset + i]` resized to `size` (for a raster source: chips drawn from
    indices training never reaches)."""
    m = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
    imgs = []
    for i in range(n):
        img = source[offset + i].float()
        if img.shape[-2:] != (size, size):
            img = F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        imgs.append((img - m) / s)
    return torch.stack(imgs)


# ------------------------------------------------------------------------------------------------
# Trainer, DDP, saving
# ------------------------------------------------------------------------------------------------

def save_student(meta: DistillMetaArch, name: str, path: Path, which: str = "ema", extra: dict | None = None) -> Path:
    from geodino.models.registry import official_state_dict
    from geodino.train.checkpoint import save_atomic

    backbone = meta.export_backbone(name, which)
    obj = {"format": "geodino-backbone", "backbone": official_state_dict(backbone),
           "contract": copy.deepcopy(backbone.geodino_contract), "weights": which, **(extra or {})}
    return save_atomic(obj, path)


class DistillTrainer(Trainer):
    """The common trainer; each checkpoint also writes every student to `<run_dir>/students/<name>.pt`."""

    def __init__(self, *args, export: str = "ema", student_extra: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.export = export
        self.student_extra = dict(student_extra or {})

    def save_students(self, step: int) -> list[Path]:
        if not self.is_main:
            return []
        return [save_student(self.meta, name, self.run_dir / "students" / f"{name}.pt", self.export,
                             {**self.student_extra, "step": step})
                for name in self.meta.students]

    def save(self, next_step: int):
        path = super().save(next_step)
        self.save_students(next_step)
        return path


def wrap_students(meta: DistillMetaArch, mode: str, info):
    """One process: nothing to do. Under torchrun: every student module in its own DDP (all students on every
    rank; the reference's per-student process subgroups are not implemented)."""
    from geodino.train.distributed import DDPParallel, Parallel, _ForwardFeatures

    meta.to(info.device)
    if not info.distributed:
        return Parallel(info)
    if mode != "ddp":
        raise GeodinoError(f"stage=distill supports train.parallel=ddp only (got {mode}); every rank holds every "
                           "student and the teacher")
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    calls = {}
    for key, module in meta.student_modules().items():
        is_backbone = key.startswith(("backbone/", "convnext/"))
        unused = is_backbone and getattr(module, "local_cls_norm", None) is not None and meta.n_local == 0
        calls[key] = DDP(_ForwardFeatures(module) if is_backbone else module, device_ids=device_ids,
                         find_unused_parameters=unused, broadcast_buffers=False)
    meta.student_calls = calls
    with torch.no_grad():  # DDP broadcast the students from rank 0; their EMA copies must match too
        for tensor in list(meta.students_ema.parameters()) + list(meta.students_ema.buffers()):
            dist.broadcast(tensor, src=0)
    return DDPParallel(info)


# ------------------------------------------------------------------------------------------------
# `geodino train stage=distill`
# ------------------------------------------------------------------------------------------------

def run_distill(cfg, dist_info):
    from omegaconf import open_dict

    from geodino.data.multicrop import MultiCropAugmentation
    from geodino.data.sources import build_source
    from geodino.runs import default_run_dir, prepare_run_dir
    from geodino.train.checkpoint import latest_checkpoint
    from geodino.train.distributed import broadcast_object
    from geodino.train.loop import AugmentedDataset, IndexedBatches, TrainSettings, collate_for, seed_everything

    specs = resolve_students(cfg.get("students"))
    teacher_path = cfg.get("teacher")
    ckpt = load_teacher_checkpoint(teacher_path)
    tcontract = ckpt["contract"]
    mapping = resolve_band_mapping(cfg.stage.get("band_mapping"), tcontract["bands"], list(specs))
    export = str(cfg.stage.get("export", "ema"))
    if export not in ("ema", "student"):
        raise GeodinoError(f"stage.export must be ema or student, got '{export}'")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    # no band statistics: the teacher's normalisation is used
    info = build_source(cfg.data, seed=int(cfg.seed), progress=bool(cfg.progress), stats=False)
    check_data_bands(str(cfg.data.name), info.band_names, str(teacher_path), tcontract["bands"])
    info.mean, info.std = list(tcontract["mean"]), list(tcontract["std"])  # the teacher's normalisation
    heads = teacher_head_cfg(ckpt)
    with open_dict(cfg):  # the student heads have the teacher's number of prototypes
        for head in ("dino", "ibot"):
            k = heads[head]["head_n_prototypes"]
            if int(cfg.stage[head].head_n_prototypes) != k:
                log.info("stage.%s.head_n_prototypes=%s -> %d (the teacher's)", head, cfg.stage[head].head_n_prototypes, k)
            cfg.stage[head].head_n_prototypes = k

    device = dist_info.device
    is_main = dist_info.is_main
    seed_everything(int(cfg.seed))
    run_dir = Path(cfg.run_dir) if cfg.get("run_dir") else default_run_dir("train", "distill")
    resume_from = latest_checkpoint(run_dir / "checkpoints") if cfg.get("resume", True) else None
    run_dir, resume_from = broadcast_object((run_dir, resume_from))
    if is_main:
        prepare_run_dir(run_dir, cfg)

    teacher = teacher_from_checkpoint(ckpt)
    tpatch = _stride(teacher.backbone)  # input pixels per teacher token
    crops = cfg.stage.crops
    students = {name: build_student(spec["name"], spec["kwargs"], tcontract, mapping[name])
                for name, spec in specs.items()}
    for name, bb in students.items():
        for what, size in (("global", crops.global_crops_size), ("local", crops.local_crops_size)):
            if what == "local" and int(crops.local_crops_number) == 0:
                continue
            if int(size) < _stride(bb):
                raise GeodinoError(f"student '{name}' ({bb.geodino_contract['name']}) needs crops of at least "
                                   f"{_stride(bb)} px; stage.crops.{what}_crops_size={size}")
    if int(crops.global_crops_size) % tpatch:
        raise GeodinoError(f"global crop size {crops.global_crops_size} must be a multiple of the teacher's patch size {tpatch}")
    augment = MultiCropAugmentation(
        global_crops_size=int(crops.global_crops_size), local_crops_size=int(crops.local_crops_size),
        local_crops_number=int(crops.local_crops_number), global_crops_scale=tuple(crops.global_crops_scale),
        local_crops_scale=tuple(crops.local_crops_scale), horizontal_flips=bool(crops.horizontal_flips),
        mean=info.mean, std=info.std, n_bands=info.n_bands,
        rgb_indices=info.rgb_indices if info.n_bands != 3 else None,
    )
    dataset = AugmentedDataset(info.source, augment, seed=int(cfg.seed))
    meta = DistillMetaArch(teacher, students, cfg.stage, band_indices=mapping)
    if cfg.train.get("grad_checkpointing"):
        for mods in meta.students.values():
            if hasattr(mods.backbone, "set_grad_checkpointing"):
                mods.backbone.set_grad_checkpointing(True)

    # the "closer to the teacher" metric at initialisation (held-out chips of the data)
    n_agree = int(cfg.stage.get("agreement_images", 0) or 0)
    t_temp = float(cfg.stage.teacher_temp if cfg.stage.get("teacher_temp") is not None else cfg.ema.teacher_temp)
    agreement: dict[str, dict] = {}
    probe = None
    if is_main and n_agree > 0:
        try:
            probe = heldout_images(info.source, n_agree, int(crops.global_crops_size), info.mean, info.std)
            agreement = {n: {"init": teacher_agreement(meta.students[n], teacher, probe, mapping[n], t_temp)}
                         for n in meta.students}
        except Exception as e:  # a monitor must never fail a run
            log.warning("no teacher-agreement metric: %s", e)
            probe = None

    ws, rank = dist_info.world_size, dist_info.rank
    parallel = wrap_students(meta, str(cfg.train.get("parallel", "ddp")), dist_info)
    n_tokens = (int(crops.global_crops_size) // tpatch) ** 2  # masks / iBOT positions on the teacher's grid
    batches = IndexedBatches(dataset, int(cfg.train.batch_size), collate_for(cfg.stage, n_tokens, ws, rank, patch_size=tpatch),
                             seed=int(cfg.seed), num_workers=int(cfg.train.num_workers), world_size=ws, rank=rank)
    student_contracts = {n: bb.geodino_contract for n, bb in students.items()}
    extra = {
        "contract": tcontract,  # load_backbone(<distill run>) gives the teacher; students are in students/
        "stage": "distill",
        "teacher": str(teacher_path),
        "students": student_contracts,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "data": {"bands": info.band_names, "mean": info.mean, "std": info.std, **info.extra},
    }
    settings = TrainSettings.from_cfg(cfg)
    settings.world_size = ws
    if cfg.stage.get("teacher_temp") is not None:  # a trained teacher: constant temperature, no warm-up
        settings.teacher_temp = settings.warmup_teacher_temp = float(cfg.stage.teacher_temp)
    trainer = DistillTrainer(meta, batches, settings, run_dir, device, checkpoint_extra=extra, is_main=is_main,
                             parallel=parallel, export=export,
                             student_extra={"stage": "distill", "teacher": str(teacher_path),
                                            "teacher_contract": tcontract["name"]})
    if resume_from is not None:
        trainer.resume(resume_from)
    for name, bb in students.items():
        log.info("student %s: %s (%.2fM params, bands %s)", name, bb.geodino_contract["name"],
                 sum(p.numel() for p in bb.parameters()) / 1e6, ",".join(bb.geodino_contract["bands"]))
    log.info("stage=distill teacher=%s (%s, step %s) data=%s device=%s run_dir=%s", teacher_path, tcontract["name"],
             ckpt.get("step"), cfg.data.name, device, run_dir)
    history = trainer.fit()
    if settings.checkpoint_every <= 0 or not history:
        trainer.save_students(trainer.start_step + len(history))
    if not is_main:
        return run_dir

    summary: dict[str, Any] = {"run_dir": str(run_dir), "stage": "distill", "teacher": str(teacher_path),
                               "iterations": int(cfg.train.iterations), "export": export,
                               "students": {n: str(run_dir / "students" / f"{n}.pt") for n in meta.students}}
    if history:
        first, last = history[0], history[-1]
        summary.update({"loss_first": first["loss"], "loss_last": last["loss"],
                        "student_loss_last": {n: last.get(f"loss/{n}") for n in meta.students}})
    if probe is not None:
        for n in meta.students:
            agreement[n]["final_student"] = teacher_agreement(meta.students[n], teacher, probe, mapping[n], t_temp)
            agreement[n]["final_ema"] = teacher_agreement(meta.students_ema[n], teacher, probe, mapping[n], t_temp)
            log.info("student %s: teacher agreement init %s -> student %s, ema %s", n,
                     _fmt(agreement[n]["init"]), _fmt(agreement[n]["final_student"]), _fmt(agreement[n]["final_ema"]))
        summary["teacher_agreement"] = agreement
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"run directory: {run_dir}")
    print(f"checkpoint:    {latest_checkpoint(run_dir / 'checkpoints')}")
    for n, p in summary["students"].items():
        print(f"student {n}: {p}")
    return run_dir


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in d.items())
