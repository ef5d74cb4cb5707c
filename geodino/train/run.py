"""`geodino train`: compose data, model, meta-architecture and trainer for the selected stage."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from geodino.errors import GeodinoError

log = logging.getLogger("geodino")

IMPLEMENTED_STAGES = ("pretrain", "gram", "highres", "distill")
# The stage a `init=` run must come from (dinov3_spec.md §6, "How the stages chain").
PREDECESSORS = {"gram": ("pretrain", "gram"), "highres": ("gram", "highres")}
PLANNED_STAGES = {
    "text": "dino.txt text alignment",
}


def build_backbone_for(cfg, info):
    """The student backbone for `model=` with the data's bands, and its contract."""
    from geodino.models.registry import build_backbone, load_backbone, make_contract

    name = str(cfg.model.name)
    in_chans = int(cfg.model.in_chans) if cfg.model.get("in_chans") is not None else info.n_bands
    if in_chans != info.n_bands:
        raise GeodinoError(f"model.in_chans={in_chans} but data={cfg.data.name} has {info.n_bands} bands ({', '.join(info.band_names)})")
    kw = cfg.model.get("kwargs")
    overrides = OmegaConf.to_container(kw, resolve=True) if kw is not None else {}
    if cfg.model.get("weights"):
        model = load_backbone(name, weights=str(cfg.model.weights), in_chans=in_chans, bands=info.band_names,
                              rgb_indices=info.rgb_indices, **overrides)
        adaptation = model.geodino_contract.get("band_adaptation")
    else:
        model = build_backbone(name, in_chans=in_chans, **overrides)
        adaptation = None
    base = model.geodino_contract
    model.geodino_contract = make_contract(
        base["name"], base["family"], base["kwargs"], bands=info.band_names, mean=info.mean, std=info.std,
        input_scale=info.input_scale, band_adaptation=adaptation,
    )
    return model


def preview_image(cfg, info, size: int = 160) -> torch.Tensor | None:
    """A larger view of the data (C, H, W) in [0, 1] for the PCA figure."""
    try:
        if cfg.data.kind == "raster":
            from geodino.data.sources.raster import RasterSource

            src = info.source
            side = min(size, *(int((b[2] - b[0]) / src.res[0]) for b in src._bounds), *(int((b[3] - b[1]) / src.res[1]) for b in src._bounds))
            side -= side % 16
            prev = RasterSource([str(f) for f in src.files], chip_size=side, bands=src.band_names, scale=src.scale,
                                nodata_max_fraction=src.nodata_max_fraction, length=1, seed=12345,
                                sensor=getattr(src, "sensor", None))
            return prev[0]
        img = info.source[0]
        return torch.nn.functional.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True)[0]
    except Exception as e:  # a figure must never fail a finished run
        log.warning("no PCA preview: %s", e)
        return None


def run_train(cfg):
    """`geodino train`, in one process or on every rank of a `torchrun` launch (train.parallel: ddp | fsdp2)."""
    import torch.distributed as dist

    from geodino.runs import setup_logging
    from geodino.train.distributed import destroy_distributed, init_distributed

    setup_logging()
    caller_group = dist.is_available() and dist.is_initialized()  # a caller's process group stays up
    dist_info = init_distributed(str(cfg.device))
    if not dist_info.is_main:
        log.setLevel(logging.WARNING)  # one rank talks
    try:
        return _run_train(cfg, dist_info)
    finally:
        if dist_info.distributed and not caller_group:
            destroy_distributed()


