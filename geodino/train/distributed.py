"""The trainer under `torchrun`: process group, DDP / FSDP2 wrapping, full checkpoints, reductions.

`geodino train` runs unchanged in one process; under
``torchrun --standalone --nproc_per_node=N -m geodino.cli train ...`` it becomes data parallel
(``train.parallel``):

* ``ddp`` (small models): every student module (backbone, DINO head, iBOT head) gets its own
  ``DistributedDataParallel``. The teacher is never wrapped: it has no gradients, and because DDP keeps
  the student replicas bit-identical, every rank's local EMA produces the same teacher. The backbone is
  wrapped through a tiny adapter whose ``forward`` is ``forward_features``, so the DDP forward hooks run
  for the call the meta-architecture actually makes. The wrappers live in ``meta.student_calls``, a plain
  dict, so state-dict keys stay those of the bare modules.
* ``fsdp2`` (large models): ``fully_shard`` on every ViT block (ConvNeXt: stage), then on the backbone
  root, then on each head — the reference's order (dinov3_spec.md §6) — with
  ``reshard_after_forward=True`` and an optional ``MixedPrecisionPolicy(param_dtype, reduce_dtype=fp32)``.
  The teacher is sharded identically, so parameter ``i`` of the teacher and of the student hold the same
  slice on every rank and the EMA is a purely local ``_foreach_mul_ / _foreach_add_`` on the shards.
  ``forward_features`` (and each block's ``forward_list``) is registered as an FSDP forward method (they
  bypass ``__call__``), and the teacher's roots are resharded after its no-grad forward (a root never
  reshards on its own). With a
  bf16 ``param_dtype`` the fp32 k-bias *buffers* (timm's ``k_bias``) are cast to bf16 first — FSDP casts
  parameters only; geodino's own ``bias_mask`` is already cast to the bias dtype inside ``forward`` so it
  is left in fp32 and checkpoints keep their dtype.

Checkpoints stay the single ``step_<N>.pt`` file the one-process loop writes: under FSDP2 the model and
the optimiser state are gathered in full to rank 0 (``get_model_state_dict`` / ``get_optimizer_state_dict``
with ``StateDictOptions(full_state_dict=True, cpu_offload=True)``), the optimiser state is rewritten from
parameter names to the integer ids ``torch.optim.Optimizer.state_dict`` uses, and rank 0 writes the
file. A checkpoint written by 1 process, by DDP or by FSDP2 resumes under any of the three, and
``load_backbone`` reads it as before.

Exactness. With the same global batch, a run on N ranks computes what one process computes (up to
float summation order): data are addressed by index (rank r takes the r-th slice of every global batch),
iBOT masks are drawn for the *global* batch from the per-batch seed and sliced (`rank_masks`), the
Sinkhorn-Knopp normalisations run over the process group, the DINO / iBOT / KoLeo losses are per-rank
means whose rank average is the global mean (DDP and FSDP2 average gradients), KoLeo uses the grouped
distributed form with the whole global batch as the group, and logged losses are all-reduced means.
Every rank is seeded with the same ``seed``, so model randomness drawn once per forward from the global
torch RNG (RoPE coordinate augmentation) is the one-process draw on every rank.

Not rank-invariant: the collapse monitor (``cls_std``, ``patch_erank``) is computed on each rank's local
batch and then averaged; per-sample model randomness (drop path, ``drop_path_rate > 0``) is drawn per
rank from that shared stream, so ranks repeat each other's pattern instead of continuing the
one-process draw.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from geodino.errors import GeodinoError
from geodino.runtime import resolve_device

log = logging.getLogger("geodino")

__all__ = [
    "DistInfo",
    "init_distributed",
    "destroy_distributed",
    "Parallel",
    "wrap_student",
    "rank_masks",
    "broadcast_object",
    "barrier",
    "local_tensors",
    "reshard",
]

PARALLEL_MODES = ("ddp", "fsdp2")


# ------------------------------------------------------------------------------------------------
# Process group
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError as e:
        raise GeodinoError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from e


def _device_for(requested: str | None, local_rank: int) -> torch.device:
    dev = resolve_device(requested, local_rank=local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str | None = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group.

    World size 1 (a plain ``python`` / ``geodino`` call, or ``torchrun --nproc_per_node=1``) creates no
    process group at all. Otherwise the backend is gloo for a CPU device, and gloo for CPU tensors plus
    NCCL for CUDA tensors (``cpu:gloo,cuda:nccl``) for a GPU device. An already initialised default group
    (e.g. created by a caller) is reused.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    if not 0 <= rank < world_size:
        raise GeodinoError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    dev = _device_for(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise GeodinoError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        log.debug("rank %d/%d joined the %s process group on %s", rank, world_size, backend, dev)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, is_main=rank == 0)


def is_distributed_initialized() -> bool:
    """Whether a default process group exists (e.g. one a caller created)."""
    return dist.is_available() and dist.is_initialized()


def destroy_distributed() -> None:
    if is_distributed_initialized():
        dist.destroy_process_group()


def _group_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (identity in one process)."""
    if not _group_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if _group_active():
        dist.barrier()


