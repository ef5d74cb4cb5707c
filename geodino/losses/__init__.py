"""DINOv3 losses: Sinkhorn-Knopp teacher, DINO (CLS), iBOT (masked patches), KoLeo and Gram anchoring.

Plain functions plus thin modules that hold state (temperatures, centres, process groups); each
reproduces the official DINOv3 reference tensors (``loss_*.pt``) to ~1e-6 relative in fp32.
"""

from .centering import SoftmaxCentering, softmax_center
from .dino import DINOLoss, dino_loss
from .gram import GramLoss, gram_loss, resize_gram_teacher_tokens
from .ibot import ibot_loss, iBOTPatchLoss, masks_weight_from_masks
from .koleo import KoLeoLoss, KoLeoLossDistributed, koleo_loss, koleo_loss_distributed
from .sinkhorn import sinkhorn_knopp

__all__ = [
    "sinkhorn_knopp",
    "dino_loss",
    "DINOLoss",
    "ibot_loss",
    "masks_weight_from_masks",
    "iBOTPatchLoss",
    "koleo_loss",
    "koleo_loss_distributed",
    "KoLeoLoss",
    "KoLeoLossDistributed",
    "gram_loss",
    "GramLoss",
    "resize_gram_teacher_tokens",
    "softmax_center",
    "SoftmaxCentering",
]
