"""The stage interface: a training stage is a plug-in that builds its parts from the config.

`geodino train stage=<name>` composes ``configs/stage/<name>.yaml``; its ``meta_arch`` key names the stage class,
either a short name of `STAGES` or an import string ``package.module:Class``. The run skeleton
(geodino.train.run) does everything else once for every stage: process group, threads, seed, run directory,
resume, the trainer, the summary. A stage only says what is specific to it:

    class MyStage(Stage):
        def build(self) -> StageParts: ...          # data, meta-architecture, settings, checkpoint extras
        def finish(self, parts, trainer, run_dir):  # optional: outputs and summary entries after training
            ...

`build` must not change ``self.cfg``: it returns the resolved config it ran with (``StageParts.config``, written to
``config.yaml`` and the checkpoints), so what a stage sees never depends on the order in which helpers ran.
docs/ARCHITECTURE.md ("Adding a stage") walks through a complete example.
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from torch import nn

from geodino.contract import Contract
from geodino.errors import GeodinoError
from geodino.train.distributed import DistInfo, Parallel
from geodino.train.loop import TrainSettings

# meta_arch short names -> import strings (strings, so train/ never imports the layers above it)
STAGES: dict[str, str] = {
    "ssl": "geodino.train.stages.ssl:SSLStage",
    "distill": "geodino.train.stages.distill:DistillStage",
    "dinotxt": "geodino.text.stage:TextStage",
}


@dataclass
class StageParts:
    """What a stage hands the run skeleton."""

    meta_arch: nn.Module  # the trainer's meta-architecture (geodino.train.loop: the interface)
    dataset: Any  # index-addressed: item i -> one augmented sample
    collate: Callable[[list, random.Random], dict]  # samples, per-batch RNG -> a batch
    config: DictConfig  # the resolved config the run used (config.yaml, checkpoints)
    contract: Contract  # the backbone this run produces (`load_backbone(<run>)` returns it)
    settings: TrainSettings
    checkpoint_extra: dict = field(default_factory=dict)  # stage entries beside contract / stage / config
    parallel: Parallel | None = None  # None: one process
    monitor: Callable[[], dict] | None = None  # held-out monitor, every train.monitor_every steps
    learning: Callable[[int, dict], None] | None = None  # per-step watcher (train.monitors.LearningMonitor)
    describe: str = ""  # one log line about the run


class Stage:
    """Base class of the training stages (see the module docstring)."""

    supports_distributed: bool = True

    def __init__(self, cfg: DictConfig, dist: DistInfo):
        self.cfg = cfg
        self.dist = dist
        self.name = str(cfg.stage.name)

    def build(self) -> StageParts:
        raise NotImplementedError

    def finish(self, parts: StageParts, trainer, run_dir: Path) -> dict:
        """After training, on every rank (collective work such as gathering sharded weights is allowed).
        Returns ``{"summary": {...}, "outputs": {label: path}}``; only the main rank's result is used."""
        return {}

    # -- helpers for subclasses ---------------------------------------------------------------------
    def resolved(self, **groups: dict) -> DictConfig:
        """A copy of the config with `groups` merged in (e.g. ``stage={...}``, ``train={...}``)."""
        out = OmegaConf.create(OmegaConf.to_container(self.cfg, resolve=True))
        if groups:
            out = OmegaConf.merge(out, OmegaConf.create({k: v for k, v in groups.items() if v}))
        return out


def stage_class(meta_arch: str) -> type[Stage]:
    """The Stage class for a ``stage.meta_arch`` value (a short name or ``module:Class``)."""
    target = STAGES.get(str(meta_arch), str(meta_arch))
    module_name, sep, attr = target.partition(":")
    if not sep:
        raise GeodinoError(f"stage.meta_arch={meta_arch!r} is neither one of {', '.join(STAGES)} nor an import "
                           "string 'package.module:Class'")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise GeodinoError(f"stage.meta_arch={meta_arch!r}: cannot import {target} ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise GeodinoError(f"stage.meta_arch={meta_arch!r}: {target} is not a geodino.train.stage.Stage")
    return cls
