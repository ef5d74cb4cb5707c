"""One input contract from captions to segments (issue 19): the text stage reads caption images in the frozen
backbone's band order, scale and normalisation, mapping every file by band name with the segmenter's function
(geodino.data.geotiff.pick_bands); a file it cannot map is refused naming the file and the bands."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geodino import cli
from geodino.errors import DataError
from geodino.train.distributed import DistInfo

TINY = ["threads=1", "train.batch_size=4", "stage.crops.size=32", "progress=false", "stage.text.width=32",
        "stage.text.layers=1", "stage.text.heads=2", "stage.embed_dim=64", "stage.vision_head_blocks=1",
        "stage.crops.scale=[1.0,1.0]", "stage.crops.horizontal_flips=false"]
RGB = np.array([2, 1, 0])  # rows of B02, B03, B04 that hold R, G, B


def _scenes(n=4, size=32, seed=0):
    """n (B02, B03, B04) uint16 scenes with distinct band values."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(100, 4000, (3, size, size)) + np.array([0, 3000, 6000])[:, None, None]).astype(np.uint16)
            for _ in range(n)]


def _captions(folder, scenes, order):
    """GeoTIFF chips storing `order` (band names) and a caption file; returns the caption file."""
    from fakes.synthetic import write_geotiff

    stored = {"B02": 0, "B03": 1, "B04": 2, "R": 2, "G": 1, "B": 0}
    rows = ["path,caption"]
    for i, s in enumerate(scenes):
        write_geotiff(folder / f"c{i}.tif", s[[stored[b] for b in order]], bands=list(order), nodata=None)
        rows.append(f"c{i}.tif,scene {i}")
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    return folder / "captions.csv"


def _parts(run_dir, caption_file, *extra):
    from geodino.text.stage import TextStage

    cfg = cli.compose("train", ["stage=text", "data=captions", f"caption_file={caption_file}", f"run_dir={run_dir}",
                                *TINY, *extra])
    return TextStage(cfg, DistInfo(0, 1, 0, torch.device("cpu"), True)).build()


@pytest.fixture(scope="module")
def rgb_backbone(tmp_path_factory):
    """An exported 3-band backbone whose contract is R, G, B with distinct per-band statistics and scale 10000."""
    from geodino.models import build_backbone, export_backbone

    bb = build_backbone("geodino_vit_tiny", in_chans=3, embed_dim=32, num_heads=1, depth=1)
    bb.geodino_contract = bb.geodino_contract.with_data(bands=["R", "G", "B"], mean=[0.6, 0.4, 0.1],
                                                        std=[0.2, 0.1, 0.05], scale=10000.0)
    return export_backbone(bb, tmp_path_factory.mktemp("bb") / "rgb.safetensors", fmt="safetensors")


def test_bgr_stored_captions_give_the_same_model_inputs(tmp_path, rgb_backbone):
    scenes = _scenes()
    orders = {"rgb": ("B04", "B03", "B02"), "bgr": ("B02", "B03", "B04"), "names": ("R", "G", "B")}
    inputs = {}
    for key, order in orders.items():
        (tmp_path / key).mkdir()
        parts = _parts(tmp_path / f"run_{key}", _captions(tmp_path / key, scenes, order), f"init={rgb_backbone}")
        assert parts.contract.bands == ["R", "G", "B"] and parts.contract.mean == [0.6, 0.4, 0.1]
        inputs[key] = torch.stack([parts.dataset[i]["image"] for i in range(len(scenes))])
    torch.testing.assert_close(inputs["bgr"], inputs["rgb"], rtol=0, atol=0)
    torch.testing.assert_close(inputs["names"], inputs["rgb"], rtol=0, atol=0)
    # the values are the contract's: R = B04 / 10000, normalised with R's mean / std
    expected = (torch.from_numpy(scenes[0][RGB].astype(np.float32)) / 10000.0 - torch.tensor([0.6, 0.4, 0.1])[:, None, None]) \
        / torch.tensor([0.2, 0.1, 0.05])[:, None, None]
    torch.testing.assert_close(inputs["bgr"][0], expected)


