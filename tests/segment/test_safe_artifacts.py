"""Safe artifacts (issue #15): a dino.txt (text / open-vocabulary segmenter) model exports to safetensors with its
contract, config, tokenizer settings and data scaling; the file loads back without unpickling (torch.load is never
called) and gives the same embeddings and segmentation logits; a text run directory stays loadable as before."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import geodino
from geodino import cli
from geodino.checkpoint import TRAIN_FORMAT, Checkpoint, save_atomic
from geodino.models import load_backbone
from geodino.testing import cli_error_lines
from geodino.text.io import load_dinotxt


@pytest.fixture
def no_torch_load(monkeypatch):
    """Any torch.load (the unpickler) while this is active fails the test."""
    def refuse(*a, **k):
        raise AssertionError("torch.load called: the safetensors artifact must load without unpickling")
    return lambda: monkeypatch.setattr(torch, "load", refuse)


def test_a_text_model_exports_to_safetensors_and_loads_back_identically(micro4, tmp_path, no_torch_load):
    out = tmp_path / "text.safetensors"
    assert cli.main(["export", f"checkpoint={micro4}", "part=text", "format=safetensors", f"out={out}"]) == 0
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["format"] == "geodino-dinotxt-model"
    assert json.loads(meta["geodino_contract"])["bands"] == ["R", "G", "B", "NIR"]
    info = json.loads(meta["geodino_checkpoint"])
    assert info["dinotxt"]["config"]["embed_dim"] == 32 and info["dinotxt"]["tokenizer"]["context_length"] == 77
    assert info["dinotxt"]["random_backbone"] is False and info["kind"] == "geodino-dinotxt"
    want_model, want_meta = load_dinotxt(micro4)
    assert sorted(keys) == sorted(f"model.{k}" for k in want_model.state_dict())
    prompts = ["water", "forest"]
    seg_want = geodino.OpenVocabSegmenter.from_checkpoint(micro4)
    x01 = torch.rand(4, 32, 48)
    logits_want = seg_want.patch_similarity(x01, None, seg_want.text_embeddings(prompts))
    tokens = want_model.tokenize(["a photo of water"])
    image = seg_want.contract.normalize(x01)[None]
    with torch.no_grad():
        text_want, image_want = want_model.encode_text(tokens), want_model.encode_image(image)

    no_torch_load()
    model, meta2 = load_dinotxt(out)
    for k, v in want_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert meta2["contract"].to_dict() == want_meta["contract"].to_dict() and meta2["data"] == want_meta["data"]
    assert meta2["config"] == want_meta["config"] and meta2["tokenizer"] == want_meta["tokenizer"]
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), text_want)
        assert torch.equal(model.encode_image(image), image_want)
    seg = geodino.OpenVocabSegmenter.from_checkpoint(out)
    assert torch.equal(seg.patch_similarity(x01, None, seg.text_embeddings(prompts)), logits_want)
    # its frozen backbone is a backbone too
    bb = load_backbone(out)
    assert torch.equal(bb.forward_features(image)["x_norm_clstoken"],
                       want_model.visual_model.backbone.forward_features(image)["x_norm_clstoken"])


def test_a_text_run_exports_beside_itself_and_stays_loadable(micro4, tmp_path, capsys):
    raw = torch.load(micro4, weights_only=True)
    raw.update(format=TRAIN_FORMAT, step=3, optimizer={}, rng={}, data_position=0, nan_streak=0, stage="text")
    raw["dinotxt"]["random_backbone"] = True
    run = tmp_path / "run"
    save_atomic(raw, run / "checkpoints" / "step_00000003.pt")
    model_run, meta_run = load_dinotxt(run)  # the run directory, as before
    assert meta_run["step"] == 3 and meta_run["random_backbone"] is True
    assert cli.main(["export", f"checkpoint={run}", "part=segmenter", "format=safetensors"]) == 0
    out = run / "text_model.safetensors"
    ckpt = Checkpoint.open(out)
    assert ckpt.is_dinotxt and ckpt.step == 3 and "optimizer" not in ckpt.raw
    model, meta = load_dinotxt(out)
    assert meta["random_backbone"] is True and meta["step"] == 3
    for k, v in model_run.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    capsys.readouterr()
    assert cli.main(["export", f"checkpoint={run}", "part=text", "format=safetensors"]) == 2  # exists
    assert cli_error_lines(capsys.readouterr().err)[0].endswith("exists; overwrite=true replaces it")
    assert cli.main(["export", f"checkpoint={run}", "part=text", "format=onnx"]) == 2
    assert "part=text exports the dino.txt model as format=safetensors" in capsys.readouterr().err
