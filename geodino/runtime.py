"""Where a verb runs: the one device resolver and the set-up every verb does first.

- `resolve_device(name, local_rank=None)`: ``auto`` (CUDA when visible, else CPU), ``cpu``, ``cuda``, ``cuda:N``;
  under ``torchrun`` a bare ``cuda`` means the local rank's GPU. Unknown names and CUDA without a GPU are one-line
  errors.
- `verb_setup(cfg)`: logging, ``threads``, the device and the CPU allocator setting (``cpu_malloc_cache``);
  returns the device.
"""

from __future__ import annotations

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