# ------------------------------------------------------------------------------------------------
# iBOT masks of the global batch
# ------------------------------------------------------------------------------------------------

def rank_masks(global_masks: torch.Tensor, n_global_crops: int, world_size: int, rank: int) -> dict[str, torch.Tensor]:
    """This rank's share of the masks drawn for the whole global batch, with the derived batch fields.

    ``global_masks`` is the collate's ``collated_masks`` for the global batch: ``[G·B_global, N]``,
    crop-major (all images' crop 0, then crop 1, ...). Rank ``r`` holds images
    ``[r·B_local, (r+1)·B_local)``, so its rows are, for every crop ``g``, the slice
    ``g·B_global + r·B_local ...``, again crop-major. Returns ``collated_masks``, ``mask_indices_list``,
    ``masks_weight`` and ``n_masked_patches`` for those rows, computed as the collate computes them.
    """
    rows, n_tokens = global_masks.shape
    if rows % (n_global_crops * world_size):
        raise ValueError(f"{rows} mask rows do not split into {n_global_crops} crops x {world_size} ranks")
    b_global = rows // n_global_crops
    b_local = b_global // world_size
    masks = global_masks.view(n_global_crops, b_global, n_tokens)[:, rank * b_local:(rank + 1) * b_local]
    masks = masks.reshape(n_global_crops * b_local, n_tokens).contiguous()
    mask_indices = masks.flatten().nonzero().flatten()
    per_crop = masks.sum(-1).clamp(min=1).to(torch.float32)
    masks_weight = (1.0 / per_crop).unsqueeze(-1).expand_as(masks)[masks]
    return {
        "collated_masks": masks,
        "mask_indices_list": mask_indices,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices.shape[0], dtype=torch.long),
    }


# ------------------------------------------------------------------------------------------------
# Parallel wrappers
# ------------------------------------------------------------------------------------------------

