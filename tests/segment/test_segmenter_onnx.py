"""`geodino export part=segmenter format=onnx` (issue #15): the open-vocabulary segmenter's image side runs in
onnxruntime with the features the segmenter uses (<= 1e-4), and the class embeddings and logit scale in its
metadata reproduce the segmenter's per-patch class logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import geodino
from geodino import cli

ort = pytest.importorskip("onnxruntime", reason="onnxruntime runs the exported graph")
onnx = pytest.importorskip("onnx", reason="torch.onnx.export needs onnx")


def test_the_segmenter_image_side_exports_to_onnx_with_its_class_logits(micro4, tmp_path):
    out = tmp_path / "seg.onnx"
    prompts = ["water", "forest", "road"]
    assert cli.main(["export", f"checkpoint={micro4}", "part=segmenter", "format=onnx", f"out={out}",
                     f"prompts=[{','.join(prompts)}]"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    text = torch.tensor(json.loads(meta["class_embeddings"]))
    scale = json.loads(meta["logit_scale"])
    assert json.loads(meta["classes"]) == prompts and json.loads(meta["dynamic_size"]) is True
    seg = geodino.OpenVocabSegmenter.from_checkpoint(micro4)
    assert torch.allclose(text, seg.text_embeddings(prompts), atol=1e-6)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x01 = torch.rand(4, 48, 64)
    image, patches = session.run(None, {"pixel_values": seg.contract.normalize(x01)[None].numpy()})
    assert patches.shape == (1, 3 * 4, text.shape[1])
    with torch.no_grad():
        _, want_patches, _ = seg.model.encode_image_with_patch_tokens(seg.contract.normalize(x01)[None])
        want_image = seg.model.encode_image(seg.contract.normalize(x01)[None], normalize=True)
        logits = seg.patch_similarity(x01, None, text)  # the segmenter's own path, upsampled to the image
    assert np.abs(patches - F.normalize(want_patches, dim=-1).numpy()).max() <= 1e-4
    assert np.abs(image - want_image.numpy()).max() <= 1e-4
    ours = (scale * torch.from_numpy(patches[0]) @ text.t()).t().reshape(3, 3, 4)
    up = F.interpolate(ours[None], size=(48, 64), mode="bilinear", align_corners=False)[0]
    assert (up - logits).abs().max().item() <= 1e-3
    assert cli.main(["export", f"checkpoint={micro4}", "part=segmenter", "format=hf", f"out={tmp_path / 'x'}"]) == 2
