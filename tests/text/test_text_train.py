"""`geodino train stage=text`: caption files, image–caption data (photos and GeoTIFFs of any band count),
the dino.txt meta-architecture on geodino's trainer, checkpoints, exact resume, and the "Done when" check:
a short CPU alignment run makes open-vocabulary segmentation beat chance clearly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from geodino import cli
from geodino.errors import DataError
from geodino.train import loop


@pytest.fixture(scope="module")
def chips(tmp_path_factory):
    from fakes.synthetic import caption_chips

    return caption_chips(tmp_path_factory.mktemp("chips"), n=24, size=32, seed=1)


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # `threads=1` below (tiny models on a shared CPU) must not leak into other tests


TINY = ["threads=1", "train.batch_size=4", "stage.crops.size=32", "progress=false", "stage.text.width=32", "stage.text.layers=1",
        "stage.text.heads=2", "stage.embed_dim=64", "stage.vision_head_blocks=1", "stage.optim.warmup_iterations=1"]


def _cfg(run_dir, caption_file, *extra):
    return cli.compose("train", ["stage=text", "data=captions", f"caption_file={caption_file}", f"run_dir={run_dir}",
                                 *TINY, *extra])


def _rows(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


# -- caption files ------------------------------------------------------------------------------------------------
def test_caption_file_formats(tmp_path):
    from geodino.text.data import read_caption_file

    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.tif").write_bytes(b"")
    (tmp_path / "h.csv").write_text("image,text\na.jpg,a river\nsub/b.tif,\"fields, and a road\"\n")
    (tmp_path / "n.csv").write_text("a.jpg,a river\nsub/b.tif,fields, and a road\n")
    (tmp_path / "p.jsonl").write_text('{"path": "a.jpg", "caption": "a river"}\n\n'
                                      '{"image": "sub/b.tif", "captions": ["fields", "a road"]}\n')
    for name in ("h.csv", "n.csv", "p.jsonl"):
        pairs = read_caption_file(tmp_path / name)
        assert [p.path.name for p in pairs] == ["a.jpg", "b.tif"]
        assert pairs[0].captions == ["a river"]
    assert read_caption_file(tmp_path / "n.csv")[1].captions == ["fields, and a road"]
    assert read_caption_file(tmp_path / "p.jsonl")[1].captions == ["fields", "a road"]

    (tmp_path / "missing.csv").write_text("path,caption\nnope.png,x\n")
    with pytest.raises(DataError, match="do not exist.*nope.png"):
        read_caption_file(tmp_path / "missing.csv")
    (tmp_path / "empty_cap.jsonl").write_text('{"path": "a.jpg", "caption": "  "}\n')
    with pytest.raises(DataError, match="empty_cap.jsonl:1: empty caption"):
        read_caption_file(tmp_path / "empty_cap.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"path": "a.jpg", "label": "x"}\n')
    with pytest.raises(DataError, match="no caption column"):
        read_caption_file(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="use .csv, .tsv or .jsonl"):
        (tmp_path / "x.xml").write_text("<a/>")
        read_caption_file(tmp_path / "x.xml")


def test_caption_source_reads_any_band_count_and_photos(tmp_path):
    from PIL import Image

    from fakes.synthetic import write_geotiff
    from geodino.text.data import CaptionAugment, CaptionSource, read_caption_file

    rng = np.random.default_rng(0)
    arr = rng.integers(1, 10000, (5, 40, 48)).astype(np.uint16)
    arr[:, :3, :3] = 0  # nodata corner
    write_geotiff(tmp_path / "s.tif", arr, bands=["B02", "B03", "B04", "B08", "B11"], nodata=0)
    (tmp_path / "c.csv").write_text("path,caption\ns.tif,a field\n")
    src = CaptionSource(read_caption_file(tmp_path / "c.csv"))
    assert src.band_names == ["B02", "B03", "B04", "B08", "B11"]
    x = src[0]["image"]
    assert x.shape == (5, 40, 48) and torch.isnan(x[:, :3, :3]).all()
    torch.testing.assert_close(x[:, 10, 10], torch.from_numpy(arr[:, 10, 10] / 10000.0).float())
    sub = CaptionSource(read_caption_file(tmp_path / "c.csv"), bands=["B08", "B04"])
    torch.testing.assert_close(sub[0]["image"][:, 10, 10], torch.from_numpy(arr[[3, 2], 10, 10] / 10000.0).float())
    aug = CaptionAugment(32, [0.1] * 5, [0.2] * 5)
    out = aug(src[0], generator=torch.Generator().manual_seed(0))
    assert out["image"].shape == (5, 32, 32) and torch.isfinite(out["image"]).all() and out["caption"] == "a field"

    Image.fromarray(rng.integers(0, 255, (30, 40, 3)).astype(np.uint8)).save(tmp_path / "p.png")
    (tmp_path / "mixed.csv").write_text("path,caption\np.png,a photo\ns.tif,a field\n")
    mixed = CaptionSource(read_caption_file(tmp_path / "mixed.csv"))
    assert mixed.band_names == ["R", "G", "B"] and mixed[0]["image"].shape == (3, 30, 40)
    # the GeoTIFF is mapped onto the photo's R, G, B by band name: B04, B03, B02
    torch.testing.assert_close(mixed[1]["image"][:, 10, 10], torch.from_numpy(arr[[2, 1, 0], 10, 10] / 10000.0).float())
    write_geotiff(tmp_path / "swir.tif", arr[3:], bands=["B08", "B11"], nodata=0)
    (tmp_path / "swir.csv").write_text("path,caption\np.png,a photo\nswir.tif,a field\n")
    with pytest.raises(DataError, match=r"swir.tif \(B08, B11\) has 2 bands; this model takes 3 \(R, G, B\)"):
        CaptionSource(read_caption_file(tmp_path / "swir.csv"))[1]


# -- model pieces ---------------------------------------------------------------------------------------------------
def test_loss_matches_spec_formula_and_groups():
    from geodino.text.dinotxt import contrastive_loss
    from geodino.text.stage import text_param_groups
    from geodino.models import build_backbone
    from geodino.text.dinotxt import DinoTxt, DinoTxtConfig

    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    scale = torch.tensor([math.log(1 / 0.07)]).exp()
    s = scale * img @ txt.t()
    expected = (-(2 * s.diag() - s.logsumexp(1) - s.logsumexp(0)) / 2).mean()
    torch.testing.assert_close(contrastive_loss(img, txt, scale), expected)

    m = DinoTxt(build_backbone("geodino_vit_tiny", in_chans=4), DinoTxtConfig(embed_dim=64, head_blocks=1,
                                                                                text_width=32, text_layers=1, text_heads=2))
    assert m.logit_scale.item() == pytest.approx(2.659260036932778)
    groups = text_param_groups({**m.trainable_modules(), "logit_scale": torch.nn.Module()})
    by = {n: g["wd_mult"] for g in groups for n in g["names"]}
    assert by["text.transformer.resblocks.0.ln_1.weight"] == 0.0 and by["text.ln_final.weight"] == 0.0
    assert by["vision_head.blocks.0.norm1.weight"] == 0.0 and by["vision_head.blocks.0.ls1.gamma"] == 0.0
    assert by["text.positional_embedding"] == 1.0 and by["vision_head.blocks.0.attn.qkv.weight"] == 1.0
    assert by["text.transformer.resblocks.0.attn.out_proj.bias"] == 0.0
    assert "text.transformer.resblocks.0.attn.in_proj_bias" not in by  # frozen at zero
    assert not any(n.startswith("backbone") for n in by)
    with torch.no_grad():
        m.logit_scale.fill_(9.0)
    m.clamp_logit_scale()
    assert m.logit_scale.item() == pytest.approx(math.log(100))


# -- the stage end to end -------------------------------------------------------------------------------------------
def test_stage_text_trains_checkpoints_and_resumes_exactly(tmp_path, chips, monkeypatch):
    from geodino.text.io import load_dinotxt
    from geodino.train.run import run_train

    common = ["train.iterations=4", "train.checkpoint_every=2", "train.keep_last=5"]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    run_train(_cfg(full_dir, chips, *common))

    real_fit = loop.Trainer.fit

    def killed_fit(self, on_step=None):
        def kill(step, row):
            if step == 2:
                raise KeyboardInterrupt
        return real_fit(self, on_step=kill)

    monkeypatch.setattr(loop.Trainer, "fit", killed_fit)
    with pytest.raises(KeyboardInterrupt):
        run_train(_cfg(resumed_dir, chips, *common))
    monkeypatch.setattr(loop.Trainer, "fit", real_fit)
    run_train(_cfg(resumed_dir, chips, *common))
    full, resumed = _rows(full_dir), _rows(resumed_dir)
    assert sorted(resumed) == [0, 1, 2, 3]
    for step in range(4):
        for key in ("loss", "log_scale", "acc_i2t"):
            assert resumed[step][key] == full[step][key], (step, key)
    assert all(math.isfinite(r["loss"]) for r in full.values())

    ckpt = torch.load(full_dir / "checkpoints" / "step_00000004.pt", weights_only=False)
    assert ckpt["stage"] == "text" and ckpt["kind"] == "geodino-dinotxt"
    assert ckpt["contract"]["bands"] == ["R", "G", "B", "NIR"] and ckpt["contract"]["in_chans"] == 4
    tok = ckpt["dinotxt"]["tokenizer"]
    assert tok["context_length"] == 77 and tok["vocab_file"] == "bpe_simple_vocab_16e6.txt.gz" and tok["vocab_sha256"]
    assert ckpt["dinotxt"]["config"]["text_width"] == 32 and ckpt["dinotxt"]["config"]["embed_dim"] == 64
    b = torch.load(resumed_dir / "checkpoints" / "step_00000004.pt", weights_only=False)["models"]["meta_arch"]
    for k, v in ckpt["models"]["meta_arch"].items():
        assert torch.equal(v, b[k]), k

    # the frozen backbone did not move; the head and the text tower did
    first = torch.load(full_dir / "checkpoints" / "step_00000002.pt", weights_only=False)["models"]["meta_arch"]
    last = ckpt["models"]["meta_arch"]
    assert all(torch.equal(first[k], last[k]) for k in last if k.startswith("model.visual_model.backbone."))
    assert not torch.equal(first["model.text_model.token_embedding.weight"], last["model.text_model.token_embedding.weight"])
    assert not torch.equal(first["model.visual_model.head.blocks.0.attn.qkv.weight"],
                           last["model.visual_model.head.blocks.0.attn.qkv.weight"])

    model, meta = load_dinotxt(full_dir)
    assert meta["contract"].bands == ["R", "G", "B", "NIR"] and meta["step"] == 4
    assert meta["random_backbone"] is True  # model= without init= / model.weights: recorded for the segmenter
    with torch.no_grad():
        t = model.encode_text(model.tokenize(["water"]), normalize=True)
    assert t.shape == (1, 64) and torch.isfinite(t).all()


def test_stage_text_errors_are_one_line(tmp_path, chips, capsys):
    rc = cli.main(["train", "stage=text", f"run_dir={tmp_path / 'r'}", "progress=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "data=captions caption_file=" in err and len(err.strip().splitlines()) == 1
    rc = cli.main(["train", "stage=text", "data=captions", f"caption_file={tmp_path / 'none.csv'}",
                   f"run_dir={tmp_path / 'r2'}", "progress=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "none.csv does not exist" in err
    rc = cli.main(["train", "stage=text", "data=captions", f"caption_file={chips}", f"run_dir={tmp_path / 'r3'}",
                   "progress=false", "init=dinov3_vitl16_sat493m", "model.weights=/nope.pth"])
    err = capsys.readouterr().err
    assert rc == 2 and "/nope.pth does not exist" in err


def test_init_from_a_geodino_backbone_keeps_its_contract(tmp_path, chips):
    """init=<exported geodino backbone>: the frozen backbone's normalisation governs the caption images."""
    from geodino.models import build_backbone, export_backbone
    from geodino.text.io import load_dinotxt
    from geodino.train.run import run_train

    bb = build_backbone("geodino_vit_tiny", in_chans=4)
    bb.geodino_contract = bb.geodino_contract.with_data(bands=["R", "G", "B", "NIR"], mean=[0.3] * 4, std=[0.25] * 4)
    path = export_backbone(bb, tmp_path / "bb.safetensors", fmt="safetensors")
    run_train(_cfg(tmp_path / "run", chips, f"init={path}", "train.iterations=1", "train.checkpoint_every=1"))
    model, meta = load_dinotxt(tmp_path / "run")
    assert meta["contract"].mean == [0.3] * 4 and meta["data"]["mean"] == [0.3] * 4
    assert meta["random_backbone"] is False
    for k, v in bb.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k


