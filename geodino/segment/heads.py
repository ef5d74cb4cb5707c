"""Apply an evaluation head (``geodino eval ... save_heads=true``: a backbone — frozen, fully fine-tuned or with LoRA
merged — and its dense head) to a raster of any size.

`DenseSegmenter` offers what `geodino.segment.run.segment_raster` needs from a segmenter (the text side is the
identity: the classes are the head's), so a head checkpoint is applied with the same tiled, bounded-memory, blended
GeoTIFF writer as open-vocabulary segmentation: same CRS, transform and size as the input, label values 1..K for the
head's classes in order (a class the task ignores, e.g. LoveDA's no-data, never wins), a score band, a preview and a
summary. From Python: ``geodino.segment.run.apply_head(checkpoint, "scene.tif", "scene_seg.tif")``; from the CLI:
``geodino segment checkpoint=<run>/heads/dpt.pt input=scene.tif out=scene_seg.tif``
(``prompts`` default to the head's class names). Segmentation heads only; a regression head (canopy height) is
refused with a message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from geodino.errors import GeodinoError
from geodino.eval.finetune import load_dense_checkpoint
from geodino.runtime import resolve_device


class DenseSegmenter:
    def __init__(self, net, record: dict, device: str | torch.device = "cpu", blend: str = "linear",
                 scale: float | None = None, offset: float | None = None, info: dict | None = None):
        if record.get("kind") != "seg":
            raise GeodinoError(f"{(info or {}).get('checkpoint', 'this head')} is a {record.get('kind')} head; only "
                               "segmentation heads are applied to rasters here")
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.record = record
        self.contract = net.contract
        self.bands = list(self.contract.bands)
        self.patch = self.contract.patch_size
        self.scale = self.contract.scale if scale is None else float(scale)
        self.offset = offset
        self.blend = blend
        self.info = dict(info or {})
        names = record.get("class_names") or [f"class_{i}" for i in range(int(record["n_out"]))]
        self.class_names = [str(c) for c in names]

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs) -> "DenseSegmenter":
        net, rec = load_dense_checkpoint(path, device="cpu")
        return cls(net, rec, device=device, info={"checkpoint": str(path), "head": rec.get("head"),
                                                  "finetune": rec.get("finetune"), "task": rec.get("task")}, **kwargs)

    def text_embeddings(self, prompts: Sequence[str], templates=None):
        """The head's classes stand in for text: `prompts` must be its class names, in order."""
        if list(prompts) != self.class_names:
            raise GeodinoError(f"this head predicts {self.class_names}; prompts must be those names in that order "
                               f"(got {list(prompts)})")
        return None

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor | np.ndarray, valid=None) -> torch.Tensor:
        """(C, h, w) in [0, 1] -> (K, h, w) class probabilities (padded to the patch size internally)."""
        x = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.asarray(image))
        x = x.float().to(self.device)
        h, w = x.shape[-2:]
        p = self.patch
        ph, pw = (-h) % p, (-w) % p
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        logits = self.net.logits(x[None])[0, :, :h, :w]
        logits = logits.masked_fill(~self.net.model.allowed.view(-1, 1, 1), float("-inf"))
        return logits.softmax(0).cpu()

    def predictor(self, text=None) -> Callable:
        return self.probabilities
