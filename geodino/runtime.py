"""Where a verb runs: the one device resolver and the set-up every verb does first.

- `resolve_device(name, local_rank=None)`: ``auto`` (CUDA when visible, else CPU), ``cpu``, ``cuda``, ``cuda:N``;
  under ``torchrun`` a bare ``cuda`` means the local rank's GPU. Unknown names and CUDA without a GPU are one-line
  errors.
- `verb_setup(cfg)`: logging, ``threads``, the device and the CPU allocator setting (``cpu_malloc_cache``);
  returns the device.
- `loader_workers(setting, device)`: the DataLoader worker count for ``train.num_workers`` (``auto`` from the
  machine).
"""

from __future__ import annotations

import os

import torch

from geodino.cpu import apply_run_settings
from geodino.errors import GeodinoError
from geodino.runs import setup_logging


def resolve_device(name: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    if isinstance(name, torch.device):
        requested = str(name)
    else:
        requested = "auto" if name in (None, "", "auto") else str(name)
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(requested)
    except (RuntimeError, ValueError) as e:
        raise GeodinoError(f"device={name} is not a device name (auto, cpu, cuda, cuda:N): {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GeodinoError(f"device={name} was requested but no CUDA device is visible; use device=cpu or "
                               "device=auto")
        if dev.index is None and local_rank is not None:  # one GPU per local rank
            n_gpus = torch.cuda.device_count()
            if local_rank >= n_gpus:
                raise GeodinoError(f"LOCAL_RANK={local_rank} but only {n_gpus} GPU(s) are visible: start at most "
                                   f"{n_gpus} processes per node (torchrun --nproc_per_node) or use device=cpu")
            dev = torch.device("cuda", local_rank)
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise GeodinoError(f"device={name}: geodino runs on cpu or cuda")
    return dev


def verb_setup(cfg, device: torch.device | None = None) -> torch.device:
    """Logging to stderr, torch threads from ``threads``, the device (``device``) and, on the CPU, the allocator
    cache (``cpu_malloc_cache``). Returns the device."""
    setup_logging()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if device is None:
        device = resolve_device(cfg.get("device", "auto"))
    apply_run_settings(cfg, device)
    return device


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under a scheduler), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loader_workers(setting, device: torch.device | str, processes_per_node: int = 1) -> int:
    """DataLoader workers for ``train.num_workers``: a number is kept; ``auto`` gives each process of the node an
    equal share of the cores. On a GPU every core but the one the training loop drives reads and augments (at most
    8: beyond that cut a chip store or use data.augment_on=gpu); on a CPU the training itself needs the cores, so a
    quarter of them (none on machines of 1-3 cores, where a worker only competes with the model)."""
    if str(setting) != "auto":
        return int(setting)
    share = max(1, usable_cpus() // max(1, int(processes_per_node)))
    if torch.device(device).type == "cuda":
        return max(0, min(8, share - 1))
    return min(4, share // 4)