# -- Done when ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_short_alignment_run_segments_textures_well_above_chance(tmp_path):
    """Texture scenes with known truth; captions name what is in each chip; a frozen random `geodino_vit_tiny`,
    ~2 min on 2 CPU cores. Chance mIoU for 4 balanced classes labelled at random is 1/7 = 0.143."""
    from geodino.segment.open_vocab import OpenVocabSegmenter
    from fakes.synthetic import CLASSES, caption_chips, texture_scene
    from geodino.train.run import run_train

    captions = caption_chips(tmp_path / "chips", n=320, size=64, seed=0)
    cfg = cli.compose("train", ["stage=text", "data=captions", f"caption_file={captions}", f"run_dir={tmp_path / 'run'}",
                                "train.iterations=120", "train.batch_size=32", "stage.crops.size=64",
                                "train.checkpoint_every=120", "progress=false", "threads=1"])
    run_train(cfg)
    seg = OpenVocabSegmenter.from_checkpoint(tmp_path / "run")
    assert torch.get_num_threads() == 1
    rng = np.random.default_rng(123)
    inter, union = np.zeros(4), np.zeros(4)
    for _ in range(4):
        img, truth = texture_scene(256, 256, rng)
        pred = seg.segment(img, list(CLASSES), tile=256).labels
        for c in range(4):
            inter[c] += ((pred == c) & (truth == c)).sum()
            union[c] += ((pred == c) | (truth == c)).sum()
    miou = float((inter / union).mean())
    chance = 1 / 7
    print(f"mIoU {miou:.3f} (per class {np.round(inter / union, 3).tolist()}), chance {chance:.3f}")
    assert miou > 3 * chance, miou


