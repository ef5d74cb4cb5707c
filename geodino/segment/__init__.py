"""Open-vocabulary segmentation with dino.txt models: the Python API (`OpenVocabSegmenter`), tiled inference with
overlap blending in bounded memory (geodino.segment.tiling) and the `geodino segment` verb (geodino.segment.run), whose
streaming function is public: `segment_raster(segmenter, path, prompts, out, ...)` for rasters of any size (COG by
default, optional GeoPackage polygons)."""


def __getattr__(name: str):
    if name in ("OpenVocabSegmenter", "SegmentationResult"):
        from geodino.segment import open_vocab

        return getattr(open_vocab, name)
    if name == "segment_raster":
        from geodino.segment import run

        return run.segment_raster
    raise AttributeError(f"module 'geodino.segment' has no attribute {name!r}")
