"""A restricted unpickler for GEO-Bench v1 metadata (``task_specs.pkl`` and the HDF5 ``pickle`` attribute).

GEO-Bench stores its metadata as pickles of its own classes (``geobench.dataset.Sentinel2``,
``geobench.label.Classification``, ``geobench.task.TaskSpecifications``; old files say ``ccb.io.*``),
of ``affine.Affine`` (pickled by affine 2.x, which affine 3.x cannot rebuild) and of rasterio CRSs.
geodino does not depend on ``geobench`` and never calls ``pickle.load`` on these files. Instead
`RestrictedUnpickler.find_class` resolves a short allow-list:

* any ``geobench.*`` / ``ccb.*`` class -> an inert `GeobenchRecord` subclass that only stores the
  pickled attributes (no code of the original class runs);
* ``affine.Affine`` -> `AffineStub` (a plain tuple of the coefficients);
* ``rasterio.crs.CRS`` -> `CRSStub` (keeps the pickled WKT/state, imports nothing);
* ``datetime`` value types, ``collections.OrderedDict``, pure ``pathlib`` paths, a few harmless
  builtins, ``copyreg._reconstructor`` and numpy's array/scalar reconstructors.

Anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) raises `UnsafePickleError`
naming the file and the refused class.
"""

from __future__ import annotations

import ast
import builtins
import collections
import copyreg
import datetime
import importlib
import io
import pathlib
import pickle
from pathlib import Path
from types import MappingProxyType
from typing import Any

from geodino.errors import DataError


class UnsafePickleError(DataError):
    """A pickle asked for a class outside the allow-list."""


class GeobenchRecord:
    """Inert stand-in for a pickled geobench class: keeps the attributes, runs no foreign code."""

    _pickled_class = "geobench.?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args, **kwargs):  # REDUCE-style construction: keep the arguments
        self.__dict__["_args"] = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            for part in state:
                if isinstance(part, dict):
                    self.__dict__.update(part)
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    @property
    def class_name(self) -> str:
        return self._pickled_class.rsplit(".", 1)[-1]

    def get(self, name: str, default: Any = None) -> Any:
        return self.__dict__.get(name, default)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if not k.startswith("_"))
        return f"<{self._pickled_class} {fields}>"


class AffineStub(tuple):
    """affine.Affine as pickled by affine 2.x: a tuple of its coefficients (a, b, c, d, e, f[, g, h, i])."""

    def __new__(cls, *args):
        return tuple.__new__(cls, args)

    def __setstate__(self, state):  # affine 2.x also pickles a dict of the same coefficients
        pass


class CRSStub:
    """rasterio.crs.CRS: keeps the pickled state (a WKT string for rasterio >= 1.0)."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.state = args[0] if args else None
        return obj

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        s = str(self.state)
        return f"CRSStub({s[:40]}{'...' if len(s) > 40 else ''})"


def _crs_from(*args, **kwargs) -> CRSStub:  # CRS.from_wkt / from_epsg / from_dict, if a pickle names them
    return CRSStub(*args)


_SAFE_BUILTINS = frozenset({"set", "frozenset", "complex", "slice", "range", "bytearray", "object", "tuple", "list", "dict",
                  "bytes", "str", "int", "float", "bool"})
_ALLOWED: MappingProxyType[tuple[str, str], Any] = MappingProxyType({
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "date"): datetime.date,
    ("datetime", "time"): datetime.time,
    ("datetime", "timedelta"): datetime.timedelta,
    ("datetime", "timezone"): datetime.timezone,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "PosixPath"): pathlib.PurePosixPath,
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
    ("affine", "Affine"): AffineStub,
    ("rasterio.crs", "CRS"): CRSStub,
    ("rasterio.crs", "CRS.from_wkt"): _crs_from,
    ("rasterio.crs", "CRS.from_epsg"): _crs_from,
    ("rasterio.crs", "CRS.from_dict"): _crs_from,
    ("rasterio._crs", "_CRS"): CRSStub,
})
_NUMPY = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
})
_RECORD_PREFIXES = ("geobench", "ccb")


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` only resolves the allow-list above."""

    def __init__(self, file, source: str = "<bytes>"):
        super().__init__(file)
        self.source = source
        self.record_types: dict[str, type] = {}

    def record_type(self, module: str, name: str) -> type:
        """One `GeobenchRecord` subclass per pickled class name (so `type(x).__name__` keeps the name)."""
        qual = f"{module}.{name}"
        if qual not in self.record_types:
            self.record_types[qual] = type(name.replace(".", "_"), (GeobenchRecord,), {"_pickled_class": qual})
        return self.record_types[qual]

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if module == "builtins" and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if key in _NUMPY:
            obj = importlib.import_module(module)
            for part in name.split("."):
                obj = getattr(obj, part)
            return obj
        root = module.split(".", 1)[0]
        if root in _RECORD_PREFIXES:
            return self.record_type(module, name)
        raise UnsafePickleError(
            f"{self.source}: refusing to unpickle '{module}.{name}' — not in geodino's allow-list for GEO-Bench "
            f"metadata (geobench/ccb classes, affine.Affine, rasterio CRS, datetime, OrderedDict, numpy arrays)"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: refusing a pickle with persistent ids ({pid!r})")


def safe_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle `data` with the allow-list; every failure is a `DataError` naming `source`."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except UnsafePickleError:
        raise
    except Exception as e:
        raise DataError(f"{source}: cannot unpickle GEO-Bench metadata ({type(e).__name__}: {e})") from None


def safe_load_file(path: str | Path) -> Any:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    return safe_loads(data, source=str(path))


def decode_attr_pickle(value: Any, source: str) -> Any:
    """The HDF5 ``pickle`` attribute: ``str(pickle.dumps(d))`` — a bytes literal — decoded without eval."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return safe_loads(value, source)
    if not isinstance(value, str):
        raise DataError(f"{source}: the 'pickle' attribute is a {type(value).__name__}, expected a bytes literal string")
    try:
        raw = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise DataError(f"{source}: the 'pickle' attribute is not a Python bytes literal ({type(e).__name__})") from None
    if not isinstance(raw, bytes):
        raise DataError(f"{source}: the 'pickle' attribute decodes to a {type(raw).__name__}, expected bytes")
    return safe_loads(raw, source)