# -- honest metrics -------------------------------------------------------------------------------------------------
def test_retrieval_accuracy_counts_identical_captions_as_one_class():
    from geodino.text.dinotxt import get_tokenizer
    from geodino.text.stage import retrieval_accuracy

    tokens = get_tokenizer(77)(["water", "water", "forest", "fields"])
    # image 1 retrieves caption 0 ("water" too): right; image 3 retrieves caption 2 ("forest"): wrong
    sim = torch.tensor([[9.0, 1, 0, 0], [8, 2, 0, 0], [0, 0, 9, 5], [0, 0, 9, 1]])
    i2t, t2i = retrieval_accuracy(sim, tokens)
    assert i2t == 0.75
    # captions 0 and 1 both retrieve image 0 (a "water" image): right; caption 3 retrieves image 2: wrong
    assert t2i == 0.75


def test_text_run_metrics_reach_full_retrieval_on_memorised_distinct_captions(tmp_path):
    """Four chips of distinct colour with distinct captions, one batch of all four every step: the logged retrieval
    accuracy reaches 1.0, the logged log_scale is the learned parameter (ln of the multiplier), and no teacher
    settings are logged."""
    from fakes.synthetic import write_geotiff
    from geodino.train.run import run_train

    colours = [(0.8, 0.1, 0.1, 0.2), (0.1, 0.8, 0.1, 0.6), (0.1, 0.1, 0.8, 0.1), (0.7, 0.7, 0.7, 0.9)]
    rows = ["path,caption"]
    for i, (c, name) in enumerate(zip(colours, ["red roofs", "green fields", "blue lake", "white snow"])):
        img = (np.array(c)[:, None, None] * np.ones((4, 32, 32)) * 10000).astype(np.uint16)
        write_geotiff(tmp_path / f"c{i}.tif", img, nodata=None)
        rows.append(f"c{i}.tif,{name}")
    (tmp_path / "caps.csv").write_text("\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    run_train(_cfg(run_dir, tmp_path / "caps.csv", "train.iterations=40", "train.checkpoint_every=40",
                   "stage.optim.lr=3e-3", "stage.crops.scale=[1.0,1.0]"))
    rows = _rows(run_dir)
    last = rows[39]
    assert last["acc_i2t"] == 1.0 and last["acc_t2i"] == 1.0, last
    assert "momentum" not in last and "teacher_temp" not in last and "logit_scale" not in last
    first = rows[0]
    assert 0.0 <= last["log_scale"] <= math.log(100)
    assert first["log_scale"] == pytest.approx(math.log(1 / 0.07), abs=0.05)  # the initial parameter, not exp() of it


