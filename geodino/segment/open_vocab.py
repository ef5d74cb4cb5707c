"""Open-vocabulary segmentation with a dino.txt model (dinov3_spec.md §8, the segmentation notebooks).

    seg = geodino.OpenVocabSegmenter.from_checkpoint("outputs/train/text/<run>")
    result = seg.segment("scene.tif", ["building", "road", "water", "forest"], background=0.4)
    result.labels      # (H, W) int16: index into result.class_names; -1 background, -2 nodata
    result.scores      # (H, W) float32: probability of the winning class
    result.file_labels()   # (H, W) uint8: the values `geodino segment` writes to its GeoTIFF (below)

Labels: two conventions, one mapping. In Python, ``labels`` index ``class_names`` (0..K-1), with ``BACKGROUND``
(-1) and ``NODATA`` (-2). In files (the ``geodino segment`` GeoTIFF, band 1, uint8) the K classes are 1..K in
prompt order, background is K+1 and nodata is the raster's nodata value (0 unless the input's own nodata value fits
uint8 and is free), so 0 stays a natural nodata. :func:`file_labels` maps the first to the second and
:func:`api_labels` back; the CLI writes its rasters with :func:`file_labels`, so ``result.file_labels()`` equals
the raster ``geodino segment`` writes for the same image and prompts.

Text side: every class name is put into each prompt template, encoded, and the half of the joint embedding that is
aligned with the pooled patch tokens (``[E/2:]`` for ``[cls || patch]`` models) is kept, L2-normalised, averaged
over the templates and normalised again. Image side: the input is scaled and normalised with the backbone's
contract, padded to a multiple of the patch size, and the head's patch tokens (``patch_features="head"``, the
default; ``"backbone"`` uses the frozen backbone's tokens through the head projection, as one official notebook
does) are L2-normalised; their cosine with every class, times the learned ``exp(logit_scale)``, is upsampled
bilinearly to the input resolution and turned into class probabilities with a softmax. Inputs larger than
``tile`` are processed as overlapping tiles blended with ramp weights (geodino.segment.tiling).

Inputs: numpy arrays (HWC or CHW; 2-D for one band), PIL images, torch tensors (CHW or 1CHW) or a path (GeoTIFF
of any band count, or a photo). GeoTIFFs and integer arrays are divided by the checkpoint's data scale (when the
run did not fix one: the data type's default, geodino.data.geotiff, as in training; GeoTIFFs also get their
product's offset, else the contract's); float arrays and tensors are taken as already in [0, 1]; photos are divided
by 255.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from open_clip import zero_shot_metadata as z
from PIL import Image

from geodino.contract import Contract
from geodino.data.geotiff import default_scale, read_scaled
from geodino.errors import DataError, GeodinoError
from geodino.runtime import resolve_device
from geodino.segment.tiling import blend_tiles
from geodino.text.dinotxt import DinoTxt
from geodino.text.io import load_dinotxt

log = logging.getLogger("geodino")

__all__ = ["OpenVocabSegmenter", "SegmentationResult", "TEMPLATES", "RS_TEMPLATES", "BACKGROUND", "NODATA",
           "api_labels", "file_labels", "resolve_templates"]

BACKGROUND = -1
NODATA = -2


def file_labels(labels: np.ndarray, n_classes: int, nodata: int = 0) -> np.ndarray:
    """API labels (0..K-1, BACKGROUND, NODATA) -> the uint8 label values of a ``geodino segment`` GeoTIFF: class i
    -> i + 1, BACKGROUND -> K + 1, NODATA -> ``nodata`` (module docstring)."""
    k = int(n_classes)
    if not 0 <= int(nodata) <= 255 or 1 <= int(nodata) <= k + 1:
        raise GeodinoError(f"nodata value {nodata} must fit uint8 and differ from the labels 1..{k + 1}")
    lab = np.asarray(labels)
    out = (lab.astype(np.int16) + 1).astype(np.uint8)  # classes 0..K-1 -> 1..K
    out[lab == BACKGROUND] = k + 1
    out[lab == NODATA] = int(nodata)
    return out


def api_labels(values: np.ndarray, n_classes: int, nodata: int | None = 0) -> np.ndarray:
    """The inverse of :func:`file_labels`: GeoTIFF label values -> int16 API labels."""
    k = int(n_classes)
    v = np.asarray(values).astype(np.int16)
    out = v - 1
    out[v == k + 1] = BACKGROUND
    if nodata is not None:
        out[v == int(nodata)] = NODATA
    return out

#: Remote-sensing prompt templates.
RS_TEMPLATES: tuple[str, ...] = (
    "a satellite image of {}.",
    "an aerial image of {}.",
    "a remote sensing image of {}.",
    "a satellite photo of {}.",
    "an aerial view of {}.",
    "an overhead view of {}.",
    "{} seen from above.",
    "a top-down view of {}.",
)


def _open_clip_templates(name: str) -> tuple[str, ...]:
    table = {"openai": z.OPENAI_IMAGENET_TEMPLATES, "simple": z.SIMPLE_IMAGENET_TEMPLATES}[name]
    return tuple(t("{}") for t in table)


TEMPLATES: dict[str, Callable[[], tuple[str, ...]]] = {
    "default": lambda: ("{}",) + RS_TEMPLATES,
    "rs": lambda: RS_TEMPLATES,
    "openai": lambda: _open_clip_templates("openai"),  # the 80 CLIP ImageNet templates (the notebook's choice)
    "simple": lambda: _open_clip_templates("simple"),
    "none": lambda: ("{}",),
}


def resolve_templates(templates: str | Sequence[str] | None) -> tuple[str, ...]:
    """A template set name (default, rs, openai, simple, none) or a list of strings with one ``{}``."""
    if templates is None:
        templates = "default"
    if isinstance(templates, str):
        if "{}" in templates:
            return (templates,)
        if templates not in TEMPLATES:
            raise GeodinoError(f"unknown template set '{templates}'; choose one of {', '.join(TEMPLATES)} "
                               "or pass a list of strings with a '{}' placeholder")
        return TEMPLATES[templates]()
    out = []
    for t in templates:
        if callable(t):
            t = t("{}")
        t = str(t)
        if t.count("{}") != 1:
            raise GeodinoError(f"prompt template '{t}' must contain exactly one '{{}}' for the class name")
        out.append(t)
    if not out:
        raise GeodinoError("the list of prompt templates is empty")
    return tuple(out)


def check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts is None:
        prompts = []
    prompts = list(prompts)
    if not prompts:
        raise GeodinoError("segment needs at least one class prompt, e.g. ['building', 'road', 'water']")
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
    if bad:
        raise GeodinoError(f"class prompts must be non-empty strings; got {bad[:3]!r}")
    if len(prompts) > 250:
        raise GeodinoError(f"{len(prompts)} prompts: at most 250 classes fit the uint8 label raster")
    if len(set(prompts)) != len(prompts):
        raise GeodinoError(f"duplicate class prompts: {sorted({p for p in prompts if prompts.count(p) > 1})}")
    return [p.strip() for p in prompts]


@dataclass
class SegmentationResult:
    labels: np.ndarray  # (H, W) int16: class index, BACKGROUND (-1) or NODATA (-2)
    scores: np.ndarray  # (H, W) float32: winning-class probability (0 at nodata)
    class_names: list[str]
    probabilities: np.ndarray | None = None  # (K, H, W) float32 when requested
    valid: np.ndarray | None = None  # (H, W) bool
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.labels.shape)

    def label_names(self) -> np.ndarray:
        """(H, W) array of class names ('background' / 'nodata' where applicable)."""
        names = np.array(["nodata", "background", *self.class_names], dtype=object)
        return names[self.labels.astype(np.int64) + 2]

    def file_labels(self, nodata: int = 0) -> np.ndarray:
        """(H, W) uint8 labels as ``geodino segment`` writes them: 1..K, K+1 background, ``nodata`` (module doc)."""
        return file_labels(self.labels, len(self.class_names), nodata)


class OpenVocabSegmenter:
    """Per-pixel open-vocabulary labels from a dino.txt model (see module doc)."""

    def __init__(self, model, contract: Contract, scale: float | None = None, device: str | torch.device = "cpu",
                 patch_features: str = "head", tile: int = 512, overlap: int = 64, blend: str = "linear",
                 info: dict | None = None, offset: float | None = None):
        if not isinstance(model, DinoTxt):
            raise GeodinoError(f"OpenVocabSegmenter needs a dino.txt model, got {type(model).__name__}")
        if not model.cfg.use_patch_tokens:
            raise GeodinoError("this dino.txt model has no patch-token half (use_patch_tokens=False): it cannot segment")
        if patch_features not in ("head", "backbone"):
            raise GeodinoError(f"patch_features must be head or backbone, got '{patch_features}'")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.contract = Contract.from_dict(contract)
        self.bands = list(self.contract.bands)
        self.in_chans = self.contract.in_chans
        self.patch = self.contract.patch_size
        self.scale = self.contract.scale if scale is None else float(scale)
        self.offset = None if offset is None else float(offset)  # None: the raster's product's, else the contract's
        self.patch_features = patch_features
        self.tile = int(tile)
        self.overlap = int(overlap)
        self.blend = blend
        self.info = dict(info or {})
        self._text_cache: dict[tuple, torch.Tensor] = {}
        if self.tile % self.patch:
            raise GeodinoError(f"tile={self.tile} must be a multiple of the patch size {self.patch}")

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs) -> "OpenVocabSegmenter":
        """From a ``geodino train stage=text`` run directory or checkpoint file."""
        model, meta = load_dinotxt(path)
        if meta.get("random_backbone"):
            log.warning("%s was aligned on a RANDOMLY initialised frozen backbone (%s; stage=text without init= or "
                        "model.weights): its segmentations say little about the classes", meta["checkpoint"],
                        meta["contract"].name)
        scale = kwargs.pop("scale", meta.get("data", {}).get("scale"))
        return cls(model, meta["contract"], scale=scale, device=device, info=meta, **kwargs)

    # -- text -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str], templates: str | Sequence[str] | None = "default",
                        text_model: torch.nn.Module | None = None) -> torch.Tensor:
        """(K, E') class embeddings aligned with the patch tokens (template-ensembled, L2-normalised).
        ``text_model``: encode with this text tower instead of the model's (e.g. an untrained one, for the floor
        of ``geodino eval ov``); such embeddings are not cached."""
        prompts = check_prompts(prompts)
        temps = resolve_templates(templates)
        key = (tuple(prompts), temps)
        if text_model is None and key in self._text_cache:
            return self._text_cache[key]
        texts = [t.format(p) for p in prompts for t in temps]
        tokens = self.model.tokenize(texts).to(self.device)
        encode = self.model.encode_text if text_model is None else text_model
        feats = torch.cat([encode(chunk) for chunk in tokens.split(256)])
        cfg = self.model.cfg
        if cfg.use_class_token and cfg.use_patch_tokens:
            feats = feats[:, feats.shape[1] // 2:]
        feats = F.normalize(feats.float(), dim=-1).view(len(prompts), len(temps), -1).mean(1)
        emb = F.normalize(feats, dim=-1)
        if text_model is not None:
            return emb
        if len(self._text_cache) > 16:
            self._text_cache.clear()
        self._text_cache[key] = emb
        return emb

    # -- image ----------------------------------------------------------------------------------------------------
    def scale_for(self, dtype) -> float:
        """The divisor that brings raw values of this data type to [0, 1]: the checkpoint's data scale, else the
        default for the type (geodino.data.geotiff.default_scale)."""
        return self.scale if self.scale is not None else default_scale(dtype)

    def to_float(self, arr: np.ndarray | torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """Integer data / scale (clipped to [0, 1]); floats unchanged."""
        t = torch.as_tensor(arr) if not isinstance(arr, torch.Tensor) else arr
        if t.dtype == torch.bool:
            raise DataError("a boolean array is not an image")
        if t.is_floating_point():
            return t.float()
        s = float(scale) if scale is not None else self.scale_for(np.dtype(str(t.dtype).replace("torch.", "")))
        return (t.float() / s).clamp_(0.0, 1.0)

    def _band_error(self, n: int, what: str) -> GeodinoError:
        return GeodinoError(f"{what} has {n} band{'s' if n != 1 else ''}; this model takes {self.in_chans} "
                            f"({', '.join(self.bands)})")

    def load_image(self, image: Any, scale: float | None = None) -> tuple[torch.Tensor, np.ndarray, dict]:
        """Any supported input -> ((C, H, W) float32 in [0, 1], valid (H, W) bool, raster info)."""
        info: dict = {}
        if isinstance(image, (str, Path)):
            path = Path(str(image)).expanduser()
            if not path.is_file():
                raise DataError(f"image {path} does not exist")
            if path.suffix.lower() in (".tif", ".tiff", ".vrt", ".jp2", ".img"):
                return self._load_raster(path, scale)
            try:
                with Image.open(path) as im:
                    im.load()
                    image = im.copy()
            except Exception as e:
                raise DataError(f"cannot read image {path}: {e}") from e
            info["path"] = str(path)
        if isinstance(image, Image.Image):
            if self.in_chans == 3:
                arr = np.asarray(image.convert("RGB"))
            elif self.in_chans == 1:
                arr = np.asarray(image.convert("L"))[..., None]
            else:
                raise self._band_error(len(image.getbands()), f"PIL image (mode {image.mode})")
            x = self.to_float(np.ascontiguousarray(arr.transpose(2, 0, 1)), scale=255.0 if scale is None else scale)
            return x, np.ones(x.shape[1:], bool), info
        if isinstance(image, np.ndarray) or isinstance(image, torch.Tensor):
            t = image
            if isinstance(t, torch.Tensor):
                t = t.detach().cpu()
                if t.ndim == 4:
                    if t.shape[0] != 1:
                        raise DataError(f"segment takes one image; got a batch of {t.shape[0]} (shape {tuple(t.shape)})")
                    t = t[0]
            if t.ndim == 2:
                t = t[None]
            if t.ndim != 3:
                raise DataError(f"an image must be 2-D or 3-D (HWC / CHW); got shape {tuple(t.shape)}")
            c = self.in_chans
            if t.shape[0] == c:
                chw = t
            elif t.shape[-1] == c:
                chw = t.permute(2, 0, 1) if isinstance(t, torch.Tensor) else np.ascontiguousarray(t.transpose(2, 0, 1))
            else:
                n = t.shape[0] if t.shape[0] <= t.shape[-1] else t.shape[-1]
                raise self._band_error(n, f"array of shape {tuple(t.shape)}")
            x = self.to_float(chw if isinstance(chw, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(chw)), scale)
            valid = ~torch.isnan(x).any(0)
            return torch.nan_to_num(x), valid.numpy(), info
        raise DataError(f"cannot segment a {type(image).__name__}: pass a numpy array, PIL image, torch tensor or a path")

    def _load_raster(self, path: Path, scale) -> tuple[torch.Tensor, np.ndarray, dict]:
        # as in training (geodino.text.data): raster values / scale, clipped to [0, 1], bands by name
        x, valid, info = read_scaled(path, self.bands, scale if scale is not None else self.scale, self.offset,
                                     fallback_offset=self.contract.offset)
        return torch.from_numpy(x), valid, info

    # -- prediction -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def patch_similarity(self, x01: torch.Tensor, valid: np.ndarray | torch.Tensor | None,
                         text: torch.Tensor) -> torch.Tensor:
        """(C, h, w) image in [0, 1] -> (K, h, w) cosine maps upsampled bilinearly (times exp(logit_scale))."""
        c, h, w = x01.shape
        if c != self.in_chans:
            raise self._band_error(c, "image")
        x = self.contract.normalize(x01.float())
        if valid is not None:
            v = torch.as_tensor(np.asarray(valid))
            if not bool(v.all()):
                x = x * v[None].to(x.dtype)  # nodata -> 0 = the band mean
        p = self.patch
        ph, pw = math.ceil(h / p) * p, math.ceil(w / p) * p
        if (ph, pw) != (h, w):
            x = F.pad(x[None], (0, pw - w, 0, ph - h), mode="replicate")[0]
        x = x[None].to(self.device)
        if self.patch_features == "head":
            _, patches, _ = self.model.encode_image_with_patch_tokens(x)
        else:
            _, _, bb = self.model.visual_model.get_class_and_patch_tokens(x)
            patches = self.model.visual_model.head.linear_projection(bb)
        gh, gw = ph // p, pw // p
        feats = F.normalize(patches[0].float(), dim=-1)  # (N, E')
        if feats.shape[-1] != text.shape[-1]:
            raise GeodinoError(f"patch features have {feats.shape[-1]} dims, the text embeddings {text.shape[-1]}")
        cos = (text.to(feats.device) @ feats.t()).view(-1, gh, gw)
        logits = cos * self.model.logit_scale.exp().float().reshape(())
        up = F.interpolate(logits[None], size=(ph, pw), mode="bilinear", align_corners=False)[0]
        return up[:, :h, :w]

    def predictor(self, text: torch.Tensor) -> Callable:
        def predict(image: torch.Tensor | np.ndarray, valid) -> torch.Tensor:
            x = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.asarray(image))
            return self.patch_similarity(x, valid, text).softmax(dim=0).cpu()

        return predict

    def export_onnx(self, out: str | Path, prompts: Sequence[str] | None = None,
                    templates: str | Sequence[str] | None = "default", **options) -> Path:
        """The image side as ONNX (`geodino.models.onnx.export_onnx`): ``pixel_values`` (normalised, as
        `geodino.transforms_for`) -> ``image_embedding`` ``[B, E]`` and ``patch_embeddings`` ``[B, HW, E']``, both
        L2-normalised. The metadata holds ``logit_scale`` (``exp``, a number) and, for `prompts`, ``classes`` and
        ``class_embeddings`` (``[K, E']``, JSON): class logits per patch are ``logit_scale * patch_embeddings @
        class_embeddings.T``, upsampled to the image as `patch_similarity` does."""
        from geodino.models.onnx import export_onnx

        meta = {"logit_scale": json.dumps(float(self.model.logit_scale.detach().exp())),
                "patch_features": self.patch_features}
        if prompts:
            prompts = check_prompts(prompts)
            meta["classes"] = json.dumps(prompts)
            meta["class_embeddings"] = json.dumps(self.text_embeddings(prompts, templates).cpu().tolist())
        backbone = self.model.visual_model.backbone
        if getattr(backbone, "geodino_contract", None) is None:
            backbone.geodino_contract = self.contract
        return export_onnx(backbone, out, graph=_ImageSide(self.model, self.patch_features),
                           output_names=("image_embedding", "patch_embeddings"), metadata=meta, **options)

    def segment(self, image: Any, prompts: Sequence[str], background: float | None = None,
                templates: str | Sequence[str] | None = "default", tile: int | None = None,
                overlap: int | None = None, return_probabilities: bool = False, scale: float | None = None,
                progress: bool = False) -> SegmentationResult:
        """Per-pixel labels and scores at the input resolution (see module doc).

        ``background``: a probability threshold; pixels whose winning class scores below it are BACKGROUND (-1).
        """
        prompts = check_prompts(prompts)
        if background is not None and not 0.0 <= float(background) <= 1.0:
            raise GeodinoError(f"background is a probability threshold in [0, 1], got {background}")
        text = self.text_embeddings(prompts, templates)
        x, valid, info = self.load_image(image, scale=scale)
        _, H, W = x.shape
        if H < 1 or W < 1:
            raise DataError(f"empty image of shape {tuple(x.shape)}")
        K = len(prompts)
        labels = np.full((H, W), NODATA, np.int16)
        scores = np.zeros((H, W), np.float32)
        probs_out = np.zeros((K, H, W), np.float32) if return_probabilities else None

        def read(y, x0, h, w):
            return x[:, y:y + h, x0:x0 + w], valid[y:y + h, x0:x0 + w]

        def emit(y, x0, probs, v):
            lab, sc = decide(probs, v, background)
            labels[y:y + lab.shape[0], x0:x0 + lab.shape[1]] = lab
            scores[y:y + lab.shape[0], x0:x0 + lab.shape[1]] = sc
            if probs_out is not None:
                probs_out[:, y:y + lab.shape[0], x0:x0 + lab.shape[1]] = probs


        stats = blend_tiles(H, W, int(tile or self.tile), int(self.overlap if overlap is None else overlap), read,
                            self.predictor(text), emit, blend=self.blend, progress=progress)
        return SegmentationResult(labels, scores, prompts, probs_out, valid, {**info, **stats})


class _ImageSide(nn.Module):
    """The segmenter's image side as one graph (`OpenVocabSegmenter.export_onnx`); the same features as
    `OpenVocabSegmenter.patch_similarity` uses, L2-normalised."""

    def __init__(self, model: DinoTxt, patch_features: str):
        super().__init__()
        self.model, self.patch_features = model, patch_features

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls, patches, backbone_patches = self.model.visual_model.get_class_and_patch_tokens(pixel_values)
        image = F.normalize(self.model.visual_model.pool(cls, patches), dim=-1)
        if self.patch_features == "backbone":
            patches = self.model.visual_model.head.linear_projection(backbone_patches)
        return image, F.normalize(patches, dim=-1)


def decide(probs: np.ndarray, valid: np.ndarray, background: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(K, h, w) probabilities -> (labels int16 with BACKGROUND / NODATA, winning score float32)."""
    sc_t, lab_t = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32)).max(dim=0)
    lab = lab_t.numpy().astype(np.int16)
    sc = sc_t.numpy()
    if background is not None:
        lab[sc < float(background)] = BACKGROUND
    lab[~valid] = NODATA
    sc[~valid] = 0.0
    return lab, sc
