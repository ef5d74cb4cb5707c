"""The DINOv3 SSL stages: pretraining, Gram anchoring and high-resolution adaptation (``stage.meta_arch: ssl``).

One stage class, three configs; what differs is read from the config, never from the stage's name:

- ``stage.predecessors`` (gram: pretrain or gram runs; highres: gram or highres runs): the run continues from
  ``init=<run or checkpoint>`` — same bands and normalisation, the predecessor's head sizes, its student and
  heads, and its EMA teacher as the frozen Gram teacher unless ``stage.gram.ckpt`` names another backbone;
- ``stage.released_init`` (gram): ``init=`` may instead name a released backbone (a registry name with
  ``model.weights``, or an official ``.pth`` / ``.safetensors``); fresh heads then warm up on the frozen backbone
  for ``stage.head_warmup_iterations``;
- ``stage.gram.use_loss``: a Gram teacher anchors the patch similarities (GramMetaArch);
- ``stage.highres``: per-batch crop-size settings (MultiResolutionDataset); else fixed global / local (and Gram
  teacher, ``stage.crops.gram_teacher_crops_size``) crop sizes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from geodino.checkpoint import Checkpoint
from geodino.data.multicrop import MultiCropAugmentation
from geodino.data.sources import SourceInfo, build_source
from geodino.errors import GeodinoError
from geodino.figures import pca_feature_png
from geodino.models import backbone_from_contract, build_backbone, load_backbone, set_stochastic_depth
from geodino.models.registry import is_arch
from geodino.models.weights import load_weights_into
from geodino.train.distributed import wrap_student
from geodino.train.gram import GramMetaArch, MultiResolutionDataset, copy_backbone
from geodino.train.loop import TrainSettings, augmented_data, collate_for
from geodino.train.monitors import LearningMonitor, heldout_images, heldout_monitor
from geodino.train.ssl import SSLMetaArch
from geodino.train.stage import Stage, StageParts

log = logging.getLogger("geodino")

HEAD_KEYS = ("head_n_prototypes", "head_hidden_dim", "head_bottleneck_dim", "head_nlayers")


class SSLStage(Stage):
    def build(self) -> StageParts:
        cfg = self.cfg
        info = build_source(cfg.data, seed=int(cfg.seed), progress=bool(cfg.progress),
                            batch_size=int(cfg.train.batch_size), world_size=self.dist.world_size)
        init = cfg.get("init")
        predecessors = list(cfg.stage.get("predecessors") or [])
        stage_overrides: dict = {}
        init_ckpt = None
        released = bool(init and predecessors and cfg.stage.get("released_init", False) and is_released(init))
        if released:
            info, backbone = self._released_backbone(info)
        elif predecessors:
            if not init:
                raise GeodinoError(f"stage={self.name} continues from a predecessor: pass init=<run directory or "
                                   f"checkpoint> of a {' / '.join(predecessors)} run")
            init_ckpt = Checkpoint.open(init).require_stage(predecessors, "init")
            info, stage_overrides = inherit_predecessor(info, init_ckpt, str(cfg.data.name))
            backbone = backbone_from_checkpoint(init_ckpt, "student")
        else:
            if init:
                log.warning("stage=%s starts from scratch; init=%s is ignored (it applies to stages with "
                            "predecessors: gram, highres)", self.name, init)
            backbone = self._new_backbone(info)
        drop_path = student_drop_path(cfg, init_ckpt)
        if drop_path is not None:
            set_stochastic_depth(backbone, drop_path)
        config = self.resolved(stage=stage_overrides,
                               train={"drop_path_rate": drop_path} if drop_path is not None else None)
        stage_cfg = config.stage
        contract = backbone.geodino_contract
        dataset, n_tokens, augment = self._dataset(info, stage_cfg, contract.patch_size)
        collate = collate_for(stage_cfg, n_tokens, self.dist.world_size, self.dist.rank, patch_size=contract.patch_size)
        if augment is not None:
            dataset, collate = augmented_data(info.source, augment, int(cfg.seed), collate,
                                              str(cfg.data.get("augment_on", "cpu")), self.dist.device)
        meta = self._meta_arch(backbone, stage_cfg, init_ckpt)
        if cfg.train.get("grad_checkpointing"):
            meta.student.backbone.set_grad_checkpointing(True)
        parallel = self._parallel(meta)
        settings = TrainSettings.from_cfg(config)
        if released:  # fresh heads warm up on the frozen released backbone first
            settings.head_warmup_iterations = int(stage_cfg.get("head_warmup_iterations", 0))
        monitor = None
        if int(cfg.train.get("monitor_every", 0)) > 0 and not parallel.sharded:
            images = heldout_images(info.source, int(cfg.train.get("monitor_images", 16)),
                                    int(stage_cfg.crops.global_crops_size), contract).to(self.dist.device)
            gram_size = stage_cfg.crops.get("gram_teacher_crops_size")
            monitor = lambda: heldout_monitor(meta, images, int(gram_size) if gram_size else None)  # noqa: E731
        self._info = info
        learning = LearningMonitor(int(stage_cfg.dino.head_n_prototypes),
                                   warmup_steps=int(config.ema.warmup_teacher_temp_iterations),
                                   patience=int(config.train.get("learning_patience", 100)),
                                   min_gap=float(config.train.get("learning_min_gap", 0.005)))
        n_params = sum(p.numel() for p in backbone.parameters())
        return StageParts(
            meta_arch=meta, dataset=dataset, config=config, contract=contract, settings=settings,
            collate=collate,
            checkpoint_extra={"init": str(init) if init_ckpt is not None else None,
                              "data": {"bands": info.band_names, "mean": info.mean, "std": info.std, **info.extra}},
            parallel=parallel, monitor=monitor, learning=learning,
            describe=f"stage={self.name} model={contract.name} ({n_params / 1e6:.2f}M params, {info.n_bands} bands) "
                     f"data={cfg.data.name}",
        )

    # -- backbones ---------------------------------------------------------------------------------
    def _new_backbone(self, info: SourceInfo) -> nn.Module:
        """The student backbone for `model=` with the data's bands (released weights when model.weights)."""
        cfg = self.cfg
        name = str(cfg.model.name)
        in_chans = int(cfg.model.in_chans) if cfg.model.get("in_chans") is not None else info.n_bands
        if in_chans != info.n_bands:
            raise GeodinoError(f"model.in_chans={in_chans} but data={cfg.data.name} has {info.n_bands} bands "
                               f"({', '.join(info.band_names)})")
        kw = cfg.model.get("kwargs")
        overrides = OmegaConf.to_container(kw, resolve=True) if kw is not None else {}
        if cfg.model.get("weights"):
            model = load_backbone(name, weights=str(cfg.model.weights), in_chans=in_chans, bands=info.band_names,
                                  rgb_indices=info.rgb_indices, **overrides)
        else:
            model = build_backbone(name, in_chans=in_chans, **overrides)
        model.geodino_contract = info.contract(model.geodino_contract)
        return model

    def _released_backbone(self, info: SourceInfo) -> tuple[SourceInfo, nn.Module]:
        """The released backbone named by `init=` (name + model.weights, or a weights file with model=), adapted to
        the data's bands; RGB data keep the released normalisation."""
        cfg = self.cfg
        init = str(cfg.init)
        name, weights = (init, cfg.model.get("weights")) if is_arch(init) else (str(cfg.model.name), init)
        if not weights:
            raise GeodinoError(f"init={init} names a released backbone: pass its local weights with model.weights=<file>")
        model = load_backbone(name, weights=str(weights), in_chans=info.n_bands, bands=info.band_names,
                              rgb_indices=info.rgb_indices)
        if info.n_bands == 3:  # released RGB weights expect their own normalisation
            info = info.with_stats(model.geodino_contract.mean, model.geodino_contract.std)
        model.geodino_contract = info.contract(model.geodino_contract)
        log.info("continuing from the released backbone %s (%s); heads start fresh and warm up for %s iterations",
                 name, weights, cfg.stage.get("head_warmup_iterations", 0))
        return info, model

    def _gram_teacher(self, init_ckpt: Checkpoint | None, student: nn.Module) -> nn.Module:
        """The frozen Gram teacher: `stage.gram.ckpt` (any backbone file or run), else the init run's EMA teacher,
        else (a released init) the released backbone itself."""
        path = self.cfg.stage.gram.get("ckpt")
        if path:
            teacher = load_backbone(str(path))
            if teacher.geodino_contract.kwargs != student.geodino_contract.kwargs:
                log.warning("Gram teacher %s has a different architecture from the student; tokens are resized to "
                            "the student grid, dims must agree", path)
            return copy_backbone(teacher)
        if init_ckpt is not None:
            return copy_backbone(backbone_from_checkpoint(init_ckpt, "teacher"))
        return copy_backbone(student)

    # -- parts -------------------------------------------------------------------------------------
    def _meta_arch(self, backbone: nn.Module, stage_cfg, init_ckpt: Checkpoint | None) -> nn.Module:
        if not bool(stage_cfg.gram.get("use_loss", False)):
            return SSLMetaArch(backbone, stage_cfg)
        meta = GramMetaArch(backbone, stage_cfg, self._gram_teacher(init_ckpt, backbone))
        if init_ckpt is not None:
            load_predecessor_state(meta, init_ckpt)
        return meta

    def _dataset(self, info: SourceInfo, stage_cfg, patch: int):
        crops = stage_cfg.crops

        def multicrop(global_size, local_size, gram_size=None):
            for what, size in (("global", global_size), ("local", local_size), ("gram teacher", gram_size)):
                if size is not None and int(size) % patch:
                    raise GeodinoError(f"{what} crop size {size} must be a multiple of the patch size {patch}")
            return MultiCropAugmentation(
                global_crops_size=int(global_size), local_crops_size=int(local_size),
                local_crops_number=int(crops.local_crops_number), global_crops_scale=tuple(crops.global_crops_scale),
                local_crops_scale=tuple(crops.local_crops_scale), horizontal_flips=bool(crops.horizontal_flips),
                mean=info.mean, std=info.std, n_bands=info.n_bands,
                rgb_indices=info.rgb_indices if info.n_bands != 3 else None,
                gram_teacher_crops_size=None if gram_size is None else int(gram_size),
                gram_teacher_no_distortions=bool(crops.get("gram_teacher_no_distortions", False)),
            )

        hr = stage_cfg.get("highres")
        if hr is not None:
            sizes = list(zip(hr.global_crops_sizes, hr.local_crops_sizes, hr.gram_teacher_crops_sizes))
            dataset = MultiResolutionDataset(info.source, [multicrop(*s) for s in sizes], list(hr.probabilities),
                                             samples_per_batch=int(self.cfg.train.batch_size) * self.dist.world_size,
                                             seed=int(self.cfg.seed))
            if str(self.cfg.data.get("augment_on", "cpu")) != "cpu":
                raise GeodinoError("data.augment_on=gpu does not apply to stage.highres (mixed crop sizes per batch); "
                                   "use data.augment_on=cpu")
            return dataset, None, None  # the token count is read off each batch
        augment = multicrop(crops.global_crops_size, crops.local_crops_size, crops.get("gram_teacher_crops_size"))
        return None, (int(crops.global_crops_size) // patch) ** 2, augment

    def _parallel(self, meta: nn.Module):
        mode = str(self.cfg.train.get("parallel", "ddp"))
        precision = str(self.cfg.train.precision)
        bf16 = precision == "bf16" or (precision == "auto" and self.dist.device.type == "cuda")
        return wrap_student(meta, mode, param_dtype=torch.bfloat16 if (bf16 and mode == "fsdp2") else None,
                            info=self.dist)

    # -- after training ----------------------------------------------------------------------------
    def finish(self, parts: StageParts, trainer, run_dir: Path) -> dict:
        """The PCA figure of the final EMA teacher on a preview of the data (under FSDP2 the teacher is gathered
        first, on every rank), and the last collapse statistics."""
        meta, parallel = parts.meta_arch, trainer.parallel
        teacher_backbone = meta.teacher.backbone
        want_png = bool(self.cfg.train.get("pca_png", True))
        if want_png and parallel.sharded:
            full = parallel.full_state_dict(meta.teacher.backbone)  # collective
            if self.dist.is_main:
                teacher_backbone = backbone_from_contract(parts.contract)
                teacher_backbone.load_state_dict(full)
        if not self.dist.is_main:
            return {}
        summary, outputs = {}, {}
        if trainer.history:
            last = trainer.history[-1]
            summary.update({"cls_std_last": last.get("cls_std"), "patch_erank_last": last.get("patch_erank")})
        if want_png:
            try:  # a figure must never fail a finished run
                png = pca_feature_png(teacher_backbone, self._info.source.preview(160, parts.contract.patch_size),
                                      run_dir / "pca_features.png", rgb=self._info.rgb_indices)
                summary["pca_png"] = outputs["PCA figure"] = str(png)
            except Exception as e:
                log.warning("no PCA preview: %s", e)
        return {"summary": summary, "outputs": outputs}


# ------------------------------------------------------------------------------------------------
# Stage chaining (gram <- pretrain, highres <- gram)
# ------------------------------------------------------------------------------------------------

def is_released(init) -> bool:
    """`init=` names a released backbone (a registry name, or an official .pth / .safetensors file) rather than
    a geodino training run."""
    init = str(init)
    return is_arch(init) or (Path(init).is_file() and Path(init).suffix in (".pth", ".safetensors"))


def inherit_predecessor(info: SourceInfo, ckpt: Checkpoint, data_name: str) -> tuple[SourceInfo, dict]:
    """A continued stage keeps its predecessor's normalisation (continuing with other statistics would shift
    every input) and head sizes, and needs its bands. Returns (the data with the predecessor's statistics,
    the stage config entries to override)."""
    contract = ckpt.contract
    if list(info.band_names) != list(contract.bands):
        raise GeodinoError(f"data={data_name} has bands {', '.join(info.band_names)} but init={ckpt.path} was trained "
                           f"on {', '.join(contract.bands)}")
    prev = ckpt.config.get("stage", {})
    heads = {head: {k: prev[head][k] for k in HEAD_KEYS if k in prev.get(head, {})} for head in ("dino", "ibot")}
    return info.with_stats(contract.mean, contract.std), {h: v for h, v in heads.items() if v}


def backbone_from_checkpoint(ckpt: Checkpoint, which: str) -> nn.Module:
    model = backbone_from_contract(ckpt.contract)
    load_weights_into(model, ckpt.backbone_state(which), source=f"the {which} backbone of {ckpt.path}")
    return model


def load_predecessor_state(meta: nn.Module, ckpt: Checkpoint) -> None:
    """The predecessor's student, heads and EMA teacher (the Gram teacher and its refresh count start anew)."""
    state = ckpt.meta_arch_state
    own = meta.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise GeodinoError(f"init={ckpt.path} does not fit this stage's heads: {'; '.join(bad[:4])}")
    missing, _ = meta.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    missing = [k for k in missing if not k.startswith("gram_teacher.") and k != "gram_updates"]
    if missing:
        raise GeodinoError(f"init={ckpt.path} lacks {len(missing)} keys this stage needs ({', '.join(missing[:5])})")
    log.info("continuing from %s (%s run, step %s)", ckpt.path, ckpt.stage, ckpt.step)


def student_drop_path(cfg, init_ckpt: Checkpoint | None) -> float | None:
    """The student's stochastic depth: train.drop_path_rate, else the predecessor run's (init= stages), else
    model.drop_path_rate. The value used is recorded in the resolved config (config.yaml, checkpoints)."""
    rate = cfg.train.get("drop_path_rate")
    if rate is None and init_ckpt is not None:
        rate = (init_ckpt.config.get("train") or {}).get("drop_path_rate")
    if rate is None:
        rate = cfg.model.get("drop_path_rate")
    if rate is None:
        return None
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise GeodinoError(f"train.drop_path_rate: drop_path_rate must be in [0, 1), got {rate}")
    return rate