def test_freeze_token_embedding_keeps_the_word_table_and_trains_the_rest(tmp_path, chips):
    from geodino.train.run import run_train

    run_train(_cfg(tmp_path / "run", chips, "train.iterations=2", "train.checkpoint_every=1",
                   "stage.text.freeze_token_embedding=true"))
    first = torch.load(tmp_path / "run" / "checkpoints" / "step_00000001.pt", weights_only=False)
    last = torch.load(tmp_path / "run" / "checkpoints" / "step_00000002.pt", weights_only=False)
    a, b = first["models"]["meta_arch"], last["models"]["meta_arch"]
    assert torch.equal(a["model.text_model.token_embedding.weight"], b["model.text_model.token_embedding.weight"])
    assert not torch.equal(a["model.text_model.positional_embedding"], b["model.text_model.positional_embedding"])
    assert last["dinotxt"]["config"]["freeze_token_embedding"] is True

    from geodino.text.stage import TextStage
    from geodino.train.distributed import DistInfo

    dist = DistInfo(0, 1, 0, torch.device("cpu"), True)
    frozen = TextStage(_cfg(tmp_path / "p", chips, "stage.text.freeze_token_embedding=true"), dist).build()
    names = [n for g in frozen.meta_arch.param_groups() for n in g["names"]]
    assert "text.positional_embedding" in names and not any("token_embedding" in n for n in names)
    assert "trainable=0.13M" in frozen.describe  # of 1.71M with the 49408 x 32 table (test_stage_text... log)
