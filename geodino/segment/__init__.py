"""Open-vocabulary segmentation with dino.txt models: the Python API (`OpenVocabSegmenter`), tiled inference with
overlap blending in bounded memory (geodino.segment.tiling) and the `geodino segment` verb (geodino.segment.run)."""


def __getattr__(name: str):
    if name in ("OpenVocabSegmenter", "SegmentationResult"):
        from geodino.segment import open_vocab

        return getattr(open_vocab, name)
    raise AttributeError(f"module 'geodino.segment' has no attribute {name!r}")
