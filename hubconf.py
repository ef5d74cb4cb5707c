"""torch.hub entry points over `geodino.load_backbone`, one per registry name, as the DINOv3 repository offers:

    model = torch.hub.load("<path to this repository>", "dinov3_vits16", source="local", weights="<local file>")

`weights` is a local file or folder in the official, timm or Hugging Face layout (geodino never downloads);
other keyword arguments go to `load_backbone` (``in_chans``, ``bands``, ``device``, constructor overrides).
``pretrained=False`` builds the randomly initialised architecture.
"""

dependencies = ["torch", "timm", "safetensors"]


def _entry(name: str):
    def load(*, weights=None, pretrained: bool = True, **kwargs):
        from geodino.models import build_backbone, load_backbone

        if weights is None:
            if pretrained:
                raise ValueError(f"{name}: geodino never downloads weights; pass weights=<local .pth / .safetensors "
                                 "file or timm / Hugging Face folder>, or pretrained=False for random weights")
            device = kwargs.pop("device", "cpu")
            return build_backbone(name, **kwargs).to(device).eval()
        return load_backbone(name, weights=weights, **kwargs)

    load.__name__ = load.__qualname__ = name
    load.__doc__ = f"geodino.load_backbone({name!r}, weights=...): the {name} backbone with local weights."
    return load


def _names():
    from geodino.models.registry import arch_names

    return arch_names()


for _name in _names():
    globals()[_name] = _entry(_name)
del _name
