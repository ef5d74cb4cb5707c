"""Tests for geodino.data.collate.collate_data_and_cast."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from geodino.data.collate import collate_data_and_cast
from geodino.data.masking import MaskingGenerator
from geodino.data.multicrop import MultiCropAugmentation


def fake_sample(b: int, c: int = 3, n_local: int = 3, gram: bool = True) -> dict:
    """Crop j of image b is the constant 100*b + j (globals), 100*b + 10 + j (locals), 100*b + 50 + j (gram)."""
    s = {
        "global_crops": [torch.full((c, 8, 8), 100.0 * b + j) for j in range(2)],
        "local_crops": [torch.full((c, 4, 4), 100.0 * b + 10 + j) for j in range(n_local)],
        "global_crops_teacher": None,
        "offsets": (),
        "params": {"whatever": 1},
    }
    if gram:
        s["gram_teacher_crops"] = [torch.full((c, 16, 16), 100.0 * b + 50 + j) for j in range(2)]
    return s


def ladder(N: int, n_masked: int, lo: float = 0.1, hi: float = 0.5) -> list[int]:
    probs = torch.linspace(lo, hi, n_masked + 1)
    return [int(N * probs[i + 1]) for i in range(n_masked)]


@pytest.mark.parametrize("c", [3, 13])
def test_shapes_dtypes_and_crop_major_order(c):
    B = 4
    out = collate_data_and_cast([fake_sample(b, c) for b in range(B)], n_tokens=16, random_state=0)
    g, l, gr = out["collated_global_crops"], out["collated_local_crops"], out["collated_gram_teacher_crops"]
    assert g.shape == (2 * B, c, 8, 8) and l.shape == (3 * B, c, 4, 4) and gr.shape == (2 * B, c, 16, 16)
    assert g.dtype == l.dtype == gr.dtype == torch.float32
    for j in range(2):
        for b in range(B):
            assert torch.all(g[j * B + b] == 100 * b + j)
            assert torch.all(gr[j * B + b] == 100 * b + 50 + j)
    for j in range(3):
        for b in range(B):
            assert torch.all(l[j * B + b] == 100 * b + 10 + j)
    # unflatten(0, (2, B)) gives [crop, image]
    assert torch.all(g.unflatten(0, (2, B))[1, 3] == 301)
    m = out["collated_masks"]
    assert m.shape == (2 * B, 16) and m.dtype == torch.bool
    assert out["mask_indices_list"].dtype == torch.long
    assert out["masks_weight"].dtype == torch.float32
    assert out["n_masked_patches"].dtype == torch.long and out["n_masked_patches"].shape == (1,)
    assert isinstance(out["upperbound"], int)


@pytest.mark.parametrize("B,N,p", [(4, 16, 0.5), (8, 196, 0.5), (3, 49, 0.4), (16, 196, 0.5), (5, 36, 1.0)])
def test_mask_ladder_counts(B, N, p):
    side = int(np.sqrt(N))
    gen = MaskingGenerator((side, side), rng=random.Random(0))
    out = collate_data_and_cast([fake_sample(b) for b in range(B)], mask_probability=p, mask_generator=gen,
                                random_state=random.Random(1))
    masks = out["collated_masks"]
    n_masked = int(2 * B * p)
    counts = masks.sum(-1).tolist()
    expected = ladder(N, n_masked)
    assert sorted(c for c in counts if c > 0) == sorted(c for c in expected if c > 0)
    assert counts.count(0) == 2 * B - n_masked + expected.count(0)
    assert out["upperbound"] == sum(expected)
    M = int(masks.sum())
    assert out["n_masked_patches"].item() == M
    assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
    assert out["masks_weight"].shape == (M,)
    # masks_weight = 1/(masked count of that crop); it sums to the number of non-empty masks
    row = out["mask_indices_list"] // N
    torch.testing.assert_close(out["masks_weight"], 1.0 / masks.sum(-1)[row].float())
    assert out["masks_weight"].sum().item() == pytest.approx(sum(1 for c in counts if c > 0), rel=1e-5)


def test_ladder_matches_reference_values():
    # 2B = 8, n_masked = 4, probs = linspace(0.1, 0.5, 5) -> 0.2, 0.3, 0.4, 0.5 of N = 196
    assert ladder(196, 4) == [39, 58, 78, 98]
    out = collate_data_and_cast([fake_sample(b) for b in range(4)], n_tokens=196, random_state=3)
    assert sorted(out["collated_masks"].sum(-1).tolist()) == [0, 0, 0, 0, 39, 58, 78, 98]
    assert out["upperbound"] == 39 + 58 + 78 + 98


def test_masks_are_shuffled_over_seeds():
    positions = set()
    for seed in range(10):
        out = collate_data_and_cast([fake_sample(b) for b in range(4)], n_tokens=16, random_state=seed)
        positions.add(tuple(out["collated_masks"].any(-1).tolist()))
    assert len(positions) > 3


def test_reproducible_under_seed():
    samples = [fake_sample(b) for b in range(4)]

    def run(seed):
        gen = MaskingGenerator((7, 7), rng=random.Random(seed))
        return collate_data_and_cast(samples, mask_generator=gen, random_state=random.Random(seed + 100))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a["collated_masks"], b["collated_masks"])
    assert torch.equal(a["masks_weight"], b["masks_weight"])
    assert not torch.equal(a["collated_masks"], c["collated_masks"])
    # int seed (also seeds the default mask generator)
    x = collate_data_and_cast(samples, n_tokens=49, random_state=7)
    y = collate_data_and_cast(samples, n_tokens=49, random_state=7)
    assert torch.equal(x["collated_masks"], y["collated_masks"])
    # module-level random / np.random, as the reference
    outs = []
    for _ in range(2):
        random.seed(4)
        np.random.seed(4)
        outs.append(collate_data_and_cast(samples, n_tokens=49)["collated_masks"])
    assert torch.equal(outs[0], outs[1])


def test_dtype_cast_and_tuple_samples():
    samples = [(fake_sample(b, gram=False), 0) for b in range(2)]  # reference (dict, target) form
    out = collate_data_and_cast(samples, dtype=torch.bfloat16, n_tokens=16, random_state=0)
    assert out["collated_global_crops"].dtype == torch.bfloat16
    assert out["collated_local_crops"].dtype == torch.bfloat16
    assert out["collated_masks"].dtype == torch.bool
    assert "collated_gram_teacher_crops" not in out


def test_no_masked_images():
    out = collate_data_and_cast([fake_sample(0)], mask_probability=0.2, n_tokens=16, random_state=0)
    assert not out["collated_masks"].any()
    assert out["mask_indices_list"].numel() == 0 and out["masks_weight"].numel() == 0
    assert out["n_masked_patches"].item() == 0 and out["upperbound"] == 0


def test_errors():
    samples = [fake_sample(b) for b in range(2)]
    with pytest.raises(ValueError, match="n_tokens"):
        collate_data_and_cast(samples)
    with pytest.raises(ValueError, match="square"):
        collate_data_and_cast(samples, n_tokens=15)
    with pytest.raises(ValueError, match="n_tokens=20"):
        collate_data_and_cast(samples, n_tokens=20, mask_generator=MaskingGenerator((4, 4)))
    with pytest.raises(ValueError):
        collate_data_and_cast([])


@pytest.mark.parametrize("n_bands", [3, 13])
def test_end_to_end_with_multicrop(n_bands):
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kw = {} if n_bands == 3 else dict(mean=[0.2] * 13, std=[0.1] * 13)
        aug = MultiCropAugmentation(32, 16, 2, n_bands=n_bands, gram_teacher_crops_size=48, return_params=True, **kw)
        g = torch.Generator().manual_seed(0)
        imgs = [torch.rand(n_bands, 40, 40, generator=g) for _ in range(3)]
        samples = [aug(img, generator=g) for img in imgs]
        out = collate_data_and_cast(samples, n_tokens=(32 // 8) ** 2, random_state=0)
    finally:
        torch.set_num_threads(torch_threads)
    assert out["collated_global_crops"].shape == (6, n_bands, 32, 32)
    assert out["collated_local_crops"].shape == (6, n_bands, 16, 16)
    assert out["collated_gram_teacher_crops"].shape == (6, n_bands, 48, 48)
    assert torch.equal(out["collated_global_crops"][4], samples[1]["global_crops"][1])
    assert torch.equal(out["collated_local_crops"][5], samples[2]["local_crops"][1])
    assert out["collated_masks"].shape == (6, 16)
