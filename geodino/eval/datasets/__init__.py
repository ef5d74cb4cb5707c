"""On-disk readers of the evaluation datasets, one dataset per module (as torchgeo lays them out): file discovery,
split lists, reading an image, mask, label and metadata, and the checks that name a bad file.

- `loveda`: the LoveDA tree (through torchgeo's `LoveDA`);
- `geobench`: GEO-Bench v1 tasks (HDF5 samples, partitions, band statistics), with `safe_pickle`, the allow-list
  unpickler for their metadata;
- `canopy`: paired RGB / canopy-height-model GeoTIFFs;
- `ov_folder`: GeoTIFFs with label rasters and a class-name list (scored by `geodino eval ov`, geodino.segment.evaluate).

The protocols (features, heads, training, metrics, report) are in geodino.eval.tasks. Nothing is imported here, so
importing one reader does not import the others' dependencies.
"""
