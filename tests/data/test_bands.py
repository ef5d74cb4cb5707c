"""The one RGB detector (geodino.data.bands.rgb_indices): every band name the sensor tables, the canopy task and the
GEO-Bench task accepted before it replaced their own detectors is still recognised, with the same colour."""

from __future__ import annotations

import pytest

from geodino.data.bands import band_colour, missing_rgb, rgb_indices

# What each former detector accepted, per colour.
SENSOR_TABLE = {"R": ["B04", "SR_B4", "R"], "G": ["B03", "SR_B3", "G"], "B": ["B02", "SR_B2", "B"]}
CANOPY = {"R": ["red", "r", "b04", "b4"], "G": ["green", "g", "b03", "b3"], "B": ["blue", "b", "b02", "b2"]}
GEOBENCH = {  # lower-cased names, plus descriptors ending in "- <colour>"
    "R": ["red", "b04", "b4", "sr_b4", "04 - Red"],
    "G": ["green", "b03", "b3", "sr_b3", "03 - Green"],
    "B": ["blue", "b02", "b2", "sr_b2", "02 - Blue"],
}


@pytest.mark.parametrize("table", [SENSOR_TABLE, CANOPY, GEOBENCH], ids=["sensor-table", "canopy", "geobench"])
def test_every_formerly_accepted_name_keeps_its_colour(table):
    for colour, names in table.items():
        for name in names:
            for spelling in (name, name.upper(), name.lower(), name.capitalize()):
                assert band_colour(spelling) == colour, spelling


@pytest.mark.parametrize("name", ["B08", "B8A", "NIR", "nir", "08 - NIR", "05 - Vegetation Red Edge",
                                  "08A - Vegetation Red Edge", "TCI_R", "band_1", "reddish", "B01", "SR_B5"])
def test_other_bands_have_no_colour(name):
    assert band_colour(name) is None


def test_rgb_indices_of_the_real_band_lists():
    s2 = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
    assert rgb_indices(s2) == (3, 2, 1)
    assert rgb_indices(s2, "sentinel2") == (3, 2, 1)
    assert rgb_indices(["SR_B4", "SR_B3", "SR_B2"], "landsat8") == (0, 1, 2)
    assert rgb_indices(["R", "G", "B", "NIR"], "naip") == (0, 1, 2)
    assert rgb_indices(["red", "green", "blue"]) == (0, 1, 2)
    # GEO-Bench descriptors in stored order, and the channel-order-fixed brick-kiln names (TCI_* are not RGB)
    assert rgb_indices(["02 - Blue", "03 - Green", "04 - Red"]) == (2, 1, 0)
    kiln = ["B01", "B02", "B03", "B04", "B05", "B07", "B8A", "B08", "B11", "B12", "TCI_R", "TCI_G", "TCI_B"]
    assert rgb_indices(kiln) == (3, 2, 1)
    assert rgb_indices(["B02", "B03", "B08"]) is None
    assert rgb_indices(["SR_B4", "SR_B3", "SR_B2"], "sentinel2") is None  # a named sensor restricts the table


def test_first_band_of_each_colour_wins_and_alternative_names_count():
    assert rgb_indices(["b", "r", "g", "red"]) == (1, 2, 0)
    # one entry per band: its name and alternative names (GEO-Bench band_info)
    bands = [("01 - Coastal aerosol", "1"), ("02 - Blue", "2", "blue"), ("Green band", "green"), ("x", "RED")]
    assert rgb_indices(bands) == (3, 2, 1)


def test_missing_rgb_names_the_missing_colours_in_order():
    assert missing_rgb(["red", "green", "blue"]) == []
    assert missing_rgb(["B08", "B03"]) == ["red", "blue"]
