"""geodino's GEO-Bench v1 reader: restricted unpickler, band selection, channel-order fixes, clear errors."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from fakes.eval_fakes import S2_BANDS, geobench_stubs, make_geobench_task

from geodino.errors import DataError
from geodino.eval.datasets.geobench import GeobenchTask, find_tasks
from geodino.eval.datasets.safe_pickle import GeobenchRecord, UnsafePickleError, decode_attr_pickle, safe_loads


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_restricted_unpickler_refuses_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"label": 1, "x": _Evil(marker)})
    with pytest.raises(UnsafePickleError, match=r"refusing to unpickle '(posix|os|nt)\.system'") as e:
        safe_loads(payload, source="sample.hdf5")
    assert "sample.hdf5" in str(e.value)
    assert not marker.exists()
    # eval / exec / subprocess are refused as well
    for mod, name in (("builtins", "eval"), ("builtins", "exec"), ("subprocess", "Popen"), ("builtins", "__import__")):
        blob = b"\x80\x04\x8c" + bytes([len(mod)]) + mod.encode() + b"\x8c" + bytes([len(name)]) + name.encode() + b"\x93."
        with pytest.raises(UnsafePickleError, match=f"{mod}.{name}"):
            safe_loads(blob)


def test_malicious_task_specs_and_hdf5_attribute_name_the_file(tmp_path):
    import h5py

    tdir = make_geobench_task(tmp_path / "gb", "m-fake-cls", "cls")
    marker = tmp_path / "pwned"
    (tdir / "task_specs.pkl").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UnsafePickleError, match="task_specs.pkl"):
        GeobenchTask(tdir)
    assert not marker.exists()

    tdir2 = make_geobench_task(tmp_path / "gb2", "m-fake-cls", "cls")
    task = GeobenchTask(tdir2)
    name = task.names("train")[0]
    with h5py.File(task.sample_file(name), "a") as f:
        f.attrs["pickle"] = str(pickle.dumps({"bands_order": [], "label": _Evil(marker)}))
    with pytest.raises(UnsafePickleError, match=f"{name}.hdf5"):
        task.read(name, "rgb", "minmax")
    assert not marker.exists()
    # a non-literal attribute is never eval'd
    with pytest.raises(DataError, match="not a Python bytes literal"):
        decode_attr_pickle("__import__('os').system('true')", "x.hdf5")


def test_geobench_classes_become_inert_records(tmp_path):
    tdir = make_geobench_task(tmp_path / "gb", "m-fake-seg", "seg", n_classes=3, size=16)
    task = GeobenchTask(tdir)
    assert isinstance(task.specs, GeobenchRecord)
    assert task.specs.class_name == "TaskSpecifications"
    assert task.kind == "seg" and task.n_classes == 3
    assert task.class_names == ["class0", "class1", "class2"]
    image, label, names = task.read(task.names("test")[0], "rgb", "minmax")
    assert image.shape == (3, 16, 16) and label.shape == (16, 16)
    assert names == ["04 - Red", "03 - Green", "02 - Blue"]  # RGB order, found through alt names
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_find_tasks_accepts_bench_root_benchmark_dir_and_task_dir(geobench_root):
    assert [p.name for p in find_tasks(geobench_root, "all")] == ["m-fake-cls", "m-fake-multilabel", "m-fake-seg"]
    assert [p.name for p in find_tasks(geobench_root / "classification_v1.0", "all")] == ["m-fake-cls", "m-fake-multilabel"]
    task_dir = geobench_root / "segmentation_v1.0" / "m-fake-seg"
    assert find_tasks(task_dir, "all") == [task_dir]
    with pytest.raises(DataError, match="m-nope.*available: m-fake-cls"):
        find_tasks(geobench_root, "m-nope")


@pytest.mark.parametrize("task_name,rgb_positions", [("m-eurosat", (3, 2, 1)), ("m-brick-kiln", (3, 2, 1))])
def test_channel_order_fix(tmp_path, task_name, rgb_positions):
    # stored names are the standard S2 list; the pixels follow the real (different) order
    values = {j: 100 * (j + 1) for j in range(13)}
    tdir = make_geobench_task(tmp_path, task_name, "cls", n_classes=2, bands=S2_BANDS, n=(2, 1, 1), band_values=values)
    task = GeobenchTask(tdir)
    name = task.names("train")[0]
    _, _, names_all = task.read(name, "all", "none")
    if task_name == "m-eurosat":
        assert names_all[8:] == ["B09", "B10", "B11", "B12", "B8A"]
    else:
        assert names_all[5:10] == ["B07", "B8A", "B08", "B11", "B12"] and names_all[10:] == ["TCI_R", "TCI_G", "TCI_B"]
    img, _, names = task.read(name, "rgb", "none")
    assert names == ["B04", "B03", "B02"]
    got = [round(float(img[c].mean() * 255)) for c in range(3)]
    assert got == [values[p] for p in rgb_positions]
    # the B8A pixels are at stored position 12 (eurosat) / 6 (brick-kiln), not at the stored name's position 8
    full, _, names_all = task.read(name, "all", "none")
    b8a = names_all.index("B8A")
    assert round(float(full[b8a].mean() * 255)) == values[12 if task_name == "m-eurosat" else 6]


def test_hdf5_missing_a_band_names_the_file(tmp_path):
    import h5py

    tdir = make_geobench_task(tmp_path, "m-fake-cls", "cls")
    task = GeobenchTask(tdir)
    name = task.names("valid")[0]
    with h5py.File(task.sample_file(name), "a") as f:
        del f["04 - Red"]
    with pytest.raises(DataError, match=rf"{name}\.hdf5: band '04 - Red' is listed in bands_order but the file has no such dataset"):
        task.read(name, "rgb", "minmax")


def test_mislabelled_samples_name_the_file(tmp_path):
    import h5py

    tdir = make_geobench_task(tmp_path / "a", "m-fake-cls", "cls", n_classes=3)
    task = GeobenchTask(tdir)
    name = task.names("train")[1]
    # rewrite the pickled label with the stub classes registered (as geobench itself would)
    with geobench_stubs(), h5py.File(task.sample_file(name), "a") as f:
        import ast

        attr = pickle.loads(ast.literal_eval(f.attrs["pickle"]))
        attr["label"] = 7
        f.attrs["pickle"] = str(pickle.dumps(attr))
    with pytest.raises(DataError, match=rf"{name}\.hdf5: label 7 outside 0\.\.2"):
        task.read(name, "rgb", "minmax")

    sdir = make_geobench_task(tmp_path / "b", "m-fake-seg", "seg", n_classes=3, size=16)
    seg = GeobenchTask(sdir)
    name = seg.names("test")[0]
    with h5py.File(seg.sample_file(name), "a") as f:
        lab = np.array(f["label"])
        lab[0, 0] = 9
        f["label"][...] = lab
    with pytest.raises(DataError, match=rf"{name}\.hdf5: label value\(s\) 9 outside 0\.\.2"):
        seg.read(name, "rgb", "minmax")


def test_missing_partition_and_stats_are_clear(tmp_path):
    tdir = make_geobench_task(tmp_path, "m-fake-cls", "cls")
    with pytest.raises(DataError, match=r"0\.10x_train_partition\.json not found; partitions here: default"):
        GeobenchTask(tdir, partition="0.10x_train")
    stats = json.loads((tdir / "band_stats.json").read_text())
    del stats["03 - Green"]
    (tdir / "band_stats.json").write_text(json.dumps(stats))
    task = GeobenchTask(tdir)
    with pytest.raises(DataError, match="band_stats.json: no min/max for band '03 - Green'"):
        task.read(task.names("train")[0], "rgb", "minmax")


def test_corrupt_hdf5_and_missing_sample_name_the_file(tmp_path):
    tdir = make_geobench_task(tmp_path, "m-fake-cls", "cls")
    task = GeobenchTask(tdir)
    a, b = task.names("train")[:2]
    task.sample_file(a).write_bytes(b"garbage")
    with pytest.raises(DataError, match=rf"{a}\.hdf5: not a readable HDF5 file"):
        task.read(a, "rgb", "minmax")
    task.sample_file(b).unlink()
    with pytest.raises(DataError, match=rf"{b}\.hdf5: sample '{b}' listed in default_partition.json is missing"):
        task.read(b, "rgb", "minmax")
