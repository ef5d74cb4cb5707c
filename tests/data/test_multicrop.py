"""Tests for geodino.data.multicrop.MultiCropAugmentation (tiny sizes: 64/32 px, 3 and 13 bands)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode

from geodino.data import multicrop
from geodino.data.multicrop import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, MultiCropAugmentation

MEAN13 = [0.05 * (i + 1) for i in range(13)]
STD13 = [0.1 + 0.01 * i for i in range(13)]
NO_COLOR = dict(color_jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=0.0)
NO_DISTORTION = dict(NO_COLOR, blur_probs=(0.0, 0.0, 0.0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny images: intra-op threads only add overhead (and oversubscribe a busy 2-core CI box)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rgb_u8(h: int = 80, w: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen(seed))


def smooth(c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency image in [0, 1] (resampling differences stay small)."""
    low = torch.rand(c, 1, 6, 6, generator=gen(seed))
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=True)[:, 0]


def aug13(**kw) -> MultiCropAugmentation:
    base = dict(global_crops_size=64, local_crops_size=32, local_crops_number=4, n_bands=13, mean=MEAN13, std=STD13)
    base.update(kw)
    return MultiCropAugmentation(**base)


def aug3(**kw) -> MultiCropAugmentation:
    base = dict(global_crops_size=64, local_crops_size=32, local_crops_number=4)
    base.update(kw)
    return MultiCropAugmentation(**base)


def denorm(x: torch.Tensor, mean, std) -> torch.Tensor:
    return x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)


# ----------------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("n_bands", [3, 13])
@pytest.mark.parametrize("gram,no_dist", [(None, False), (96, False), (96, True)])
def test_shapes_and_dtypes(n_bands, gram, no_dist):
    make = aug3 if n_bands == 3 else aug13
    aug = make(gram_teacher_crops_size=gram, gram_teacher_no_distortions=no_dist)
    img = rgb_u8() if n_bands == 3 else torch.rand(13, 80, 96, generator=gen())
    out = aug(img, generator=gen(1))
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 4
    for t in out["global_crops"]:
        assert t.shape == (n_bands, 64, 64) and t.dtype == torch.float32
    for t in out["local_crops"]:
        assert t.shape == (n_bands, 32, 32) and t.dtype == torch.float32
    if gram is None:
        assert "gram_teacher_crops" not in out
    else:
        assert len(out["gram_teacher_crops"]) == 2
        for t in out["gram_teacher_crops"]:
            assert t.shape == (n_bands, gram, gram) and t.dtype == torch.float32
    for t in out["global_crops"] + out["local_crops"]:
        assert torch.isfinite(t).all()


def test_input_kinds_rgb_identical():
    """PIL, numpy HWC uint8 and a CHW uint8 tensor go through the same path and give identical crops."""
    t = rgb_u8()
    arr = t.permute(1, 2, 0).numpy().copy()
    pil = Image.fromarray(arr)
    aug = aug3(gram_teacher_crops_size=96)
    outs = [aug(x, generator=gen(7)) for x in (t, arr, pil)]
    for key in ("global_crops", "local_crops", "gram_teacher_crops"):
        for a, b, c in zip(outs[0][key], outs[1][key], outs[2][key]):
            assert torch.equal(a, b) and torch.equal(a, c)


def test_uint8_and_float_rgb_same_semantics():
    """uint8 (rounded after each op, like the reference on PIL) and float input differ only by rounding."""
    t = rgb_u8()
    f = t.float() / 255
    aug = aug3()
    diffs = []
    for seed in range(5):
        a = aug(t, generator=gen(seed))
        b = aug(f, generator=gen(seed))
        for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
            assert x.shape == y.shape
            diffs.append((x - y).abs().mean().item())
    # same random draws, same ops: only rounding differences (solarize may flip a few pixels at the threshold)
    assert np.mean(diffs) < 0.03, np.mean(diffs)


