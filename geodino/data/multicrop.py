"""DINOv3 multi-crop augmentation for RGB and any number of spectral bands.

This follows the recipe of ``dinov3/data/augmentations.py: DataAugmentationDINO`` (spec section 5):

* two global crops: ``RandomResizedCrop(global size, scale=(0.32, 1), ratio=(3/4, 4/3), bicubic)`` and a
  horizontal flip with p 0.5;
* ``local_crops_number`` local crops: the same with the local size and scale ``(0.05, 0.32)``;
* colour, per crop unless ``share_color_jitter``: ``RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8)`` then
  ``RandomGrayscale(p=0.2)``;
* Gaussian blur (kernel 9, sigma ~ U(0.1, 2.0)) with the reference's *effective* probabilities, and solarize
  (p 0.2) on the second global crop only;
* per-band ``(x - mean) / std`` normalisation;
* optional Gram-teacher crops (see :class:`MultiCropAugmentation`).

Input scaling contract
----------------------
The augmentation works on values in ``[0, 1]``: a ``uint8`` image (PIL, numpy ``HWC`` or a ``CHW`` tensor) is divided
by 255, and a float ``(C, H, W)`` tensor must **already be scaled to [0, 1] by the data source** (for example
Sentinel-2 L2A reflectance ``DN / 10000``). Values above 1 (bright clouds, specular reflections) are allowed and are
never clipped on the multispectral path; only the solarize threshold (0.5) and the blend formulas assume the
``[0, 1]`` convention. A float image whose maximum exceeds :data:`MAX_PLAUSIBLE_VALUE` is rejected, because that is
almost always raw, unscaled data.

Two paths, one semantics
------------------------
* ``n_bands == 3`` (RGB): torchvision v2 functional kernels on tensors. ``uint8`` input stays ``uint8`` until the
  normalisation, exactly as the reference does on PIL images (rounding after every op); float input runs the same ops
  in float (torchvision clamps the colour ops to [0, 1], which is what uint8 data does implicitly).
* ``n_bands != 3`` (multispectral): the same geometry, blur, solarize and normalisation kernels (they accept any
  channel count), but a band-aware colour step written by hand (see :func:`_ms_brightness_contrast`).

Resampling and the value range: the bicubic RandomResizedCrop (and the Gram-crop resize) overshoots near edges.
The reference resamples PIL ``uint8`` images, so every resampled pixel is clamped to [0, 255]; here a float RGB
image is clamped to [0, 1] on input and after every resampling of undistorted pixels, as uint8 data is (without
it the hue jitter turns overshoot into NaN). The multispectral path clamps the same places at the bottom only: a
resampled value never falls below 0 (or below the image's own minimum when that is negative), while values above 1
stay, as everywhere on that path.

Every random draw uses torch's RNG: an optional ``torch.Generator`` (constructor or call argument) makes a run
reproducible; without one the global torch RNG is used, which ``DataLoader`` seeds differently in each worker. Do
**not** give a constructor generator to a transform used by several DataLoader workers: each worker would receive a
copy of the same generator state and produce identical augmentations.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "MAX_CROP_SIZE",
    "MAX_PLAUSIBLE_VALUE",
    "MultiCropAugmentation",
]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

#: Largest crop side accepted (the DINOv3 high-resolution recipe uses Gram crops of 1152).
MAX_CROP_SIZE = 4096
#: A float input whose maximum is above this is treated as unscaled data (see module docstring).
MAX_PLAUSIBLE_VALUE = 50.0

_BICUBIC = InterpolationMode.BICUBIC
_BLUR_KERNEL = [9, 9]
_BLUR_SIGMA = (0.1, 2.0)
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)

# Effective Gaussian-blur probabilities of the reference implementation. Its ``GaussianBlur(p)`` passes ``1 - p`` to
# ``v2.RandomApply``, whose ``p`` is the probability of *applying* the transform, so the nominal 1.0 / 0.1 / 0.5 turn
# into 0.0 / 0.9 / 0.5 (facebookresearch/dinov3 issue #286, fix PR #342 swaps the call-site values to keep this).
# The released DINOv3 models were trained with these inverted values, so we reproduce them.
BLUR_PROB_GLOBAL_1 = 0.0
BLUR_PROB_GLOBAL_2 = 0.9
BLUR_PROB_LOCAL = 0.5


# ----------------------------------------------------------------------------------------------------------------------
# Random helpers (torch RNG, optional generator)
# ----------------------------------------------------------------------------------------------------------------------


def _rand(gen: torch.Generator | None) -> float:
    return float(torch.rand((), generator=gen))


def _uniform(lo: float, hi: float, gen: torch.Generator | None) -> float:
    return lo + (hi - lo) * _rand(gen)


def _coin(p: float, gen: torch.Generator | None) -> bool:
    """True with probability ``p`` (``RandomApply`` semantics: apply when ``rand < p``)."""
    if p <= 0.0:
        return False
    if p >= 1.0:
        return True
    return _rand(gen) < p


def _randint(lo: int, hi_exclusive: int, gen: torch.Generator | None) -> int:
    return int(torch.randint(lo, hi_exclusive, (), generator=gen))


def _rrc_params(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], gen: torch.Generator | None
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a RandomResizedCrop box (the usual Inception-style sampler, 10 tries then centre)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], gen)
        aspect = math.exp(_uniform(log_lo, log_hi, gen))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(0, height - h + 1, gen)
            left = _randint(0, width - w + 1, gen)
            return top, left, h, w
    # Fallback: central crop with the ratio clamped into range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(img: torch.Tensor, size: int) -> torch.Tensor:
    if img.shape[-2:] == (size, size):
        return img
    return F.resize(img, [size, size], interpolation=_BICUBIC, antialias=True)


# ----------------------------------------------------------------------------------------------------------------------
# Band-aware colour ops for n_bands != 3
# ----------------------------------------------------------------------------------------------------------------------
# torchvision's ColorJitter (and adjust_brightness / adjust_contrast alone) refuse anything but 1 or 3 channels, and
# albumentations' ColorJitter / ToGray are 3-channel only while its float pixel ops clip to [0, 1] (reflectance above 1
# would be destroyed). So the multispectral "colour jitter" is written here on tensors: brightness scales the bands,
# contrast blends every band with its own spatial mean. Hue and saturation have no band-agnostic meaning and are
# skipped. Nothing is clipped.


def _ms_brightness_contrast(
    img: torch.Tensor,
    brightness: float,
    contrast: float,
    per_band: bool,
    gen: torch.Generator | None,
) -> torch.Tensor:
    n = img.shape[-3] if per_band else 1

    def factors(strength: float) -> torch.Tensor:
        u = torch.rand(n, generator=gen, dtype=torch.float32)
        return (1.0 - strength + 2.0 * strength * u).to(img.device, img.dtype).view(n, 1, 1)

    b = factors(brightness)
    c = factors(contrast)
    # ColorJitter permutes its ops; here both orders are the same map, b·(c·(x - m) + m) with m the band's spatial
    # mean (brightness scales the mean with the pixels), so one pass applies it. The order draw is kept so the random
    # stream (and every later draw) stays what it was.
    _rand(gen)
    mean = img.mean(dim=(-2, -1), keepdim=True)
    return torch.addcmul(mean * (b * (1.0 - c)), img, b * c)


def _weighted_gray(img: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Replace every band by the weighted band mean (weights sum to 1), like torchgeo's RandomGrayscale.

    torchgeo.transforms.RandomGrayscale computes the same thing but is a kornia batch augmentation driven by the global
    RNG, which does not fit a per-sample transform with its own generator.
    """
    gray = torch.tensordot(weights.to(img.device, img.dtype), img, dims=([0], [0]))
    return gray.unsqueeze(0).expand_as(img).contiguous()


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Isotropic 9-tap Gaussian blur with reflect padding: torchvision's ``gaussian_blur`` to ~4e-7.

    Written here rather than calling ``F.gaussian_blur`` for speed only: torchvision runs its grouped convolution on
    the contiguous (N, C, H, W) layout, which oneDNN executes 3-4x slower on the CPU for 3-13 bands than the same
    depthwise convolution on a channels-last input (224 px: 6.6 -> 1.6 ms RGB, 9.1 -> 2.2 ms 13-band). The kernel is
    the sampled Gaussian at -4..4, normalised to sum 1, as in torchvision. uint8 input keeps torchvision's path
    (it rounds back to uint8).
    """
    if img.dtype == torch.uint8 or img.ndim < 3:
        return F.gaussian_blur(img, _BLUR_KERNEL, [sigma, sigma])
    half = _BLUR_KERNEL[0] // 2
    taps = torch.linspace(-half, half, _BLUR_KERNEL[0], dtype=img.dtype, device=img.device)
    k1 = torch.exp(-0.5 * (taps / sigma) ** 2)
    k1 = k1 / k1.sum()
    k2 = torch.outer(k1, k1)
    shape = img.shape
    bands = shape[-3]
    x = img.reshape(-1, bands, shape[-2], shape[-1])
    x = torch.nn.functional.pad(x, [half, half, half, half], mode="reflect")
    weight = k2.expand(bands, 1, *k2.shape)
    out = torch.nn.functional.conv2d(x.contiguous(memory_format=torch.channels_last), weight, groups=bands)
    return out.contiguous().reshape(shape)


# ----------------------------------------------------------------------------------------------------------------------
# The augmentation
# ----------------------------------------------------------------------------------------------------------------------


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r} must be a positive integer (pixels)")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name}={value} must be a positive integer (pixels)")
    if value > MAX_CROP_SIZE:
        raise ValueError(f"{name}={value} is larger than the supported maximum crop size {MAX_CROP_SIZE}")
    return value


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    if len(scale) != 2:
        raise ValueError(f"{name}={scale!r} must be a (min, max) pair")
    lo, hi = float(scale[0]), float(scale[1])
    if not (0.0 < lo <= hi <= 1.0):
        raise ValueError(f"{name}={scale!r} must satisfy 0 < min <= max <= 1")
    return lo, hi


class MultiCropAugmentation:
    """DINOv3 multi-crop transform: ``image -> {"global_crops": [2], "local_crops": [n], "gram_teacher_crops": [2]?}``.

    Args:
        global_crops_size, local_crops_size: output sides in pixels.
        local_crops_number: number of local crops (8 in the reference).
        global_crops_scale, local_crops_scale: RandomResizedCrop area ranges.
        horizontal_flips: flip each crop with p 0.5 (the reference 7B and distilled configs turn this off).
        mean, std: per-band normalisation, ``n_bands`` values each; default ImageNet for ``n_bands == 3``.
        n_bands: expected channel count. 3 means RGB (torchvision ColorJitter + grayscale); any other count uses the
            band-aware brightness/contrast and weighted-mean grayscale.
        rgb_indices: for ``n_bands > 3``, the indices of the R, G, B bands. When given, grayscale uses luma weights on
            those three bands (torchgeo's "RGB-only" option); otherwise the plain mean of all bands.
        gram_teacher_crops_size: if set, also emit two Gram-teacher crops of this size. The global RandomResizedCrop
            is then taken at ``max(global, gram)`` size.
        gram_teacher_no_distortions: if True the Gram crop is the undistorted base crop (same geometry and flip)
            resized to the Gram size and normalised, and the global crop is resized to the global size *before* the
            colour/blur ops; if False the distorted (and normalised) crop is resized to both sizes afterwards.
        share_color_jitter: apply the colour step once to the whole image instead of per crop.
        color_jitter_prob, grayscale_prob, solarize_prob, blur_probs: recipe probabilities (defaults: 0.8, 0.2,
            0.2 and the effective ``(0.0, 0.9, 0.5)`` for global-1, global-2, local). Exposed for tests and ablations.
        per_band_jitter: multispectral only: draw an independent brightness/contrast factor per band (changes the
            spectral shape) instead of one factor shared by all bands (an illumination change; default).
        generator: optional ``torch.Generator`` for reproducible runs (see module docstring about DataLoader workers).
        return_params: add a ``"params"`` entry recording the sampled boxes, flips and ops of every crop.
    """

    def __init__(
        self,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        local_crops_number: int = 8,
        global_crops_scale: Sequence[float] = (0.32, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.32),
        horizontal_flips: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        n_bands: int = 3,
        rgb_indices: Sequence[int] | None = None,
        gram_teacher_crops_size: int | None = None,
        gram_teacher_no_distortions: bool = False,
        share_color_jitter: bool = False,
        *,
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        solarize_prob: float = 0.2,
        blur_probs: Sequence[float] = (BLUR_PROB_GLOBAL_1, BLUR_PROB_GLOBAL_2, BLUR_PROB_LOCAL),
        per_band_jitter: bool = False,
        generator: torch.Generator | None = None,
        return_params: bool = False,
    ) -> None:
        self.global_crops_size = _check_size("global_crops_size", global_crops_size)
        self.local_crops_size = _check_size("local_crops_size", local_crops_size)
        if self.local_crops_size > self.global_crops_size:
            raise ValueError(
                f"local_crops_size={self.local_crops_size} is larger than global_crops_size={self.global_crops_size}"
            )
        self.gram_teacher_crops_size = (
            None if gram_teacher_crops_size is None else _check_size("gram_teacher_crops_size", gram_teacher_crops_size)
        )
        if (
            isinstance(local_crops_number, bool)
            or int(local_crops_number) != local_crops_number
            or local_crops_number < 0
        ):
            raise ValueError(f"local_crops_number={local_crops_number!r} must be a non-negative integer")
        self.local_crops_number = int(local_crops_number)
        self.global_crops_scale = _check_scale("global_crops_scale", global_crops_scale)
        self.local_crops_scale = _check_scale("local_crops_scale", local_crops_scale)
        self.horizontal_flips = bool(horizontal_flips)
        self.flip_prob = 0.5 if horizontal_flips else 0.0
        self.gram_teacher_no_distortions = bool(gram_teacher_no_distortions)
        self.share_color_jitter = bool(share_color_jitter)

        if isinstance(n_bands, bool) or int(n_bands) != n_bands or n_bands < 1:
            raise ValueError(f"n_bands={n_bands!r} must be a positive integer")
        self.n_bands = int(n_bands)
        self.is_rgb = self.n_bands == 3
        if mean is None and std is None and self.is_rgb:
            mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        if mean is None or std is None:
            raise ValueError(f"mean and std must be given (one value per band) for n_bands={self.n_bands}")
        if len(mean) != self.n_bands or len(std) != self.n_bands:
            raise ValueError(
                f"mean has {len(mean)} values and std {len(std)}, but n_bands={self.n_bands}: one value per band needed"
            )
        if any(float(s) <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        # (x - mean) / std as one pass: x * (1 / std) + (-mean / std)
        self._inv_std_t = 1.0 / self._std_t
        self._shift_t = -self._mean_t / self._std_t

        if rgb_indices is not None:
            rgb_indices = tuple(int(i) for i in rgb_indices)
            if len(rgb_indices) != 3 or len(set(rgb_indices)) != 3:
                raise ValueError(f"rgb_indices={rgb_indices!r} must name three distinct bands (R, G, B)")
            if any(i < 0 or i >= self.n_bands for i in rgb_indices):
                raise ValueError(f"rgb_indices={rgb_indices!r} out of range for n_bands={self.n_bands}")
            if self.is_rgb and rgb_indices != (0, 1, 2):
                raise ValueError(
                    "with n_bands=3 the bands are taken as R, G, B in order; rgb_indices must be (0, 1, 2)"
                )
        self.rgb_indices = rgb_indices
        weights = torch.zeros(self.n_bands, dtype=torch.float32)
        if rgb_indices is not None and not self.is_rgb:
            weights[list(rgb_indices)] = torch.tensor(_LUMA)
        else:
            weights[:] = 1.0
        self._gray_weights = weights / weights.sum()

        self.color_jitter_prob = float(color_jitter_prob)
        self.grayscale_prob = float(grayscale_prob)
        self.solarize_prob = float(solarize_prob)
        if len(blur_probs) != 3:
            raise ValueError(f"blur_probs={blur_probs!r} must give (global-1, global-2, local) probabilities")
        self.blur_probs = tuple(float(p) for p in blur_probs)
        self.per_band_jitter = bool(per_band_jitter)
        self.generator = generator
        self.return_params = bool(return_params)
        # Reference ColorJitter strengths.
        self.brightness, self.contrast, self.saturation, self.hue = 0.4, 0.4, 0.2, 0.1

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global={self.global_crops_size}x2 scale={self.global_crops_scale}, "
            f"local={self.local_crops_size}x{self.local_crops_number} scale={self.local_crops_scale}, "
            f"gram={self.gram_teacher_crops_size} no_distortions={self.gram_teacher_no_distortions}, "
            f"n_bands={self.n_bands}, flips={self.horizontal_flips}, share_color_jitter={self.share_color_jitter}, "
            f"blur_probs={self.blur_probs})"
        )

    # ------------------------------------------------------------------------------------------------ input handling

    def _to_tensor(self, image: Any) -> torch.Tensor:
        if isinstance(image, Image.Image):
            if self.n_bands == 3 and image.mode != "RGB":
                image = image.convert("RGB")
            img = F.pil_to_tensor(image)
        elif isinstance(image, np.ndarray):
            if image.dtype == np.uint8:
                # uint8 arrays follow the image convention (H, W[, C]).
                arr = image[:, :, None] if image.ndim == 2 else image
                if arr.ndim != 3:
                    raise ValueError(f"expected an (H, W, C) uint8 array, got shape {image.shape}")
                img = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
            else:
                # float arrays follow the tensor convention (C, H, W).
                img = torch.from_numpy(np.ascontiguousarray(image))
        elif isinstance(image, torch.Tensor):
            img = image.as_subclass(torch.Tensor) if type(image) is not torch.Tensor else image
        else:
            raise TypeError(
                f"unsupported image type {type(image).__name__}; expected a tensor, numpy array or PIL image"
            )

        if img.ndim == 2:
            img = img.unsqueeze(0)
        if img.ndim != 3:
            raise ValueError(f"expected a (C, H, W) image, got shape {tuple(img.shape)}")
        if img.shape[0] != self.n_bands:
            raise ValueError(
                f"image has {img.shape[0]} bands (shape {tuple(img.shape)}) but n_bands={self.n_bands} "
                f"(mean/std have {len(self.mean)} values)"
            )
        if img.dtype == torch.uint8:
            if not self.is_rgb:
                img = img.to(torch.float32).div_(255.0)
        elif img.is_floating_point():
            img = img.to(torch.float32)
            vmax = float(img.amax()) if img.numel() else 0.0
            if not math.isfinite(vmax) or vmax > MAX_PLAUSIBLE_VALUE:
                raise ValueError(
                    f"float image maximum is {vmax:g}: the multi-crop augmentation expects values scaled to [0, 1] "
                    f"by the data source (e.g. reflectance DN/10000); values above {MAX_PLAUSIBLE_VALUE:g} "
                    "look unscaled"
                )
            if self.is_rgb:  # what a uint8 image holds implicitly (module docstring)
                img = img.clamp(0.0, 1.0)
        else:
            raise ValueError(
                f"unsupported dtype {img.dtype}: give uint8 or a float tensor already scaled to [0, 1] "
                "by the data source"
            )
        return img

    # -------------------------------------------------------------------------------------------------- single ops

    def _value_range(self, img: torch.Tensor) -> tuple[float, float | None] | None:
        """The range resampled pixels are clamped to (module docstring): None for uint8 (the dtype clamps), [0, 1]
        for float RGB, [min(0, image minimum), no limit] for multispectral float."""
        if img.dtype == torch.uint8:
            return None
        if self.is_rgb:
            return 0.0, 1.0
        return min(0.0, float(img.amin())) if img.numel() else 0.0, None

    @staticmethod
    def _clamp(img: torch.Tensor, value_range: tuple[float, float | None] | None) -> torch.Tensor:
        return img if value_range is None else img.clamp(*value_range)

    def _geometric(self, img: torch.Tensor, size: int, scale, gen, rec: dict,
                   value_range: tuple[float, float | None] | None = None) -> torch.Tensor:
        top, left, h, w = _rrc_params(img.shape[-2], img.shape[-1], scale, _RATIO, gen)
        out = F.resized_crop(img, top, left, h, w, [size, size], interpolation=_BICUBIC, antialias=True)
        out = self._clamp(out, value_range)
        flip = _coin(self.flip_prob, gen)
        if flip:
            out = F.horizontal_flip(out)
        rec["box"] = (top, left, h, w)
        rec["flip"] = flip
        return out

    def _rgb_jitter(self, img: torch.Tensor, gen) -> torch.Tensor:
        order = torch.randperm(4, generator=gen).tolist()
        b = _uniform(1 - self.brightness, 1 + self.brightness, gen)
        c = _uniform(1 - self.contrast, 1 + self.contrast, gen)
        s = _uniform(1 - self.saturation, 1 + self.saturation, gen)
        h = _uniform(-self.hue, self.hue, gen)
        for idx in order:
            if idx == 0:
                img = F.adjust_brightness(img, b)
            elif idx == 1:
                img = F.adjust_contrast(img, c)
            elif idx == 2:
                img = F.adjust_saturation(img, s)
            else:
                img = F.adjust_hue(img, h)
        return img

    def _color(self, img: torch.Tensor, gen, rec: dict) -> torch.Tensor:
        jitter = _coin(self.color_jitter_prob, gen)
        if jitter:
            if self.is_rgb:
                img = self._rgb_jitter(img, gen)
            else:
                img = _ms_brightness_contrast(img, self.brightness, self.contrast, self.per_band_jitter, gen)
        gray = _coin(self.grayscale_prob, gen)
        if gray:
            if self.is_rgb:
                img = F.rgb_to_grayscale(img, num_output_channels=3).contiguous()
            else:
                img = _weighted_gray(img, self._gray_weights)
        rec["jitter"] = jitter
        rec["gray"] = gray
        return img

    def _normalize(self, img: torch.Tensor) -> torch.Tensor:
        if img.dtype == torch.uint8:
            img = img.to(torch.float32).div_(255.0)
        # Out of place: ``img`` may alias the caller's input when a crop needs no resampling.
        return torch.addcmul(self._shift_t.to(img.device), img, self._inv_std_t.to(img.device))

    def _distort(self, img: torch.Tensor, which: str, gen, rec: dict) -> torch.Tensor:
        """Colour (unless shared), blur, solarize (global-2 only) and normalise one crop."""
        if not self.share_color_jitter:
            img = self._color(img, gen, rec)
        p_blur = {"global1": self.blur_probs[0], "global2": self.blur_probs[1], "local": self.blur_probs[2]}[which]
        sigma = None
        if _coin(p_blur, gen):
            sigma = _uniform(_BLUR_SIGMA[0], _BLUR_SIGMA[1], gen)
            img = _gaussian_blur(img, sigma)
        rec["blur_sigma"] = sigma
        solarize = False
        if which == "global2" and _coin(self.solarize_prob, gen):
            solarize = True
            # 128 on uint8 and 0.5 on [0, 1] floats select the same pixels (>= 128/255 > 0.5 > 127/255).
            img = F.solarize(img, 128 if img.dtype == torch.uint8 else 0.5)
        rec["solarize"] = solarize
        return self._normalize(img)

    # ------------------------------------------------------------------------------------------------------- call

    def __call__(self, image: Any, generator: torch.Generator | None = None) -> dict[str, Any]:
        gen = generator if generator is not None else self.generator
        img = self._to_tensor(image)
        params: dict[str, Any] = {"global": [], "local": [], "shared": {}}

        if self.share_color_jitter:
            img = self._color(img, gen, params["shared"])
        value_range = self._value_range(img)

        gs, gram = self.global_crops_size, self.gram_teacher_crops_size
        max_size = max(gs, gram or 0)
        global_crops, gram_crops = [], []
        for which in ("global1", "global2"):
            rec: dict[str, Any] = {}
            base = self._geometric(img, max_size, self.global_crops_scale, gen, rec, value_range)
            if gram is None:
                global_crops.append(self._distort(base, which, gen, rec))
            elif self.gram_teacher_no_distortions:
                global_crops.append(self._distort(self._clamp(_resize(base, gs), value_range), which, gen, rec))
                gram_crops.append(self._normalize(self._clamp(_resize(base, gram), value_range)))
            else:
                distorted = self._distort(base, which, gen, rec)
                global_crops.append(_resize(distorted, gs))
                gram_crops.append(_resize(distorted, gram))
            params["global"].append(rec)

        local_crops = []
        for _ in range(self.local_crops_number):
            rec = {}
            base = self._geometric(img, self.local_crops_size, self.local_crops_scale, gen, rec, value_range)
            local_crops.append(self._distort(base, "local", gen, rec))
            params["local"].append(rec)

        out: dict[str, Any] = {
            "global_crops": global_crops,
            # The reference also emits the teacher's view of the global crops: the same tensors.
            "global_crops_teacher": global_crops,
            "local_crops": local_crops,
            "offsets": (),
        }
        if gram is not None:
            out["gram_teacher_crops"] = gram_crops
        if self.return_params:
            out["params"] = params
        return out
