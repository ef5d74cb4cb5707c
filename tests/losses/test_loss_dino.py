"""DINO CLS loss and the DINOLoss module against the official reference tensors."""

import pytest
import torch
import torch.nn.functional as F
from geodino.testing import assert_close_rel

from geodino.losses import DINOLoss, dino_loss, sinkhorn_knopp


def _teacher_probs(ref):
    """(2B, K) crop-major targets -> (2 crops, B, K)."""
    return ref["teacher_probs_sinkhorn"].view(2, ref["B"], ref["K"])


def test_global_loss_ignore_diagonal(load_ref):
    ref = load_ref("loss_dino")
    loss = dino_loss(ref["student_logits"][:2], _teacher_probs(ref), ref["student_temp"], ignore_diagonal=True)
    assert_close_rel(loss, ref["loss_global_ignore_diagonal"], what="global ignore-diagonal")


def test_all_crops_loss(load_ref):
    ref = load_ref("loss_dino")
    loss = dino_loss(ref["student_logits"], _teacher_probs(ref), ref["student_temp"], ignore_diagonal=False)
    assert_close_rel(loss, ref["loss_all_crops"], what="all crops")


def test_losses_from_our_sinkhorn(load_ref):
    ref = load_ref("loss_dino")
    module = DINOLoss(ref["K"], student_temp=ref["student_temp"])
    probs = module.sinkhorn_knopp_teacher(ref["teacher_logits"], ref["teacher_temp"])
    assert_close_rel(probs, ref["teacher_probs_sinkhorn"])
    probs = probs.view(2, ref["B"], ref["K"])
    assert_close_rel(module(ref["student_logits"][:2], probs, ignore_diagonal=True), ref["loss_global_ignore_diagonal"])
    assert_close_rel(module(ref["student_logits"], probs), ref["loss_all_crops"])


def test_softmax_centering_and_center_update(load_ref):
    ref = load_ref("loss_dino")
    module = DINOLoss(ref["K"], student_temp=ref["student_temp"], center_momentum=ref["center_momentum"])
    assert module.state_dict()["center"].shape == (1, ref["K"])
    probs = module.softmax_center_teacher(ref["teacher_logits"], ref["teacher_temp"])
    assert_close_rel(probs, ref["teacher_probs_centered_from_zero_center"], what="centred probs")
    module.update_center(ref["teacher_logits"])
    module.apply_center_update()
    assert_close_rel(module.center, ref["center_after_one_update"], what="centre")

    # a second step: the pending update is applied before centring, with momentum
    second = ref["teacher_logits"].flip(0) * 0.5 + 0.1
    module.update_center(second)
    centred = module.softmax_center_teacher(second, ref["teacher_temp"])
    expected_center = 0.9 * ref["center_after_one_update"] + 0.1 * second.mean(dim=0, keepdim=True)
    assert_close_rel(module.center, expected_center)
    assert_close_rel(centred, F.softmax((second - expected_center) / ref["teacher_temp"], dim=-1))


def _brute_force(student, teacher, temp, ignore_diagonal):
    log_p = F.log_softmax(student.double() / temp, dim=-1)
    total, terms = 0.0, 0
    for s in range(student.shape[0]):
        for t in range(teacher.shape[0]):
            if ignore_diagonal and s == t:
                continue
            total = total - (teacher[t].double() * log_p[s]).sum()
            terms += student.shape[1]
    return total / terms


@pytest.mark.parametrize("ignore_diagonal", [False, True])
@pytest.mark.parametrize("n_student,n_teacher", [(2, 2), (3, 2), (10, 2), (2, 3)])
def test_normalisation_over_crop_pairs(n_student, n_teacher, ignore_diagonal):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(n_student, 4, 32, generator=g)
    teacher = torch.softmax(torch.randn(n_teacher, 4, 32, generator=g), dim=-1)
    loss = dino_loss(student, teacher, 0.1, ignore_diagonal)
    assert_close_rel(loss, _brute_force(student, teacher, 0.1, ignore_diagonal).float())


def test_gradients_reach_the_student_only():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(4, 3, 16, generator=g, requires_grad=True)
    teacher = torch.softmax(torch.randn(2, 3, 16, generator=g), dim=-1).requires_grad_(True)
    dino_loss(student, teacher, ignore_diagonal=True).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_bf16_student_logits(load_ref):
    ref = load_ref("loss_dino")
    student = ref["student_logits"].bfloat16()
    loss = dino_loss(student, _teacher_probs(ref), ignore_diagonal=True)
    assert loss.dtype == torch.float32
    assert_close_rel(loss, dino_loss(student.float(), _teacher_probs(ref), ignore_diagonal=True))


def test_shape_errors():
    with pytest.raises(ValueError):
        dino_loss(torch.zeros(4, 8), torch.zeros(2, 4, 8))
    with pytest.raises(ValueError):
        dino_loss(torch.zeros(2, 4, 8), torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="no crop pair"):
        dino_loss(torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), ignore_diagonal=True)


def test_sinkhorn_rows_feed_crop_major_view(load_ref):
    """The (2B, K) teacher rows are crop-major: row c*B + b is crop c of image b."""
    ref = load_ref("loss_dino")
    probs = sinkhorn_knopp(ref["teacher_logits"], ref["teacher_temp"])
    view = probs.view(2, ref["B"], ref["K"])
    assert torch.equal(view[1, 0], probs[ref["B"]])
