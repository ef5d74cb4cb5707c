"""Builders of fake data in the real on-disk formats (GeoTIFFs, LoveDA folders, GEO-Bench HDF5, captions),
shared by the tests and the benchmarks; not part of the geodino package."""
