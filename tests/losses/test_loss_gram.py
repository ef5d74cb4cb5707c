"""Gram anchoring loss against the official reference tensors."""

import pytest
import torch
import torch.nn.functional as F
from geodino.testing import assert_close_rel

from geodino.losses import GramLoss, gram_loss, resize_gram_teacher_tokens


def test_all_reference_cases(load_ref):
    cases = load_ref("loss_gram")
    assert len(cases) == 4
    for i, case in enumerate(cases):
        flags = dict(img_level=case["img_level"], remove_neg=case["remove_neg"], apply_norm=case["apply_norm"])
        assert_close_rel(gram_loss(case["student"], case["teacher"], **flags), case["loss"], what=f"case {i} {flags}")
        module = GramLoss(apply_norm=case["apply_norm"], img_level=case["img_level"], remove_neg=case["remove_neg"])
        assert_close_rel(module(case["student"], case["teacher"]), case["loss"], what=f"module case {i}")


def test_gradients_reach_the_student_only(load_ref):
    case = load_ref("loss_gram")[0]
    student = case["student"].clone().requires_grad_(True)
    teacher = case["teacher"].clone().requires_grad_(True)
    gram_loss(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_remove_only_teacher_neg():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    gs = F.normalize(s, dim=-1) @ F.normalize(s, dim=-1).transpose(1, 2)
    gt = F.normalize(t, dim=-1) @ F.normalize(t, dim=-1).transpose(1, 2)
    # the reference zeroes student entries where (gs < 0) & (clamped gt < 0), i.e. none: only the teacher is clamped
    expected = F.mse_loss(gs, gt.clamp(min=0))
    loss = gram_loss(s, t, remove_neg=False, remove_only_teacher_neg=True)
    assert_close_rel(loss, expected)


def test_bf16_inputs(load_ref):
    case = load_ref("loss_gram")[1]
    out = gram_loss(case["student"].bfloat16(), case["teacher"].bfloat16(), remove_neg=False)
    assert out.dtype == torch.float32
    rounded = gram_loss(case["student"].bfloat16().float(), case["teacher"].bfloat16().float(), remove_neg=False)
    assert_close_rel(out, rounded)


def test_resize_teacher_tokens():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 4 * 4, 8, generator=g)
    assert resize_gram_teacher_tokens(tokens, (4, 4)) is tokens
    out = resize_gram_teacher_tokens(tokens, (7, 7))
    assert out.shape == (2, 49, 8)
    grid = tokens.transpose(1, 2).reshape(2, 8, 4, 4)
    expected = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    rect = resize_gram_teacher_tokens(torch.randn(1, 6 * 8, 3), (3, 4), teacher_grid=(6, 8), antialias=True)
    assert rect.shape == (1, 12, 3)
    with pytest.raises(ValueError):
        resize_gram_teacher_tokens(tokens, (7, 7), teacher_grid=(3, 3))


def test_shape_mismatch():
    with pytest.raises(ValueError, match="resize"):
        gram_loss(torch.randn(2, 9, 4), torch.randn(2, 16, 4))
