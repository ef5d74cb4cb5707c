"""The DINO / iBOT projection head.

Follows the reference `DINOHead` (`dinov3/layers/dino_head.py`), docs/dinov3_spec.md §4: an MLP
``Linear -> GELU -> (Linear -> GELU) x (nlayers-2) -> Linear`` to the bottleneck (keys ``mlp.0/2/4`` for 3 layers,
no BatchNorm by default), L2 normalisation (eps 1e-12, 1e-6 in fp16), then a bias-free ``last_layer`` to the
prototypes. DINOv3 has no weight normalisation on the last layer: it is a plain Linear, initialised like the rest
(trunc-normal std 0.02, zero bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOHead"]


def _build_mlp(
    nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool
) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias)]
    if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers.append(nn.GELU())
    for _ in range(nlayers - 2):
        layers.append(nn.Linear(hidden_dim, hidden_dim, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP -> L2-normalise -> bias-free prototypes layer (see module docstring)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        mlp_bias: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn=use_bn, bias=mlp_bias)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        if self.last_layer.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, no_last_layer: bool = False, only_last_layer: bool = False) -> Tensor:
        """``no_last_layer``: return the normalised bottleneck; ``only_last_layer``: apply only ``last_layer``."""
        if not only_last_layer:
            x = self.mlp(x)
            eps = 1e-6 if x.dtype == torch.float16 else 1e-12
            x = F.normalize(x, dim=-1, p=2, eps=eps)
        if not no_last_layer:
            x = _prototype_logits(x, self.last_layer.weight) if _wide_no_grad(x, self.last_layer) else self.last_layer(x)
        return x


def _wide_no_grad(x: Tensor, layer: nn.Linear) -> bool:
    return (x.device.type == "cpu" and x.dim() == 2 and layer.out_features >= 16384 and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad)))


def _prototype_logits(x: Tensor, weight: Tensor, chunk: int = 4096) -> Tensor:
    """``x @ weight.T`` for the teacher's prototype layer on the CPU (no autograd), laid out for MKL.

    With K = 65536 prototypes, MKL's sgemm is slow on the plain ``[M, 256] @ [256, K]`` product (12-60
    GFLOP/s on 2 cores against ~120 on square-ish shapes). For few rows the transposed product
    ``weight @ x.T`` is ~2x faster; for many rows, chunks of ``chunk`` prototypes as one batched product
    are ~1.4x faster. Same sums, another blocking: results agree to float rounding."""
    n_rows, dim = x.shape
    n_out = weight.shape[0]
    if n_rows <= 64:
        return (weight @ x.t()).t().contiguous()
    n_chunks = n_out // chunk
    if n_chunks < 2 or n_out % chunk:
        return F.linear(x, weight)
    out = torch.bmm(x.expand(n_chunks, n_rows, dim), weight.view(n_chunks, chunk, dim).transpose(1, 2))
    return out.permute(1, 0, 2).reshape(n_rows, n_out)
