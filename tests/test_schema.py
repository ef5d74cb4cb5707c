"""The config schema (geodino.schema): every bad value is one `error:` line naming the key, exit status 2, found
before the verb runs (no data read, no band statistics, no model, no run directory); every shipped config passes;
every key of every shipped config has a table line; the names the schema lists match their owners' lists."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest

from geodino import cli, schema
from geodino.errors import ConfigError
from geodino.testing import cli_error_lines

DISTILL = ["stage=distill", "teacher=run/"]
TEXT = ["stage=text", "data=captions"]

# (verb, overrides, the key the error line starts with)
BAD = [
    ("train", ["train.iterations=abc"], "train.iterations"),
    ("train", ["train.iterations=0"], "train.iterations"),
    ("train", ["train.batch_size=0"], "train.batch_size"),
    ("train", ["train.batch_size=-1"], "train.batch_size"),
    ("train", ["train.batch_size=1"], "train.batch_size"),
    ("train", ["train.batch_size=2.5"], "train.batch_size"),
    ("train", [*DISTILL, "train.batch_size=1"], "train.batch_size"),
    ("train", [*TEXT, "train.batch_size=1"], "train.batch_size"),
    ("train", ["train.log_every=0"], "train.log_every"),
    ("train", ["train.grad_accum=0"], "train.grad_accum"),
    ("train", ["train.checkpoint_every=-1"], "train.checkpoint_every"),
    ("train", ["train.precision=fp16"], "train.precision"),
    ("train", ["train.parallel=horovod"], "train.parallel"),
    ("train", ["train.drop_path_rate=1.0"], "train.drop_path_rate"),
    ("train", ["stage.dino.head_n_prototypes=0"], "stage.dino.head_n_prototypes"),
    ("train", ["stage.ibot.head_n_prototypes=0"], "stage.ibot.head_n_prototypes"),
    ("train", ["stage.crops.local_crops_size=96"], "stage.crops.local_crops_size"),
    ("train", ["stage.crops.global_crops_size=72"], "stage.crops.global_crops_size"),
    ("train", ["stage.crops.local_crops_size=24"], "stage.crops.local_crops_size"),
    ("train", ["+model.kwargs.patch_size=8", "stage.crops.global_crops_size=60"], "stage.crops.global_crops_size"),
    ("train", ["model=convnext_tiny", "stage.crops.local_crops_size=16"], "stage.crops.local_crops_size"),
    ("train", [*DISTILL, "students=[vit_tiny,convnext_tiny]", "stage.crops.local_crops_size=16"],
     "stage.crops.local_crops_size"),
    ("train", ["stage.crops.global_crops_scale=[0.5,0.2]"], "stage.crops.global_crops_scale"),
    ("train", ["stage.crops.local_crops_number=-1"], "stage.crops.local_crops_number"),
    ("train", ["stage.ibot.mask_ratio_min_max=[0.5,0.1]"], "stage.ibot.mask_ratio_min_max"),
    ("train", ["stage.ibot.mask_ratio_min_max=[0.1,1.5]"], "stage.ibot.mask_ratio_min_max"),
    ("train", ["stage.ibot.mask_sample_probability=2"], "stage.ibot.mask_sample_probability"),
    ("train", ["stage.centering=kmeans"], "stage.centering"),
    ("train", ["stage=highres", "stage.highres.probabilities=[0.5,0.5]"], "stage.highres.probabilities"),
    ("train", ["stage=highres", "stage.highres.probabilities=[0,0,0,0,0]"], "stage.highres.probabilities"),
    ("train", ["stage=highres", "stage.highres.probabilities=[-1,1,1,1,1]"], "stage.highres.probabilities"),
    ("train", ["stage=highres", "stage.highres.local_crops_sizes=[16,16,32,32,112]"], "stage.highres.local_crops_sizes"),
    ("train", ["stage=highres", "stage.highres.global_crops_sizes=[64,96,96,96,100]"], "stage.highres.global_crops_sizes"),
    ("train", ["stage=gram", "stage.crops.gram_teacher_crops_size=null"], "stage.crops.gram_teacher_crops_size"),
    ("train", ["stage=gram", "stage.gram.tokens_used=masked"], "stage.gram.tokens_used"),
    ("train", ["stage=gram", "stage.gram.update_frequency=0"], "stage.gram.update_frequency"),
    ("train", ["stage=gram", "stage.gram.remove_neg=true", "+stage.gram.remove_only_teacher_neg=true"],
     "stage.gram.remove_only_teacher_neg"),
    ("train", [*DISTILL, "stage.centering=softmax"], "stage.centering"),
    ("train", [*DISTILL, "stage.export=last"], "stage.export"),
    ("train", [*DISTILL, "stage.teacher_temp=0"], "stage.teacher_temp"),
    ("train", [*TEXT, "stage.text.heads=3"], "stage.text.width"),
    ("train", [*TEXT, "stage.crops.size=40"], "stage.crops.size"),
    ("train", [*TEXT, "stage.embed_dim=255"], "stage.embed_dim"),
    ("train", [*TEXT, "stage.vision.use_class_token=false", "stage.vision.use_patch_tokens=false"],
     "stage.vision.use_patch_tokens"),
    ("train", [*TEXT, "stage.vision.patch_tokens_pooler=sum"], "stage.vision.patch_tokens_pooler"),
    ("train", [*TEXT, "stage.optim.lr=-1"], "stage.optim.lr"),
    ("train", ["device=foo"], "device"),
    ("train", ["device=cuda:x"], "device"),
    ("train", ["threads=-1"], "threads"),
    ("train", ["seed=-1"], "seed"),
    ("train", ["data.bands=[]"], "data.bands"),
    ("train", ["data.scale=0"], "data.scale"),
    ("train", ["data.scale=-1"], "data.scale"),
    ("train", ["data.offset=abc"], "data.offset"),
    ("train", ["data.nodata_max_fraction=1.5"], "data.nodata_max_fraction"),
    ("train", ["data.nodata_max_fraction=-0.1"], "data.nodata_max_fraction"),
    ("train", ["data.chip_size=0"], "data.chip_size"),
    ("train", ["data.sensor=sentinel3"], "data.sensor"),
    ("train", ["data.std=[0.1,0]"], "data.std"),
    ("train", ["data.bands=[B04,B03,B02]", "data.mean=[0.1]", "data.std=[0.1]"], "data.mean"),
    ("train", ["data=sample_nat", "data.mean=[0.5]"], "data.mean"),
    ("train", ["data=mix", "data.homogeneous_source=nope"], "data.homogeneous_source"),
    ("train", ["data=mix", "data.homogeneous_fraction=2"], "data.homogeneous_fraction"),
    ("train", ["data=mix", "+data.weights.far=1"], "data.weights"),
    ("train", ["data=mix", "data.sources.wide.chip_size=0"], "data.sources.wide.chip_size"),
    ("train", ["data=mix", "+data.sources.wide.bands=[B04]", "+data.sources.wide.mean=[0.1,0.2]"],
     "data.sources.wide.mean"),
    ("train", ["data.bands=[B04,B03]", "model.in_chans=3"], "model.in_chans"),
    ("train", ["model.drop_path_rate=1.5"], "model.drop_path_rate"),
    ("train", ["optim.lr=inf"], "optim.lr"),
    ("train", ["optim.lr=nan"], "optim.lr"),
    ("train", ["optim.lr=-0.1"], "optim.lr"),
    ("train", ["optim.betas=[0.9]"], "optim.betas"),
    ("train", ["optim.scaling_rule=linear"], "optim.scaling_rule"),
    ("train", ["ema.momentum=1.5"], "ema.momentum"),
    ("train", ["ema.final_momentum=-0.1"], "ema.final_momentum"),
    ("train", ["ema.teacher_temp=0"], "ema.teacher_temp"),
    ("train", ["ema.warmup_teacher_temp=-0.04"], "ema.warmup_teacher_temp"),
    ("eval", ["num_workers=-1"], "num_workers"),
    ("eval", ["device=gpu"], "device"),
    ("eval", ["n_figures=-1"], "n_figures"),
    ("eval", ["task.stride=1024"], "task.stride"),
    ("eval", ["task.head=mlp"], "task.head"),
    ("eval", ["task.head=[linear,mlp]"], "task.head"),
    ("eval", ["task.epochs=0"], "task.epochs"),
    ("eval", ["task=geobench", "task.probes=[svm]"], "task.probes"),
    ("eval", ["task=geobench", "task.scaling=zscore"], "task.scaling"),
    ("eval", ["task=geobench", "task.features=patch"], "task.features"),
    ("eval", ["task=canopy", "task.stride=512"], "task.stride"),
    ("eval", ["task=canopy", "task.min_block_valid=2"], "task.min_block_valid"),
    ("segment", ["tile=64", "overlap=64"], "overlap"),
    ("segment", ["tile=32"], "overlap"),
    ("segment", ["overlap=-1"], "overlap"),
    ("segment", ["tile=0"], "tile"),
    ("segment", ["templates=nope"], "templates"),
    ("segment", ["templates=[a photo of]"], "templates"),
    ("segment", ["background=1.5"], "background"),
    ("segment", ["blend=gaussian"], "blend"),
    ("segment", ["patch_features=cls"], "patch_features"),
    ("curate", ["n_samples=0"], "n_samples"),
    ("curate", ["levels=[]"], "levels"),
    ("curate", ["levels=[0]"], "levels"),
    ("curate", ["levels=[10,100]"], "levels"),
    ("curate", ["k=0"], "k"),
    ("curate", ["action=sample"], "action"),
    ("curate", ["device=foo"], "device"),
    ("curate", ["seed=-3"], "seed"),
    ("curate", ["resampling_steps=[1,2,3]"], "resampling_steps"),
    ("curate", ["kmeans_init=kmeans--"], "kmeans_init"),
    ("curate", ["index=hnsw"], "index"),
    ("curate", ["data.bands=[]"], "data.bands"),
    ("export", ["checkpoint=run/", "format=zip"], "format"),
    ("export", ["checkpoint=run/", "which=ema"], "which"),
]


@pytest.fixture
def no_verb(monkeypatch):
    """The verbs must never run: validation fails first. Band statistics would fail the test as well."""

    def ran(cfg):
        raise AssertionError("the verb ran: validation must fail before it")

    monkeypatch.setattr(cli, "_handlers", lambda: dict.fromkeys(("train", "eval", "segment", "curate", "export"), ran))


@pytest.mark.parametrize("verb,overrides,key", BAD, ids=[" ".join([v, *o]) for v, o, _ in BAD])
def test_bad_value_is_one_line_naming_the_key(verb, overrides, key, no_verb, capsys):
    assert cli.main([verb, *overrides]) == 2
    err = capsys.readouterr().err
    lines = cli_error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: geodino {verb}: {key}="), lines[0]
    assert "; allowed: " in lines[0]


def test_the_cli_fails_fast_without_a_traceback(tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "geodino.cli", "train", "train.batch_size=1", f"run_dir={run_dir}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert cli_error_lines(r.stderr) == [r.stderr.strip()]
    assert r.stderr.startswith("error: geodino train: train.batch_size=1: out of range; allowed: an integer >= 2")
    assert not run_dir.exists()


def test_run_train_validates_before_any_work(tmp_path, monkeypatch):
    import geodino.data.sources as sources
    from geodino.train.run import run_train

    def no_stats(*a, **k):
        raise AssertionError("band statistics were computed")

    monkeypatch.setattr(sources, "band_statistics", no_stats)
    cfg = cli.compose("train", ["optim.lr=inf", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^optim\.lr=inf: not finite; allowed: a number >= 0$"):
        run_train(cfg)
    assert not (tmp_path / "run").exists()


def test_every_problem_is_named_on_the_one_line():
    cfg = cli.compose("train", ["train.batch_size=0", "optim.lr=inf", "device=foo"])
    with pytest.raises(ConfigError) as e:
        schema.validate("train", cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("device=foo: not a device name")
    assert msg.endswith("(also wrong: train.batch_size, optim.lr)")


def test_allowed_edge_values():
    # warm-up longer than the run; sensor names in any case (the raster reader lower-cases them); 0 threads
    schema.validate("train", cli.compose("train", ["train.iterations=5", "optim.warmup_iterations=10",
                                                   "ema.warmup_teacher_temp_iterations=50", "data.sensor=Sentinel2",
                                                   "threads=0", "train.batch_size=2"]))


def test_plain_dicts_and_missing_values():
    schema.validate("export", {"checkpoint": "???", "format": "official", "which": "student"})
    assert schema.problems("export", {"format": "zip"})[0][0] == "format"
    assert schema.problems("info", {"anything": 1}) == []


def _configs():
    """Every shipped config: each verb's default, and every option of each of its groups."""
    out = [(verb, []) for verb in schema.VERBS]
    for verb in schema.VERBS:
        for group, options in cli.config_groups(verb).items():
            out += [(verb, [f"{group}={o}"]) for o in options]
    out += [("train", ["stage=text", "data=captions"]), ("train", ["stage=distill", "students=[vit_tiny,convnext_tiny]"])]
    return out


