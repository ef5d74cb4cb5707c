"""`geodino eval <task>`: score a frozen backbone on LoveDA, GEO-Bench or canopy height (and, through
geodino.segment.evaluate, a dino.txt model's open-vocabulary segmentation: `geodino eval ov`).

`run_eval(cfg)` resolves the backbone (a released name, a geodino checkpoint / run directory, or a
released name plus an official ``.pth`` in ``weights=``), sets up the verb with `geodino.runtime.verb_setup`
(logging, ``threads`` — torch's thread count is restored afterwards —, the device, ``auto``: CUDA when visible)
and the run directory (``outputs/eval/<task>/<time>`` unless ``run_dir=``), runs the task and writes

* ``results.json`` — every number, the backbone fingerprint, cache use, timings, the published
  reference numbers and the full config;
* ``report.md`` — a table of every scalar plus the published numbers with their protocol;
* ``figures/*.png`` — input / truth / prediction for a few tiles and ``pca_features.png``;
* ``config.yaml`` and ``run.log``.

A ``run_dir`` that already holds ``results.json`` is refused unless ``overwrite=true``; a run that fails removes
the run directory it created (geodino.outputs). A released name without ``weights=`` is a randomly initialised
backbone: the log warns, and ``results.json`` (``backbone.random_weights``), the report and the printed line say so.
"""

from __future__ import annotations

import copy
import importlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from geodino.errors import GeodinoError
from geodino.eval.features import FeatureCache, backbone_fingerprint, contract_hash
from geodino.eval.published import PUBLISHED, published_markdown
from geodino.eval.report import eval_figures, eval_markdown, write_report
from geodino.models import load_backbone
from geodino.models.extract import Extractor
from geodino.models.registry import is_arch
from geodino.outputs import atomic_write_text, check_outputs, output_dir
from geodino.runs import default_run_dir, json_safe, setup_logging
from geodino.runtime import verb_setup

log = logging.getLogger("geodino")

# Task name -> the module whose `run(ctx)` runs it, imported when the task runs: a run loads only its own
# dataset reader's dependencies (torchgeo for LoveDA, h5py for GEO-Bench, rasterio for canopy).
TASK_MODULES = {
    "loveda": "geodino.eval.tasks.loveda",
    "geobench": "geodino.eval.tasks.geobench",
    "canopy": "geodino.eval.tasks.canopy",
}


class EvalContext:
    """What a task needs: config, dataset root, device, run dir, feature cache and the backbone."""

    def __init__(self, cfg: DictConfig, device: torch.device, run_dir: Path, cache_root: Path | None,
                 persistent: bool = True):
        self.cfg = cfg
        self.task = cfg.task
        self.task_name = str(cfg.task.name)
        self.root = Path(str(cfg.root)).expanduser()
        self.device = device
        self.run_dir = run_dir
        self.figures_dir = run_dir / "figures"
        self.cache = FeatureCache(cache_root)
        self.persistent = persistent and cache_root is not None
        self.progress = bool(cfg.get("progress", True))
        self.seed = int(cfg.get("seed", 0))
        self.num_workers = int(cfg.get("num_workers", 0) or 0)
        self.n_figures = int(cfg.get("n_figures", 3) or 0)
        self.cache_log: dict[str, str] = {}
        self.saved_heads: dict[str, str] = {}  # name -> checkpoint path (save_heads=true)
        self._scratch: FeatureCache | None = None
        self._backbones: dict[Any, torch.nn.Module] = {}
        self._extractors: dict[Any, Any] = {}

    def backbone(self, in_chans: int | None = None, bands: list[str] | None = None,
                 rgb_indices: list[int] | None = None) -> torch.nn.Module:
        """The frozen backbone; `in_chans` != its bands adapts the first layer (registry rule)."""
        if None not in self._backbones:
            torch.manual_seed(self.seed)  # a randomly initialised backbone is reproducible
            self._backbones[None] = load_backbone(str(self.cfg.backbone), weights=_opt(self.cfg.weights))
        base = self._backbones[None]
        if in_chans is None or int(in_chans) == base.geodino_contract.in_chans:
            return base
        key = (int(in_chans), tuple(bands) if bands else None, tuple(rgb_indices) if rgb_indices else None)
        if key not in self._backbones:
            torch.manual_seed(self.seed)
            self._backbones[key] = load_backbone(str(self.cfg.backbone), weights=_opt(self.cfg.weights),
                                                 in_chans=int(in_chans), bands=list(bands) if bands else None,
                                                 rgb_indices=list(rgb_indices) if rgb_indices else None)
        return self._backbones[key]

    def extractor(self, in_chans: int | None = None, bands: list[str] | None = None,
                  rgb_indices: list[int] | None = None):
        model = self.backbone(in_chans, bands, rgb_indices)
        if id(model) not in self._extractors:
            layers = self.task.get("layers", 1)
            layers = OmegaConf.to_container(layers) if OmegaConf.is_config(layers) else layers
            self._extractors[id(model)] = Extractor(model, self.device, layers=layers)
        return self._extractors[id(model)]

    def layers_used(self):
        """The blocks the heads read, resolved on the backbone (``spaced:4`` -> [5, 11, 17, 23] on a ViT-L)."""
        from geodino.models.extract import list_or_int

        ex = next(iter(self._extractors.values()), None)
        return None if ex is None else list_or_int(ex.layers)

    def scratch_cache(self) -> FeatureCache:
        """Features that are not worth keeping (a fine-tuned backbone's): a folder in the run dir, removed at the
        end of the run."""
        if self._scratch is None:
            self._scratch = FeatureCache(self.run_dir / "_scratch_features")
        return self._scratch

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch.root, ignore_errors=True)

    def note_cache(self, what: str, hit: bool) -> None:
        self.cache_log[what] = "hit" if hit else ("written" if self.persistent else "disabled")


