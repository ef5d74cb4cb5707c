"""Helpers for tests that compare geodino against the official DINOv3 reference: the reference tensors, the
project's relative-error bar, and `reference_step`, which replays a recorded official training step through
geodino's own trainer.

`reference_dir()` is `$GEODINO_REFERENCE_DIR`, defaulting to `../shared/fixtures/dinov3_reference` next to the
repository; `step_fixture_dir()` likewise for `dinov3_step`. Kept in the package (not a conftest) so every test
folder imports the same module regardless of pytest's rootdir handling. This module sits above every layer (it
drives the trainer); nothing in geodino imports it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from omegaconf import OmegaConf

from geodino.config import configs_dir
from geodino.models.vit import dinov3_vit
from geodino.train.gram import GramMetaArch
from geodino.train.loop import StepSchedule, Trainer, TrainSettings
from geodino.train.schedules import linear_warmup_cosine_decay
from geodino.train.ssl import SSLMetaArch

_DEFAULT_REF = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "dinov3_reference"


def reference_dir() -> Path:
    return Path(os.environ.get("GEODINO_REFERENCE_DIR", _DEFAULT_REF))


def step_fixture_dir() -> Path:
    """The recorded official training steps: ``$GEODINO_STEP_DIR``, else ``dinov3_step`` beside the reference dir."""
    return Path(os.environ.get("GEODINO_STEP_DIR", reference_dir().parent / "dinov3_step"))


def fp32_state_dict(sd: dict) -> dict:
    """Reference weights are stored as fp16 (exactly representable); cast floats to fp32."""
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in sd.items()}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = "") -> None:
    """Relative error ||a - e|| / ||e|| <= rtol (the project's 1e-5 fp32 exactness bar)."""
    actual = actual.detach().float()
    expected = expected.detach().float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-30)
    assert err <= rtol, f"{what}: relative error {err.item():.3e} > {rtol:g}"


def cli_error_lines(stderr: str) -> list[str]:
    """The lines of a CLI run's stderr that are not geodino's timestamped log lines (progress logs may
    precede a failure; the failure itself must be one `error: ...` line)."""

    log_line = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")
    return [line for line in stderr.strip().splitlines() if line.strip() and not log_line.match(line)]


# ------------------------------------------------------------------------------------------------
# One recorded official training step, replayed through geodino's trainer
# ------------------------------------------------------------------------------------------------

# official loss names <- geodino's metric names
LOSS_NAMES = {"dino_local_crops_loss": "loss_dino_local", "dino_global_crops_loss": "loss_dino_global",
              "koleo_loss": "loss_koleo", "ibot_loss": "loss_ibot", "gram_loss": "loss_gram", "total_loss": "loss"}
# heads of the official ViT sizes (`dinov3/models/vision_transformer.py`), for fixtures whose settings omit them
_OFFICIAL_HEADS = {"vit_small": 6, "vit_base": 12, "vit_large": 16, "vit_so400m": 18, "vit_huge2": 20,
                   "vit_giant2": 24, "vit_7b": 32}


