"""One trainer for every stage (dinov3_spec.md §6: step order, optimiser, schedules, EMA, checkpoints).

The loop knows nothing about which models or losses a stage uses: it takes a *meta-architecture*
with this small interface

- `student_modules() -> {name: module}` — what the optimiser trains and clips (separately per module);
- `forward_backward(batch, teacher_temp, loss_scale=...) -> (loss, stats)`;
- `update_ema(momentum)`, `state_dict()` / `load_state_dict()`;
- optional `param_groups(settings)` (its own optimiser groups; default: the reference's SSL groups),
  `after_step(step)` (e.g. a Gram-teacher refresh) and `on_checkpoint(run_dir, step)` (e.g. writing
  distilled students beside each checkpoint), and ``has_teacher = False`` for a meta-architecture without an EMA
  teacher (its metrics rows then carry no ``momentum`` / ``teacher_temp``),

and a *batch source* that turns a global batch index into a training batch (`iterate(start)`; an optional
``num_workers`` tells the data-wait monitor whether loader workers produce the batches). Step order follows the
reference: set LR/WD, zero grads, forward_backward (grad accumulation over micro-batches), clip per
student submodule, NaN check (abort after more than 2 consecutive non-finite losses), optimiser step,
EMA update, stage hook, metrics, checkpoint.

Exact resume: data are addressed by index (see geodino.data.sources.raster), masks are drawn from a
per-batch seed, and the checkpoint holds the optimiser, every RNG state and the data position, so a
killed run continues with the losses an uninterrupted run would have had.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from geodino import checkpoint as ckpt_io
from geodino.data.collate import collate_data_and_cast
from geodino.data.masking import MaskingGenerator
from geodino.errors import GeodinoError
from geodino.models.backbone import Backbone
from geodino.runs import open_metrics
from geodino.runtime import usable_cpus
from geodino.train.distributed import Parallel, rank_masks
from geodino.train.monitors import DataWaitMonitor
from geodino.train.schedules import cosine_schedule, lr_scaled, teacher_temp_schedule

log = logging.getLogger("geodino")


# ------------------------------------------------------------------------------------------------
# Parameter groups (reference `get_params_groups_with_decay_fsdp`)
# ------------------------------------------------------------------------------------------------

def param_groups(modules: dict[str, nn.Module], layerwise_decay: float, patch_embed_lr_mult: float) -> list[dict]:
    """The reference's parameter groups, built per student module and merged where (lr multiplier, wd
    multiplier, last-layer flag, backbone flag) agree (dinov3_spec.md §6):
    - a backbone (`geodino.models.Backbone`) that uses layer-wise decay gets ``d^(L+1−layer_id)``, and its patch
      embedding a further ``patch_embed_lr_mult``; other modules (heads) and ConvNeXt backbones get 1;
    - weight decay 0 for names ending in ``bias`` or containing ``norm``, ``gamma`` or ``fourier_w`` (the learned
      tokens decay);
    - ``last_layer`` parameters are flagged for the last-layer LR schedule.
    """
    groups: dict[tuple, dict] = {}
    for mod_name, module in modules.items():
        is_backbone = isinstance(module, Backbone)
        decay = is_backbone and module.uses_layer_decay
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            lr_mult = 1.0
            if decay:
                lr_mult = layerwise_decay ** (module.n_layer_ids - module.layer_id(name))
                if module.is_patch_embed(name):
                    lr_mult *= patch_embed_lr_mult
            wd_mult = 0.0 if (name.endswith("bias") or any(k in name for k in ("norm", "gamma", "fourier_w"))) else 1.0
            is_last = "last_layer" in name
            key = (round(lr_mult, 12), wd_mult, is_last, is_backbone)
            g = groups.setdefault(key, {"params": [], "lr_mult": lr_mult, "wd_mult": wd_mult, "is_last_layer": is_last,
                                        "is_backbone": is_backbone, "names": []})
            g["params"].append(p)
            g["names"].append(f"{mod_name}.{name}")
    return list(groups.values())


# ------------------------------------------------------------------------------------------------
# Batches by index
# ------------------------------------------------------------------------------------------------

class IndexedBatches:
    """Batch `b` on rank `r` holds samples [(b·W + r)·B, (b·W + r + 1)·B) of an index-addressed dataset.

    Each sample's augmentation randomness is seeded by (seed, sample index), and the batch's
    masking randomness by (seed, b), so batch `b` is the same whenever and wherever it is built.
    """

    def __init__(self, dataset, batch_size: int, collate: Callable[[list, random.Random], dict], seed: int,
                 num_workers: int = 0, world_size: int = 1, rank: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 2):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.collate = collate
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.pin_memory = bool(pin_memory)  # page-locked batches: faster, asynchronous copies to a GPU
        self.prefetch_factor = int(prefetch_factor)  # batches each worker prepares ahead

    def _indices(self, b: int) -> list[int]:
        start = (b * self.world_size + self.rank) * self.batch_size
        return list(range(start, start + self.batch_size))

    def iterate(self, start_batch: int) -> Iterator[tuple[int, dict]]:
        batch_sampler = _BatchIndexSampler(self, start_batch)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batch_sampler,
            collate_fn=list,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=self.num_workers > 0,
            # A private generator: creating the loader must not consume the global RNG, or a
            # resumed run would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed),
        )
        b = start_batch
        for samples in loader:
            yield b, self.collate(samples, random.Random(self.seed * 1_000_003 + b))
            b += 1


class _BatchIndexSampler(torch.utils.data.Sampler):
    def __init__(self, batches: IndexedBatches, start: int):
        self.batches, self.start = batches, start

    def __iter__(self):
        b = self.start
        while True:
            yield self.batches._indices(b)
            b += 1


def sample_generator(seed: int, i: int) -> torch.Generator:
    """The generator that draws sample `i`'s augmentation (wherever it runs: a loader worker or the device)."""
    return torch.Generator().manual_seed((int(seed) * 2_654_435_761 + int(i)) % (2**63 - 1))