CONFIGS = _configs()


@functools.cache
def _composed(verb: str, overrides: tuple[str, ...]):
    return cli.compose(verb, list(overrides))


@pytest.mark.parametrize("verb,overrides", CONFIGS, ids=[" ".join([v, *o]) for v, o in CONFIGS])
def test_every_shipped_config_passes(verb, overrides):
    assert schema.problems(verb, _composed(verb, tuple(overrides))) == []


def _matches(pattern: str, key: str) -> bool:
    """`pattern` (``*``: any name) names `key` or one of its parents (a mapping's entries are its value)."""
    p, k = pattern.split("."), key.split(".")
    return len(p) <= len(k) and all(a in ("*", b) for a, b in zip(p, k))


def test_every_shipped_key_has_a_table_line():
    from omegaconf import OmegaConf

    def leaves(node, prefix=""):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                yield from leaves(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            yield prefix

    missing = set()
    for verb, overrides in CONFIGS:
        patterns = list(schema.table(verb))
        tree = OmegaConf.to_container(_composed(verb, tuple(overrides)), resolve=False)
        missing |= {f"{verb}: {key}" for key in leaves(tree) if not any(_matches(p, key) for p in patterns)}
    assert not missing, "config keys without a schema line:\n" + "\n".join(sorted(missing))


def test_the_schema_names_match_their_owners():
    from geodino.data.multicrop import MAX_CROP_SIZE
    from geodino.data.sources.raster import SENSOR_DATASETS
    from geodino.eval.datasets.loveda import SCENES
    from geodino.eval.finetune import AUGMENTATIONS, FINETUNE_MODES
    from geodino.eval.probes import DENSE_HEADS
    from geodino.models.weights import EXPORT_FORMATS
    from geodino.segment.open_vocab import TEMPLATES
    from geodino.train.stage import STAGES

    assert schema.SENSORS == tuple(SENSOR_DATASETS)
    assert schema.TEMPLATE_SETS == tuple(TEMPLATES)
    assert set(DENSE_HEADS) <= set(schema.DENSE_HEADS)
    assert schema.EXPORT_FORMATS == tuple(EXPORT_FORMATS)
    assert schema.LOVEDA_SCENES == tuple(SCENES)
    assert schema.AUGMENTATIONS == AUGMENTATIONS and schema.FINETUNE_MODES == FINETUNE_MODES
    assert set(schema.PAIRWISE_STAGES) == set(STAGES)
    assert schema.MAX_CROP_SIZE == MAX_CROP_SIZE


def test_curate_actions_match_the_verb():
    pytest.importorskip("faiss")
    from geodino.verbs.curate import ACTIONS

    assert schema.CURATE_ACTIONS == tuple(ACTIONS)


def test_the_schema_does_not_import_torch():
    code = "import sys, geodino.schema; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
