"""`geodino train`: the run skeleton every stage shares.

The stage (geodino.train.stage) is looked up by ``stage.meta_arch`` and builds its parts; this module does the rest
once: the process group (one process or every rank of a ``torchrun`` launch), threads and CPU settings, the seed,
the run directory (``outputs/train/<stage>/<time>`` unless ``run_dir=``), resuming from its latest checkpoint, the
trainer, and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from geodino.checkpoint import Checkpoint, latest_checkpoint
from geodino.errors import GeodinoError
from geodino.outputs import close_file_logs
from geodino.runs import RunLock, claim_run_dir, json_safe, prepare_run_dir, setup_logging
from geodino.runtime import loader_workers, verb_setup
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
    run_dir, created = _locate_run(cfg, stage.name, dist_info)
    lock = RunLock(run_dir)
    try:
        if dist_info.is_main:
            lock.acquire()  # one run per run folder
        resume_from = latest_checkpoint(run_dir / "checkpoints") if cfg.get("resume", True) else None
        resumed = Checkpoint.open(resume_from) if resume_from is not None else None
        if resumed is not None:
            check_resume(cfg, resumed)  # before any expensive work
        parts = stage.build()
        if dist_info.is_main:
            prepare_run_dir(run_dir, parts.config)
            if resumed is not None:
                record_resume(run_dir, resumed, parts.config)
        return _train(cfg, stage, parts, run_dir, resume_from, dist_info)
    except BaseException:
        if created and latest_checkpoint(run_dir / "checkpoints") is None:
            close_file_logs(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)  # a failed new run leaves no empty folder behind
        raise
    finally:
        lock.release()


def _train(cfg, stage: Stage, parts: StageParts, run_dir: Path, resume_from: Path | None, dist_info: DistInfo) -> Path:
    trainer = _trainer(cfg, stage, parts, run_dir, dist_info)
    if resume_from is not None:
        trainer.resume(resume_from)
    if parts.describe:
        log.info("%s device=%s run_dir=%s", parts.describe, dist_info.device, run_dir)
    if dist_info.world_size > 1:
        log.info("data parallel: %s on %d processes, %d images per process, global batch %d",
                 cfg.train.get("parallel", "ddp"), dist_info.world_size, parts.settings.batch_size,
                 parts.settings.batch_size * dist_info.world_size)
    history = trainer.fit(on_step=parts.learning)
    result = stage.finish(parts, trainer, run_dir) or {}
    if parts.learning is not None and hasattr(parts.learning, "summary"):
        result.setdefault("summary", {})["learning"] = parts.learning.summary()
    if trainer.data_wait.active:
        result.setdefault("summary", {})["data_wait"] = trainer.data_wait.summary()
    if dist_info.is_main:
        _summarise(cfg, stage, history, result, run_dir)
    return run_dir


def _locate_run(cfg, stage_name: str, dist_info: DistInfo) -> tuple[Path, bool]:
    """The run directory and whether this call created it (rank 0 decides; a default name is claimed atomically)."""
    if cfg.get("run_dir"):
        run_dir = Path(str(cfg.run_dir))
        created = not run_dir.exists()
    elif dist_info.is_main:
        run_dir, created = claim_run_dir("train", stage_name), True
    else:
        run_dir, created = None, False
    run_dir = broadcast_object(run_dir)
    return Path(run_dir), created and dist_info.is_main


# ------------------------------------------------------------------------------------------------
# Resuming: the same run, or a refusal
# ------------------------------------------------------------------------------------------------

# What a run is: resuming with any of these changed would continue another run's weights on other terms.
IDENTITY_KEYS = ("data", "model", "stage.name", "stage.meta_arch", "seed", "init", "teacher", "students")
# Where and how a run is shown, not what it computes: changes are neither refused nor recorded.
RUNTIME_KEYS = ("run_dir", "resume", "progress", "threads", "device", "cpu_malloc_cache", "train.num_workers",
                "train.prefetch_factor", "train.data_wait_warn", "data.augment_on")


def _get(tree, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_resume(cfg, ckpt: Checkpoint) -> None:
    """Refuse to resume a run folder's checkpoint with other data, bands, model, stage or seed (the identity of the
    run), listing what differs; the checkpoint's own bands are never relabelled."""
    now = OmegaConf.to_container(cfg, resolve=True)
    diffs = []
    for key in IDENTITY_KEYS:
        a, b = _flatten(_get(ckpt.config, key), key), _flatten(_get(now, key), key)
        diffs += [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                  if a.get(k) != b.get(k) and not k.startswith(RUNTIME_KEYS)]
    if diffs:
        raise GeodinoError(
            f"the run in {Path(ckpt.path).parent.parent} was started with other settings ({'; '.join(diffs[:6])}"
            f"{'; ...' if len(diffs) > 6 else ''}); resuming would continue its weights on other data or another "
            "model. Use a new run_dir= (or resume=false to start over in this folder)")


def record_resume(run_dir: Path, ckpt: Checkpoint, config) -> dict:
    """Settings changed since the checkpoint (other than the identity, refused before): listed in the log and
    appended to ``config_history.yaml``; ``config.yaml`` keeps the settings the run started with."""
    before = _flatten(ckpt.config)
    now = _flatten(OmegaConf.to_container(config, resolve=True))
    changes = {k: [before.get(k), now.get(k)] for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k) and not k.startswith(RUNTIME_KEYS)}
    if changes:
        log.warning("resuming %s at step %s with changed settings: %s", run_dir, ckpt.step,
                    ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        entry = [{"resumed_at_step": ckpt.step, "time": datetime.now().isoformat(timespec="seconds"),
                  "changes": {k: {"before": a, "after": b} for k, (a, b) in changes.items()}}]
        with open(run_dir / "config_history.yaml", "a") as f:
            f.write(OmegaConf.to_yaml(OmegaConf.create(entry)))
    return changes


def _trainer(cfg, stage: Stage, parts: StageParts, run_dir: Path, dist_info: DistInfo) -> Trainer:
    settings = parts.settings
    settings.world_size = dist_info.world_size
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    workers = loader_workers(cfg.train.get("num_workers", "auto"), dist_info.device, per_node)
    batches = IndexedBatches(parts.dataset, settings.batch_size, parts.collate, seed=int(cfg.seed),
                             num_workers=workers, world_size=dist_info.world_size, rank=dist_info.rank,
                             pin_memory=dist_info.device.type == "cuda",
                             prefetch_factor=int(cfg.train.get("prefetch_factor", 2)))
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
