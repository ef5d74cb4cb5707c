"""User-facing errors.

`GeodinoError` (and its subclasses) mark bad input — a missing file, a band absent from a raster, a
checkpoint key that does not fit. The CLI prints them as one line; the Python API raises them.
They subclass ValueError so callers that already catch ValueError keep working.
"""


class GeodinoError(ValueError):
    """Bad input, with a message that names the file, band, key or shape at fault."""


class CheckpointError(GeodinoError):
    """A checkpoint or weight file that does not fit the requested model."""


class DataError(GeodinoError):
    """A data source problem: missing files, missing bands, unreadable rasters."""


class ConfigError(GeodinoError):
    """A config value its key does not allow (geodino.schema), found before any data is read."""
