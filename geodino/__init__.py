"""geodino: the DINOv3 self-supervised stack for natural and Earth-observation imagery."""

__version__ = "0.1.0"