def official_student_kwargs(fx: dict) -> dict:
    """The constructor arguments the official trainer's `build_model` gives the student of a recorded step.

    Sizes come from the weights (embed dim, depth, bands, storage tokens, LayerScale) and the number of heads from
    the fixture's settings or the official size table. `build_model` does not pass ``pos_embed_rope_dtype``, so
    training backbones use the constructor default, bf16 RoPE tables (the fixture's ``rope_embed.periods`` buffer
    is bf16); only the hub constructors use fp32."""
    s, sd, settings = fx["config"]["student"], fx["student_before"], fx.get("settings", {})
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("backbone.blocks."))
    heads = settings.get("heads", _OFFICIAL_HEADS.get(str(s.get("arch")).split("_patch")[0]))
    if heads is None:
        raise ValueError(f"the number of heads of arch {s.get('arch')!r} is neither in the fixture's settings nor "
                         "an official size")
    has_ls = "backbone.blocks.0.ls1.gamma" in sd
    return dict(
        patch_size=s["patch_size"], in_chans=int(sd["backbone.patch_embed.proj.weight"].shape[1]),
        embed_dim=int(sd["backbone.cls_token"].shape[-1]), depth=depth, num_heads=int(heads),
        ffn_ratio=float(s.get("ffn_ratio", 4.0)), ffn_layer=s["ffn_layer"], ffn_bias=s["ffn_bias"],
        qkv_bias=s["qkv_bias"], proj_bias=s["proj_bias"], drop_path_rate=s["drop_path_rate"],
        layerscale_init=s["layerscale"] if has_ls else None, norm_layer=s["norm_layer"],
        n_storage_tokens=int(sd["backbone.storage_tokens"].shape[1]) if "backbone.storage_tokens" in sd else 0,
        mask_k_bias=s["mask_k_bias"], untie_cls_and_patch_norms=s["untie_cls_and_patch_norms"],
        untie_global_and_local_cls_norm=s["untie_global_and_local_cls_norm"],
        pos_embed_rope_base=s["pos_embed_rope_base"], pos_embed_rope_min_period=s["pos_embed_rope_min_period"],
        pos_embed_rope_max_period=s["pos_embed_rope_max_period"],
        pos_embed_rope_normalize_coords=s["pos_embed_rope_normalize_coords"],
        pos_embed_rope_shift_coords=s["pos_embed_rope_shift_coords"],
        pos_embed_rope_jitter_coords=s["pos_embed_rope_jitter_coords"],
        pos_embed_rope_rescale_coords=s["pos_embed_rope_rescale_coords"], pos_embed_rope_dtype="bf16",
    )


def _local_loss_weight(fx: dict) -> float:
    """The reference's w_local at this step: the recorded value, else its `local_loss_weight_schedule`."""
    if "dino_local_loss_weight" in fx["losses"]:
        return float(fx["losses"]["dino_local_loss_weight"])
    cfg = fx["config"]
    d = cfg["dino"]
    if not d.get("reweight_dino_local_loss", False):
        return 1.0
    epoch = int(cfg["train"]["OFFICIAL_EPOCH_LENGTH"])
    sch = d["local_loss_weight_schedule"]
    total = int(cfg["optim"]["epochs"]) * epoch
    values = linear_warmup_cosine_decay(sch["start"], sch["peak"], sch["end"], int(sch["warmup_epochs"]) * epoch, total)
    return float(values[int(fx["schedule"]["iteration"])])


def official_stage_config(fx: dict):
    """geodino's stage config (configs/stage/pretrain.yaml) with the values of the recorded official config."""
    cfg = fx["config"]
    d, ib, g, cr = cfg["dino"], cfg["ibot"], cfg["gram"], cfg["crops"]
    heads = ("head_n_prototypes", "head_hidden_dim", "head_bottleneck_dim", "head_nlayers")
    over = {
        "centering": cfg["train"]["centering"],
        "crops": {k: cr.get(k) for k in ("global_crops_size", "local_crops_size", "local_crops_number",
                                          "gram_teacher_crops_size")},
        "dino": {"loss_weight": d["loss_weight"], "global_ignore_diagonal": d["global_ignore_diagonal"],
                 "local_loss_weight": _local_loss_weight(fx), "koleo_loss_weight": d["koleo_loss_weight"],
                 **{k: d[k] for k in heads}},
        "ibot": {"loss_weight": ib["loss_weight"], "mask_sample_probability": ib["mask_sample_probability"],
                 "mask_ratio_min_max": list(ib["mask_ratio_min_max"]), **{k: ib[k] for k in heads}},
        "gram": {**{k: g[k] for k in ("use_loss", "loss_weight", "normalized", "img_level", "remove_neg",
                                      "remove_only_teacher_neg", "tokens_used", "global_teacher_resize_method",
                                      "global_teacher_resize_antialias") if k in g},
                 "rep_update": False},  # one step: the Gram teacher is never refreshed
    }
    return OmegaConf.merge(OmegaConf.load(configs_dir() / "stage" / "pretrain.yaml"), OmegaConf.create(over))


class _OneBatch:
    """The batch source of a replayed step: the recorded batch (reference collate layout = geodino's)."""

    def __init__(self, batch: dict):
        self.batch = batch

    def iterate(self, start: int):
        while True:
            yield start, self.batch