class Parallel:
    """What the trainer asks of the parallel layout; this base class is the one-process behaviour.

    - ``reduce_stats``: per-rank scalars -> their mean over ranks (identity here);
    - ``clip_grad_norm_``: clip one module's gradients, return the total norm as a float;
    - ``model_state_dict`` / ``optim_state_dict``: the full, single-file state on the main rank
      (``None`` on the others); every rank must call them (they may be collective);
    - ``load_state``: load a full state (as written by any layout) on every rank.
    """

    mode = "none"
    sharded = False

    def __init__(self, info: DistInfo | None = None):
        self.info = info or DistInfo(0, 1, 0, torch.device("cpu"), True)

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    def reduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        return stats

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def model_state_dict(self, module: nn.Module) -> dict | None:
        return module.state_dict() if self.is_main else None

    def optim_state_dict(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        return optimizer.state_dict() if self.is_main else None

    def load_state(self, module: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
        module.load_state_dict(model_sd, strict=True)
        optimizer.load_state_dict(optim_sd)

    def full_state_dict(self, module: nn.Module) -> dict | None:
        """``module``'s full state dict on the main rank (collective under FSDP2)."""
        return module.state_dict() if self.is_main else None


class _DataParallel(Parallel):
    """DDP / FSDP2: stats are all-reduced means."""

    def reduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        keys = sorted(stats)
        values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
        if self.info.device.type == "cuda":
            values = values.to(self.info.device)
        # every rank must report the same keys, or the reduction would mix them up
        n_keys = torch.tensor([len(keys)], dtype=torch.long, device=values.device)
        dist.all_reduce(n_keys, op=dist.ReduceOp.MAX)
        if int(n_keys) != len(keys):
            raise GeodinoError(f"rank {self.info.rank} reports {len(keys)} statistics but another rank reports more")
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = (values / self.info.world_size).cpu().tolist()
        return dict(zip(keys, values))


class DDPParallel(_DataParallel):
    mode = "ddp"


class FSDP2Parallel(_DataParallel):
    mode = "fsdp2"
    sharded = True

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> float:
        params = list(params)
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(total, DTensor):  # a partial norm over the shards
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)

    def _options(self):
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def full_state_dict(self, module: nn.Module) -> dict | None:
        sd = get_model_state_dict(module, options=self._options())
        return sd if self.is_main else None

    def model_state_dict(self, module: nn.Module) -> dict | None:
        return self.full_state_dict(module)

    def optim_state_dict(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        by_name = get_optimizer_state_dict(module, optimizer, options=self._options())
        if not self.is_main:
            return None
        return _optim_names_to_ids(by_name, _param_names_in_optimizer_order(module, optimizer), optimizer)

    def load_state(self, module: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
        options = StateDictOptions(full_state_dict=True, strict=True)
        # load_state_dict-like strictness: the FSDP2 API reports unexpected keys only as a return value
        missing, unexpected = set_model_state_dict(module, model_sd, options=options)
        if missing or unexpected:
            raise RuntimeError(f"missing keys {sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}")
        names = _param_names_in_optimizer_order(module, optimizer)
        tuples = [{k for k, v in g.items() if isinstance(v, tuple)} for g in optimizer.param_groups]
        set_optimizer_state_dict(module, optimizer, _optim_ids_to_names(optim_sd, names), options=options)
        for group, keys in zip(optimizer.param_groups, tuples):  # the API hands tuples (betas) back as lists
            for k in keys:
                if isinstance(group.get(k), list):
                    group[k] = tuple(group[k])


def _param_names_in_optimizer_order(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    try:
        return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    except KeyError as e:
        raise GeodinoError("the optimiser holds a parameter that is not part of the model") from e


def _optim_names_to_ids(osd: dict, names: list[str], optimizer: torch.optim.Optimizer) -> dict:
    """FQN-keyed (distributed checkpoint API) -> integer-keyed (``Optimizer.state_dict``).

    The API returns tuples (``betas``) as lists; they are restored to the live optimiser's types so the
    file equals what ``optimizer.state_dict()`` writes in one process."""
    index = {n: i for i, n in enumerate(names)}
    live_by_first: dict[str, dict] = {}
    start = 0
    for g in optimizer.param_groups:
        if g["params"]:
            live_by_first[names[start]] = g
        start += len(g["params"])
    state = {index[n]: v for n, v in osd["state"].items()}
    groups = []
    for g in osd["param_groups"]:
        live = live_by_first.get(g["params"][0], {}) if g["params"] else {}
        fixed = {k: (tuple(v) if isinstance(v, list) and isinstance(live.get(k), tuple) else v) for k, v in g.items()}
        groups.append({**fixed, "params": [index[n] for n in g["params"]]})
    groups.sort(key=lambda g: g["params"][0] if g["params"] else len(names))
    return {"state": state, "param_groups": groups}


def _optim_ids_to_names(osd: dict, names: list[str]) -> dict:
    state = {names[int(i)]: v for i, v in osd["state"].items()}
    groups = [{**g, "params": [names[int(i)] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


class ForwardFeatures(nn.Module):
    """``forward`` = ``backbone.forward_features``, so DDP's forward hooks run for that call."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, *args, **kwargs):
        return self.backbone.forward_features(*args, **kwargs)


def _blocks_of(backbone: nn.Module) -> list[nn.Module]:
    for attr in ("blocks", "stages"):
        children = getattr(backbone, attr, None)
        if isinstance(children, (nn.ModuleList, nn.Sequential)):
            return list(children)
    return []


def _cast_k_bias_buffers(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast timm-style ``k_bias`` buffers (all zeros) to the FSDP param dtype; returns how many."""
    n = 0
    for sub in module.modules():
        buf = sub._buffers.get("k_bias")
        if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
            sub._buffers["k_bias"] = buf.to(dtype)
            n += 1
    return n


def _shard_tree(tree: nn.ModuleDict, mesh, mp_policy) -> None:
    kw = {"mesh": mesh, "reshard_after_forward": True}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for name, module in tree.items():
        if name == "backbone":
            for block in _blocks_of(module):
                fully_shard(block, **kw)
                # geodino's ViT runs its blocks through `forward_list`, which bypasses __call__ as well
                if hasattr(block, "forward_list"):
                    register_fsdp_forward_method(block, "forward_list")
            fully_shard(module, **kw)
            if hasattr(module, "forward_features"):
                register_fsdp_forward_method(module, "forward_features")
        else:
            fully_shard(module, **kw)


def wrap_student(meta: nn.Module, mode: str = "ddp", param_dtype: torch.dtype | None = None,
                 info: DistInfo | None = None, reduce_dtype: torch.dtype = torch.float32,
                 find_unused_parameters: bool | None = None) -> Parallel:
    """Make ``meta`` (an SSLMetaArch-like module with ``student`` / ``teacher`` ModuleDicts) data parallel.

    Call after the model is fully built and before the optimiser is created (FSDP2 replaces the
    parameters by sharded ``DTensor`` parameters). With world size 1 nothing is wrapped and the
    returned :class:`Parallel` reproduces the one-process behaviour. ``param_dtype`` (FSDP2 only) sets
    the compute dtype of the parameters, e.g. ``torch.bfloat16``; gradients are reduced in
    ``reduce_dtype`` and the master weights stay fp32.
    """
    if mode not in PARALLEL_MODES:
        raise GeodinoError(f"train.parallel must be one of {', '.join(PARALLEL_MODES)}, got '{mode}'")
    if info is None:
        info = init_distributed()
    meta.to(info.device)
    if not info.distributed:
        return Parallel(info)
    student, teacher = meta.student, meta.teacher

    if mode == "ddp":
        if param_dtype is not None:
            log.warning("train.parallel=ddp ignores param_dtype=%s (use train.precision for autocast)", param_dtype)
        if find_unused_parameters is None:
            # the untied local-crop class norm is only used when there are local crops
            backbone = student["backbone"]
            find_unused_parameters = getattr(backbone, "local_cls_norm", None) is not None and int(
                getattr(meta, "n_local", 1)) == 0
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        # buffers (k-bias masks, RoPE periods) are synced once at construction, not on every forward

        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})
        calls = {}
        for name, module in student.items():
            if not any(p.requires_grad for p in module.parameters()):
                continue
            target = ForwardFeatures(module) if name == "backbone" else module
            calls[name] = DDP(target, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
                              **no_buffer_sync)
        meta.student_calls = calls  # a plain dict: not registered, state-dict keys unchanged
        # DDP broadcast the student from rank 0; the teacher (never wrapped) must match it on every rank
        with torch.no_grad():
            for tensor in list(teacher.parameters()) + list(teacher.buffers()):
                dist.broadcast(tensor, src=0)
        return DDPParallel(info)


    # Identical replicas before sharding: every rank then keeps its own slice of the same tensors.
    with torch.no_grad():
        for tensor in list(student.parameters()) + list(teacher.parameters()):
            dist.broadcast(tensor, src=0)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp_policy = None
    if param_dtype is not None and param_dtype != torch.float32:
        mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        n = _cast_k_bias_buffers(meta, param_dtype)
        if n:
            log.info("cast %d k_bias buffers to %s for FSDP2 mixed precision", n, param_dtype)
    _shard_tree(student, mesh, mp_policy)
    _shard_tree(teacher, mesh, mp_policy)
    return FSDP2Parallel(info)


def local_tensors(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's local shard (the tensor itself when not a DTensor), for in-place updates."""
    return [p.to_local() if isinstance(p, DTensor) else p for p in params]


@torch.no_grad()
def ema_update_(teacher_params: Iterable[torch.Tensor], student_params: Iterable[torch.Tensor], momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, in place, parameter by parameter (reference `update_ema`).
    Under FSDP2 both are sharded identically, so this works on the local shards with no communication."""
    t = local_tensors(teacher_params)
    s = local_tensors(student_params)
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def reshard(modules: Iterable[nn.Module]) -> None:
    """Free the unsharded parameters of FSDP2 roots after an inference-only forward (no-op otherwise)."""
    for m in modules:
        fn = getattr(m, "reshard", None)
        if callable(fn):
            fn()