def test_geometry_exact_and_flip():
    """With distortions off, each crop equals a bicubic resized crop of the recorded box (+ flip)."""
    img = torch.rand(13, 70, 90, generator=gen(3)) * 1.5
    aug = aug13(return_params=True, **NO_DISTORTION)
    out = aug(img, generator=gen(11))
    flips = []
    groups = ((out["global_crops"], out["params"]["global"], 64), (out["local_crops"], out["params"]["local"], 32))
    for crops, recs, size in groups:
        for crop, rec in zip(crops, recs):
            top, left, h, w = rec["box"]
            exp = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC)
            exp = exp.clamp_min(0)  # bicubic undershoot is clamped as a uint8 image would be (module docstring)
            if rec["flip"]:
                exp = exp.flip(-1)
            flips.append(rec["flip"])
            torch.testing.assert_close(denorm(crop, MEAN13, STD13), exp, atol=1e-5, rtol=1e-5)
    assert len(flips) == 6


def test_flip_rate_and_disable():
    img = torch.rand(3, 40, 40, generator=gen())
    aug = aug3(global_crops_size=16, local_crops_size=8, return_params=True, **NO_DISTORTION)
    flips = [r["flip"] for s in range(100) for r in aug(img, generator=gen(s))["params"]["local"]]
    assert 0.4 < np.mean(flips) < 0.6
    aug = aug3(global_crops_size=16, local_crops_size=8, horizontal_flips=False, return_params=True)
    out = aug(img, generator=gen(0))
    assert not any(r["flip"] for r in out["params"]["global"] + out["params"]["local"])


# ---------------------------------------------------------------------------------------------------- normalisation


