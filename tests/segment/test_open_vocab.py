"""The Python API: `geodino.OpenVocabSegmenter.from_checkpoint(path).segment(image, prompts)` accepts numpy (HWC,
CHW, any integer or float type), PIL, torch tensors and GeoTIFF paths, returns labels and scores at the input
resolution, and rejects bad input with clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import geodino
from geodino.errors import GeodinoError

PROMPTS = ["building", "road", "water", "forest"]


@pytest.fixture(scope="module")
def seg4(micro4):
    return geodino.OpenVocabSegmenter.from_checkpoint(micro4)


@pytest.fixture(scope="module")
def image4():
    from fakes.synthetic import texture_scene

    img, _ = texture_scene(70, 90, np.random.default_rng(0))  # not a multiple of the patch size
    return img  # (4, 70, 90) uint8


def test_lazy_export():
    from geodino.segment.open_vocab import OpenVocabSegmenter

    assert geodino.OpenVocabSegmenter is OpenVocabSegmenter
    with pytest.raises(AttributeError):
        geodino.NoSuchThing


def test_every_input_type_gives_the_same_result(seg4, image4, tmp_path):
    from fakes.synthetic import write_geotiff

    ref = seg4.segment(image4, PROMPTS)
    assert ref.labels.shape == (70, 90) and ref.scores.shape == (70, 90) and ref.class_names == PROMPTS
    assert ref.labels.dtype == np.int16 and set(np.unique(ref.labels)) <= set(range(4))
    assert np.all((ref.scores >= 0.25 - 1e-6) & (ref.scores <= 1))
    x01 = image4.astype(np.float32) / 255
    u16 = (image4.astype(np.int64) * 10000 // 255).astype(np.uint16)
    variants = {
        "numpy HWC": image4.transpose(1, 2, 0).copy(),
        "float CHW in [0, 1]": x01,
        "float HWC": x01.transpose(1, 2, 0),
        "torch CHW": torch.from_numpy(x01),
        "torch 1CHW": torch.from_numpy(x01)[None],
        "torch uint8": torch.from_numpy(image4),
    }
    for name, v in variants.items():
        r = seg4.segment(v, PROMPTS)
        np.testing.assert_array_equal(r.labels, ref.labels, err_msg=name)
        np.testing.assert_allclose(r.scores, ref.scores, atol=1e-5, err_msg=name)
    r = seg4.segment(u16, PROMPTS, scale=10000)  # uint16 digital numbers with their scale
    assert (r.labels == ref.labels).mean() > 0.99
    # GeoTIFF path: bands matched by name (the file stores them in another order), nodata kept as NODATA
    shuffled = image4[[3, 1, 0, 2]].copy()
    shuffled[:, :5, :5] = 0
    path = write_geotiff(tmp_path / "s.tif", shuffled, bands=["NIR", "G", "R", "B"], nodata=0)
    r = seg4.segment(path, PROMPTS)
    assert (r.labels[:5, :5] == -2).all() and not r.valid[:5, :5].any()
    # (global attention: the nodata corner nudges every token, so near-ties may flip)
    assert (r.labels[r.valid] == ref.labels[r.valid]).mean() > 0.99
    assert r.label_names()[0, 0] == "nodata" and r.label_names()[40, 40] in PROMPTS
    probs = seg4.segment(image4, PROMPTS, return_probabilities=True).probabilities
    assert probs.shape == (4, 70, 90)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(0), ref.labels)


def test_photos_and_pil_for_an_rgb_model(micro3, tmp_path):
    from PIL import Image

    seg = geodino.OpenVocabSegmenter.from_checkpoint(micro3)
    arr = np.random.default_rng(0).integers(0, 255, (40, 50, 3)).astype(np.uint8)
    ref = seg.segment(arr, ["a", "b"])
    pil = Image.fromarray(arr)
    np.testing.assert_array_equal(seg.segment(pil, ["a", "b"]).labels, ref.labels)
    pil.save(tmp_path / "p.png")
    np.testing.assert_array_equal(seg.segment(tmp_path / "p.png", ["a", "b"]).labels, ref.labels)
    np.testing.assert_array_equal(seg.segment(str(tmp_path / "p.png"), ["a", "b"]).labels, ref.labels)
    gray = Image.fromarray(arr[..., 0])  # converted to RGB
    assert seg.segment(gray, ["a", "b"]).labels.shape == (40, 50)


def test_background_threshold_templates_and_tiles(seg4, image4):
    r = seg4.segment(image4, PROMPTS, background=0.99)
    assert (r.labels == -1).any()
    r0 = seg4.segment(image4, PROMPTS, background=0.0)
    assert not (r0.labels == -1).any()
    a = seg4.segment(image4, PROMPTS, templates="openai")
    b = seg4.segment(image4, PROMPTS, templates=["a satellite image of {}.", "{} seen from above"])
    c = seg4.segment(image4, PROMPTS, templates="none")
    assert a.labels.shape == b.labels.shape == c.labels.shape == (70, 90)
    from geodino.segment.open_vocab import resolve_templates

    assert len(resolve_templates("openai")) == 80 and "a satellite image of {}." in resolve_templates("rs")
    # tiled (32 px tiles, 16 px overlap) covers every pixel with valid probabilities
    t = seg4.segment(image4, PROMPTS, tile=32, overlap=16, return_probabilities=True)
    assert t.info["tiles"] > 4 and (t.labels >= 0).all()
    np.testing.assert_allclose(t.probabilities.sum(0), 1.0, atol=1e-5)


def test_bad_inputs_are_rejected_clearly(seg4, image4, tmp_path):
    from fakes.synthetic import write_geotiff

    with pytest.raises(GeodinoError, match="at least one class prompt"):
        seg4.segment(image4, [])
    with pytest.raises(GeodinoError, match="non-empty strings"):
        seg4.segment(image4, ["water", ""])
    with pytest.raises(GeodinoError, match="duplicate"):
        seg4.segment(image4, ["water", "water"])
    with pytest.raises(GeodinoError, match=r"has 3 bands; this model takes 4 \(R, G, B, NIR\)"):
        seg4.segment(image4[:3], PROMPTS)
    with pytest.raises(GeodinoError, match="3 bands; this model takes 4"):
        seg4.segment(np.zeros((20, 20, 3), np.uint8), PROMPTS)
    with pytest.raises(GeodinoError, match="3 bands; this model takes 4"):
        seg4.segment(torch.zeros(3, 20, 20), PROMPTS)
    from PIL import Image

    with pytest.raises(GeodinoError, match="PIL image .* this model takes 4"):
        seg4.segment(Image.new("RGB", (20, 20)), PROMPTS)
    path = write_geotiff(tmp_path / "five.tif", np.ones((5, 20, 20), np.uint8), bands=["a", "b", "c", "d", "e"])
    with pytest.raises(GeodinoError, match="five.tif .*5 bands; this model takes 4"):
        seg4.segment(path, PROMPTS)
    with pytest.raises(GeodinoError, match="does not exist"):
        seg4.segment(tmp_path / "missing.tif", PROMPTS)
    with pytest.raises(GeodinoError, match="batch of 2"):
        seg4.segment(torch.zeros(2, 4, 20, 20), PROMPTS)
    with pytest.raises(GeodinoError, match="cannot segment a dict"):
        seg4.segment({"x": 1}, PROMPTS)
    with pytest.raises(GeodinoError, match="exactly one"):
        seg4.segment(image4, PROMPTS, templates=["no placeholder"])
    with pytest.raises(GeodinoError, match="unknown template set"):
        seg4.segment(image4, PROMPTS, templates="nope")
    with pytest.raises(GeodinoError, match="background is a probability"):
        seg4.segment(image4, PROMPTS, background=2.0)
    with pytest.raises(GeodinoError, match="not a dino.txt checkpoint|does not exist"):
        geodino.OpenVocabSegmenter.from_checkpoint(tmp_path / "nothing")


def test_official_layout_model_segments(load_ref):
    """A model converted from the official dino.txt layout plugs into the segmenter (RGB, ImageNet contract)."""
    from geodino.segment.open_vocab import OpenVocabSegmenter
    from geodino.text.dinotxt import DinoTxt

    ref = load_ref("dinotxt_narrow")
    model = DinoTxt.from_official(ref["state_dict"], vit_kwargs=ref["vit_kwargs"], text_kwargs=ref["text_kwargs"],
                                  dinotxt_config=ref["dinotxt_config"])
    seg = OpenVocabSegmenter(model, model.backbone.geodino_contract)
    r = seg.segment(np.random.default_rng(0).random((40, 56, 3), dtype=np.float32), ["river", "farmland"])
    assert r.labels.shape == (40, 56)
    # head patch tokens (default) vs the frozen backbone's tokens through the head projection
    seg_bb = OpenVocabSegmenter(model, model.backbone.geodino_contract, patch_features="backbone")
    assert seg_bb.segment(np.zeros((32, 32, 3), np.float32), ["river", "farmland"]).labels.shape == (32, 32)