def reference_step(fx: dict, use_reference_grads: bool = False) -> dict:
    """Replay one recorded official training step (the format of ``dinov3_step/``) with geodino's own code.

    Builds geodino's meta-architecture for the stage the config describes (`SSLMetaArch`; `GramMetaArch` with a
    frozen Gram teacher when ``config.gram.use_loss``), loads ``student_before`` / ``teacher_before`` /
    ``gram_teacher`` (official key names), and runs `Trainer.step` — the method every training run calls — for
    ``fx["schedule"]``: geodino's parameter groups, per-module clipping, AdamW and EMA. Returns
    ``{"losses": {official name: float}, "grads": {official name: tensor before clipping},
    "student_after": {...}, "teacher_after": {...}, "grad_norms": {module: float}, "param_groups": {...}}``.

    ``use_reference_grads=True`` replaces geodino's gradients by the recorded ones before clipping, which checks
    clipping, AdamW and the EMA on their own (AdamW's first step divides every gradient by its magnitude, so
    elements whose gradient is within float noise of zero move by up to 2·lr on float rounding alone)."""
    cfg, sch = fx["config"], fx["schedule"]
    stage_cfg = official_stage_config(fx)
    kwargs = official_student_kwargs(fx)
    backbone = dinov3_vit(**kwargs)
    if bool(cfg["gram"]["use_loss"]):
        gram_teacher = dinov3_vit(**kwargs)
        gram_teacher.load_state_dict({k[len("backbone."):]: v for k, v in fx["gram_teacher"].items()
                                      if k.startswith("backbone.")}, strict=True)
        meta = GramMetaArch(backbone, stage_cfg, gram_teacher)
    else:
        meta = SSLMetaArch(backbone, stage_cfg)
    meta.student.load_state_dict(fx["student_before"], strict=True)
    meta.teacher.load_state_dict(fx["teacher_before"], strict=True)
    o, it = cfg["optim"], int(sch["iteration"])
    settings = TrainSettings(
        iterations=it + 1, batch_size=int(cfg["train"]["batch_size_per_gpu"]), checkpoint_every=0, log_every=10**9,
        lr=float(sch["lr"]), weight_decay=float(sch["wd"]), betas=(float(o["adamw_beta1"]), float(o["adamw_beta2"])),
        layerwise_decay=float(o["layerwise_decay"]), patch_embed_lr_mult=float(o["patch_embed_lr_mult"]),
        clip_grad=float(sch["clip_grad"]), precision="fp32", progress=False,
    )
    trainer = Trainer(meta, _OneBatch(fx["batch"]), settings, Path("."), torch.device("cpu"))
    params = {f"{m}.{n}": p for m, module in meta.student_modules().items() for n, p in module.named_parameters()}
    grads: dict[str, torch.Tensor] = {}

    def keep_grads():
        grads.update({n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None})
        if use_reference_grads:
            for n, p in params.items():
                p.grad = fx["grads"][n].to(p.dtype).clone()

    meta.train()
    schedule = StepSchedule(lr=float(sch["lr"]), last_layer_lr=float(sch["last_layer_lr"]), wd=float(sch["wd"]),
                            momentum=float(sch["momentum"]), teacher_temp=float(sch["teacher_temp"]))
    row = trainer.step(_OneBatch(fx["batch"]).iterate(it), it, schedule=schedule, before_clip=keep_grads)
    return {
        "losses": {name: float(row[key]) for name, key in LOSS_NAMES.items() if key in row},
        "grads": grads,
        "grad_norms": {k[len("grad_norm_"):]: float(v) for k, v in row.items() if k.startswith("grad_norm_")},
        "student_after": {k: v.detach().clone() for k, v in meta.student.state_dict().items()},
        "teacher_after": {k: v.detach().clone() for k, v in meta.teacher.state_dict().items()},
        "param_groups": {n: {"lr_multiplier": g["lr_mult"], "wd_multiplier": g["wd_mult"],
                             "is_last_layer": g["is_last_layer"]} for g in trainer.groups for n in g["names"]},
    }