def test_normalisation_rgb_constant():
    img = torch.full((3, 50, 60), 100, dtype=torch.uint8)
    out = aug3(**NO_COLOR)(img, generator=gen())  # blur keeps a constant image constant
    v = 100 / 255
    exp = [(v - m) / s for m, s in zip(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    for crop in out["global_crops"] + out["local_crops"]:
        for c in range(3):
            torch.testing.assert_close(crop[c], torch.full_like(crop[c], exp[c]), atol=1e-5, rtol=0)


def test_normalisation_multispectral_per_band_constant():
    vals = torch.linspace(0.0, 1.3, 13)  # ordered, and some bands above 1
    img = vals.view(13, 1, 1).expand(13, 50, 60).contiguous()
    out = aug13(**NO_COLOR)(img, generator=gen())
    exp = [(v - m) / s for v, m, s in zip(vals.tolist(), MEAN13, STD13)]
    for crop in out["global_crops"] + out["local_crops"]:
        for c in range(13):
            torch.testing.assert_close(crop[c], torch.full_like(crop[c], exp[c]), atol=1e-5, rtol=0)
        # band order kept and values above 1 not clipped
        raw = denorm(crop, MEAN13, STD13).mean(dim=(1, 2))
        assert torch.all(raw[1:] > raw[:-1])
        assert raw.max() > 1.29


def test_multispectral_jitter_never_clips_and_keeps_order():
    """Brightness/contrast with a shared factor: per-band constants keep their ratios; nothing is clipped at 1."""
    vals = torch.linspace(0.1, 3.0, 13)
    img = vals.view(13, 1, 1).expand(13, 40, 40).contiguous()
    aug = aug13(color_jitter_prob=1.0, grayscale_prob=0.0, solarize_prob=0.0, return_params=True)
    seen_above_one = 0
    for seed in range(10):
        out = aug(img, generator=gen(seed))
        for crop in out["global_crops"] + out["local_crops"]:
            raw = denorm(crop, MEAN13, STD13).mean(dim=(1, 2))
            torch.testing.assert_close(raw / raw[-1], vals / vals[-1], atol=1e-4, rtol=1e-4)
            assert torch.all(raw[1:] > raw[:-1])
            seen_above_one += int(raw.max() > 1.5)  # brightness >= 0.6 keeps 3.0 above 1.8
        assert all(r["jitter"] for r in out["params"]["global"] + out["params"]["local"])
    assert seen_above_one == 60


def test_multispectral_jitter_changes_values_and_per_band_option():
    img = smooth(13, 40, 40)
    base = aug13(**NO_DISTORTION)(img, generator=gen(0))["global_crops"][0]
    jit = aug13(color_jitter_prob=1.0, grayscale_prob=0.0, solarize_prob=0.0, blur_probs=(0, 0, 0))
    assert not torch.allclose(jit(img, generator=gen(0))["global_crops"][0], base)
    # per-band factors change the spectral shape of a per-band constant image
    vals = torch.linspace(0.1, 1.0, 13)
    const = vals.view(13, 1, 1).expand(13, 40, 40).contiguous()
    pb = aug13(color_jitter_prob=1.0, grayscale_prob=0.0, solarize_prob=0.0, per_band_jitter=True)
    raw = denorm(pb(const, generator=gen(0))["global_crops"][0], MEAN13, STD13).mean(dim=(1, 2))
    assert not torch.allclose(raw / raw[-1], vals / vals[-1], atol=1e-3)


@pytest.mark.parametrize("rgb_indices", [None, (3, 2, 1)])
def test_multispectral_grayscale_weighted_mean(rgb_indices):
    img = torch.rand(13, 40, 40, generator=gen(5))
    aug = aug13(color_jitter_prob=0.0, grayscale_prob=1.0, solarize_prob=0.0, blur_probs=(0, 0, 0),
                rgb_indices=rgb_indices, return_params=True)
    out = aug(img, generator=gen(2))
    rec = out["params"]["global"][0]
    top, left, h, w = rec["box"]
    crop = TF.resized_crop(img, top, left, h, w, [64, 64], interpolation=InterpolationMode.BICUBIC).clamp_min(0)
    if rec["flip"]:
        crop = crop.flip(-1)
    if rgb_indices is None:
        gray = crop.mean(0)
    else:
        gray = 0.2989 * crop[3] + 0.587 * crop[2] + 0.114 * crop[1]
        gray = gray / (0.2989 + 0.587 + 0.114)
    raw = denorm(out["global_crops"][0], MEAN13, STD13)
    for c in range(13):
        torch.testing.assert_close(raw[c], gray, atol=1e-5, rtol=1e-5)


def test_rgb_grayscale_and_jitter_run():
    aug = aug3(color_jitter_prob=1.0, grayscale_prob=1.0, solarize_prob=0.0, blur_probs=(0, 0, 0))
    out = aug(rgb_u8(), generator=gen())
    raw = denorm(out["global_crops"][0], IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(raw[0], raw[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(raw[1], raw[2], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------- blur and solarize probabilities


def test_effective_blur_probabilities(monkeypatch):
    """global-1 never blurred, global-2 ~0.9, local ~0.5 (dinov3 issue #286 effective values)."""
    calls = []
    real_blur = multicrop.F.gaussian_blur

    def counting_blur(img, kernel_size, sigma=None):
        calls.append((tuple(kernel_size), float(sigma[0])))
        return real_blur(img, kernel_size, sigma)

    monkeypatch.setattr(multicrop.F, "gaussian_blur", counting_blur)
    aug = aug3(global_crops_size=16, local_crops_size=8, local_crops_number=4, return_params=True)
    img = rgb_u8(24, 24)
    g = gen(123)
    blurred = {"global1": [], "global2": [], "local": []}
    recorded = []
    n_images = 200
    for _ in range(n_images):
        out = aug(img, generator=g)
        p = out["params"]
        blurred["global1"].append(p["global"][0]["blur_sigma"] is not None)
        blurred["global2"].append(p["global"][1]["blur_sigma"] is not None)
        blurred["local"] += [r["blur_sigma"] is not None for r in p["local"]]
        recorded += [r["blur_sigma"] for r in p["global"] + p["local"] if r["blur_sigma"] is not None]
    # the record matches what was actually called
    assert len(calls) == len(recorded)
    assert all(k == (9, 9) for k, _ in calls)
    assert [s for _, s in calls] == pytest.approx(recorded)
    assert all(0.1 <= s <= 2.0 for s in recorded)
    assert sum(blurred["global1"]) == 0
    assert abs(np.mean(blurred["global2"]) - 0.9) < 0.07
    assert abs(np.mean(blurred["local"]) - 0.5) < 0.06


def test_solarize_only_on_global2():
    """Output-based: a constant 0.8 image becomes 0.2 only when solarized (colour and blur off otherwise)."""
    img = torch.full((3, 24, 24), 0.8)
    aug = aug3(global_crops_size=16, local_crops_size=8, local_crops_number=4, color_jitter_prob=0.0,
               grayscale_prob=0.0, return_params=True)
    g = gen(5)
    sol = {"global1": [], "global2": [], "local": []}
    for _ in range(200):
        out = aug(img, generator=g)
        for key, crops in (("global1", out["global_crops"][:1]), ("global2", out["global_crops"][1:]),
                           ("local", out["local_crops"])):
            for c in crops:
                v = denorm(c, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD).mean().item()
                assert v == pytest.approx(0.8, abs=1e-4) or v == pytest.approx(0.2, abs=1e-4)
                sol[key].append(v < 0.5)
        assert out["params"]["global"][1]["solarize"] == sol["global2"][-1]
    assert sum(sol["global1"]) == 0 and sum(sol["local"]) == 0
    assert abs(np.mean(sol["global2"]) - 0.2) < 0.09


# ------------------------------------------------------------------------------------------------------ Gram crops


@pytest.mark.parametrize("n_bands", [3, 13])
def test_gram_no_distortions_shares_geometry(n_bands):
    img = smooth(n_bands, 90, 110, seed=4)
    make = aug3 if n_bands == 3 else aug13
    mean = IMAGENET_DEFAULT_MEAN if n_bands == 3 else MEAN13
    std = IMAGENET_DEFAULT_STD if n_bands == 3 else STD13
    # distortions off: the Gram crop downsampled to the global size matches the global crop
    aug = make(gram_teacher_crops_size=128, gram_teacher_no_distortions=True, **NO_DISTORTION)
    out = aug(img, generator=gen(9))
    for glob, gram in zip(out["global_crops"], out["gram_teacher_crops"]):
        down = TF.resize(denorm(gram, mean, std), [64, 64], interpolation=InterpolationMode.BICUBIC)
        assert (down - denorm(glob, mean, std)).abs().max() < 0.02
    # distortions on: the Gram crop stays undistorted (exactly the normalised resized base crop)
    aug = make(gram_teacher_crops_size=128, gram_teacher_no_distortions=True, color_jitter_prob=1.0,
               grayscale_prob=0.0, return_params=True)
    out = aug(img, generator=gen(9))
    for rec, glob, gram in zip(out["params"]["global"], out["global_crops"], out["gram_teacher_crops"]):
        top, left, h, w = rec["box"]
        base = TF.resized_crop(img, top, left, h, w, [128, 128], interpolation=InterpolationMode.BICUBIC)
        if rec["flip"]:
            base = base.flip(-1)
        torch.testing.assert_close(denorm(gram, mean, std), base, atol=1e-5, rtol=1e-5)
        down = TF.resize(base, [64, 64], interpolation=InterpolationMode.BICUBIC)
        assert (down - denorm(glob, mean, std)).abs().max() > 0.01  # the student crop was jittered


@pytest.mark.parametrize("n_bands", [3, 13])
def test_gram_with_distortions_shares_distortions(n_bands):
    """gram_teacher_no_distortions=False: both are resized from the same distorted crop."""
    img = smooth(n_bands, 90, 110, seed=6)
    make = aug3 if n_bands == 3 else aug13
    aug = make(gram_teacher_crops_size=128, gram_teacher_no_distortions=False, color_jitter_prob=1.0,
               blur_probs=(1.0, 1.0, 1.0), solarize_prob=1.0)
    for seed in range(3):
        out = aug(img, generator=gen(seed))
        for glob, gram in zip(out["global_crops"], out["gram_teacher_crops"]):
            down = TF.resize(gram, [64, 64], interpolation=InterpolationMode.BICUBIC)
            assert (down - glob).abs().mean() < 0.02


def test_gram_smaller_than_global():
    aug = aug3(gram_teacher_crops_size=32)
    out = aug(rgb_u8(), generator=gen())
    assert out["global_crops"][0].shape[-1] == 64 and out["gram_teacher_crops"][0].shape[-1] == 32


# ------------------------------------------------------------------------------------- RNG, sharing, errors, aliasing


@pytest.mark.parametrize("n_bands", [3, 13])
def test_reproducible_under_seed(n_bands):
    make = aug3 if n_bands == 3 else aug13
    img = rgb_u8() if n_bands == 3 else torch.rand(13, 80, 96, generator=gen())
    aug = make(gram_teacher_crops_size=96)
    a, b, c = aug(img, generator=gen(42)), aug(img, generator=gen(42)), aug(img, generator=gen(43))
    for key in ("global_crops", "local_crops", "gram_teacher_crops"):
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y)
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])
    # constructor generator and global RNG are reproducible too
    a1 = make(generator=gen(5))(img)["local_crops"][0]
    a2 = make(generator=gen(5))(img)["local_crops"][0]
    assert torch.equal(a1, a2)
    torch.manual_seed(3)
    g1 = make()(img)["global_crops"][1]
    torch.manual_seed(3)
    g2 = make()(img)["global_crops"][1]
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("n_bands", [3, 13])
def test_share_color_jitter(n_bands):
    make = aug3 if n_bands == 3 else aug13
    img = rgb_u8() if n_bands == 3 else torch.rand(13, 80, 96, generator=gen())
    aug = make(share_color_jitter=True, color_jitter_prob=1.0, return_params=True)
    out = aug(img, generator=gen(1))
    assert out["params"]["shared"]["jitter"] is True
    assert all("jitter" not in r for r in out["params"]["global"] + out["params"]["local"])
    assert out["global_crops"][0].shape == (n_bands, 64, 64)


def test_input_not_modified():
    img = torch.rand(13, 64, 64, generator=gen())
    ref = img.clone()
    aug = aug13(global_crops_scale=(1.0, 1.0), local_crops_size=64, local_crops_scale=(1.0, 1.0),
                horizontal_flips=False, **NO_DISTORTION)
    out = aug(img, generator=gen())
    assert torch.equal(img, ref)
    torch.testing.assert_close(denorm(out["global_crops"][0], MEAN13, STD13), img)


def test_errors():
    with pytest.raises(ValueError, match="5000"):
        MultiCropAugmentation(global_crops_size=5000)
    with pytest.raises(ValueError, match="gram_teacher_crops_size=9999"):
        MultiCropAugmentation(gram_teacher_crops_size=9999)
    with pytest.raises(ValueError, match="local_crops_size=300"):
        MultiCropAugmentation(global_crops_size=224, local_crops_size=300)
    with pytest.raises(ValueError, match="n_bands=13"):
        MultiCropAugmentation(n_bands=13)  # no mean/std for 13 bands
    with pytest.raises(ValueError, match="n_bands=13"):
        MultiCropAugmentation(n_bands=13, mean=[0.1] * 12, std=[0.1] * 13)
    with pytest.raises(ValueError, match="rgb_indices"):
        MultiCropAugmentation(n_bands=13, mean=MEAN13, std=STD13, rgb_indices=(1, 2, 20))
    aug = aug13()
    with pytest.raises(ValueError, match="12 bands"):
        aug(torch.rand(12, 40, 40))
    with pytest.raises(ValueError, match="unscaled"):
        aug(torch.rand(13, 40, 40) * 10000)
    with pytest.raises(ValueError, match="dtype"):
        aug(torch.randint(0, 10000, (13, 40, 40), dtype=torch.int16))
    with pytest.raises(ValueError, match="1 bands"):
        aug3()(torch.rand(1, 40, 40))


def test_pil_grayscale_is_converted_to_rgb():
    out = aug3()(Image.new("L", (40, 30), color=128), generator=gen())
    assert out["global_crops"][0].shape == (3, 64, 64)
