"""Dense heads trained on images rather than cached features: joint image + mask augmentation and fine-tuning.

The cached-feature path (`geodino.eval.tasks.common`) runs the frozen backbone once; this path runs it every step,
which two protocol settings need:

* ``task.augment`` — a list of joint augmentations applied to the image and its mask / heights / valid map
  together, through torchvision's v2 transforms on ``tv_tensors`` (``Image`` for pixels, ``Mask`` for targets, so
  geometric ops move both and masks are resampled with nearest neighbours; photometric ops touch the image only).
  Names: ``hflip``, ``vflip``, ``rot90`` (a random multiple of 90°), ``resized_crop`` (RandomResizedCrop back to
  the window, scale ``task.crop_scale``), ``brightness`` (±20 %, any band count). torchvision rather than
  albumentations because its v2 ops take any band count (albumentations' colour ops are 3-channel only).
* ``task.finetune`` — ``none`` (frozen), ``full`` (every backbone weight trains) or ``lora`` (peft's LoRA adapters
  on the attention ``qkv`` / ``proj`` Linear layers of a ViT, or ``pwconv1`` / ``pwconv2`` of ConvNeXt blocks; the
  base weights stay frozen). Backbone learning rates follow the layer-wise decay of the pre-training code
  (`geodino.train.loop.param_groups`: ``layer_decay^(L+1-layer_id)``, ViTs only) times ``task.backbone_lr_mult``.
  The backbone runs in eval mode (no drop-path, no RoPE jitter) — only its weights change.

`train_on_images` returns the trained backbone and head; evaluation then extracts windows with the trained
backbone through the same `Extractor` path as frozen features (so stitching and metrics are shared), and
`save_dense_checkpoint` writes a backbone file (LoRA merged into the base weights by `merged_state_dict`, so it
loads with `geodino.models.load_backbone` anywhere) with the head beside it, which `geodino.segment.heads` applies to rasters.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from geodino.checkpoint import backbone_payload, plain, save_atomic
from geodino.errors import GeodinoError
from geodino.eval.dense import TileSet, window_positions
from geodino.eval.features import pad_to, progress_bar
from geodino.eval.probes import DenseModel, build_dense_head, cosine_schedule, dense_step
from geodino.models.extract import features, list_or_int, n_blocks, normalize_layers
from geodino.train.loop import param_groups

log = logging.getLogger("geodino")

AUGMENTATIONS = ("hflip", "vflip", "rot90", "resized_crop", "brightness")
FINETUNE_MODES = ("none", "full", "lora")
DENSE_HEAD_KEY = "dense_head"  # the extra entry of a backbone file that holds an eval head
# LoRA targets per backbone family (full-name regexes, as peft's target_modules takes a string)
LORA_TARGETS = {"vit": r".*\.attn\.(qkv|proj)", "convnext": r".*\.(pwconv1|pwconv2)"}


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------

class _Brightness(nn.Module):
    """Scale the image by a random factor in [1 - d, 1 + d] (any band count; masks untouched)."""

    def __init__(self, delta: float = 0.2):
        super().__init__()
        self.delta = float(delta)

    def forward(self, sample: dict) -> dict:
        f = 1.0 + (torch.rand(()).item() * 2 - 1) * self.delta
        out = dict(sample)
        out["image"] = tv_tensors.wrap((sample["image"] * f).clamp(0, 1), like=sample["image"])
        return out


class _Rot90(nn.Module):
    """A random multiple of 90 degrees, exact (no resampling) on image and masks alike."""

    def forward(self, sample: dict) -> dict:
        k = int(torch.randint(0, 4, ()).item())
        if k == 0:
            return sample
        return {key: tv_tensors.wrap(torch.rot90(v, k, dims=(-2, -1)), like=v) if isinstance(v, torch.Tensor) else v
                for key, v in sample.items()}


def build_augment(names: Sequence[str] | None, window: int, crop_scale: Sequence[float] = (0.5, 1.0)):
    """A callable on ``{'image': Image, 'target': Mask, 'valid': Mask}`` dicts, or None for no augmentation."""
    if not names:
        return None
    ops = []
    for name in names:
        if name == "hflip":
            ops.append(v2.RandomHorizontalFlip())
        elif name == "vflip":
            ops.append(v2.RandomVerticalFlip())
        elif name == "rot90":
            ops.append(_Rot90())
        elif name == "resized_crop":
            ops.append(v2.RandomResizedCrop(window, scale=tuple(float(s) for s in crop_scale), antialias=True))
        elif name == "brightness":
            ops.append(_Brightness())
        else:
            raise GeodinoError(f"unknown augmentation '{name}' in task.augment; "
                               f"choose from: {', '.join(AUGMENTATIONS)}")
    return v2.Compose(ops)


class WindowDataset(torch.utils.data.Dataset):
    """Training windows of a tile set (``window`` px every ``stride`` px, padded at the bottom/right), augmented
    jointly. Items: ``(image [C, w, w] in [0, 1], target [w, w], valid [w, w] bool)``; seg padding is -1."""

    def __init__(self, tiles: TileSet, window: int, stride: int, kind: str, augment=None):
        self.tiles, self.window, self.kind, self.augment = tiles, int(window), kind, augment
        self.items = [(t, y, x) for t in range(len(tiles))
                      for y, x in window_positions(*tiles.size(t), self.window, int(stride))]
        if not self.items:
            raise GeodinoError("no training windows")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        t, y0, x0 = self.items[k]
        s = self.tiles.load(t)
        w = self.window
        img = pad_to(s["image"].float()[:, y0:y0 + w, x0:x0 + w], w, w, 0.0)
        tgt = torch.as_tensor(s["target"])[y0:y0 + w, x0:x0 + w]
        if self.kind == "seg":
            tgt = pad_to(tgt.long()[None], w, w, -1)[0]
            valid = tgt >= 0
        else:
            tgt = pad_to(tgt.float()[None], w, w, 0.0)[0]
            valid = pad_to(torch.as_tensor(s["valid"])[y0:y0 + w, x0:x0 + w][None].float(), w, w, 0.0)[0] > 0.5
        if self.augment is not None:
            out = self.augment({"image": tv_tensors.Image(img), "target": tv_tensors.Mask(tgt),
                                "valid": tv_tensors.Mask(valid)})
            img, tgt, valid = out["image"].as_subclass(torch.Tensor), out["target"].as_subclass(torch.Tensor), \
                out["valid"].as_subclass(torch.Tensor)
        return img, tgt, valid


# ----------------------------------------------------------------------------------------------
# Fine-tuning modes
# ----------------------------------------------------------------------------------------------

def prepare_backbone(backbone: nn.Module, mode: str, r: int = 8, alpha: float = 16.0, dropout: float = 0.0
                     ) -> nn.Module:
    """Set which backbone weights train: none, all (``full``) or LoRA adapters only (``lora``, injected in place
    with peft, so the model keeps its class and the geodino backbone protocol)."""
    if mode not in FINETUNE_MODES:
        raise GeodinoError(f"task.finetune={mode}: choose one of {', '.join(FINETUNE_MODES)}")
    if mode == "lora":
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as e:  # pragma: no cover - peft is a declared dependency
            raise GeodinoError("task.finetune=lora needs peft (pip install peft)") from e
        family = getattr(backbone, "family", "vit")
        cfg = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout),
                         target_modules=LORA_TARGETS[family], bias="none")
        inject_adapter_in_model(cfg, backbone)
        for name, p in backbone.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        for p in backbone.parameters():
            p.requires_grad_(mode == "full")
    return backbone


@torch.no_grad()
def merged_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's official-key weights on the CPU with every LoRA adapter merged into its base weight
    (``W + scale * B @ A``) and the adapter keys dropped: a plain geodino backbone any loader reads. Computed
    from the state dict, so the model itself (possibly a 7B on a GPU) is neither copied nor moved."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a declared dependency
        LoraLayer = ()
    lora = {name: m for name, m in backbone.named_modules() if LoraLayer and isinstance(m, LoraLayer)}
    sd = {}
    for k, v in backbone.state_dict().items():
        if "lora_" in k:
            continue
        sd[k.replace(".base_layer.", ".")] = v.detach().to("cpu", copy=True).contiguous()
    for name, m in lora.items():
        w = sd[f"{name}.weight"]
        for adapter in m.active_adapters:
            w += m.get_delta_weight(adapter).detach().to("cpu", w.dtype)
    return sd


class DenseNet(nn.Module):
    """Backbone + dense head on pixels in [0, 1]: normalise with the contract, take the ``layers`` features, head,
    upsample to the input size."""

    def __init__(self, backbone: nn.Module, model: DenseModel, layers):
        super().__init__()
        self.backbone = backbone
        self.model = model
        self.layers = normalize_layers(layers, n_blocks(backbone))
        self.contract = backbone.geodino_contract

    def logits(self, x01: torch.Tensor) -> torch.Tensor:
        x = self.contract.normalize(x01)
        trains = any(p.requires_grad for p in self.backbone.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            _, grid, _ = features(self.backbone, x, self.layers, self.contract.patch_size)
        return self.model.logits(grid.float(), tuple(x01.shape[-2:]))


def _layer_dims(backbone: nn.Module, layers, in_chans: int, window: int) -> list[int]:
    with torch.no_grad():
        p = next(backbone.parameters())
        _, _, dims = features(backbone, torch.zeros(1, in_chans, window, window, device=p.device), layers,
                              backbone.geodino_contract.patch_size)
    return dims


def build_net(backbone: nn.Module, head_kind: str, n_out: int, kind: str, layers, window: int, hidden: int = 128,
              allowed: Sequence[int] | None = None, t_mean: float = 0.0, t_std: float = 1.0) -> DenseNet:
    layers = normalize_layers(layers, n_blocks(backbone))
    dims = _layer_dims(backbone, layers, backbone.geodino_contract.in_chans, window)
    head = build_dense_head(head_kind, sum(dims), n_out, hidden, dims)
    return DenseNet(backbone, DenseModel(head, kind, allowed_classes=allowed, target_mean=t_mean, target_std=t_std),
                    layers)


def optimizer_groups(net: DenseNet, lr: float, weight_decay: float, layer_decay: float, backbone_lr_mult: float,
                     patch_embed_lr_mult: float = 1.0) -> list[dict]:
    """AdamW groups: the head at ``lr``; trainable backbone weights at ``lr * backbone_lr_mult * layer-wise decay``
    (the pre-training code's `param_groups`, so ids and no-decay rules are the same)."""
    out = []
    for g in param_groups({"backbone": net.backbone, "head": net.model.head}, layer_decay, patch_embed_lr_mult):
        mult = g["lr_mult"] * (backbone_lr_mult if g["is_backbone"] else 1.0)
        out.append({"params": g["params"], "lr": lr * mult, "base_lr": lr * mult,
                    "weight_decay": weight_decay * g["wd_mult"], "names": g["names"]})
    return out


def train_on_images(net: DenseNet, data: WindowDataset, *, epochs: int, lr: float, weight_decay: float = 1e-4,
                    layer_decay: float = 1.0, backbone_lr_mult: float = 1.0, batch_size: int = 8,
                    ignore_index: int | None = None, device: torch.device | str = "cpu", seed: int = 0,
                    num_workers: int = 0, progress: bool = False, desc: str = "head") -> DenseNet:
    """AdamW with warm-up + cosine, the loss of `geodino.eval.probes.dense_loss`, on augmented image windows."""
    net = net.to(device)
    net.backbone.eval()
    net.model.train()
    groups = optimizer_groups(net, lr, weight_decay, layer_decay, backbone_lr_mult)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr)
    steps = max(1, epochs * math.ceil(len(data) / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(steps, warmup=min(100, steps // 10)))
    g = torch.Generator().manual_seed(seed)
    dl = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=g, num_workers=num_workers,
                                     drop_last=len(data) > batch_size)
    torch.manual_seed(seed)  # augmentation draws
    last = float("nan")
    bar = progress_bar(range(epochs), epochs, desc, progress)
    for _ in bar:
        for img, tgt, valid in dl:
            if img.shape[0] < 2:  # BatchNorm needs more than one sample per channel
                continue
            img, tgt, valid = img.to(device), tgt.to(device), valid.to(device)
            value = dense_step(net.model, net.logits(img), tgt, valid, ignore_index, opt, sched)
            last = last if value is None else value
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{last:.4f}")
    log.info("%s: trained %d epochs on %d image windows, last loss %.4f", desc, epochs, len(data), last)
    net.model.eval()
    for p in net.backbone.parameters():
        p.requires_grad_(False)
    return net


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def save_dense_checkpoint(path: str | Path, net: DenseNet, *, head_kind: str, hidden: int, window: int,
                          class_names: Sequence[str] | None, ignore_index: int | None = None,
                          finetune: str = "none", task: str = "", extra: dict | None = None) -> Path:
    """A backbone file (``format: geodino-backbone``, LoRA merged) with the head under ``dense_head``: loads with
    `load_backbone(path)` as a backbone and with `geodino.segment.heads.DenseSegmenter.from_checkpoint(path)` as
    a segmenter."""
    head = net.model
    payload = backbone_payload(merged_state_dict(net.backbone), net.contract, **{DENSE_HEAD_KEY: {
        "kind": head.kind, "head": head_kind, "hidden": int(hidden), "n_out": int(head.head.n_out),
        "layers": list_or_int(net.layers), "window": int(window),
        "class_names": None if class_names is None else [str(c) for c in class_names],
        "ignore_index": ignore_index, "finetune": finetune, "task": task,
        "state": {k: v.detach().to("cpu", copy=True) for k, v in head.state_dict().items()}, **(extra or {})}})
    return save_atomic(plain(payload, str(path)), path)


def load_dense_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[DenseNet, dict]:
    """(DenseNet in eval mode, the ``dense_head`` record) of a file written by `save_dense_checkpoint`."""
    from geodino.checkpoint import Checkpoint
    from geodino.models import load_backbone

    ck = Checkpoint.open(path)
    rec = ck.get(DENSE_HEAD_KEY)
    if not rec:
        raise GeodinoError(f"{path} holds no dense head ('{DENSE_HEAD_KEY}' entry): write one with "
                           "geodino eval ... save_heads=true")
    backbone = load_backbone(str(path))
    layers = normalize_layers(rec["layers"], n_blocks(backbone))
    dims = _layer_dims(backbone, layers, backbone.geodino_contract.in_chans, int(rec["window"]))
    head = build_dense_head(rec["head"], sum(dims), int(rec["n_out"]), int(rec["hidden"]), dims)
    model = DenseModel(head, rec["kind"])
    model.load_state_dict(rec["state"])
    net = DenseNet(backbone, model, layers).to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, rec


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))[:80]