def _run_train(cfg, dist_info):
    from geodino.data.multicrop import MultiCropAugmentation
    from geodino.data.sources import build_source
    from geodino.runs import default_run_dir, prepare_run_dir
    from geodino.train.checkpoint import latest_checkpoint
    from geodino.train.distributed import broadcast_object, wrap_student
    from geodino.train.loop import AugmentedDataset, IndexedBatches, Trainer, TrainSettings, collate_for, seed_everything
    from geodino.train.ssl import SSLMetaArch

    stage = str(cfg.stage.name)
    if stage == "text":  # dino.txt: its own data (image–caption pairs) and meta-architecture
        from geodino.text.train import run_text_train

        return run_text_train(cfg, dist_info)
    if stage == "distill":  # one frozen teacher, several students (geodino.train.distill)
        from geodino.train.distill import run_distill

        return run_distill(cfg, dist_info)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    info = build_source(cfg.data, seed=int(cfg.seed), progress=bool(cfg.progress))
    if stage not in IMPLEMENTED_STAGES:
        raise GeodinoError(
            f"stage={stage} ({PLANNED_STAGES.get(stage, stage)}) is not available in this geodino version yet; "
            f"available: {', '.join(IMPLEMENTED_STAGES)}"
        )
    device = dist_info.device
    is_main = dist_info.is_main
    from geodino.cpu import apply_run_settings

    apply_run_settings(cfg, device)
    seed_everything(int(cfg.seed))

    run_dir = Path(cfg.run_dir) if cfg.get("run_dir") else default_run_dir("train", stage)
    resume_from = latest_checkpoint(run_dir / "checkpoints") if cfg.get("resume", True) else None
    run_dir, resume_from = broadcast_object((run_dir, resume_from))  # rank 0 decides (timestamped names)
    if is_main:
        prepare_run_dir(run_dir, cfg)

    init_ckpt = None
    released_init = stage == "gram" and _is_released_init(cfg.get("init"))
    if released_init:
        # Continued pretraining from a released DINOv3 backbone: no heads in the file, so the heads
        # start fresh and warm up on a frozen backbone (stage.head_warmup_iterations).
        backbone = _released_backbone(cfg, info)
    elif stage in PREDECESSORS:
        from geodino.train.gram import load_init

        init_ckpt = load_init(cfg.get("init"), PREDECESSORS[stage])
        _inherit_predecessor(cfg, init_ckpt, info)
        backbone = _backbone_from_init(init_ckpt, "student")
    else:
        backbone = build_backbone_for(cfg, info)
    _set_student_drop_path(cfg, backbone, init_ckpt)
    if is_main:  # the snapshot again, with what the predecessor and the model filled in
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    contract = backbone.geodino_contract
    crops = cfg.stage.crops
    patch = int(contract["patch_size"])

    def multicrop(global_size, local_size, gram_size=None):
        for name, size in (("global", global_size), ("local", local_size), ("gram teacher", gram_size)):
            if size is not None and int(size) % patch:
                raise GeodinoError(f"{name} crop size {size} must be a multiple of the patch size {patch}")
        return MultiCropAugmentation(
            global_crops_size=int(global_size), local_crops_size=int(local_size),
            local_crops_number=int(crops.local_crops_number), global_crops_scale=tuple(crops.global_crops_scale),
            local_crops_scale=tuple(crops.local_crops_scale), horizontal_flips=bool(crops.horizontal_flips),
            mean=info.mean, std=info.std, n_bands=info.n_bands,
            rgb_indices=info.rgb_indices if info.n_bands != 3 else None,
            gram_teacher_crops_size=None if gram_size is None else int(gram_size),
            gram_teacher_no_distortions=bool(crops.get("gram_teacher_no_distortions", False)),
        )

    ws, rank = dist_info.world_size, dist_info.rank
    if stage == "highres":
        from geodino.train.gram import MultiResolutionDataset

        hr = cfg.stage.highres
        sizes = list(zip(hr.global_crops_sizes, hr.local_crops_sizes, hr.gram_teacher_crops_sizes))
        dataset = MultiResolutionDataset(info.source, [multicrop(*s) for s in sizes], list(hr.probabilities),
                                         samples_per_batch=int(cfg.train.batch_size) * ws, seed=int(cfg.seed))
        n_tokens = None  # read off each batch
    else:
        gram_size = crops.get("gram_teacher_crops_size") if stage == "gram" else None
        dataset = AugmentedDataset(info.source, multicrop(crops.global_crops_size, crops.local_crops_size, gram_size),
                                   seed=int(cfg.seed))
        n_tokens = (int(crops.global_crops_size) // patch) ** 2
    if released_init:
        from geodino.models.registry import load_backbone
        from geodino.train.gram import GramMetaArch, copy_backbone

        # The released backbone itself is the Gram teacher unless stage.gram.ckpt names another one.
        gram_ckpt = cfg.stage.gram.get("ckpt")
        meta = GramMetaArch(backbone, cfg.stage, copy_backbone(load_backbone(str(gram_ckpt)) if gram_ckpt else backbone))
    elif init_ckpt is not None:
        from geodino.train.gram import GramMetaArch

        meta = GramMetaArch(backbone, cfg.stage, _gram_teacher(cfg, init_ckpt))
        _load_predecessor_state(meta, init_ckpt, cfg.get("init"))
    else:
        meta = SSLMetaArch(backbone, cfg.stage)
    if cfg.train.get("grad_checkpointing"):
        meta.student.backbone.set_grad_checkpointing(True)
    mode = str(cfg.train.get("parallel", "ddp"))
    precision = str(cfg.train.precision)
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    parallel = wrap_student(meta, mode, param_dtype=torch.bfloat16 if (bf16 and mode == "fsdp2") else None,
                            info=dist_info)
    batches = IndexedBatches(dataset, int(cfg.train.batch_size),
                             collate_for(cfg.stage, n_tokens, ws, rank, patch_size=patch), seed=int(cfg.seed),
                             num_workers=int(cfg.train.num_workers), world_size=ws, rank=rank)
    extra = {
        "contract": contract,
        "stage": stage,
        "init": str(cfg.get("init")) if init_ckpt is not None else None,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "data": {"bands": info.band_names, "mean": info.mean, "std": info.std, **info.extra},
    }
    settings = TrainSettings.from_cfg(cfg)
    settings.world_size = ws
    if released_init:
        settings.head_warmup_iterations = int(cfg.stage.get("head_warmup_iterations", 0))
    monitor = _heldout_monitor(cfg, info, meta, patch, device) if int(cfg.train.get("monitor_every", 0)) > 0 \
        and not parallel.sharded else None
    trainer = Trainer(meta, batches, settings, run_dir, device, checkpoint_extra=extra, is_main=is_main,
                      parallel=parallel, monitor=monitor, monitor_every=int(cfg.train.get("monitor_every", 0)))
    if resume_from is not None:
        trainer.resume(resume_from)
    n_params = sum(p.numel() for p in backbone.parameters())
    log.info("stage=%s model=%s (%.2fM params, %d bands) data=%s device=%s run_dir=%s", stage, contract["name"],
             n_params / 1e6, info.n_bands, cfg.data.name, device, run_dir)
    if ws > 1:
        log.info("data parallel: %s on %d processes, %d images per process, global batch %d", mode, ws,
                 settings.batch_size, settings.batch_size * ws)
    history = trainer.fit()

    teacher_backbone = meta.teacher.backbone
    if cfg.train.get("pca_png", True) and parallel.sharded:
        # FSDP2: gather the full teacher backbone (every rank) into a plain module on rank 0
        from geodino.models.registry import backbone_from_contract

        full = parallel.full_state_dict(meta.teacher.backbone)
        if is_main:
            teacher_backbone = backbone_from_contract(contract)
            teacher_backbone.load_state_dict(full)
    if not is_main:
        return run_dir

    summary = {"run_dir": str(run_dir), "stage": stage, "iterations": int(cfg.train.iterations)}
    if history:
        first, last = history[0], history[-1]
        summary.update({"loss_first": first["loss"], "loss_last": last["loss"], "cls_std_last": last.get("cls_std"),
                        "patch_erank_last": last.get("patch_erank")})
    if cfg.train.get("pca_png", True):
        img = preview_image(cfg, info)
        if img is not None:
            from geodino.eval.report import pca_feature_png

            png = pca_feature_png(teacher_backbone, img, info.mean, info.std, run_dir / "pca_features.png",
                                  rgb=info.rgb_indices)
            summary["pca_png"] = str(png)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    print(f"run directory: {run_dir}")
    print(f"checkpoint:    {ckpt}")
    if "pca_png" in summary:
        print(f"PCA figure:    {summary['pca_png']}")
    return run_dir


# ------------------------------------------------------------------------------------------------
# Stage chaining (gram <- pretrain, highres <- gram)
# ------------------------------------------------------------------------------------------------

def _set_student_drop_path(cfg, backbone, init_ckpt: dict | None) -> None:
    """The student's stochastic depth: train.drop_path_rate, else the predecessor run's (init= stages), else
    model.drop_path_rate. The value used is written back to train.drop_path_rate, so the run's config
    snapshot and checkpoints record it."""
    from omegaconf import open_dict

    from geodino.models.registry import set_stochastic_depth

    rate = cfg.train.get("drop_path_rate")
    if rate is None and init_ckpt is not None:
        rate = ((init_ckpt.get("config") or {}).get("train") or {}).get("drop_path_rate")
    if rate is None:
        rate = cfg.model.get("drop_path_rate")
    if rate is None:
        return
    try:
        set_stochastic_depth(backbone, float(rate))
    except ValueError as e:
        raise GeodinoError(f"train.drop_path_rate: {e}") from e
    with open_dict(cfg):
        cfg.train.drop_path_rate = float(rate)


def _inherit_predecessor(cfg, ckpt: dict, info) -> None:
    """A continued stage keeps its predecessor's heads and normalisation, and needs its bands."""
    from omegaconf import open_dict

    contract = ckpt["contract"]
    if list(info.band_names) != list(contract["bands"]):
        raise GeodinoError(
            f"data={cfg.data.name} has bands {', '.join(info.band_names)} but init={cfg.init} was trained on "
            f"{', '.join(contract['bands'])}"
        )
    # Same normalisation as the predecessor: continuing with other statistics would shift every input.
    info.mean, info.std = list(contract["mean"]), list(contract["std"])
    prev = (ckpt.get("config") or {}).get("stage", {})
    with open_dict(cfg):
        for head in ("dino", "ibot"):
            for key in ("head_n_prototypes", "head_hidden_dim", "head_bottleneck_dim", "head_nlayers"):
                if key in prev.get(head, {}):
                    cfg.stage[head][key] = prev[head][key]


def _backbone_from_init(ckpt: dict, which: str):
    from geodino.models.registry import backbone_from_contract, load_weights_into

    model = backbone_from_contract(ckpt["contract"])
    prefix = f"{which}.backbone."
    sd = {k[len(prefix):]: v for k, v in ckpt["models"]["meta_arch"].items() if k.startswith(prefix)}
    load_weights_into(model, sd, source=f"the {which} backbone of the init checkpoint")
    return model


def _gram_teacher(cfg, ckpt: dict):
    """The frozen Gram teacher: `stage.gram.ckpt` (any backbone file or run) or the init run's EMA teacher."""
    from geodino.models.registry import load_backbone
    from geodino.train.gram import copy_backbone

    path = cfg.stage.gram.get("ckpt")
    if path:
        teacher = load_backbone(str(path))
        if teacher.geodino_contract["kwargs"] != ckpt["contract"]["kwargs"]:
            log.warning("Gram teacher %s has a different architecture from the student; tokens are resized to the "
                        "student grid, dims must agree", path)
        return copy_backbone(teacher)
    return copy_backbone(_backbone_from_init(ckpt, "teacher"))


def _load_predecessor_state(meta, ckpt: dict, init) -> None:
    state = ckpt["models"]["meta_arch"]
    own = meta.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise GeodinoError(f"init={init} does not fit this stage's heads: {'; '.join(bad[:4])}")
    missing, unexpected = meta.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    missing = [k for k in missing if not k.startswith("gram_teacher.") and k != "gram_updates"]
    if missing:
        raise GeodinoError(f"init={init} lacks {len(missing)} keys this stage needs ({', '.join(missing[:5])})")
    log.info("continuing from %s (%s run, step %s)", init, ckpt.get("stage"), ckpt.get("step"))


def _is_released_init(init) -> bool:
    """`init=` names a released backbone (a registry name, or an official .pth / .safetensors file)
    rather than a geodino training run."""
    from geodino.models.registry import ARCHS

    if not init:
        return False
    init = str(init)
    return init in ARCHS or (Path(init).is_file() and Path(init).suffix in (".pth", ".safetensors"))


def _released_backbone(cfg, info):
    """The released backbone named by `init=` (name + model.weights, or a weights file with model=),
    adapted to the data's bands; its contract keeps the released normalisation for RGB data."""
    from geodino.models.registry import ARCHS, load_backbone, make_contract

    init = str(cfg.init)
    name, weights = (init, cfg.model.get("weights")) if init in ARCHS else (str(cfg.model.name), init)
    if not weights:
        raise GeodinoError(f"init={init} names a released backbone: pass its local weights with model.weights=<file>")
    model = load_backbone(name, weights=str(weights), in_chans=info.n_bands, bands=info.band_names,
                          rgb_indices=info.rgb_indices)
    base = model.geodino_contract
    if info.n_bands == 3:  # released RGB weights expect their own normalisation
        info.mean, info.std = list(base["mean"]), list(base["std"])
    model.geodino_contract = make_contract(base["name"], base["family"], base["kwargs"], bands=info.band_names,
                                           mean=info.mean, std=info.std, input_scale=info.input_scale,
                                           band_adaptation=base.get("band_adaptation"))
    log.info("continuing from the released backbone %s (%s); heads start fresh and warm up for %s iterations",
             name, weights, cfg.stage.get("head_warmup_iterations", 0))
    return model


def _heldout_monitor(cfg, info, meta, patch: int, device):
    """Fixed held-out chips (indices far beyond any training index, so never trained on as such),
    centre-cropped to the global crop size and normalised like the training crops."""
    from geodino.train.gram import heldout_monitor

    size = int(cfg.stage.crops.global_crops_size)
    n = int(cfg.train.get("monitor_images", 16))
    mean = torch.tensor(info.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(-1, 1, 1)
    imgs = []
    for i in range(n):
        x = info.source[10**12 + i]
        h, w = x.shape[-2:]
        if min(h, w) < size:
            x = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)[0]
        else:
            top, left = (h - size) // 2, (w - size) // 2
            x = x[:, top:top + size, left:left + size]
        imgs.append((x - mean) / std)
    images = torch.stack(imgs).to(device)
    gram_size = cfg.stage.crops.get("gram_teacher_crops_size")
    return lambda: heldout_monitor(meta, images, int(gram_size) if gram_size else None)