def _opt(v) -> str | None:
    return None if v in (None, "", "null") else str(v)


# Tasks that need a higher layer run through it and pass their runner to `run_eval` (the CLI dispatches them).
UPPER_TASKS = {"ov": "geodino.segment.evaluate.run_ov_eval"}


def _task_runner(name: str) -> Callable[[EvalContext], dict]:
    if name in UPPER_TASKS:
        raise GeodinoError(f"eval task '{name}' runs through {UPPER_TASKS[name]} (`geodino eval {name}`)")
    if name not in TASK_MODULES:
        raise GeodinoError(f"unknown eval task '{name}'; choose one of: {', '.join([*TASK_MODULES, *UPPER_TASKS])}")
    return importlib.import_module(TASK_MODULES[name]).run


def run_eval(cfg: DictConfig, runner: Callable[[EvalContext], dict] | None = None) -> dict:
    """Run ``cfg.task`` (its module in TASK_MODULES, or `runner` for a task of a higher layer) and write the
    results (module doc)."""
    task = str(cfg.task.name)
    runner = runner if runner is not None else _task_runner(task)
    if cfg.get("root") in (None, "", "null"):
        raise GeodinoError(f"set root=<dataset folder> for geodino eval {task} (datasets are never downloaded)")
    root = Path(str(cfg.root)).expanduser()
    if not root.exists():
        raise GeodinoError(f"root={root} does not exist")
    threads_before = torch.get_num_threads()
    try:
        device = verb_setup(cfg)
        return _run(cfg, task, runner, root, device)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: DictConfig, task: str, runner, root: Path, device: torch.device) -> dict:
    run_dir = Path(str(cfg.run_dir)).expanduser() if cfg.get("run_dir") else default_run_dir("eval", task)
    check_outputs([run_dir / "results.json", run_dir / "report.md"], [_opt(cfg.get("weights"))],
                  overwrite=bool(cfg.get("overwrite", False)), what="eval output")
    with output_dir(run_dir):  # a failed run leaves no run directory behind
        return _run_in(cfg, task, runner, root, device, run_dir)


def _run_in(cfg: DictConfig, task: str, runner, root: Path, device: torch.device, run_dir: Path) -> dict:
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    setup_logging(run_dir / "run.log")
    temporary = not cfg.get("cache_features", True)
    if temporary:  # features still go to memory-mapped files (a LoveDA split can exceed RAM), removed at the end
        cache_root = run_dir / "_features_tmp"
    else:
        cache_root = Path(str(cfg.cache_dir)) if cfg.get("cache_dir") else Path("outputs") / "eval" / "feature_cache"
    ctx = EvalContext(cfg, device, run_dir, cache_root, persistent=not temporary)
    try:
        return _evaluate(cfg, task, runner, root, ctx, run_dir, device, None if temporary else cache_root)
    finally:
        ctx.close()
        if temporary:
            shutil.rmtree(cache_root, ignore_errors=True)


def _evaluate(cfg, task, runner, root, ctx, run_dir, device, cache_root) -> dict:
    log.info("geodino eval %s: root=%s backbone=%s weights=%s device=%s run_dir=%s", task, root, cfg.backbone,
             cfg.get("weights"), device, run_dir)

    t0 = time.perf_counter()
    backbone = ctx.backbone()
    contract = backbone.geodino_contract
    metrics = runner(ctx)
    elapsed = time.perf_counter() - t0
    random_weights = is_arch(str(cfg.backbone)) and _opt(cfg.get("weights")) is None
    results = {
        "task": task,
        "backbone": {
            "name": str(cfg.backbone),
            "weights": _opt(cfg.get("weights")),
            "random_weights": random_weights,
            "arch": contract.name,
            "bands": list(contract.bands),
            "mean": list(contract.mean),
            "std": list(contract.std),
            "patch_size": contract.patch_size,
            "contract_hash": contract_hash(contract),
            "fingerprint": backbone_fingerprint(backbone),
        },
        "device": str(device),
        **metrics,
        "feature_cache": {"dir": None if cache_root is None else str(cache_root), **ctx.cache_log},
        **({"checkpoints": ctx.saved_heads} if ctx.saved_heads else {}),
        "seconds": round(elapsed, 2),
    }
    results = json_safe(results)
    config = OmegaConf.to_container(cfg, resolve=True)
    # the published numbers go into the JSON and a section of their own, not into our metric table
    published = copy.deepcopy(PUBLISHED.get(task, {}))
    warning = f"RANDOM backbone weights: {cfg.backbone} was loaded without weights=" if random_weights else ""
    figures = eval_figures(results, run_dir / "figures") if ctx.n_figures > 0 else {}
    appendix = eval_markdown(results, figures) + "\n" + published_markdown(task)
    if warning:
        appendix = f"\n> **Warning: {warning}; these numbers are a random-feature baseline.**\n\n{appendix}"
    _, md = write_report(run_dir, results, config=config, title=f"geodino eval {task} — {cfg.backbone}",
                         json_only={"published": published}, appendix=appendix)
    results["published"] = published
    log.info("wrote %s and %s", run_dir / "results.json", md)
    print(f"geodino eval {task}: {_headline(results)} -> {run_dir}" + (f"  ({warning})" if warning else ""))
    return results


def _headline(results: dict) -> str:
    h = results.get("headline")
    if isinstance(h, dict):
        return ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in h.items())
    return "done"
