"""iBOT masked-patch loss against the official reference tensors."""

import pytest
import torch
import torch.nn.functional as F
from geodino.testing import assert_close_rel

from geodino.losses import iBOTPatchLoss, ibot_loss, masks_weight_from_masks


def test_loss_with_reference_targets(load_ref):
    ref = load_ref("loss_ibot")
    loss = ibot_loss(ref["student_patch_logits"], ref["teacher_probs_sinkhorn"], ref["masks"], ref["student_temp"])
    assert_close_rel(loss, ref["loss"])


def test_module_end_to_end(load_ref):
    ref = load_ref("loss_ibot")
    module = iBOTPatchLoss(ref["K"], student_temp=ref["student_temp"])
    assert module.state_dict()["center"].shape == (1, 1, ref["K"])
    n_masked = torch.tensor(int(ref["masks"].sum()))
    probs = module.sinkhorn_knopp_teacher(
        ref["teacher_patch_logits"], ref["teacher_temp"], n_masked_patches_tensor=n_masked
    )
    assert_close_rel(probs, ref["teacher_probs_sinkhorn"])
    assert_close_rel(module.forward_masked(ref["student_patch_logits"], probs, ref["masks"]), ref["loss"])
    assert_close_rel(module(ref["student_patch_logits"], probs, ref["masks"]), ref["loss"])


def test_weighting_rule(load_ref):
    """Each image's masked patches are averaged; the sum is divided by the number of images."""
    ref = load_ref("loss_ibot")
    masks = ref["masks"]
    per_patch = -(ref["teacher_probs_sinkhorn"] * F.log_softmax(ref["student_patch_logits"] / 0.1, dim=-1)).sum(-1)
    image_of_patch = torch.arange(masks.shape[0]).unsqueeze(1).expand_as(masks)[masks]
    per_image = torch.stack([per_patch[image_of_patch == i].mean() for i in range(masks.shape[0])])
    assert_close_rel(per_image.mean(), ref["loss"])


def test_explicit_weights_and_padding(load_ref):
    ref = load_ref("loss_ibot")
    masks = ref["masks"]
    weights = masks_weight_from_masks(masks)
    assert weights.shape == (int(masks.sum()),)
    torch.testing.assert_close(weights.sum(), torch.tensor(float(masks.shape[0])))
    # padded to an upper bound as the official collate does: the extra rows are ignored
    pad = 7
    student = torch.cat([ref["student_patch_logits"], torch.randn(pad, ref["K"])])
    teacher = torch.cat([ref["teacher_probs_sinkhorn"], torch.softmax(torch.randn(pad, ref["K"]), -1)])
    padded_weights = torch.cat([weights, torch.ones(pad)])
    loss = ibot_loss(student, teacher, masks, n_masked_patches=int(masks.sum()), masks_weight=padded_weights)
    assert_close_rel(loss, ref["loss"])


def test_images_without_masks_count_in_the_divisor():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(4, 9, dtype=torch.bool)
    masks[0, :3] = True
    student = torch.randn(3, 8, generator=g)
    teacher = torch.softmax(torch.randn(3, 8, generator=g), dim=-1)
    loss = ibot_loss(student, teacher, masks)
    per_patch = -(teacher * F.log_softmax(student / 0.1, dim=-1)).sum(-1)
    assert_close_rel(loss, per_patch.mean() / 4)


def test_gradients_and_errors(load_ref):
    ref = load_ref("loss_ibot")
    student = ref["student_patch_logits"].clone().requires_grad_(True)
    teacher = ref["teacher_probs_sinkhorn"].clone().requires_grad_(True)
    ibot_loss(student, teacher, ref["masks"]).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    with pytest.raises(ValueError, match="weights"):
        ibot_loss(student[:-1], teacher[:-1], ref["masks"])


def test_bf16_student(load_ref):
    ref = load_ref("loss_ibot")
    s = ref["student_patch_logits"].bfloat16()
    loss = ibot_loss(s, ref["teacher_probs_sinkhorn"], ref["masks"])
    assert loss.dtype == torch.float32
    assert_close_rel(loss, ibot_loss(s.float(), ref["teacher_probs_sinkhorn"], ref["masks"]))


def test_center_update_over_patches():
    module = iBOTPatchLoss(8, center_momentum=0.9)
    tokens = torch.randn(5, 8)
    module.update_center(tokens)
    probs = module.softmax_center_teacher(tokens, 0.07)
    expected_center = 0.1 * tokens.mean(0)
    assert_close_rel(module.center.reshape(-1), expected_center)
    assert_close_rel(probs, torch.softmax((tokens - expected_center) / 0.07, dim=-1))
