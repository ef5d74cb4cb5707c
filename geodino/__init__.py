"""geodino: the DINOv3 self-supervised stack for natural and Earth-observation imagery.

Public API (imported lazily so `import geodino` and `geodino --help` stay light):
`load_backbone`, `build_backbone`, `export_backbone`, `transforms_for` (geodino.models), `Contract`
(geodino.contract) and `OpenVocabSegmenter` (geodino.segment.open_vocab).
"""

__version__ = "0.1.0"

_LAZY = {
    "load_backbone": ("geodino.models", "load_backbone"),
    "build_backbone": ("geodino.models", "build_backbone"),
    "export_backbone": ("geodino.models", "export_backbone"),
    "transforms_for": ("geodino.models.transforms", "transforms_for"),
    "Contract": ("geodino.contract", "Contract"),
    "OpenVocabSegmenter": ("geodino.segment.open_vocab", "OpenVocabSegmenter"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'geodino' has no attribute {name!r}")
