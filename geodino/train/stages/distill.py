"""Multi-student distillation, the stage (``stage.meta_arch: distill``; dinov3_spec.md §7):
    geodino train stage=distill teacher=<pretrain / gram / highres run or checkpoint> students=[vit_tiny,convnext_tiny]

The teacher is the EMA teacher backbone of the ``teacher=`` training checkpoint with its DINO and iBOT heads
(frozen); each ``students=`` entry is a ``model=`` config name or a registry name and becomes a randomly
initialised student with heads of the teacher's K (geodino.train.distill.DistillMetaArch). The data must have the
teacher's bands, and the teacher's normalisation is used; a student may see a subset of them through
``stage.band_mapping`` (a list of teacher band names for every student, or ``{student: [names]}``). Anything else
is an error that names both band lists.

Outputs: every checkpoint also writes each student standalone to ``<run_dir>/students/<name>.pt`` (official keys +
contract; ``stage.export`` picks the EMA copy, as the reference, or the raw student). The training checkpoint holds
the teacher too (the reference drops ``teacher.*``), so a run directory resumes on its own and
``load_backbone(<run dir>)`` gives the teacher. ``summary.json`` holds the "closer to the teacher" metric
(geodino.train.monitors.teacher_agreement) on ``stage.agreement_images`` held-out chips, at initialisation and at
the end, for the student and its EMA.

Distributed: under ``torchrun`` every rank holds every student and the teacher; each student module is its own
``DistributedDataParallel`` (``train.parallel=ddp`` only). The reference instead puts each student on its own
disjoint process subgroup, shards the teacher over the world and scatters the teacher's outputs; that layout is
not implemented yet.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from geodino.checkpoint import Checkpoint
from geodino.config import model_configs
from geodino.contract import Contract
from geodino.data.multicrop import MultiCropAugmentation
from geodino.data.sources import build_source
from geodino.errors import GeodinoError
from geodino.models import build_backbone
from geodino.models.heads import DINOHead
from geodino.models.registry import arch_names, is_arch
from geodino.models.weights import load_weights_into
from geodino.train.distill import DistillMetaArch
from geodino.train.distributed import DDPParallel, ForwardFeatures, Parallel
from geodino.train.loop import TrainSettings, augmented_data, collate_for
from geodino.train.monitors import heldout_images, teacher_agreement
from geodino.train.stage import Stage, StageParts
from geodino.train.stages.ssl import backbone_from_checkpoint

log = logging.getLogger("geodino")

TEACHER_STAGES = ("pretrain", "gram", "highres")


# ------------------------------------------------------------------------------------------------
# Students, bands, teacher
# ------------------------------------------------------------------------------------------------

def resolve_students(students) -> dict[str, dict]:
    """`students=` entries -> {entry: {"name": registry name, "kwargs": constructor overrides}}.

    An entry is a `model=` config name (configs/model/*.yaml, e.g. vit_tiny -> geodino_vit_tiny,
    convnext_tiny -> dinov3_convnext_tiny) or a registry name (e.g. geodino_convnext_tiny)."""
    if students is None:
        students = []
    if isinstance(students, str):
        students = [students]
    students = [str(s) for s in students]
    configs = model_configs()
    choices = f"model configs: {', '.join(sorted(configs))}; registry names: {', '.join(arch_names())}"
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
        elif is_arch(s):
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


def load_teacher(teacher) -> Checkpoint:
    """The `teacher=` training checkpoint, with clear errors for a missing or unsuitable one."""
    if not teacher:
        raise GeodinoError(f"stage=distill needs a teacher: pass teacher=<run directory or checkpoint> of a "
                           f"{' / '.join(TEACHER_STAGES)} run")
    ckpt = Checkpoint.open(teacher)
    if not ckpt.is_training or not ckpt.has_contract:
        raise GeodinoError(
            f"teacher={teacher} is not a geodino training checkpoint; distillation needs the teacher's DINO and iBOT "
            f"heads, which only the checkpoint of a {' / '.join(TEACHER_STAGES)} run holds (a run directory or its "
            "checkpoints/step_*.pt)"
        )
    ckpt.require_stage(TEACHER_STAGES, "teacher")
    return ckpt.require_states([f"teacher.{part}." for part in ("backbone", "dino_head", "ibot_head")], "teacher")


def teacher_head_cfg(ckpt: Checkpoint) -> dict[str, dict]:
    """The teacher's DINO / iBOT head sizes, read off its weights (K, bottleneck, hidden, layers)."""
    state = ckpt.meta_arch_state
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


def teacher_from_checkpoint(ckpt: Checkpoint) -> nn.ModuleDict:
    """{backbone, dino_head, ibot_head} of the checkpoint's EMA teacher, frozen and in eval mode."""

    backbone = backbone_from_checkpoint(ckpt, "teacher")
    mods = {"backbone": backbone}
    for head, h in teacher_head_cfg(ckpt).items():
        module = DINOHead(int(backbone.embed_dim), h["head_n_prototypes"], h["head_hidden_dim"],
                          h["head_bottleneck_dim"], h["head_nlayers"])
        load_weights_into(module, ckpt.state(f"teacher.{head}_head."), source=f"the teacher {head} head of {ckpt.path}")
        mods[f"{head}_head"] = module
    teacher = nn.ModuleDict(mods)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def build_student(registry_name: str, kwargs: dict, teacher_contract: Contract,
                  band_indices: list[int] | None) -> nn.Module:
    """A randomly initialised student on the teacher's (or the mapped) bands, with its contract."""
    idx = list(range(teacher_contract.n_bands)) if band_indices is None else list(band_indices)
    model = build_backbone(registry_name, in_chans=len(idx), **kwargs)
    base = model.geodino_contract
    model.geodino_contract = teacher_contract.subset(idx, name=base.name, family=base.family, kwargs=base.kwargs)
    return model


def wrap_students(meta: DistillMetaArch, mode: str, info) -> Parallel:
    """One process: nothing to do. Under torchrun: every student module in its own DDP (all students on every
    rank; the reference's per-student process subgroups are not implemented)."""
    meta.to(info.device)
    if not info.distributed:
        return Parallel(info)
    if mode != "ddp":
        raise GeodinoError(f"stage=distill supports train.parallel=ddp only (got {mode}); every rank holds every "
                           "student and the teacher")
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    calls = {}
    for key, module in meta.student_modules().items():
        is_backbone = key.startswith("backbone/")
        unused = is_backbone and getattr(module, "local_cls_norm", None) is not None and meta.n_local == 0
        calls[key] = DDP(ForwardFeatures(module) if is_backbone else module, device_ids=device_ids,
                         find_unused_parameters=unused, broadcast_buffers=False)
    meta.student_calls = calls
    with torch.no_grad():  # DDP broadcast the students from rank 0; their EMA copies must match too
        for tensor in list(meta.students_ema.parameters()) + list(meta.students_ema.buffers()):
            dist.broadcast(tensor, src=0)
    return DDPParallel(info)


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in d.items())


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------

class DistillStage(Stage):
    def build(self) -> StageParts:
        cfg = self.cfg
        specs = resolve_students(cfg.get("students"))
        teacher_path = cfg.get("teacher")
        ckpt = load_teacher(teacher_path)
        tcontract = ckpt.contract
        mapping = resolve_band_mapping(cfg.stage.get("band_mapping"), tcontract.bands, list(specs))
        # no band statistics: the teacher's normalisation is used
        info = build_source(cfg.data, seed=int(cfg.seed), progress=bool(cfg.progress), stats=False,
                            batch_size=int(cfg.train.batch_size), world_size=self.dist.world_size)
        check_data_bands(str(cfg.data.name), info.band_names, str(teacher_path), tcontract.bands)
        info = info.with_stats(tcontract.mean, tcontract.std)
        heads = teacher_head_cfg(ckpt)
        for head in ("dino", "ibot"):  # the student heads have the teacher's number of prototypes
            if int(cfg.stage[head].head_n_prototypes) != heads[head]["head_n_prototypes"]:
                log.info("stage.%s.head_n_prototypes=%s -> %d (the teacher's)", head,
                         cfg.stage[head].head_n_prototypes, heads[head]["head_n_prototypes"])
        config = self.resolved(stage={h: {"head_n_prototypes": heads[h]["head_n_prototypes"]} for h in ("dino", "ibot")})
        stage_cfg = config.stage
        teacher = teacher_from_checkpoint(ckpt)
        tstride = teacher.backbone.token_stride  # input pixels per teacher token
        students = {name: build_student(spec["name"], spec["kwargs"], tcontract, mapping[name])
                    for name, spec in specs.items()}
        # masks / iBOT positions on the teacher's grid
        n_tokens = (int(stage_cfg.crops.global_crops_size) // tstride) ** 2
        dataset, collate = augmented_data(
            info.source, self._augment(info, stage_cfg.crops, tstride, students), int(cfg.seed),
            collate_for(stage_cfg, n_tokens, self.dist.world_size, self.dist.rank, patch_size=tstride),
            str(cfg.data.get("augment_on", "cpu")), self.dist.device)
        export = str(stage_cfg.get("export", "ema"))
        meta = DistillMetaArch(teacher, students, stage_cfg, band_indices=mapping, export=export,
                               student_extra={"stage": "distill", "teacher": str(teacher_path),
                                              "teacher_contract": tcontract.name})
        if cfg.train.get("grad_checkpointing"):
            for mods in meta.students.values():
                if hasattr(mods.backbone, "set_grad_checkpointing"):
                    mods.backbone.set_grad_checkpointing(True)
        self._agreement_at_init(meta, teacher, info, stage_cfg, mapping)
        settings = TrainSettings.from_cfg(config)
        if stage_cfg.get("teacher_temp") is not None:  # a trained teacher: constant temperature, no warm-up
            settings.teacher_temp = settings.warmup_teacher_temp = float(stage_cfg.teacher_temp)
        for name, bb in students.items():
            c = bb.geodino_contract
            log.info("student %s: %s (%.2fM params, bands %s)", name, c.name,
                     sum(p.numel() for p in bb.parameters()) / 1e6, ",".join(c.bands))
        return StageParts(
            meta_arch=meta, dataset=dataset, config=config,
            contract=tcontract,  # load_backbone(<distill run>) gives the teacher; students are in students/
            settings=settings,
            collate=collate,
            checkpoint_extra={"teacher": str(teacher_path),
                              "students": {n: bb.geodino_contract.to_dict() for n, bb in students.items()},
                              "data": {"bands": info.band_names, "mean": info.mean, "std": info.std, **info.extra}},
            parallel=wrap_students(meta, str(cfg.train.get("parallel", "ddp")), self.dist),
            describe=f"stage=distill teacher={teacher_path} ({tcontract.name}, step {ckpt.step}) data={cfg.data.name}",
        )

    def _augment(self, info, crops, tstride: int, students: dict) -> MultiCropAugmentation:
        for name, bb in students.items():
            for what, size in (("global", crops.global_crops_size), ("local", crops.local_crops_size)):
                if what == "local" and int(crops.local_crops_number) == 0:
                    continue
                if int(size) < bb.token_stride:
                    raise GeodinoError(f"student '{name}' ({bb.geodino_contract.name}) needs crops of at least "
                                       f"{bb.token_stride} px; stage.crops.{what}_crops_size={size}")
        if int(crops.global_crops_size) % tstride:
            raise GeodinoError(f"global crop size {crops.global_crops_size} must be a multiple of the teacher's "
                               f"patch size {tstride}")
        return MultiCropAugmentation(
            global_crops_size=int(crops.global_crops_size), local_crops_size=int(crops.local_crops_size),
            local_crops_number=int(crops.local_crops_number), global_crops_scale=tuple(crops.global_crops_scale),
            local_crops_scale=tuple(crops.local_crops_scale), horizontal_flips=bool(crops.horizontal_flips),
            mean=info.mean, std=info.std, n_bands=info.n_bands,
            rgb_indices=info.rgb_indices if info.n_bands != 3 else None,
        )

    def _agreement_at_init(self, meta, teacher, info, stage_cfg, mapping) -> None:
        """The "closer to the teacher" metric at initialisation, on held-out chips of the data (main rank)."""
        self._probe, self._agreement, self._mapping = None, {}, mapping
        self._t_temp = float(stage_cfg.teacher_temp if stage_cfg.get("teacher_temp") is not None
                             else self.cfg.ema.teacher_temp)
        n_agree = int(stage_cfg.get("agreement_images", 0) or 0)
        if not self.dist.is_main or n_agree <= 0:
            return
        try:
            probe = heldout_images(info.source, n_agree, int(stage_cfg.crops.global_crops_size),
                                   meta.teacher.backbone.geodino_contract)
            self._agreement = {n: {"init": teacher_agreement(meta.students[n], teacher, probe, mapping[n], self._t_temp)}
                               for n in meta.students}
            self._probe = probe
        except Exception as e:  # a monitor must never fail a run
            log.warning("no teacher-agreement metric: %s", e)

    def finish(self, parts: StageParts, trainer, run_dir: Path) -> dict:
        meta = parts.meta_arch
        if trainer.s.checkpoint_every <= 0 or not trainer.history:  # no checkpoint hook ran: write them now
            if self.dist.is_main:
                meta.save_students(run_dir, trainer.start_step + len(trainer.history))
        if not self.dist.is_main:
            return {}
        students = {n: str(run_dir / "students" / f"{n}.pt") for n in meta.students}
        summary: dict = {"teacher": str(self.cfg.get("teacher")), "export": meta.export, "students": students}
        if trainer.history:
            last = trainer.history[-1]
            summary["student_loss_last"] = {n: last.get(f"loss/{n}") for n in meta.students}
        if self._probe is not None:
            for n in meta.students:
                a = self._agreement[n]
                a["final_student"] = teacher_agreement(meta.students[n], meta.teacher, self._probe, self._mapping[n],
                                                       self._t_temp)
                a["final_ema"] = teacher_agreement(meta.students_ema[n], meta.teacher, self._probe, self._mapping[n],
                                                   self._t_temp)
                log.info("student %s: teacher agreement init %s -> student %s, ema %s", n, _fmt(a["init"]),
                         _fmt(a["final_student"]), _fmt(a["final_ema"]))
            summary["teacher_agreement"] = self._agreement
        return {"summary": summary, "outputs": {f"student {n}": p for n, p in students.items()}}
