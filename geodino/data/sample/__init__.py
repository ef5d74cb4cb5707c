"""Real sample data shipped with geodino (see README.md in this folder).

* :func:`sample_sat_path` -- a 256 x 256 px, 13-band Sentinel-2 L1C GeoTIFF (uint16, 10 m,
  UTM 18N, nodata 0), bands in :data:`SENTINEL2_BANDS` order.
* :func:`sample_nat_dir` / :func:`sample_nat_paths` -- six small RGB JPEG photographs.
* :func:`sample_captions_path` -- ``captions/captions.jsonl``: 50 13-band chips of the Sentinel-2 sample's top half
  with land-cover captions (``data=sample_captions``); :func:`sample_ov_dir` -- ``ov/``: its bottom half with
  per-pixel land-cover labels in the ``geodino eval ov`` layout (rule: :mod:`geodino.data.sample.landcover`).

Rebuild them with ``python scripts/make_sample_data.py`` and ``python scripts/make_sample_captions.py``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "SENTINEL2_BANDS",
    "SENTINEL2_WAVELENGTHS_NM",
    "SENTINEL2_NATIVE_GSD_M",
    "sample_dir",
    "sample_sat_path",
    "sample_nat_dir",
    "sample_nat_paths",
    "sample_files",
    "sample_captions_path",
    "sample_ov_dir",
]

#: Band names in file order (band 1 .. 13 of the GeoTIFF).
SENTINEL2_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
)  # fmt: skip
#: Sentinel-2A centre wavelengths (nm), same order as :data:`SENTINEL2_BANDS`.
SENTINEL2_WAVELENGTHS_NM: tuple[float, ...] = (
    442.7, 492.4, 559.8, 664.6, 704.1, 740.5, 782.8, 832.8, 864.7, 945.1, 1373.5, 1613.7, 2202.4,
)  # fmt: skip
#: Native ground sampling distance (m) of each band before resampling to 10 m.
SENTINEL2_NATIVE_GSD_M: tuple[int, ...] = (60, 10, 10, 10, 20, 20, 20, 10, 20, 60, 60, 20, 20)

_DIR = Path(__file__).resolve().parent
_SAT_NAME = "sentinel2_l1c_sample.tif"
_NAT_SUFFIXES = (".jpg", ".jpeg", ".png")
_HINT = "reinstall geodino or rebuild the sample data with `python scripts/make_sample_data.py`"


def sample_dir() -> Path:
    """The folder holding the sample data."""
    return _DIR


def sample_sat_path() -> Path:
    """Path of the 13-band Sentinel-2 L1C sample GeoTIFF."""
    path = _DIR / _SAT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"Sentinel-2 sample file is missing: {path} ({_HINT})")
    return path


def sample_nat_paths() -> list[Path]:
    """Sorted paths of the sample RGB photographs."""
    nat = _DIR / "nat"
    if not nat.is_dir():
        raise FileNotFoundError(f"sample photo folder is missing: {nat} ({_HINT})")
    paths = sorted(p for p in nat.iterdir() if p.is_file() and p.suffix.lower() in _NAT_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"sample photo folder has no images: {nat} ({_HINT})")
    return paths


def sample_nat_dir() -> Path:
    """Folder of the sample RGB photographs (JPEG, <= 512 px long side)."""
    sample_nat_paths()  # raises if the folder is missing or empty
    return _DIR / "nat"


def sample_files() -> list[Path]:
    """Every sample data file: the Sentinel-2 GeoTIFF first, then the photos (sorted)."""
    return [sample_sat_path(), *sample_nat_paths()]


def sample_captions_path() -> Path:
    """The caption file of the packaged caption sample (``captions/captions.jsonl``, chips beside it)."""
    path = _DIR / "captions" / "captions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"caption sample is missing: {path} (reinstall geodino or rebuild it with "
                                "`python scripts/make_sample_captions.py`)")
    return path


def sample_ov_dir() -> Path:
    """The labelled open-vocabulary folder of the sample (``ov/``: classes.txt, images/, labels/)."""
    path = _DIR / "ov"
    if not (path / "classes.txt").is_file():
        raise FileNotFoundError(f"open-vocabulary sample is missing: {path} (reinstall geodino or rebuild it with "
                                "`python scripts/make_sample_captions.py`)")
    return path
