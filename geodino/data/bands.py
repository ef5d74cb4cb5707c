"""The band contract: band names, order, centre wavelengths and ground sample distance per sensor,
and the normalisation statistics geodino ships.

Every checkpoint records the band names (in order) and the normalisation it was trained with, so a
backbone is always fed the bands it expects (see geodino.models.registry).

`match_bands` is the one by-name band mapping (a raster's band descriptions, or a photo's R, G, B, onto a model's
band list): the caption data of ``stage=text``, segmentation and the ``ov`` evaluation all read through it
(geodino.data.geotiff.pick_bands). `band_colour` / `rgb_indices` are the one RGB detector: a band is red, green or blue when its name (in any case) is
a visible band of the sensor table (or one of its aliases, e.g. Sentinel-2 ``B4``), a colour word (``red``), or a
GEO-Bench band descriptor ending in ``- <colour>`` (``04 - Red``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from geodino.errors import DataError


@dataclass(frozen=True)
class Band:
    name: str
    wavelength_nm: float | None  # centre wavelength
    gsd_m: float | None  # native ground sample distance
    rgb: str | None = None  # 'R', 'G' or 'B' for the visible bands used as RGB
    aliases: tuple[str, ...] = ()  # other names of the band that RGB detection accepts


# Sentinel-2 MSI (L1C / L2A), centre wavelengths of S2A.
SENTINEL2 = (
    Band("B01", 442.7, 60), Band("B02", 492.4, 10, "B", ("B2",)), Band("B03", 559.8, 10, "G", ("B3",)),
    Band("B04", 664.6, 10, "R", ("B4",)), Band("B05", 704.1, 20), Band("B06", 740.5, 20),
    Band("B07", 782.8, 20), Band("B08", 832.8, 10), Band("B8A", 864.7, 20),
    Band("B09", 945.1, 60), Band("B10", 1373.5, 60), Band("B11", 1613.7, 20),
    Band("B12", 2202.4, 20),
)
# Landsat 8/9 OLI + TIRS, Collection 2 file band names: Level-2 surface reflectance / temperature (as torchgeo names
# them), then Level-1 (B8 panchromatic at 15 m, B9 cirrus, B10/B11 thermal).
LANDSAT89 = (
    Band("SR_B1", 443, 30), Band("SR_B2", 482, 30, "B"), Band("SR_B3", 562, 30, "G"),
    Band("SR_B4", 655, 30, "R"), Band("SR_B5", 865, 30), Band("SR_B6", 1609, 30),
    Band("SR_B7", 2201, 30), Band("ST_B10", 10895, 100),
    Band("B1", 443, 30), Band("B2", 482, 30, "B"), Band("B3", 562, 30, "G"), Band("B4", 655, 30, "R"),
    Band("B5", 865, 30), Band("B6", 1609, 30), Band("B7", 2201, 30), Band("B8", 590, 15), Band("B9", 1373, 30),
    Band("B10", 10895, 100), Band("B11", 12005, 100),
)
# NAIP 4-band aerial imagery.
NAIP = (Band("R", 635, 0.6, "R"), Band("G", 555, 0.6, "G"), Band("B", 465, 0.6, "B"), Band("NIR", 845, 0.6))
RGB = (Band("R", 640, None, "R"), Band("G", 550, None, "G"), Band("B", 465, None, "B"))

SENSORS: dict[str, tuple[Band, ...]] = {
    "sentinel2": SENTINEL2,
    "landsat8": LANDSAT89,
    "landsat9": LANDSAT89,
    "naip": NAIP,
    "rgb": RGB,
}

def sensor_bands(sensor: str) -> tuple[Band, ...]:
    try:
        return SENSORS[sensor.lower()]
    except KeyError:
        raise DataError(f"unknown sensor '{sensor}'; choose one of: {', '.join(SENSORS)}") from None


def select_bands(available: Sequence[str], wanted: Sequence[str] | None, where: str = "") -> list[int]:
    """Indices of `wanted` band names in `available` (all when wanted is None); a clear error
    names the missing band, the file and the bands that are there."""
    available = list(available)
    if wanted is None:
        return list(range(len(available)))
    missing = [b for b in wanted if b not in available]
    if missing:
        src = f" in {where}" if where else ""
        raise DataError(
            f"band{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found{src}; "
            f"available bands: {', '.join(available)}"
        )
    return [available.index(b) for b in wanted]


# Colour words (any case), also matched as the end of a GEO-Bench descriptor such as "04 - Red".
COLOUR_WORDS = (("R", "red"), ("G", "green"), ("B", "blue"))


def band_colour(name: str, sensor: str | None = None) -> str | None:
    """'R', 'G' or 'B' when `name` names a visible band (see the module docstring), else None. The sensor table is
    `sensor`'s when given, every sensor's otherwise; colour words and GEO-Bench descriptors count for any sensor."""
    key = str(name).lower()
    table = sensor_bands(sensor) if sensor else tuple(b for s in SENSORS.values() for b in s)
    for band in table:
        if band.rgb and key in (band.name.lower(), *(a.lower() for a in band.aliases)):
            return band.rgb
    for colour, word in COLOUR_WORDS:
        if key == word or key.endswith(f"- {word}"):
            return colour
    return None


def _first_of_each_colour(band_names: Sequence[str | Sequence[str]], sensor: str | None) -> dict[str, int]:
    found: dict[str, int] = {}
    for i, entry in enumerate(band_names):
        for name in ((entry,) if isinstance(entry, str) else entry):
            colour = band_colour(name, sensor)
            if colour and colour not in found:
                found[colour] = i
    return found


def rgb_indices(band_names: Sequence[str | Sequence[str]], sensor: str | None = None) -> tuple[int, int, int] | None:
    """Indices of the R, G, B bands within `band_names` (the first band of each colour, by `band_colour`), or None
    when a colour is missing. An entry may be the names of one band (its name and alternative names): the band has
    a colour when any of its names has it."""
    found = _first_of_each_colour(band_names, sensor)
    if all(c in found for c in "RGB"):
        return found["R"], found["G"], found["B"]
    return None


def missing_rgb(band_names: Sequence[str | Sequence[str]], sensor: str | None = None) -> list[str]:
    """The colour words ('red', 'green', 'blue') that no band of `band_names` has (for error messages)."""
    found = _first_of_each_colour(band_names, sensor)
    return [word for colour, word in COLOUR_WORDS if colour not in found]


# Names of the near-infrared band that `band_key` treats as one band (not Landsat "B8"/"B5": those are panchromatic
# in one table and NIR in another, so they only match by their exact name).
NIR_NAMES = ("nir", "b08", "near-infrared", "near infrared")


def band_key(name: str) -> str:
    """The identity `match_bands` compares: 'R' / 'G' / 'B' for a visible band (`band_colour`: ``B04``, ``red``,
    ``04 - Red`` ...), 'NIR' for a near-infrared name (``NIR``, ``B08``, ``... - NIR``), else the name in lower case."""
    colour = band_colour(name)
    if colour:
        return colour
    key = str(name).strip().lower()
    if key in NIR_NAMES or key.endswith(("- nir", "- near-infrared")):
        return "NIR"
    return key


def is_generic(names: Sequence[str]) -> bool:
    """True when `names` are placeholders (``band_1``, ``band_2`` ...: a raster without band descriptions, or a
    model whose contract names no bands), which say nothing about which band is which."""
    return all(str(n) == f"band_{i + 1}" for i, n in enumerate(names))


def match_bands(available: Sequence[str], wanted: Sequence[str]) -> list[int] | None:
    """Positions of the `wanted` bands in `available`: by exact name when every one is there, else by `band_key`
    (so ``B02, B03, B04`` stored in that order feed an ``R, G, B`` model as ``B04, B03, B02``); None when some
    wanted band has no single match."""
    available, wanted = [str(a) for a in available], [str(w) for w in wanted]
    if len(set(wanted)) != len(wanted):
        return None
    if all(w in available for w in wanted):
        return [available.index(w) for w in wanted]
    keys = [band_key(a) for a in available]
    out = []
    for w in wanted:
        hits = [i for i, k in enumerate(keys) if k == band_key(w)]
        if len(hits) != 1:
            return None
        out.append(hits[0])
    return out if len(set(out)) == len(out) else None
