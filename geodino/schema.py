"""The typed schema of every config: what each key of the verbs' configs and of their groups (stage, data, model,
task) allows, checked right after composing, before any data is read, any statistic computed or any model built.

`validate(verb, cfg)` raises `ConfigError` with one line, ``<key>=<value>: <what is wrong>; allowed: <what the key
takes>`` (the first problem, followed by the keys of any others). The CLI calls it after composing and
`geodino.train.run.run_train` calls it too, so the Python API is checked the same way.

The tables below map a key (dotted; ``*`` stands for any name) to a check; a new config key is one line. A check
is an object (``Int(ge=1)``, ``Float(gt=0, le=1)``, ``OneOf("a", "b")``, ``List(Str(), min_len=1)``, ``Opt(...)``
for null) or a function of the whole config that returns one, for limits that depend on other keys (the batch size
on the stage, crop sizes on the patch size). Relations a single check cannot state (a local crop no larger than the
global crop, lists of equal length) are small rule functions after the tables; they run once every value passed
its own check.

Not checked here: keys absent from a config (every stage has its own keys), values still missing (``???``: the
verb names them with an example), unknown keys (Hydra refuses them when composing), and whatever depends on a
file: a checkpoint's patch size or bands, a raster's band count, a distillation teacher's patch size, whether a
path exists. Those are checked where the file is opened.

A base-layer module: it imports omegaconf and geodino.errors only (no torch), so a bad value is answered as fast
as a bad option.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterator, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from geodino.errors import ConfigError

MAX_CROP_SIZE = 4096  # geodino.data.multicrop.MAX_CROP_SIZE
DEFAULT_PATCH_SIZE = 16  # every registered ViT; model.kwargs.patch_size overrides it
CONVNEXT_STRIDE = 32  # pixels per ConvNeXt output token: its crops need at least this many
# stage.meta_arch values (geodino.train.stage.STAGES) whose losses compare the images of a batch
PAIRWISE_STAGES = {
    "ssl": "KoLeo's nearest neighbour and the DINO loss compare the images of a batch",
    "distill": "KoLeo's nearest neighbour and the DINO loss compare the images of a batch",
    "dinotxt": "the contrastive loss needs the other pairs of a batch as negatives",
}
# names the verbs accept, kept beside their owners' lists by tests/test_schema.py
SENSORS = ("sentinel2", "landsat8", "landsat9", "naip")  # geodino.data.sources.raster.SENSOR_DATASETS
TEMPLATE_SETS = ("default", "rs", "openai", "simple", "none")  # geodino.segment.open_vocab.TEMPLATES
DENSE_HEADS = ("linear", "light_decoder", "decoder", "dpt", "upernet")  # geodino.eval.probes.build_dense_head
EXPORT_FORMATS = ("official", "safetensors", "timm", "hf", "onnx")  # geodino.models.weights.EXPORT_FORMATS
CURATE_ACTIONS = ("stats", "embed", "balance", "retrieve", "dedup", "chip")  # geodino.verbs.curate.ACTIONS
LOVEDA_SCENES = ("urban", "rural")  # geodino.eval.datasets.loveda.SCENES
AUGMENTATIONS = ("hflip", "vflip", "rot90", "resized_crop", "brightness")  # geodino.eval.finetune.AUGMENTATIONS
FINETUNE_MODES = ("none", "full", "lora")  # geodino.eval.finetune.FINETUNE_MODES


# ------------------------------------------------------------------------------------------------
# Checks: `problem(value)` is None for an allowed value, else what is wrong; `allowed` says what the key takes
# ------------------------------------------------------------------------------------------------

class Check:
    allowed = "anything"

    def problem(self, value) -> str | None:
        return None


def _is_int(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bounds(gt=None, ge=None, lt=None, le=None) -> str:
    lo = ("(", gt) if gt is not None else ("[", ge) if ge is not None else None
    hi = (")", lt) if lt is not None else ("]", le) if le is not None else None
    if lo and hi:
        return f" in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f" {'>' if lo[0] == '(' else '>='} {lo[1]:g}"
    if hi:
        return f" {'<' if hi[0] == ')' else '<='} {hi[1]:g}"
    return ""


def _within(v, gt=None, ge=None, lt=None, le=None) -> bool:
    return (gt is None or v > gt) and (ge is None or v >= ge) and (lt is None or v < lt) and (le is None or v <= le)


def _noted(text: str, note: str) -> str:
    return f"{text} ({note})" if note else text


class Int(Check):
    def __init__(self, ge=None, le=None, multiple_of: int | None = None, note: str = ""):
        self.ge, self.le, self.multiple_of = ge, le, multiple_of
        self.allowed = _noted(f"an integer{_bounds(ge=ge, le=le)}"
                              + (f", a multiple of {multiple_of}" if multiple_of else ""), note)

    def problem(self, v):
        if not _is_int(v):
            return "not an integer"
        if not _within(v, ge=self.ge, le=self.le):
            return "out of range"
        if self.multiple_of and v % self.multiple_of:
            return f"not a multiple of {self.multiple_of}"
        return None


class Float(Check):
    def __init__(self, gt=None, ge=None, lt=None, le=None, note: str = ""):
        self.bounds = dict(gt=gt, ge=ge, lt=lt, le=le)
        self.allowed = _noted(f"a number{_bounds(**self.bounds)}", note)

    def problem(self, v):
        if not _is_number(v):
            return "not a number"
        if not math.isfinite(v):
            return "not finite"
        return None if _within(v, **self.bounds) else "out of range"


class Bool(Check):
    allowed = "true or false"

    def problem(self, v):
        return None if isinstance(v, bool) else "not a boolean"


class Str(Check):
    allowed = "a non-empty string"

    def problem(self, v):
        return None if isinstance(v, str) and v else "not a non-empty string"


class Path(Check):
    allowed = "a path"

    def problem(self, v):
        return None if isinstance(v, (str, int, float)) and not isinstance(v, bool) else "not a path"


class Pattern(Check):
    """A string matching a regular expression (whole string)."""

    def __init__(self, regex: str, example: str):
        self.regex = re.compile(regex)
        self.allowed = f"a string like '{example}'"

    def problem(self, v):
        return None if isinstance(v, str) and self.regex.fullmatch(v) else "not of that form"


class OneOf(Check):
    def __init__(self, *choices: str, ignore_case: bool = False, note: str = ""):
        self.choices, self.ignore_case = choices, ignore_case
        self.allowed = _noted(f"one of {', '.join(choices)}", note)

    def problem(self, v):
        ok = isinstance(v, str) and (v.lower() if self.ignore_case else v) in self.choices
        return None if ok else "unknown value"


class Device(Check):
    allowed = "a device: auto, cpu, cuda, cuda:N, mps or xpu"
    _pattern = re.compile(r"auto|(cpu|cuda|mps|xpu)(:\d+)?")

    def problem(self, v):
        return None if isinstance(v, str) and self._pattern.fullmatch(v) else "not a device name"


class List(Check):
    def __init__(self, item: Check, min_len: int = 0, length: int | None = None):
        self.item, self.min_len, self.length = item, min_len, length
        what = f"a list of {length} items" if length else "a non-empty list" if min_len else "a list"
        self.allowed = f"{what}, each {item.allowed}"

    def problem(self, v):
        if not isinstance(v, list):
            return "not a list"
        if self.length is not None and len(v) != self.length:
            return f"{len(v)} items"
        if len(v) < self.min_len:
            return "empty" if not v else f"{len(v)} items"
        for x in v:
            p = self.item.problem(x)
            if p:
                return f"item {_show(x)} {p}"
        return None


class Mapping(Check):
    def __init__(self, value: Check | None = None):
        self.value = value
        self.allowed = "a mapping {name: value}" + (f", each value {value.allowed}" if value else "")

    def problem(self, v):
        if not isinstance(v, dict):
            return "not a mapping"
        for k, x in v.items() if self.value else ():
            p = self.value.problem(x)
            if p:
                return f"{k}: {_show(x)} {p}"
        return None


class Span(Check):
    """A pair [min, max] with lo <= min <= max <= hi (lo itself excluded when `lo_open`)."""

    def __init__(self, lo: float = 0.0, hi: float = 1.0, lo_open: bool = False):
        self.lo, self.hi, self.lo_open = lo, hi, lo_open
        self.allowed = f"a pair [min, max] with {lo:g} {'<' if lo_open else '<='} min <= max <= {hi:g}"

    def problem(self, v):
        if not (isinstance(v, list) and len(v) == 2 and all(_is_number(x) and math.isfinite(x) for x in v)):
            return "not a pair of numbers"
        if v[0] > v[1]:
            return "min > max"
        low_ok = v[0] > self.lo if self.lo_open else v[0] >= self.lo
        return None if low_ok and v[1] <= self.hi else "out of range"


class Opt(Check):
    """`check`, or null."""

    def __init__(self, check: Check):
        self.check = check
        self.allowed = f"{check.allowed}, or null"

    def problem(self, v):
        return None if v is None else self.check.problem(v)


class AnyOf(Check):
    """One of `checks`; a wrong list (mapping) is described by the list (mapping) check."""

    def __init__(self, *checks: Check, allowed: str = ""):
        self.checks = checks
        self.allowed = allowed or " or ".join(c.allowed for c in checks)

    def problem(self, v):
        problems = [c.problem(v) for c in self.checks]
        if None in problems:
            return None
        for c, p in zip(self.checks, problems):  # a number is described by the number check, and so on
            if _is_number(v) and isinstance(c, (Int, Float)):
                return p
        for c, p in zip(self.checks, problems):
            if isinstance(c, List) == isinstance(v, list) and isinstance(c, Mapping) == isinstance(v, dict):
                return p
        return problems[0]


def one_or_list(item: Check, min_len: int = 1) -> AnyOf:
    return AnyOf(item, List(item, min_len), allowed=f"{item.allowed}, or a list of them")


class Templates(Check):
    allowed = (f"a template set ({', '.join(TEMPLATE_SETS)}), a template with one '{{}}' for the class name, "
               "or a non-empty list of templates")

    def problem(self, v):
        if v is None or isinstance(v, str) and (v in TEMPLATE_SETS or "{}" in v):
            return None
        if isinstance(v, str):
            return "unknown template set"
        if not isinstance(v, list) or not v:
            return "not a template set or a non-empty list"
        bad = [t for t in v if not (isinstance(t, str) and t.count("{}") == 1)]
        return f"template {_show(bad[0])} has no single '{{}}'" if bad else None


Entry = Union[Check, Callable[[dict], Check]]  # a check, or a function of the whole config that returns one


# ------------------------------------------------------------------------------------------------
# Limits that depend on other keys
# ------------------------------------------------------------------------------------------------

def _get(tree: dict, key: str, default=None):
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _meta_arch(t: dict) -> str:
    return str(_get(t, "stage.meta_arch", "ssl"))


def _batch_size(t: dict) -> Check:
    why = PAIRWISE_STAGES.get(_meta_arch(t))
    return Int(ge=2, note=f"stage={_get(t, 'stage.name')}: {why}") if why else Int(ge=1)


def _patch_size(t: dict) -> int | None:
    """The patch size crops must be a multiple of: model.kwargs.patch_size (default 16) for the stages that build
    their backbone from model= or continue one made so; None for distillation (the teacher file's)."""
    if _meta_arch(t) not in ("ssl", "dinotxt"):
        return None
    p = _get(t, "model.kwargs.patch_size", DEFAULT_PATCH_SIZE)
    return int(p) if _is_int(p) and p >= 1 else None


def _min_crop(t: dict, local: bool = False) -> int:
    """ConvNeXt backbones (model=, or distillation students) make one token per 32 px."""
    if _meta_arch(t) == "distill":
        names = _get(t, "students") or []
        names = [names] if isinstance(names, str) else names
        if local and _get(t, "stage.crops.local_crops_number") == 0:
            return 1
    else:
        names = [_get(t, "model.name", "")]
    return CONVNEXT_STRIDE if any("convnext" in str(n) for n in names) else 1


def _crop(local: bool = False) -> Callable[[dict], Check]:
    def check(t: dict) -> Check:
        patch, low = _patch_size(t), _min_crop(t, local)
        notes = ([f"the patch size is model.kwargs.patch_size, default {DEFAULT_PATCH_SIZE}"] if patch else []) + \
                ([f"ConvNeXt needs at least {CONVNEXT_STRIDE} px"] if low > 1 else [])
        return Int(ge=low, le=MAX_CROP_SIZE, multiple_of=patch, note="; ".join(notes))
    return check


def _crop_list(local: bool = False) -> Callable[[dict], Check]:
    return lambda t: List(_crop(local)(t), min_len=1)


def _task_stride(t: dict) -> Check:
    """LoveDA needs a stride; canopy's null stride means half the window."""
    return Int(ge=1) if _get(t, "task.name") == "loveda" else Opt(Int(ge=1))


# ------------------------------------------------------------------------------------------------
# The tables
# ------------------------------------------------------------------------------------------------

PATH = Opt(Path())
SEED = Int(ge=0)  # numpy's generators refuse negative seeds
RUNTIME = {  # keys every verb that runs a model shares
    "device": Opt(Device()),
    "threads": Opt(Int(ge=0, note="0 or null: torch's default")),
    "progress": Bool(),
    "cpu_malloc_cache": Bool(),
}
HEAD = {  # a DINO / iBOT head
    "loss_weight": Float(ge=0),
    "head_n_prototypes": Int(ge=1),
    "head_hidden_dim": Int(ge=1),
    "head_bottleneck_dim": Int(ge=1),
    "head_nlayers": Int(ge=1),
}
OPTIM = {  # an optimiser (the SSL stages': optim.*, the text stage's: stage.optim.*)
    "lr": Float(ge=0),
    "min_lr": Float(ge=0),
    "warmup_iterations": Int(ge=0),  # longer than the run is allowed
    "weight_decay": Float(ge=0),
    "betas": List(Float(ge=0, lt=1), length=2),
    "clip_grad": Float(ge=0, note="0: no clipping"),
}

TRAIN: dict[str, Entry] = {
    **RUNTIME,
    "run_dir": PATH,
    "seed": SEED,
    "init": PATH,
    "teacher": PATH,
    "students": one_or_list(Str(), min_len=0),
    "resume": Bool(),
    "caption_file": PATH,
    "train.iterations": Int(ge=1),
    "train.batch_size": _batch_size,
    "train.grad_accum": Int(ge=1),
    "train.num_workers": AnyOf(OneOf("auto"), Int(ge=0)),
    "train.prefetch_factor": Int(ge=1),
    "train.data_wait_warn": Float(ge=0, le=1, note="0: never warn"),
    "train.log_every": Int(ge=1),
    "train.loggers": one_or_list(OneOf("jsonl", "tensorboard"), min_len=1),  # geodino.runs.LOGGERS
    "train.checkpoint_every": Int(ge=0, note="0: no checkpoints"),
    "train.keep_last": Int(ge=0, note="0: keep every checkpoint"),
    "train.precision": OneOf("auto", "fp32", "bf16"),
    "train.grad_checkpointing": Bool(),
    "train.drop_path_rate": Opt(Float(ge=0, lt=1)),
    "train.parallel": OneOf("ddp", "fsdp2"),
    "train.pca_png": Bool(),
    "train.monitor_every": Int(ge=0, note="0: off"),
    "train.monitor_images": Int(ge=1),
    "train.learning_patience": Int(ge=1),
    "train.learning_min_gap": Float(gt=0),
    **{f"optim.{k}": c for k, c in OPTIM.items()},
    "optim.weight_decay_end": Float(ge=0),
    "optim.layerwise_decay": Float(gt=0, le=1),
    "optim.patch_embed_lr_mult": Float(ge=0),
    "optim.freeze_last_layer_iterations": Int(ge=0),
    "optim.scaling_rule": OneOf("none", "sqrt_wrt_1024"),
    "ema.momentum": Float(ge=0, le=1),
    "ema.final_momentum": Float(ge=0, le=1),
    "ema.teacher_temp": Float(gt=0),
    "ema.warmup_teacher_temp": Float(gt=0),
    "ema.warmup_teacher_temp_iterations": Int(ge=0),
}

STAGE: dict[str, Entry] = {
    "name": Str(),
    "meta_arch": Str(),
    "predecessors": List(Str()),
    "released_init": Bool(),
    "head_warmup_iterations": Int(ge=0),
    "centering": OneOf("sinkhorn_knopp", "softmax"),
    "crops.global_crops_size": _crop(),
    "crops.local_crops_size": _crop(local=True),
    "crops.local_crops_number": Int(ge=0),
    "crops.global_crops_scale": Span(lo_open=True),
    "crops.local_crops_scale": Span(lo_open=True),
    "crops.horizontal_flips": Bool(),
    "crops.gram_teacher_crops_size": lambda t: Opt(_crop()(t)),
    "crops.gram_teacher_no_distortions": Bool(),
    **{f"dino.{k}": c for k, c in HEAD.items()},
    "dino.global_ignore_diagonal": Bool(),
    "dino.local_loss_weight": Float(ge=0),
    "dino.koleo_loss_weight": Float(ge=0),
    "dino.koleo_distributed": Bool(),
    "dino.koleo_distributed_loss_group_size": Opt(Int(ge=2)),
    **{f"ibot.{k}": c for k, c in HEAD.items()},
    "ibot.mask_sample_probability": Float(ge=0, le=1),
    "ibot.mask_ratio_min_max": Span(),
    "gram.use_loss": Bool(),
    "gram.loss_weight": Float(ge=0),
    "gram.img_level": Bool(),
    "gram.remove_neg": Bool(),
    "gram.remove_only_teacher_neg": Bool(),
    "gram.normalized": Bool(),
    "gram.apply_norm": Bool(),
    "gram.tokens_used": OneOf("all", "masked", "unmasked"),
    "gram.ckpt": PATH,
    "gram.rep_update": Bool(),
    "gram.update_frequency": Int(ge=1),
    "gram.it_first_update": Int(ge=0),
    "gram.max_updates": Int(ge=0),
    "gram.global_teacher_resize_method": OneOf("bicubic", "bilinear", "nearest", "nearest-exact", "area"),
    "gram.global_teacher_resize_antialias": Bool(),
    "highres.global_crops_sizes": _crop_list(),
    "highres.local_crops_sizes": _crop_list(local=True),
    "highres.gram_teacher_crops_sizes": _crop_list(),
    "highres.probabilities": List(Float(ge=0), min_len=1),
    # distill
    "teacher_temp": Opt(Float(gt=0, note="null: the ema.* schedule")),
    "band_mapping": Opt(AnyOf(List(Str(), min_len=1), Mapping(List(Str(), min_len=1)))),
    "export": OneOf("ema", "student"),
    "agreement_images": Int(ge=0, note="0: off"),
    # text
    "caption_file": PATH,
    "vision_head_blocks": Int(ge=0),
    "embed_dim": Int(ge=1),
    "text.width": Int(ge=1),
    "text.layers": Int(ge=1),
    "text.heads": Int(ge=1),
    "text.context_length": Int(ge=1),
    "text.vocab_size": Int(ge=1),
    "text.mlp_ratio": Float(gt=0),
    "text.freeze_token_embedding": Bool(),
    "vision.head_drop_path": Float(ge=0, lt=1),
    "vision.use_class_token": Bool(),
    "vision.use_patch_tokens": Bool(),
    "vision.use_linear_projection": Bool(),
    "vision.patch_tokens_pooler": OneOf("mean", "max"),
    "vision.patch_token_layer": Int(ge=1),
    "init_logit_scale": Float(),
    "freeze_logit_scale": Bool(),
    "crops.size": _crop(),
    "crops.scale": Span(lo_open=True),
    **{f"optim.{k}": c for k, c in OPTIM.items()},  # the text stage's own optimiser
}

DATA: dict[str, Entry] = {
    "name": Str(),
    "kind": OneOf("raster", "chips", "folder", "mix", "captions"),
    "base": Str(),  # data=mix entries: the data config they start from
    "paths": Opt(one_or_list(Path())),
    "filename_glob": Str(),
    "bands": Opt(List(Str(), min_len=1)),
    "sensor": Opt(OneOf(*SENSORS, ignore_case=True)),  # null: generic GeoTIFFs
    "chip_size": Int(ge=1),
    "scale": Opt(Float(gt=0)),
    "offset": Opt(Float()),
    "mean": Opt(List(Float(), min_len=1)),
    "std": Opt(List(Float(gt=0), min_len=1)),
    "stats_file": PATH,
    "nodata_max_fraction": Float(ge=0, le=1),
    "samples_per_epoch": Opt(Int(ge=1)),
    "chip_list": PATH,
    "file_list": PATH,
    "min_size": Int(ge=1),
    "caption_file": PATH,
    "root": PATH,
    "cache_mb": Float(ge=0),  # data=captions: decoded images kept in memory after their first read (0: off)
    "sources": Mapping(Mapping()),
    "weights": Opt(AnyOf(Mapping(Float(ge=0)), List(Float(ge=0), min_len=1))),
    "homogeneous_fraction": Float(ge=0, le=1),
    "homogeneous_source": Opt(Str()),
    "augment_on": OneOf("cpu", "gpu"),  # multi-crop in the loader workers (cpu) or on the training device (gpu)
    "rows": Opt(Span()),  # raster sources: the band of rows (fractions of each raster's height, north = 0) chips come from
}

MODEL: dict[str, Entry] = {
    "name": Str(),
    "in_chans": Opt(Int(ge=1, note="null: the data's band count")),
    "kwargs": Mapping(),
    "kwargs.patch_size": Int(ge=1),
    "drop_path_rate": Float(ge=0, lt=1),
    "weights": PATH,
}

TASK: dict[str, Entry] = {
    "name": Str(),
    "head": one_or_list(OneOf(*DENSE_HEADS)),
    "epochs": Int(ge=1),
    "seg_epochs": Opt(Int(ge=1)),
    "lr": Float(gt=0),
    "lrs": Opt(List(Float(gt=0), min_len=1)),  # the learning-rate grid (null: [lr])
    "seg_lrs": Opt(List(Float(gt=0), min_len=1)),  # GEO-Bench segmentation heads' grid (null: lrs)
    "val_split": Opt(Str()),  # where a sweep is scored (null: hold out val_fraction of the training tiles)
    "val_fraction": Float(gt=0, lt=1),
    "weight_decay": Float(ge=0),
    "batch_size": Int(ge=1),
    "feature_batch_size": Opt(Int(ge=1)),
    "decoder_dim": Int(ge=1),
    "layers": AnyOf(Int(ge=1), List(Int(ge=0), 1), Pattern(r"spaced:[1-9][0-9]*", "spaced:N"),
                    allowed="an int n >= 1 (the last n blocks), 'spaced:N' (N evenly spaced blocks), or a list of "
                            "0-based block indices"),
    "protocol": Str(),  # a name for the settings (quick | paper), recorded in results.json
    "train_split": Str(),
    "eval_split": Str(),
    "augment": List(OneOf(*AUGMENTATIONS)),
    "crop_scale": List(Float(gt=0, le=1), length=2),
    "finetune": OneOf(*FINETUNE_MODES),
    "lora": Mapping(),
    "lora.r": Int(ge=1),
    "lora.alpha": Float(gt=0),
    "lora.dropout": Float(ge=0, lt=1),
    "layer_decay": Float(gt=0, le=1),
    "backbone_lr_mult": Float(ge=0),
    # loveda
    "scenes": Opt(List(OneOf(*LOVEDA_SCENES))),
    "window": Int(ge=1),
    "stride": _task_stride,
    "train_stride": Opt(Int(ge=1)),
    "max_train_tiles": Opt(Int(ge=1)),
    "max_eval_tiles": Opt(Int(ge=1)),
    # canopy
    "patch": Int(ge=1),
    "block_size": Int(ge=1),
    "border": Int(ge=0),
    "min_block_valid": Float(ge=0, le=1),
    "tree_threshold_m": Float(ge=0),
    "height_bins": List(Float(ge=0), min_len=1),
    "max_height_m": Opt(Float(gt=0)),
    # geobench
    "benchmark_task": one_or_list(Str()),
    "partition": Str(),
    "probes": List(OneOf("knn", "linear"), min_len=1),
    "bands": OneOf("rgb", "all"),
    "knn_k": Int(ge=1),
    "knn_temperature": Float(gt=0),
    "train_on_trainval": Bool(),
    "scaling": OneOf("minmax", "percentile", "none"),
    "features": OneOf("cls", "cls_avgpool"),
    "ignore_index": Mapping(Int()),
    "exclude_from_mean": Mapping(List(Int())),
    "max_samples": Opt(Int(ge=1)),
    # ov (open-vocabulary segmentation scored against label rasters)
    "prompts": Opt(List(Str(), min_len=2)),
    "templates": one_or_list(Str()),
    "tile": Int(ge=1),
    "overlap": Int(ge=0),
    "ignore_value": Opt(Int()),
}

EVAL: dict[str, Entry] = {
    **RUNTIME,
    "root": PATH,
    "backbone": Str(),
    "weights": PATH,
    "run_dir": PATH,
    "overwrite": Bool(),
    "seed": SEED,
    "cache_features": Bool(),
    "cache_dir": PATH,
    "num_workers": Int(ge=0),
    "n_figures": Int(ge=0),
    "save_heads": Bool(),
}

SEGMENT: dict[str, Entry] = {
    **RUNTIME,
    "checkpoint": PATH,
    "input": PATH,
    "out": PATH,
    "overwrite": Bool(),
    "prompts": one_or_list(Str(), min_len=0),
    "templates": Templates(),
    "background": Opt(Float(ge=0, le=1, note="a probability threshold")),
    "tile": Int(ge=1),
    "overlap": Int(ge=0),
    "blend": OneOf("linear", "cosine", "none"),
    "patch_features": OneOf("head", "backbone"),
    "scale": Opt(Float(gt=0)),
    "offset": Opt(Float()),
    "scores": Bool(),
    "preview": Bool(),
    "preview_size": Int(ge=1),
    "gdal_cache_mb": Int(ge=1),
    "format": OneOf("cog", "gtiff"),  # geodino.segment.run.FORMATS
    "vector": Bool(),
}

CURATE: dict[str, Entry] = {
    **RUNTIME,
    "action": OneOf(*CURATE_ACTIONS),
    "caption_file": PATH,  # data=captions sets it
    "backbone": Str(),
    "weights": PATH,
    "out": PATH,
    "overwrite": Bool(),
    "n_samples": Int(ge=1),
    "n_chips": Opt(Int(ge=1)),
    "shard_size": Int(ge=1),
    "levels": List(Int(ge=1), min_len=1),
    "seed": SEED,
    "stats_chips": Int(ge=1),
    "embeddings": PATH,
    "pool_size": Opt(Int(ge=1)),
    "batch_size": Int(ge=1),
    "num_workers": Int(ge=0),
    "image_size": Opt(Int(ge=1)),
    "resampling_steps": one_or_list(Int(ge=0)),
    "resampling_size": one_or_list(Int(ge=1)),
    "kmeans_iters": Int(ge=1),
    "kmeans_init": OneOf("random", "kmeans++"),
    "max_train_points": Opt(Int(ge=1)),
    "strategy": OneOf("r", "c"),
    "queries": PATH,
    "k": Int(ge=1),
    "index": OneOf("flat", "ivf"),
    "nlist": Opt(Int(ge=1)),
    "nprobe": Int(ge=1),
    "dedup_threshold": Opt(Float(ge=-1, le=1, note="a cosine similarity")),
}

EXPORT: dict[str, Entry] = {
    "checkpoint": PATH,
    "format": OneOf(*EXPORT_FORMATS),
    "which": OneOf("teacher", "student"),
    "out": PATH,
    "overwrite": Bool(),
    "part": OneOf("backbone", "students", "text", "segmenter"),
    "prompts": one_or_list(Str(), min_len=0),
    "templates": Templates(),
}

# config groups, wherever a verb's config holds them (data=mix entries are data configs too)
GROUPS: dict[str, dict[str, Entry]] = {"stage": STAGE, "data": DATA, "data.sources.*": DATA, "model": MODEL,
                                       "task": TASK}


# ------------------------------------------------------------------------------------------------
# Relations between keys: rule(config) yields (key, value, "what is wrong; allowed: ...")
# ------------------------------------------------------------------------------------------------

Problem = tuple[str, Any, str]


def _crop_nesting(t: dict) -> Iterator[Problem]:
    g, lo = _get(t, "stage.crops.global_crops_size"), _get(t, "stage.crops.local_crops_size")
    if _is_int(g) and _is_int(lo) and lo > g:
        yield ("stage.crops.local_crops_size", lo, f"larger than stage.crops.global_crops_size={g}; "
               "allowed: a local crop no larger than the global crop")


def _highres(t: dict) -> Iterator[Problem]:
    hr = _get(t, "stage.highres")
    if not isinstance(hr, dict):
        return
    lists = {k: v for k, v in hr.items() if isinstance(v, list)}
    n = len(lists.get("global_crops_sizes", []))
    for k, v in lists.items():
        if len(v) != n:
            yield (f"stage.highres.{k}", v, f"{len(v)} entries but stage.highres.global_crops_sizes has {n}; "
                   "allowed: one entry per crop-size setting")
    p = lists.get("probabilities", [1])
    if sum(p) <= 0:
        yield ("stage.highres.probabilities", p, "sum to 0; allowed: non-negative numbers with a positive sum")
    for g, lo in zip(lists.get("global_crops_sizes", []), lists.get("local_crops_sizes", [])):
        if lo > g:
            yield ("stage.highres.local_crops_sizes", lists["local_crops_sizes"], f"local crop {lo} is larger than "
                   f"its global crop {g}; allowed: each local crop no larger than the global crop of its setting")


def _gram(t: dict) -> Iterator[Problem]:
    g = _get(t, "stage.gram")
    if _meta_arch(t) != "ssl" or not isinstance(g, dict) or not g.get("use_loss", False):
        return
    if _get(t, "stage.highres") is None and _get(t, "stage.crops.gram_teacher_crops_size") is None:
        yield ("stage.crops.gram_teacher_crops_size", None, "stage.gram.use_loss=true needs Gram teacher crops; "
               "allowed: a crop size (the reference: twice stage.crops.global_crops_size)")
    if g.get("tokens_used", "all") != "all" and g.get("img_level", True):
        yield ("stage.gram.tokens_used", g["tokens_used"], "needs stage.gram.img_level=false (as the reference); "
               "allowed: all, or masked / unmasked with img_level=false")
    if g.get("remove_neg", False) and g.get("remove_only_teacher_neg", False):
        yield ("stage.gram.remove_only_teacher_neg", True, "excludes stage.gram.remove_neg=true (as the reference); "
               "allowed: at most one of them true")


def _distill(t: dict) -> Iterator[Problem]:
    centering = _get(t, "stage.centering", "sinkhorn_knopp")
    if _meta_arch(t) == "distill" and centering != "sinkhorn_knopp":
        yield ("stage.centering", centering, "stage=distill uses Sinkhorn-Knopp teacher targets (the reference's "
               "only choice); allowed: sinkhorn_knopp")


def _text(t: dict) -> Iterator[Problem]:
    if _meta_arch(t) != "dinotxt":
        return
    cls, patches = _get(t, "stage.vision.use_class_token", True), _get(t, "stage.vision.use_patch_tokens", True)
    if not (cls or patches):
        yield ("stage.vision.use_patch_tokens", False, "with stage.vision.use_class_token=false too, no image "
               "embedding is left; allowed: at least one of them true")
    dim = _get(t, "stage.embed_dim")
    if cls and patches and _is_int(dim) and dim % 2:
        yield ("stage.embed_dim", dim, "odd, but the image embedding is [cls || patch] in two halves; "
               "allowed: an even integer")
    width, heads = _get(t, "stage.text.width"), _get(t, "stage.text.heads")
    if _is_int(width) and _is_int(heads) and width % heads:
        yield ("stage.text.width", width, f"not divisible by stage.text.heads={heads}; "
               "allowed: a multiple of the number of heads")


def _data_source(prefix: str, d: dict) -> Iterator[Problem]:
    kind = d.get("kind")
    bands = d.get("bands")
    n_bands, what = (len(bands), f"{prefix}.bands") if isinstance(bands, list) else \
        (3, "the R, G, B photos") if kind == "folder" else (None, "")
    mean, std = d.get("mean"), d.get("std")
    for key, v in (("mean", mean), ("std", std)):
        if isinstance(v, list) and n_bands is not None and len(v) != n_bands:
            yield (f"{prefix}.{key}", v, f"{len(v)} values for the {n_bands} bands of {what}; "
                   "allowed: one value per band")
    if n_bands is None and isinstance(mean, list) and isinstance(std, list) and len(mean) != len(std):
        yield (f"{prefix}.std", std, f"{len(std)} values but {prefix}.mean has {len(mean)}; "
               "allowed: one value per band in each")


def _mix(data: dict) -> Iterator[Problem]:
    sources = data.get("sources")
    names = list(sources) if isinstance(sources, dict) else []
    w = data.get("weights")
    values = list(w.values()) if isinstance(w, dict) else w if isinstance(w, list) else []
    unknown = [k for k in w if k not in names] if isinstance(w, dict) else []
    if unknown:
        yield ("data.weights", w, f"{', '.join(unknown)} is not a source; allowed: weights of {', '.join(names)}")
    elif isinstance(w, list) and len(w) != len(names):
        yield ("data.weights", w, f"{len(w)} weights for {len(names)} sources; allowed: one weight per source "
               f"({', '.join(names)})")
    elif values and sum(values) <= 0:
        yield ("data.weights", w, "sum to 0; allowed: non-negative weights with a positive sum")
    hs = data.get("homogeneous_source")
    if hs is not None and hs not in names:
        yield ("data.homogeneous_source", hs, f"not a source; allowed: one of {', '.join(names)}")


def _data(t: dict) -> Iterator[Problem]:
    data = t.get("data")
    if not isinstance(data, dict):
        return
    yield from _data_source("data", data)
    sources = data.get("sources")
    if data.get("kind") == "mix" and isinstance(sources, dict):
        for name, entry in sources.items():
            yield from _data_source(f"data.sources.{name}", entry)
        yield from _mix(data)


def _model_bands(t: dict) -> Iterator[Problem]:
    """A stage that builds its backbone from model= (no predecessor) needs model.in_chans to fit the bands."""
    in_chans, bands = _get(t, "model.in_chans"), _get(t, "data.bands")
    if _meta_arch(t) == "ssl" and not _get(t, "stage.predecessors") and _is_int(in_chans) \
            and isinstance(bands, list) and in_chans != len(bands):
        yield ("model.in_chans", in_chans, f"does not fit data.bands, which selects {len(bands)} bands; "
               f"allowed: {len(bands)}, or null (the data's band count)")


def _task_windows(t: dict) -> Iterator[Problem]:
    task = t.get("task")
    if not isinstance(task, dict):
        return
    wkey = "window" if "window" in task else "patch"
    window = task.get(wkey)
    for key in ("stride", "train_stride"):
        s = task.get(key)
        if _is_int(s) and _is_int(window) and s > window:
            yield (f"task.{key}", s, f"larger than task.{wkey}={window} leaves pixels without a prediction; "
                   f"allowed: at most {window}")


def _tiles(t: dict) -> Iterator[Problem]:
    tile, overlap = t.get("tile"), t.get("overlap")
    if _is_int(tile) and _is_int(overlap) and overlap >= tile:
        yield ("overlap", overlap, f"not smaller than tile={tile}; allowed: 0 <= overlap < tile")


def _levels(t: dict) -> Iterator[Problem]:
    levels = t.get("levels")
    if not isinstance(levels, list):
        return
    if any(b >= a for a, b in zip(levels, levels[1:])):
        yield ("levels", levels, "not shrinking; allowed: cluster counts from the finest level to the coarsest, "
               "each smaller than the one before (e.g. [10000, 1000, 100])")
    for key in ("resampling_steps", "resampling_size"):
        v = t.get(key)
        if isinstance(v, list) and len(v) != len(levels):
            yield (key, v, f"{len(v)} entries for {len(levels)} levels; allowed: one value, or one per level")


# verb -> (its table, the relations between its keys)
VERBS: dict[str, tuple[dict[str, Entry], tuple[Callable[[dict], Iterator[Problem]], ...]]] = {
    "train": (TRAIN, (_crop_nesting, _highres, _gram, _distill, _text, _data, _model_bands)),
    "eval": (EVAL, (_task_windows,)),
    "segment": (SEGMENT, (_tiles,)),
    "curate": (CURATE, (_data, _levels)),
    "export": (EXPORT, ()),
}


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

def table(verb: str) -> dict[str, Entry]:
    """Full key (``*``: any name) -> check, for `verb`'s config and every group it may hold."""
    out = dict(VERBS[verb][0])
    for group, rows in GROUPS.items():
        out.update({f"{group}.{k}": c for k, c in rows.items()})
    return out


def _plain(node):
    """A config as plain dicts and lists, interpolations resolved. Keys whose value is still missing (``???``, or
    an interpolation to such a value) are left out: the verb names them, with an example."""
    if isinstance(node, DictConfig):
        out = {}
        for k in node.keys():
            try:
                if not OmegaConf.is_missing(node, k):
                    out[k] = _plain(node[k])
            except OmegaConfBaseException:  # an interpolation to a missing value
                pass
        return out
    if isinstance(node, ListConfig):
        return [_plain_item(node, i) for i in range(len(node))]
    return node


def _plain_item(node: ListConfig, i: int):
    try:
        return "???" if OmegaConf.is_missing(node, i) else _plain(node[i])
    except OmegaConfBaseException:
        return "???"


def _select(tree: dict, pattern: str) -> list[tuple[str, Any]]:
    """(key, value) of every key of `tree` matching `pattern` (dotted, ``*`` any name)."""
    nodes: list[tuple[str, Any]] = [("", tree)]
    for part in pattern.split("."):
        nodes = [(f"{key}.{name}" if key else str(name), node[name]) for key, node in nodes if isinstance(node, dict)
                 for name in (node if part == "*" else [part] if part in node else [])]
    return nodes


def _show(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_show(x)}" for k, x in v.items()) + "}"
    return str(v)


def problems(verb: str, cfg) -> list[tuple[str, str]]:
    """(key, one-line message) for every problem of `verb`'s config: the table's checks, then (when every value
    passed) the relations between keys. Verbs without a schema have none."""
    if verb not in VERBS:
        return []
    tree = _plain(cfg if OmegaConf.is_config(cfg) else OmegaConf.create(cfg))
    out = []
    for pattern, entry in table(verb).items():
        for key, value in _select(tree, pattern):
            check = entry if isinstance(entry, Check) else entry(tree)
            p = check.problem(value)
            if p:
                out.append((key, f"{key}={_show(value)}: {p}; allowed: {check.allowed}"))
    if not out:
        for rule in VERBS[verb][1]:
            out += [(key, f"{key}={_show(value)}: {text}") for key, value, text in rule(tree)]
    return out


def validate(verb: str, cfg) -> None:
    """Raise ConfigError (one line) naming the first bad key of `verb`'s config, its value and what it allows;
    the keys of further problems follow in parentheses."""
    found = problems(verb, cfg)
    if found:
        others = list(dict.fromkeys(key for key, _ in found[1:] if key != found[0][0]))
        raise ConfigError(found[0][1] + (f" (also wrong: {', '.join(others)})" if others else ""))
