"""``geodino train stage=text``: dino.txt alignment of a frozen backbone with a text tower (dinov3_spec.md §8).

The stage (``stage.meta_arch: dinotxt``, found by geodino.train.stage) runs on geodino's one trainer through the
meta-architecture interface:

* ``DinoTxtMetaArch.student_modules()`` -> the vision head blocks, the text tower and the logit scale (the
  backbone is frozen and never reaches the optimiser);
* ``forward_backward`` -> symmetric contrastive loss (open_clip ``ClipLoss``) on a batch of image–caption pairs;
  its metrics: ``loss``, ``log_scale`` (the learned ``logit_scale`` parameter, i.e. ln of the logit multiplier,
  clamped to [0, ln 100]) and ``acc_i2t`` / ``acc_t2i``, in-batch retrieval accuracy where identical captions count
  as the same class (`retrieval_accuracy`); no momentum / teacher temperature (``has_teacher = False``);
* ``param_groups`` -> the reference's text-stage rule: no weight decay for parameters with ndim < 2 or names
  holding ``bias``, ``ln``, ``bn`` or ``logit_scale``; the optimiser settings come from ``stage.optim`` (the text
  stage's reference values, lr 7e-4, betas (0.9, 0.99), wd 1e-4, scaled to CPU runs), not from the top-level
  ``optim``;
* ``after_step`` clamps ``logit_scale`` to [0, ln 100]; there is no EMA teacher (``update_ema`` is a no-op).

Checkpoints are the trainer's (atomic, resumable, RNG and data position included) plus a ``dinotxt`` entry with the
model config and tokenizer settings, the backbone contract and the data scaling, which is all
geodino.text.io.load_dinotxt (and geodino.segment's ``OpenVocabSegmenter``) needs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from geodino.checkpoint import DINOTXT_KIND
from geodino.contract import IMAGENET_MEAN, IMAGENET_STD
from geodino.data.bands import match_bands, rgb_indices
from geodino.data.geotiff import DEFAULT_SCALE_RULE
from geodino.data.sample import sample_captions_path
from geodino.errors import CheckpointError, DataError, GeodinoError
from geodino.models import build_backbone, load_backbone
from geodino.models.registry import arch, is_arch
from geodino.text.data import (CaptionAugment, CaptionSource, caption_band_statistics, caption_collate,
                               check_caption_bands, read_caption_file)
from geodino.text.dinotxt import DinoTxt, DinoTxtConfig, contrastive_loss, tokenizer_settings
from geodino.train.loop import AugmentedDataset, TrainSettings
from geodino.train.stage import Stage, StageParts

log = logging.getLogger("geodino")


class _ScalarModule(nn.Module):
    """Presents the shared ``logit_scale`` parameter as a module (the trainer clips and groups per module)."""

    def __init__(self, p: nn.Parameter):
        super().__init__()
        self.logit_scale = p


class DinoTxtMetaArch(nn.Module):
    """The trainer's view of a :class:`DinoTxt` model (see module doc)."""

    def __init__(self, model: DinoTxt):
        super().__init__()
        self.model = model
        # not registered: the parameter already lives in `model` (no duplicate state-dict key)
        self.__dict__["_scale_module"] = _ScalarModule(model.logit_scale)

    def student_modules(self) -> dict[str, nn.Module]:
        mods = dict(self.model.trainable_modules())
        if self.model.logit_scale.requires_grad:
            mods["logit_scale"] = self._scale_module
        return mods

    #: no EMA teacher: the trainer leaves momentum / teacher temperature out of this stage's metrics
    has_teacher = False

    def forward_backward(self, batch: dict[str, Any], teacher_temp: float = 0.0,
                         loss_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
        images, tokens = batch["images"], batch["tokens"]
        img, txt, scale = self.model(images, tokens)
        loss = contrastive_loss(img, txt, scale)
        (loss * loss_scale).backward()
        with torch.no_grad():
            acc_i2t, acc_t2i = retrieval_accuracy(img.float() @ txt.float().t(), tokens)
        stats = {"loss": float(loss.detach()), "loss_clip": float(loss.detach()),
                 "log_scale": float(scale.detach().reshape(-1)[0].log()), "acc_i2t": acc_i2t, "acc_t2i": acc_t2i}
        return loss.detach(), stats

    def update_ema(self, momentum: float) -> None:  # no teacher in dino.txt
        return None

    def after_step(self, step: int) -> dict[str, float]:
        self.model.clamp_logit_scale()
        return {}

    def param_groups(self, settings=None) -> list[dict]:
        """The trainer's optimiser groups: the reference's text-stage rule (`text_param_groups`)."""
        return text_param_groups(self.student_modules())


def retrieval_accuracy(sim: torch.Tensor, tokens: torch.Tensor) -> tuple[float, float]:
    """In-batch retrieval accuracy (image -> caption, caption -> image) from the (B, B) image-caption similarities.
    A retrieval counts as right when the retrieved caption is *the same text* as the image's own (identical token
    rows), so a batch with several "water" chips can reach 1.0: the contrastive loss cannot tell them apart either."""
    same = (tokens[:, None, :] == tokens[None, :, :]).all(-1)  # (B, B): caption i is caption j
    rows = torch.arange(sim.shape[0], device=sim.device)
    i2t = same[rows, sim.argmax(1)].float().mean()
    t2i = same[sim.argmax(0), rows].float().mean()
    return float(i2t), float(t2i)


def text_param_groups(modules: dict[str, nn.Module]) -> list[dict]:
    """Reference rule: no weight decay for ndim < 2 or names with bias / ln / bn / logit_scale."""
    decay = {"params": [], "lr_mult": 1.0, "wd_mult": 1.0, "is_last_layer": False, "names": []}
    no_decay = {"params": [], "lr_mult": 1.0, "wd_mult": 0.0, "is_last_layer": False, "names": []}
    for mod_name, module in modules.items():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            parts = name.split(".")
            skip = (p.ndim < 2 or "bias" in name or "logit_scale" in name
                    or any(s.startswith(("ln", "bn")) or "norm" in s for s in parts))
            g = no_decay if skip else decay
            g["params"].append(p)
            g["names"].append(f"{mod_name}.{name}")
    return [g for g in (decay, no_decay) if g["params"]]


# ---------------------------------------------------------------------------------------------------------------
# Model from config
# ---------------------------------------------------------------------------------------------------------------
def config_from_stage(stage_cfg) -> DinoTxtConfig:
    text = stage_cfg.get("text") or {}
    vision = stage_cfg.get("vision") or {}
    return DinoTxtConfig(
        embed_dim=int(stage_cfg.get("embed_dim", 256)),
        head_blocks=int(stage_cfg.get("vision_head_blocks", 2)),
        head_drop_path=float(vision.get("head_drop_path", 0.0)),
        use_class_token=bool(vision.get("use_class_token", True)),
        use_patch_tokens=bool(vision.get("use_patch_tokens", True)),
        use_linear_projection=bool(vision.get("use_linear_projection", False)),
        patch_tokens_pooler=str(vision.get("patch_tokens_pooler", "mean")),
        patch_token_layer=int(vision.get("patch_token_layer", 1)),
        text_width=int(text.get("width", 128)),
        text_layers=int(text.get("layers", 2)),
        text_heads=int(text.get("heads", 4)),
        text_mlp_ratio=float(text.get("mlp_ratio", 4.0)),
        context_length=int(text.get("context_length", 77)),
        vocab_size=int(text.get("vocab_size", 49408)),
        freeze_token_embedding=bool(text.get("freeze_token_embedding", False)),
        init_logit_scale=float(stage_cfg.get("init_logit_scale", DinoTxtConfig.init_logit_scale)),
        freeze_logit_scale=bool(stage_cfg.get("freeze_logit_scale", False)),
    )


def _frozen_backbone(cfg, n_bands: int, band_names: list[str], rgb: tuple | None):
    """The backbone from ``init=`` (a geodino run / checkpoint / exported file, or a registry name with
    ``model.weights``) or from ``model=``. Returns (backbone, random weights: bool).

    A trained backbone keeps its contract whenever the caption images can be mapped onto its bands by name (same
    band count, or its bands found among the images'): the images are then read in the contract's band order. Only
    a 3-band (RGB) backbone given images of another band count has its first layer adapted to the images' bands
    (geodino.models.adapt_bands). Without weights (``init=<registry name>`` without ``model.weights``, or
    ``model=``) the backbone is random either way, and the caller normalises with the images' statistics."""
    init = cfg.get("init")
    weights = cfg.model.get("weights") if cfg.get("model") is not None else None
    if weights and not Path(str(weights)).expanduser().is_file():  # before building a large model
        raise CheckpointError(f"model.weights={weights}: weights file {weights} does not exist")
    if init and not is_arch(str(init)):
        name = str(init)
        model = load_backbone(name)
        c = model.geodino_contract
        if c.in_chans == n_bands or match_bands(band_names, c.bands) is not None:
            return model, False
        if c.in_chans == 3:
            return load_backbone(name, in_chans=n_bands, bands=band_names, rgb_indices=rgb), False
        raise GeodinoError(f"init={name} takes {c.in_chans} bands ({', '.join(c.bands)}) but the caption images "
                           f"have {n_bands} ({', '.join(band_names)}) and they cannot be matched by name")
    name = str(init) if init else str(cfg.model.name)
    kw = cfg.model.get("kwargs") if (not init and cfg.get("model") is not None) else None
    overrides = OmegaConf.to_container(kw, resolve=True) if kw is not None else {}
    if weights:
        native = int({**arch(name)["kwargs"], **overrides}.get("in_chans", 3))
        if native == n_bands:  # keep the released band names (R, G, B): the images are mapped onto them by name
            return load_backbone(name, weights=str(weights), **overrides), False
        return load_backbone(name, weights=str(weights), in_chans=n_bands, bands=band_names, rgb_indices=rgb,
                             **overrides), False
    log.warning("stage=text with %s=%s and no model.weights: aligning a RANDOMLY initialised frozen backbone, "
                "normalised with the caption images' statistics (fine for tests; pass init=<pretrain run> for real "
                "use)", "init" if init else "model", name)
    return build_backbone(name, in_chans=n_bands, **overrides), True


def _caption_data_cfg(cfg):
    data = cfg.get("data")
    stage_file = cfg.stage.get("caption_file")
    if data is not None and str(data.get("kind")) == "captions":
        cf = data.get("caption_file") or stage_file
        if not cf and str(data.get("name")) == "sample_captions":  # the packaged caption sample
            cf = str(sample_captions_path())
        if not cf:
            raise DataError("stage=text needs a caption file: caption_file=<pairs.csv|pairs.jsonl>")
        return data, str(cf)
    if stage_file:
        return OmegaConf.create({"name": "captions", "kind": "captions"}), str(stage_file)
    raise DataError("stage=text trains on image–caption pairs: use data=captions caption_file=<pairs.csv|pairs.jsonl> "
                    f"(data={data.get('name') if data is not None else None} holds no captions)")


class TextStage(Stage):
    """``geodino train stage=text data=captions caption_file=...`` (one process)."""

    supports_distributed = False

    def build(self) -> StageParts:
        cfg = self.cfg
        stage_cfg = cfg.stage
        data_cfg, caption_file = _caption_data_cfg(cfg)
        pairs = read_caption_file(caption_file, root=data_cfg.get("root"))
        scale = data_cfg.get("scale")
        scale = None if scale is None else float(scale)
        length = int(data_cfg.samples_per_epoch) if data_cfg.get("samples_per_epoch") else None
        cache_mb = float(data_cfg.get("cache_mb", 512))
        # the images' own bands (data.bands picks some by name); the backbone decides which ones are read
        probe = CaptionSource(pairs, bands=list(data_cfg.bands) if data_cfg.get("bands") is not None else None,
                              scale=scale, length=length, cache_mb=cache_mb)
        rgb = rgb_indices(probe.band_names) if probe.n_bands != 3 else (0, 1, 2)
        backbone, random_backbone = _frozen_backbone(cfg, probe.n_bands, probe.band_names, rgb)
        contract = backbone.geodino_contract
        if random_backbone:
            # A random backbone has no learned normalisation: `init=<registry name>` without weights and `model=`
            # both normalise with the images' statistics (data.mean/std when given) and record the images' bands.
            source = probe
            scale_rule = ("photos: uint8 / 255; GeoTIFFs: digital numbers / "
                          + (f"{scale:g}" if scale is not None else DEFAULT_SCALE_RULE)
                          + ", clipped to [0, 1], then (x - mean) / std")
            mean, std = _caption_statistics(data_cfg, source, pairs)
            contract = contract.with_data(bands=source.band_names, mean=mean, std=std, input_scale=scale_rule,
                                          scale=scale, offset=0.0)
            backbone.geodino_contract = contract
        else:
            # A trained backbone's contract governs: its bands (every image mapped onto them by name, as the
            # segmenter maps rasters), its scale (data.scale overrides it for images stored differently, e.g.
            # 8-bit chips of a 16-bit product), its offset and its mean / std.
            if scale is None:
                scale = contract.scale
            elif contract.scale is not None and scale != contract.scale:
                log.info("caption images: data.scale=%g instead of the backbone contract's %g", scale, contract.scale)
            source = CaptionSource(pairs, bands=contract.bands, scale=scale, length=length,
                                   fallback_offset=contract.offset, cache_mb=cache_mb)
            scale_rule = contract.input_scale
        check_caption_bands(source)
        dcfg = config_from_stage(stage_cfg)
        meta = DinoTxtMetaArch(DinoTxt(backbone, dcfg)).to(self.dist.device)
        crops = stage_cfg.get("crops") or {}
        size = int(crops.get("size", 96))
        if size % contract.patch_size:
            raise GeodinoError(f"stage.crops.size={size} must be a multiple of the patch size {contract.patch_size}")
        augment = CaptionAugment(size, contract.mean, contract.std, scale=tuple(crops.get("scale", (0.5, 1.0))),
                                 horizontal_flips=bool(crops.get("horizontal_flips", True)))
        data_meta = {"kind": "captions", "caption_file": str(caption_file), "n_pairs": len(pairs),
                     "bands": source.band_names, "mean": list(contract.mean), "std": list(contract.std),
                     "scale": scale, "input_scale": scale_rule}
        n_train = sum(p.numel() for m in meta.student_modules().values() for p in m.parameters() if p.requires_grad)
        n_words = meta.model.text_model.token_embedding.weight.numel()
        if not dcfg.freeze_token_embedding and n_words > n_train / 2:
            log.info("the word embeddings are %.2fM of the %.2fM trainable parameters; with a small caption set, "
                     "stage.text.freeze_token_embedding=true keeps them at their initialisation", n_words / 1e6,
                     n_train / 1e6)
        return StageParts(
            meta_arch=meta, dataset=AugmentedDataset(source, augment, seed=int(cfg.seed)),
            collate=caption_collate(dcfg.context_length), config=self.resolved(), contract=contract,
            settings=_text_settings(cfg, stage_cfg),
            checkpoint_extra={"kind": DINOTXT_KIND, "data": data_meta,
                              "dinotxt": {"config": dcfg.to_dict(), "tokenizer": tokenizer_settings(dcfg.context_length),
                                          "crop_size": size, "state_prefix": "model.",
                                          "random_backbone": random_backbone}},
            describe=f"stage=text backbone={contract.name} (frozen, {source.n_bands} bands) "
                     f"trainable={n_train / 1e6:.2f}M pairs={len(pairs)} crop={size}",
        )

    def finish(self, parts: StageParts, trainer, run_dir: Path) -> dict:
        if not trainer.history:
            return {}
        last = trainer.history[-1]
        return {"summary": {"log_scale_last": last["log_scale"], "acc_i2t_last": last["acc_i2t"],
                            "acc_t2i_last": last["acc_t2i"]}}


def _caption_statistics(data_cfg, source: CaptionSource, pairs) -> tuple[list[float], list[float]]:
    """Normalisation of a backbone trained here from scratch: data.mean/std, ImageNet statistics for photos, else
    the caption images' own band statistics."""
    if data_cfg.get("mean") is not None and data_cfg.get("std") is not None:
        mean, std = [float(x) for x in data_cfg.mean], [float(x) for x in data_cfg.std]
    elif source.band_names == ["R", "G", "B"] and pairs[0].path.suffix.lower() not in (".tif", ".tiff"):
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    else:
        mean, std = caption_band_statistics(source)
        log.info("caption images: band statistics mean %s std %s", [round(m, 4) for m in mean],
                 [round(s, 4) for s in std])
    if len(mean) != source.n_bands or len(std) != source.n_bands:
        raise DataError(f"data.mean/std have {len(mean)}/{len(std)} values for {source.n_bands} bands")
    return mean, std


def _text_settings(cfg, stage_cfg) -> TrainSettings:
    """The trainer's settings with the text stage's own optimiser (``stage.optim``)."""
    settings = TrainSettings.from_cfg(cfg)
    o = stage_cfg.get("optim") or {}
    settings.lr = float(o.get("lr", settings.lr))
    settings.min_lr = float(o.get("min_lr", 0.0))
    settings.warmup_iterations = int(o.get("warmup_iterations", settings.warmup_iterations))
    settings.weight_decay = settings.weight_decay_end = float(o.get("weight_decay", 1e-4))
    settings.betas = tuple(float(b) for b in o.get("betas", (0.9, 0.99)))
    settings.clip_grad = float(o.get("clip_grad", 0.0))
    settings.scaling_rule = "none"
    settings.freeze_last_layer_iterations = 0
    return settings
