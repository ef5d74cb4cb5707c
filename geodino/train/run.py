"""`geodino train`: the run skeleton every stage shares.

The stage (geodino.train.stage) is looked up by ``stage.meta_arch`` and builds its parts; this module does the rest
once: the process group (one process or every rank of a ``torchrun`` launch), threads and CPU settings, the seed,
the run directory (``outputs/train/<stage>/<time>`` unless ``run_dir=``), resuming from its latest checkpoint, the
trainer, and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from geodino.checkpoint import latest_checkpoint
from geodino.errors import GeodinoError
from geodino.runs import default_run_dir, json_safe, prepare_run_dir, setup_logging
from geodino.runtime import verb_setup
from geodino.schema import validate
from geodino.train.distributed import (
    DistInfo,
    broadcast_object,
    destroy_distributed,
    init_distributed,
    is_distributed_initialized,
)
from geodino.train.loop import IndexedBatches, Trainer, seed_everything
from geodino.train.stage import Stage, StageParts, stage_class

log = logging.getLogger("geodino")


def run_train(cfg) -> Path:
    """`geodino train`, in one process or on every rank of a `torchrun` launch (train.parallel: ddp | fsdp2).
    The config is validated first (geodino.schema), before the process group, the data or the model."""
    validate("train", cfg)
    setup_logging()
    caller_group = is_distributed_initialized()  # a caller's process group stays up
    dist_info = init_distributed(str(cfg.device))
    if not dist_info.is_main:
        log.setLevel(logging.WARNING)  # one rank talks
    try:
        return train(cfg, dist_info)
    finally:
        if dist_info.distributed and not caller_group:
            destroy_distributed()


def train(cfg, dist_info: DistInfo) -> Path:
    """Run the stage ``cfg.stage.meta_arch`` names; returns the run directory."""
    stage = stage_class(str(cfg.stage.get("meta_arch", "ssl")))(cfg, dist_info)
    if dist_info.distributed and not stage.supports_distributed:
        raise GeodinoError(f"stage={stage.name} runs in one process; launch it without torchrun")
    verb_setup(cfg, dist_info.device)
    seed_everything(int(cfg.seed))
    run_dir, resume_from = _locate_run(cfg, stage.name)
    parts = stage.build()
    if dist_info.is_main:
        prepare_run_dir(run_dir, parts.config)
    trainer = _trainer(cfg, stage, parts, run_dir, dist_info)
    if resume_from is not None:
        trainer.resume(resume_from)
    if parts.describe:
        log.info("%s device=%s run_dir=%s", parts.describe, dist_info.device, run_dir)
    if dist_info.world_size > 1:
        log.info("data parallel: %s on %d processes, %d images per process, global batch %d",
                 cfg.train.get("parallel", "ddp"), dist_info.world_size, parts.settings.batch_size,
                 parts.settings.batch_size * dist_info.world_size)
    history = trainer.fit()
    result = stage.finish(parts, trainer, run_dir) or {}
    if dist_info.is_main:
        _summarise(cfg, stage, history, result, run_dir)
    return run_dir


def _locate_run(cfg, stage_name: str) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (rank 0 decides: timestamped names)."""
    run_dir = Path(cfg.run_dir) if cfg.get("run_dir") else default_run_dir("train", stage_name)
    resume_from = latest_checkpoint(run_dir / "checkpoints") if cfg.get("resume", True) else None
    return broadcast_object((run_dir, resume_from))


def _trainer(cfg, stage: Stage, parts: StageParts, run_dir: Path, dist_info: DistInfo) -> Trainer:
    settings = parts.settings
    settings.world_size = dist_info.world_size
    batches = IndexedBatches(parts.dataset, settings.batch_size, parts.collate, seed=int(cfg.seed),
                             num_workers=int(cfg.train.num_workers), world_size=dist_info.world_size,
                             rank=dist_info.rank)
    extra = {"contract": parts.contract.to_dict(), "stage": stage.name,
             "config": OmegaConf.to_container(parts.config, resolve=True), **parts.checkpoint_extra}
    return Trainer(parts.meta_arch, batches, settings, run_dir, dist_info.device, checkpoint_extra=extra,
                   is_main=dist_info.is_main, parallel=parts.parallel, monitor=parts.monitor,
                   monitor_every=int(cfg.train.get("monitor_every", 0) or 0))


def _summarise(cfg, stage: Stage, history: list[dict], result: dict, run_dir: Path) -> None:
    summary = {"run_dir": str(run_dir), "stage": stage.name, "iterations": int(cfg.train.iterations)}
    if history:
        summary.update({"loss_first": history[0]["loss"], "loss_last": history[-1]["loss"]})
    summary.update(result.get("summary", {}))
    (run_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=2))
    print(f"run directory: {run_dir}")
    print(f"checkpoint:    {latest_checkpoint(run_dir / 'checkpoints')}")
    for label, path in result.get("outputs", {}).items():
        print(f"{label + ':':<14} {path}")
