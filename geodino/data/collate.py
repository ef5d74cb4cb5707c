"""DINOv3 batch collation with iBOT masks (``dinov3/data/collate.py: collate_data_and_cast``, spec section 5).

Layout (``B`` images, ``G`` global crops each, normally 2):

* ``collated_global_crops [G*B, C, Hg, Wg]`` is **crop-major**: all images' crop 0, then all images' crop 1, ...
  (``x.unflatten(0, (G, B))`` recovers ``[G, B, ...]``). Same for ``collated_local_crops [n_local*B, ...]`` and the
  optional ``collated_gram_teacher_crops [G*B, ...]``.
* ``n_masked = int(G*B * mask_probability)`` of the ``G*B`` global crops get a mask; masked crop ``i`` gets exactly
  ``int(N * probs[i+1])`` patches with ``probs = linspace(min_ratio, max_ratio, n_masked + 1)`` (a deterministic
  ladder of ratios); the others get empty masks; the list of masks is shuffled.
* ``collated_masks [G*B, N] bool``, ``mask_indices_list [M] long`` (flat positions of the masked patches in
  ``collated_masks.flatten()``), ``masks_weight [M] float32`` (``1 / number of masked patches of that crop``, so it
  sums to the number of non-empty masks), ``n_masked_patches [1] long`` (``M``) and ``upperbound`` (int, the sum of
  the ladder counts; unused by the loss).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from geodino.data.masking import MaskingGenerator, MaskRng

__all__ = ["collate_data_and_cast"]


def _sample_dict(sample: Any) -> dict:
    """Accept a MultiCropAugmentation dict or the reference's ``(dict, target)`` tuple."""
    if isinstance(sample, dict):
        return sample
    if isinstance(sample, (tuple, list)) and sample and isinstance(sample[0], dict):
        return sample[0]
    raise TypeError(f"expected a dict of crops or a (dict, target) tuple, got {type(sample).__name__}")


def _stack_crop_major(samples: list[dict], key: str) -> torch.Tensor | None:
    if key not in samples[0]:
        return None
    n = len(samples[0][key])
    for s in samples:
        if len(s[key]) != n:
            raise ValueError(f"all samples must have the same number of {key!r} ({n}), got {len(s[key])}")
    if n == 0:
        return None
    return torch.stack([s[key][i] for i in range(n) for s in samples])


def collate_data_and_cast(
    samples: Sequence[Any],
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    dtype: torch.dtype = torch.float32,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
    random_state: Any = None,
) -> dict[str, Any]:
    """Collate multi-crop samples into the DINOv3 training batch dict (see module docstring).

    Args:
        samples: dicts from :class:`~geodino.data.multicrop.MultiCropAugmentation` (or ``(dict, target)`` tuples);
            keys other than the crop lists are ignored.
        mask_ratio_tuple: ``(min, max)`` masking ratio of the ladder.
        mask_probability: fraction of global crops that get a mask.
        dtype: dtype of the image tensors (the reference uses the param dtype, e.g. bf16).
        n_tokens: patches per global crop ``N``; default ``mask_generator.num_patches``.
        mask_generator: a :class:`MaskingGenerator`; if None, one is built on a square ``sqrt(N)`` grid with the
            default settings, drawing from ``random_state``.
        random_state: ``random.Random`` / numpy Generator / int seed for the mask shuffle (and the default mask
            generator); None uses the module-level ``random`` as the reference does.
    """
    if len(samples) == 0:
        raise ValueError("cannot collate an empty batch")
    dicts = [_sample_dict(s) for s in samples]
    if "global_crops" not in dicts[0] or "local_crops" not in dicts[0]:
        raise KeyError(f"samples need 'global_crops' and 'local_crops', got keys {sorted(dicts[0])}")

    collated_global_crops = _stack_crop_major(dicts, "global_crops")
    if collated_global_crops is None:
        raise ValueError("samples have no global crops")
    collated_local_crops = _stack_crop_major(dicts, "local_crops")
    if collated_local_crops is None:  # local_crops_number = 0
        collated_local_crops = collated_global_crops.new_empty((0,) + tuple(collated_global_crops.shape[1:2]) + (0, 0))
    collated_gram = _stack_crop_major(dicts, "gram_teacher_crops")

    rng = MaskRng(random_state)
    if mask_generator is None:
        if n_tokens is None:
            raise ValueError("give n_tokens (patches per global crop) or a mask_generator")
        side = math.isqrt(int(n_tokens))
        if side * side != n_tokens:
            raise ValueError(f"n_tokens={n_tokens} is not a square grid; pass a mask_generator for (h, w) grids")
        mask_generator = MaskingGenerator((side, side), rng=rng.rng)
    if n_tokens is None:
        n_tokens = mask_generator.num_patches
    elif n_tokens != mask_generator.num_patches:
        raise ValueError(f"n_tokens={n_tokens} but the mask generator grid has {mask_generator.num_patches} patches")
    N = int(n_tokens)

    n_crops = collated_global_crops.shape[0]
    n_masked = int(n_crops * mask_probability)
    # float32 linspace and truncation as in the reference, so the ladder counts match it bit for bit.
    probs = torch.linspace(*mask_ratio_tuple, n_masked + 1)
    upperbound = 0
    masks = []
    for i in range(n_masked):
        count = int(N * probs[i + 1])
        masks.append(torch.from_numpy(mask_generator(count)))
        upperbound += count
    for _ in range(n_masked, n_crops):
        masks.append(torch.from_numpy(mask_generator(0)))
    rng.shuffle(masks)

    collated_masks = torch.stack(masks).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_crop = collated_masks.sum(-1).clamp(min=1).to(torch.float32)
    masks_weight = (1.0 / per_crop).unsqueeze(-1).expand_as(collated_masks)[collated_masks]

    out = {
        "collated_global_crops": collated_global_crops.to(dtype),
        "collated_local_crops": collated_local_crops.to(dtype),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }
    if collated_gram is not None:
        out["collated_gram_teacher_crops"] = collated_gram.to(dtype)
    return out
