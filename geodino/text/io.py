"""dino.txt model files: writing a model outside a run and reading a model from a ``stage=text`` run or file.

Both read and write through the one checkpoint format (geodino.checkpoint; a saved model may also be its
safetensors form, ``geodino export part=text format=safetensors``): a ``stage=text`` training checkpoint and a saved
model hold the model's state under ``models.meta_arch`` with the ``model.`` prefix, the backbone
contract, the data scaling, and a ``dinotxt`` entry with the model config and tokenizer settings.
"""

from __future__ import annotations

from pathlib import Path

from geodino.checkpoint import DINOTXT_FORMAT, DINOTXT_KIND, Checkpoint, save_atomic, save_safetensors
from geodino.contract import Contract
from geodino.errors import CheckpointError
from geodino.models import backbone_from_contract
from geodino.text.dinotxt import DinoTxt, DinoTxtConfig, tokenizer_settings


def save_dinotxt(model: DinoTxt, path: str | Path, data: dict | None = None, contract: Contract | None = None,
                 random_backbone: bool = False, step: int | None = None) -> Path:
    """Write ``model`` as a (non-resumable) dino.txt model file that :func:`load_dinotxt` and the segmenter read,
    e.g. a model converted with ``DinoTxt.from_official`` or exported from a run: a ``.safetensors`` path writes
    the safetensors form (`geodino.checkpoint.save_safetensors`: the weights as tensors, config, tokenizer, data
    scaling and contract as JSON metadata), any other a weights-only torch file. ``contract`` defaults to the
    backbone's; ``random_backbone`` records that the frozen backbone was never trained (as the text stage does)."""
    contract = contract or getattr(model.backbone, "geodino_contract", None)
    if contract is None:
        raise CheckpointError("the backbone has no geodino contract (bands, mean/std); pass contract=")
    state = {
        "format": DINOTXT_FORMAT,
        "kind": DINOTXT_KIND,
        "stage": "text",
        "step": None if step is None else int(step),
        "models": {"meta_arch": {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}},
        "contract": contract.to_dict(),
        "data": dict(data or {}),
        "dinotxt": {"config": model.cfg.to_dict(), "tokenizer": tokenizer_settings(model.cfg.context_length),
                    "state_prefix": "model.", "random_backbone": bool(random_backbone)},
    }
    if Path(path).suffix == ".safetensors":
        return save_safetensors(state, path)
    return save_atomic(state, path)


def load_dinotxt(path: str | Path) -> tuple[DinoTxt, dict]:
    """(model in eval mode, metadata) from a ``stage=text`` run directory or checkpoint file, or a dino.txt model
    file (``.pt`` or ``.safetensors``, `save_dinotxt`).

    The metadata holds ``contract`` (backbone: bands, mean/std, patch size), ``data`` (scaling), ``tokenizer``,
    ``config`` (the dino.txt config) and ``random_backbone`` (True when the text stage aligned a randomly
    initialised frozen backbone: no ``init=`` / ``model.weights``)."""
    ckpt = Checkpoint.open(path)
    file = ckpt.path
    if not ckpt.is_dinotxt:
        raise CheckpointError(f"{file} is not a dino.txt checkpoint (stage={ckpt.stage or '?'}); train one with "
                              "`geodino train stage=text data=captions caption_file=...`")
    info = ckpt.raw["dinotxt"]
    cfg = DinoTxtConfig.from_dict(info["config"])
    model = DinoTxt(backbone_from_contract(ckpt.contract), cfg)
    sd = ckpt.state(info.get("state_prefix", "model."))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{file}: weights do not fit the recorded dino.txt config: {str(e).splitlines()[0]}") from e
    meta = {"contract": ckpt.contract, "data": ckpt.data, "tokenizer": info.get("tokenizer", {}),
            "config": cfg.to_dict(), "checkpoint": str(file), "step": ckpt.step,
            "random_backbone": bool(info.get("random_backbone", False))}
    return model.eval(), meta
