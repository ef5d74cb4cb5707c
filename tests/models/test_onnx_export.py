"""`geodino export format=onnx` (issue #15): the graph runs in onnxruntime with the backbone's features (<= 1e-4),
for batch sizes and image sizes other than the export example's, and carries the contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from geodino import cli
from geodino.checkpoint import backbone_payload, save_atomic
from geodino.models import build_backbone

ort = pytest.importorskip("onnxruntime", reason="onnxruntime runs the exported graph")
onnx = pytest.importorskip("onnx", reason="torch.onnx.export needs onnx")


def test_an_onnx_export_matches_the_backbone_at_other_batch_and_image_sizes(tmp_path, capsys):
    torch.manual_seed(0)
    bb = build_backbone("geodino_vit_tiny", in_chans=4).eval()
    bb.geodino_contract = bb.geodino_contract.with_data(bands=["R", "G", "B", "NIR"], mean=[0.3] * 4, std=[0.2] * 4)
    src = save_atomic(backbone_payload(bb.state_dict(), bb.geodino_contract), tmp_path / "bb.pt")
    out = tmp_path / "bb.onnx"
    assert cli.main(["export", f"checkpoint={src}", "format=onnx", f"out={out}"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["geodino_contract"])["bands"] == ["R", "G", "B", "NIR"]
    assert json.loads(meta["dynamic_size"]) is True
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    for shape in [(1, 4, 64, 64), (3, 4, 32, 96)]:
        x = torch.randn(*shape)
        cls, patches = session.run(None, {"pixel_values": x.numpy()})
        with torch.no_grad():
            want = bb.forward_features(x)
        assert patches.shape == (shape[0], shape[2] // 16 * shape[3] // 16, 96)
        assert np.abs(cls - want["x_norm_clstoken"].numpy()).max() <= 1e-4
        assert np.abs(patches - want["x_norm_patchtokens"].numpy()).max() <= 1e-4
