"""Feature extraction and the on-disk cache: keys, reuse, atomic entries, normalisation from the contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geodino.eval.dense import DenseSpec, extract_windows
from geodino.eval.features import FeatureCache, backbone_fingerprint
from geodino.models import load_backbone
from geodino.models.extract import Extractor


class _Tiles:
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.items = [{"image": torch.rand(3, 32, 32, generator=g), "target": torch.randint(0, 3, (32, 32), generator=g),
                       "name": str(i), "group": ""} for i in range(2)]
        self.loads = 0

    def __len__(self):
        return len(self.items)

    def size(self, i):
        return (32, 32)

    def load(self, i):
        self.loads += 1
        return self.items[i]


def _spec(model):
    return DenseSpec(kind="seg", window=32, stride=32)


def test_fingerprint_depends_on_weights_not_only_on_the_contract():
    torch.manual_seed(0)
    a = load_backbone("geodino_vit_tiny")
    torch.manual_seed(1)
    b = load_backbone("geodino_vit_tiny")
    assert a.geodino_contract == b.geodino_contract
    assert backbone_fingerprint(a) != backbone_fingerprint(b)
    torch.manual_seed(0)
    assert backbone_fingerprint(load_backbone("geodino_vit_tiny")) == backbone_fingerprint(a)


def test_cache_hit_skips_the_backbone_and_returns_identical_features(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    model = load_backbone("geodino_vit_tiny")
    ex = Extractor(model, torch.device("cpu"))
    key = cache.key(backbone=backbone_fingerprint(ex.backbone), dataset={"name": "fake"}, split="train", transform={"w": 32})
    tiles = _Tiles()
    first = extract_windows(ex, tiles, _spec(model), cache, "fake", key)
    assert not first.hit and tiles.loads == 2
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache" / "fake").iterdir())  # no temp dir left
    again = extract_windows(ex, tiles, _spec(model), cache, "fake", key)
    assert again.hit and tiles.loads == 2
    np.testing.assert_array_equal(np.asarray(first["feats"]), np.asarray(again["feats"]))
    np.testing.assert_array_equal(np.asarray(again["targets"]), np.stack([t["target"].numpy() for t in tiles.items]))
    # another split / transform / backbone gives another key
    assert cache.key(backbone=backbone_fingerprint(ex.backbone), dataset={"name": "fake"}, split="val", transform={"w": 32}) != key
    assert cache.key(backbone="other", dataset={"name": "fake"}, split="train", transform={"w": 32}) != key


def test_a_damaged_cache_entry_is_extracted_again(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    model = load_backbone("geodino_vit_tiny")
    ex = Extractor(model, torch.device("cpu"))
    fs = extract_windows(ex, _Tiles(), _spec(model), cache, "fake", "k1")
    (fs.path / "feats.npy").write_bytes(b"garbage")
    assert cache.get("fake", "k1") is None
    again = extract_windows(ex, _Tiles(), _spec(model), cache, "fake", "k1")
    assert not again.hit and again["feats"].shape == fs["feats"].shape


def test_extractor_features_match_a_manual_forward_with_the_contract_normalisation():
    model = load_backbone("geodino_vit_tiny")
    c = model.geodino_contract
    img = torch.rand(1, 3, 32, 32)
    x = c.normalize(img)
    manual = (img - torch.tensor(c.mean).view(1, 3, 1, 1)) / torch.tensor(c.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, manual)
    cls, grid = Extractor(model, torch.device("cpu"))(x)
    with torch.no_grad():
        out = model.forward_features(manual)
    torch.testing.assert_close(cls, out["x_norm_clstoken"])
    torch.testing.assert_close(grid, out["x_norm_patchtokens"].transpose(1, 2).reshape(1, -1, 2, 2))
    with pytest.raises(ValueError, match=r"takes 3 bands .* got an input of shape \(4, 8, 8\)"):
        c.normalize(torch.rand(4, 8, 8))