def test_mixed_band_orders_in_one_caption_file_read_alike(tmp_path):
    from geodino.text.data import CaptionSource, check_caption_bands, read_caption_file

    scenes = _scenes(2)
    _captions(tmp_path / "a", scenes[:1], ("B02", "B03", "B04"))
    _captions(tmp_path / "b", scenes[1:], ("B04", "B03", "B02"))
    (tmp_path / "both.csv").write_text("path,caption\na/c0.tif,x\nb/c0.tif,y\n")
    src = CaptionSource(read_caption_file(tmp_path / "both.csv"))  # no backbone contract: the first file's bands
    assert src.band_names == ["B02", "B03", "B04"]
    for i in range(2):
        torch.testing.assert_close(src[i]["image"], torch.from_numpy(scenes[i] / 10000.0).float())
    assert check_caption_bands(src) == {("B02", "B03", "B04"): [0, 1, 2], ("B04", "B03", "B02"): [2, 1, 0]}
    assert src.read(src.pairs[0].path) is src.read(src.pairs[0].path)  # cached after the first read


def test_unmappable_caption_file_is_refused_naming_file_and_bands(tmp_path, rgb_backbone):
    from fakes.synthetic import write_geotiff

    scenes = _scenes(2)
    cap = _captions(tmp_path, scenes, ("B04", "B03", "B02"))
    write_geotiff(tmp_path / "c1.tif", scenes[1], bands=["B08", "B11", "B12"], nodata=None)
    with pytest.raises(DataError, match=r"c1.tif \(B08, B11, B12\) has 3 bands; this model takes 3 \(R, G, B\)"):
        _parts(tmp_path / "run", cap, f"init={rgb_backbone}")


def test_random_backbone_normalises_alike_under_both_spellings(tmp_path):
    """init=geodino_vit_tiny (no weights) and model=vit_tiny are the same random backbone: both use the images'
    statistics (not ImageNet's) and record the images' bands."""
    cap = _captions(tmp_path, _scenes(), ("B02", "B03", "B04"))
    a = _parts(tmp_path / "a", cap, "init=geodino_vit_tiny")
    b = _parts(tmp_path / "b", cap, "model=vit_tiny")
    assert a.contract.mean == b.contract.mean and a.contract.std == b.contract.std
    assert a.contract.bands == b.contract.bands == ["B02", "B03", "B04"]
    assert a.contract.mean[0] == pytest.approx(float(np.mean([s[0] for s in _scenes()])) / 10000.0, rel=1e-4)
    assert a.checkpoint_extra["dinotxt"]["random_backbone"] and b.checkpoint_extra["dinotxt"]["random_backbone"]


def test_pick_bands_matches_spellings_and_refuses_what_it_cannot_map():
    from geodino.data.geotiff import pick_bands

    assert pick_bands(["B02", "B03", "B04"], ["R", "G", "B"], 3, "f.tif") == [2, 1, 0]
    assert pick_bands(["B02", "B03", "B04", "B08"], ["R", "G", "B", "NIR"], 4, "f.tif") == [2, 1, 0, 3]
    assert pick_bands(["04 - Red", "03 - Green", "02 - Blue"], ["B04", "B03", "B02"], 3, "f.tif") == [0, 1, 2]
    assert pick_bands(["band_1", "band_2", "band_3"], ["R", "G", "B"], 3, "f.tif") == [0, 1, 2]  # undescribed
    assert pick_bands(["B08", "B04", "B03"], ["band_1", "band_2", "band_3"], 3, "f.tif") == [0, 1, 2]  # unnamed model
    with pytest.raises(DataError, match="raster f.tif \\(B08, B04, B03\\) has 3 bands; this model takes 3 \\(R, G, B\\)"):
        pick_bands(["B08", "B04", "B03"], ["R", "G", "B"], 3, "f.tif")


def test_registry_name_with_weights_keeps_rgb_band_names(tmp_path):
    """init=<registry name> model.weights=<file>: the released R, G, B contract is kept (not relabelled with the
    caption files' band order), so BGR-stored captions are reordered by name."""
    from geodino.models import build_backbone

    weights = tmp_path / "w.pth"
    torch.save(build_backbone("geodino_vit_tiny").state_dict(), weights)
    scenes = _scenes(2)
    inputs = {}
    for key, order in {"bgr": ("B02", "B03", "B04"), "rgb": ("B04", "B03", "B02")}.items():
        (tmp_path / key).mkdir()
        parts = _parts(tmp_path / f"run_{key}", _captions(tmp_path / key, scenes, order), "init=geodino_vit_tiny",
                       f"model.weights={weights}")
        assert parts.contract.bands == ["R", "G", "B"] and not parts.checkpoint_extra["dinotxt"]["random_backbone"]
        inputs[key] = torch.stack([parts.dataset[i]["image"] for i in range(2)])
    torch.testing.assert_close(inputs["bgr"], inputs["rgb"], rtol=0, atol=0)