class AugmentedDataset(torch.utils.data.Dataset):
    """source[i] -> augment(image, generator seeded by (seed, i))."""

    def __init__(self, source, augment, seed: int = 0):
        self.source, self.augment, self.seed = source, augment, int(seed)

    def __len__(self):
        return 2**62

    def __getitem__(self, i: int):
        return self.augment(self.source[i], generator=sample_generator(self.seed, i))


class IndexedImages(torch.utils.data.Dataset):
    """source[i] -> (i, image): the loader workers only read; `DeviceAugment` augments on the training device."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return 2**62

    def __getitem__(self, i: int):
        return int(i), self.source[i]


class DeviceAugment:
    """``data.augment_on=gpu``: each image goes to the training device and is multi-cropped there with the same
    transform and the same per-sample generator as in a loader worker, so both paths draw the same crops (on the CPU
    bit for bit; on a GPU up to the kernels' rounding). For when the CPU workers cannot keep up."""

    def __init__(self, augment, seed: int, device: torch.device):
        self.augment, self.seed, self.device = augment, int(seed), torch.device(device)

    def __call__(self, samples: list) -> list:
        return [self.augment(img.to(self.device, non_blocking=True), generator=sample_generator(self.seed, i))
                for i, img in samples]


AUGMENT_ON = ("cpu", "gpu")


def augmented_data(source, augment, seed: int, collate: Callable, on: str = "cpu",
                   device: torch.device | str = "cpu") -> tuple[torch.utils.data.Dataset, Callable]:
    """The training dataset and batch collate for `augment` applied to `source`: in the loader workers
    (``on="cpu"``, the default) or on the training device after the workers read the images (``on="gpu"``)."""
    if on not in AUGMENT_ON:
        raise GeodinoError(f"data.augment_on={on!r}: choose one of {', '.join(AUGMENT_ON)}")
    if on == "cpu":
        return AugmentedDataset(source, augment, seed), collate
    if torch.device(device).type == "cpu":
        log.warning("data.augment_on=gpu on a CPU run: the multi-crop runs in the main process, after the loader")
    on_device = DeviceAugment(augment, seed, device)
    return IndexedImages(source), lambda samples, rng: collate(on_device(samples), rng)


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepSchedule:
    """The schedules' values for one iteration."""

    lr: float
    last_layer_lr: float
    wd: float
    momentum: float
    teacher_temp: float


@dataclass
class TrainSettings:
    iterations: int
    batch_size: int
    grad_accum: int = 1
    log_every: int = 10
    checkpoint_every: int = 100
    keep_last: int = 3
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_iterations: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    freeze_last_layer_iterations: int = 0
    head_warmup_iterations: int = 0  # backbone LR 0 while fresh heads warm up (continuing a released backbone)
    scaling_rule: str = "none"
    momentum: float = 0.992
    final_momentum: float = 1.0
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_iterations: int = 0
    precision: str = "auto"
    progress: bool = True
    world_size: int = 1
    data_wait_warn: float = 0.5  # warn when the loop waits on data for more than this share of a step (0: never)
    loggers: tuple[str, ...] = ("jsonl",)  # metrics writers: jsonl (metrics.jsonl), tensorboard (tensorboard/)

    @classmethod
    def from_cfg(cls, cfg) -> "TrainSettings":
        t, o, e = cfg.train, cfg.optim, cfg.ema
        return cls(
            iterations=int(t.iterations), batch_size=int(t.batch_size), grad_accum=int(t.grad_accum),
            log_every=int(t.log_every), checkpoint_every=int(t.checkpoint_every), keep_last=int(t.keep_last),
            lr=float(o.lr), min_lr=float(o.min_lr), warmup_iterations=int(o.warmup_iterations),
            weight_decay=float(o.weight_decay), weight_decay_end=float(o.weight_decay_end),
            betas=tuple(float(b) for b in o.betas), layerwise_decay=float(o.layerwise_decay),
            patch_embed_lr_mult=float(o.patch_embed_lr_mult), clip_grad=float(o.clip_grad),
            freeze_last_layer_iterations=int(o.freeze_last_layer_iterations), scaling_rule=str(o.scaling_rule),
            momentum=float(e.momentum), final_momentum=float(e.final_momentum), teacher_temp=float(e.teacher_temp),
            warmup_teacher_temp=float(e.warmup_teacher_temp),
            warmup_teacher_temp_iterations=int(e.warmup_teacher_temp_iterations), precision=str(t.precision),
            progress=bool(cfg.get("progress", True)), data_wait_warn=float(t.get("data_wait_warn", 0.5)),
            loggers=_loggers(t.get("loggers", ["jsonl"])),
        )


def _loggers(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in (OmegaConf.to_container(value) if OmegaConf.is_config(value) else value or []))


class Trainer:
    """The one training loop (see the module docstring): schedules, optimiser, clipping, EMA, checkpoints."""

    def __init__(self, meta_arch: nn.Module, batches: IndexedBatches, settings: TrainSettings, run_dir: str | Path,
                 device: torch.device, checkpoint_extra: dict | None = None, is_main: bool = True,
                 parallel: Parallel | None = None, monitor: Callable[[], dict] | None = None,
                 monitor_every: int = 0):
        # `parallel` (geodino.train.distributed.wrap_student) does the rank-aware parts: stat reduction,
        # gradient clipping of sharded parameters, full-state checkpoints. None: one process.
        self.parallel = parallel if parallel is not None else Parallel()
        self.meta = meta_arch.to(device)
        self.batches = batches
        self.s = settings
        self.run_dir = Path(run_dir)
        self.device = device
        self.extra = dict(checkpoint_extra or {})
        self.is_main = is_main
        # Held-out dense-feature monitor (geodino.train.monitors.heldout_monitor), every `monitor_every` steps.
        self.monitor, self.monitor_every = monitor, int(monitor_every)
        n = settings.iterations
        global_batch = settings.batch_size * settings.grad_accum * settings.world_size
        peak = lr_scaled(settings.lr, global_batch, settings.scaling_rule)
        self.lr = cosine_schedule(peak, settings.min_lr, n, warmup=settings.warmup_iterations)
        # reference `last_layer_lr_schedule`: the LR schedule, 0 for the first freeze_last_layer iterations
        self.last_layer_lr = self.lr.copy()
        self.last_layer_lr[: settings.freeze_last_layer_iterations] = 0.0
        self.wd = cosine_schedule(settings.weight_decay, settings.weight_decay_end, n)
        self.momentum = cosine_schedule(settings.momentum, settings.final_momentum, n)
        self.teacher_temp = teacher_temp_schedule(settings.warmup_teacher_temp, settings.teacher_temp,
                                                  settings.warmup_teacher_temp_iterations, n)
        # A meta-architecture may define its own parameter groups (dino.txt: the reference's text-stage rule);
        # otherwise the reference's SSL groups over its student modules.
        custom = getattr(self.meta, "param_groups", None)
        self.groups = custom(settings) if callable(custom) else param_groups(
            self.meta.student_modules(), settings.layerwise_decay, settings.patch_embed_lr_mult)
        # The fused AdamW kernel (CUDA and, since torch 2.4, CPU) updates each tensor in one pass; on the CPU the
        # "foreach" path is a per-tensor loop of ~10 element-wise ops (66M parameters at the reference ViT-S
        # head sizes: 0.20 s -> 0.06 s per step on 2 cores).
        self.optimizer = torch.optim.AdamW(
            [{k: v for k, v in g.items() if k != "names"} for g in self.groups],
            lr=peak, betas=settings.betas, weight_decay=settings.weight_decay, fused=device.type in ("cuda", "cpu"),
        )
        self.start_step = 0
        self.nan_streak = 0
        self.history: list[dict] = []

    # -- precision -------------------------------------------------------------------------------
    def _autocast(self):
        prec = self.s.precision
        if prec == "auto":
            prec = "bf16" if self.device.type == "cuda" else "fp32"
        if prec == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if prec != "fp32":
            raise GeodinoError(f"train.precision must be auto, fp32 or bf16, got '{prec}'")
        return torch.autocast(self.device.type, enabled=False)

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self, next_step: int) -> dict | None:
        """The full training state; collective under FSDP2 (call on every rank), None off the main rank."""
        model_sd = self.parallel.model_state_dict(self.meta)
        optim_sd = self.parallel.optim_state_dict(self.meta, self.optimizer)
        if not self.is_main:
            return None
        return ckpt_io.training_payload(next_step, model_sd, optim_sd, data_position=next_step * self.s.grad_accum,
                                        nan_streak=self.nan_streak, extra=self.extra)

    def save(self, next_step: int) -> Path | None:
        """Write a checkpoint (every rank calls: gathering a sharded state is collective; the main rank writes),
        then run the meta-architecture's `on_checkpoint(run_dir, step)` hook on the main rank."""
        state = self.state(next_step)
        if state is None:
            return None
        path = ckpt_io.save_checkpoint(state, self.run_dir / "checkpoints", next_step, self.s.keep_last)
        hook = getattr(self.meta, "on_checkpoint", None)
        if callable(hook):
            hook(self.run_dir, next_step)
        return path

    def resume(self, path: str | Path) -> int:
        state = ckpt_io.load_checkpoint(path)
        try:
            self.parallel.load_state(self.meta, self.optimizer, state["models"]["meta_arch"], state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise GeodinoError(f"checkpoint {path} does not fit this run's models/optimiser: {str(e).splitlines()[0]}") from e
        ckpt_io.set_rng_state(state["rng"])
        self.start_step = int(state["step"])
        self.nan_streak = int(state.get("nan_streak", 0))
        log.info("resumed from %s at step %d", path, self.start_step)
        return self.start_step

    # -- one step ---------------------------------------------------------------------------------
    def schedule(self, step: int) -> StepSchedule:
        """The schedules' values at `step`."""
        return StepSchedule(lr=float(self.lr[step]), last_layer_lr=float(self.last_layer_lr[step]),
                            wd=float(self.wd[step]), momentum=float(self.momentum[step]),
                            teacher_temp=float(self.teacher_temp[step]))

    def _set_schedules(self, step: int, sch: StepSchedule) -> None:
        """Reference `apply_optim_scheduler`: lr = (last_layer_lr if is_last_layer else lr) × lr_multiplier,
        weight_decay = wd × wd_multiplier; plus the backbone's LR 0 while fresh heads warm up."""
        for group in self.optimizer.param_groups:
            lr = (sch.last_layer_lr if group["is_last_layer"] else sch.lr) * group["lr_mult"]
            if group.get("is_backbone") and step < self.s.head_warmup_iterations:
                lr = 0.0
            group["lr"] = lr
            group["weight_decay"] = sch.wd * group["wd_mult"]

    def _forward_backward(self, data, teacher_temp: float) -> tuple[dict[str, float], float]:
        """Forward and backward over `grad_accum` micro-batches; (rank-mean stats, data time)."""
        t_data = 0.0
        stats_acc: dict[str, float] = {}
        for _ in range(self.s.grad_accum):
            td = time.perf_counter()
            _, batch = next(data)
            batch = _to_device(batch, self.device)
            t_data += time.perf_counter() - td
            with self._autocast():
                _, stats = self.meta.forward_backward(batch, teacher_temp, loss_scale=1.0 / self.s.grad_accum)
            for k, v in stats.items():
                stats_acc[k] = stats_acc.get(k, 0.0) + v / self.s.grad_accum
        return self.parallel.reduce_stats(stats_acc), t_data  # rank means (identity in one process)

    def _clip(self) -> dict[str, float]:
        """Clip each student module's gradients separately (reference); the norms before clipping."""
        norms = {}
        for name, module in self.meta.student_modules().items():
            params = [p for p in module.parameters() if p.grad is not None]
            if params and self.s.clip_grad > 0:
                norms[f"grad_norm_{name}"] = self.parallel.clip_grad_norm_(params, self.s.clip_grad)
        return norms

    def _update(self, step: int, loss: float, momentum: float) -> None:
        """Optimiser step and EMA, or skip the step on a non-finite loss (abort after more than 2 in a row)."""
        if not math.isfinite(loss):
            self.nan_streak += 1
            log.warning("step %d: non-finite loss %s (%d in a row)", step, loss, self.nan_streak)
            if self.nan_streak > 2:
                raise GeodinoError(
                    f"training diverged: non-finite loss for {self.nan_streak} consecutive steps at step {step}; "
                    "lower optim.lr or check the data normalisation"
                )
            self.optimizer.zero_grad(set_to_none=True)
            return
        self.nan_streak = 0
        self.optimizer.step()
        self.meta.update_ema(momentum)

    def step(self, data, step: int, schedule: StepSchedule | None = None,
             before_clip: Callable[[], None] | None = None) -> dict:
        """One training iteration in the reference's order (set LR / WD, zero grads, forward-backward, clip per
        student module, optimiser step, EMA, stage hook, monitor); returns the metrics row. `schedule` replaces
        the schedules' values at `step` and `before_clip` is called with the raw gradients in place (both for
        geodino.testing.reference_step, which replays a recorded official step through this method)."""
        t0 = time.perf_counter()
        sch = schedule if schedule is not None else self.schedule(step)
        self._set_schedules(step, sch)
        self.optimizer.zero_grad(set_to_none=True)
        stats, t_data = self._forward_backward(data, sch.teacher_temp)
        t_fb = time.perf_counter()
        if before_clip is not None:
            before_clip()
        grad_norms = self._clip()
        self._update(step, stats["loss"], sch.momentum)
        hook = getattr(self.meta, "after_step", None)
        if hook is not None:
            stats.update(hook(step) or {})
        if self.monitor is not None and self.monitor_every > 0 and (
                step % self.monitor_every == 0 or step == self.s.iterations - 1):
            stats.update(self.monitor())
        t_end = time.perf_counter()
        teacher = {"momentum": sch.momentum, "teacher_temp": sch.teacher_temp} if getattr(
            self.meta, "has_teacher", True) else {}  # e.g. dino.txt has no EMA teacher: nothing to report
        return {
            "step": step, **stats, **grad_norms,
            "lr": sch.lr, "wd": sch.wd, **teacher,
            "time_data": t_data, "time_forward_backward": t_fb - t0 - t_data, "time_optim": t_end - t_fb,
            "time_step": t_end - t0,
        }

    # -- the loop ---------------------------------------------------------------------------------
    def _log(self, step: int, row: dict) -> None:
        if self.is_main and (step % self.s.log_every == 0 or step == self.s.iterations - 1):
            log.info("step %d/%d loss %.4f %s", step, self.s.iterations, row["loss"],
                     " ".join(f"{k[5:]}={v:.4f}" for k, v in row.items() if k.startswith("loss_")))

    def fit(self, on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
        s = self.s
        metrics = open_metrics(self.run_dir, s.loggers, truncate_after_step=self.start_step - 1) if self.is_main else None
        self.meta.train()
        # a stand-in batch source (benchmarks/train_step.py replays one batch) has no loader workers
        self.data_wait = DataWaitMonitor(s.data_wait_warn, getattr(self.batches, "num_workers", 0), self.device,
                                         usable_cpus())
        data = self.batches.iterate(self.start_step * s.grad_accum)
        bar = tqdm(total=s.iterations, initial=self.start_step, desc="train", disable=not (s.progress and self.is_main),
                   dynamic_ncols=True)
        try:
            for step in range(self.start_step, s.iterations):
                row = self.step(data, step)
                self.history.append(row)
                if metrics is not None:
                    metrics.write(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", cls_std=f"{row.get('cls_std', 0):.3f}")
                self._log(step, row)
                if self.is_main:
                    self.data_wait(step, row)
                if on_step is not None:
                    on_step(step, row)
                done = step + 1
                if s.checkpoint_every > 0 and (done % s.checkpoint_every == 0 or done == s.iterations):
                    self.save(done)  # on every rank (collective under FSDP2); the main rank writes
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        return self.history


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def collate_for(stage_cfg, n_tokens: int | None, world_size: int = 1, rank: int = 0,
                patch_size: int = 16) -> Callable[[list, Any], dict]:
    """The batch collate. With ``world_size > 1`` the iBOT masks are drawn for the *global* batch (the
    same draws a one-process run of batch ``world_size × B`` makes from the same per-batch seed) and this
    rank's images' masks are sliced out (`geodino.train.distributed.rank_masks`)."""

    fixed_side = None if n_tokens is None else int(round(math.sqrt(n_tokens)))

    def collate(samples: list, rng: random.Random) -> dict:
        # n_tokens None: the global crop size varies per batch (high-res adaptation); read it off the crops
        side = fixed_side if fixed_side is not None else int(samples[0]["global_crops"][0].shape[-1]) // patch_size
        n_tokens = side * side
        gen = MaskingGenerator(input_size=(side, side), max_num_patches=0.5 * side * side, rng=rng)
        kw = dict(mask_ratio_tuple=tuple(stage_cfg.ibot.mask_ratio_min_max),
                  mask_probability=float(stage_cfg.ibot.mask_sample_probability), n_tokens=n_tokens)
        if world_size == 1:
            return collate_data_and_cast(samples, mask_generator=gen, random_state=rng, **kw)
        # this rank's crops (their masks are replaced below; a private generator leaves `rng` untouched)
        out = collate_data_and_cast(samples, mask_generator=MaskingGenerator(input_size=(side, side), rng=0),
                                    random_state=0, **{**kw, "mask_probability": 0.0})
        n_global = len(samples[0]["global_crops"])
        # stand-ins for the global batch: only their count matters to the mask draws
        ghosts = [{"global_crops": [torch.empty(0)] * n_global, "local_crops": []}] * (len(samples) * world_size)
        full = collate_data_and_cast(ghosts, mask_generator=gen, random_state=rng, **kw)
        out.update(rank_masks(full["collated_masks"], n_global, world_size, rank))
        out["upperbound"] = full["upperbound"]
        return out

    return collate

