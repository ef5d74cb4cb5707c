"""Sinkhorn-Knopp teacher: the official reference tensors, marginals and numerical stability."""

import math

import pytest
import torch
from geodino.testing import assert_close_rel

from geodino.losses import sinkhorn_knopp


def official_linear_sinkhorn(logits, temp, n_iterations=3, n_samples=None, subtract_max=False):
    """The reference algorithm as the spec (§3.1) states it, in the linear domain, for comparison."""
    x = (logits if logits.dtype == torch.float64 else logits.float()) / temp
    if subtract_max:
        x = x - x.max()
    q = torch.exp(x).t()  # (K, M)
    b = q.shape[1] if n_samples is None else n_samples
    k = q.shape[0]
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def _logits(m=24, k=128, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g) * scale


def test_matches_reference_dino(load_ref):
    ref = load_ref("loss_dino")
    probs = sinkhorn_knopp(ref["teacher_logits"], ref["teacher_temp"], n_iterations=3)
    assert probs.dtype == torch.float32
    assert_close_rel(probs, ref["teacher_probs_sinkhorn"], what="dino SK")


def test_matches_reference_ibot_with_masked_patch_count(load_ref):
    ref = load_ref("loss_ibot")
    logits = ref["teacher_patch_logits"]
    n_masked = torch.tensor(int(ref["masks"].sum()))
    assert n_masked.item() == logits.shape[0]
    probs = sinkhorn_knopp(logits, ref["teacher_temp"], n_masked_patches_tensor=n_masked)
    assert_close_rel(probs, ref["teacher_probs_sinkhorn"], what="ibot SK")
    assert n_masked.item() == logits.shape[0], "the caller's count must not be modified in place"


def test_spec_algorithm_reproduces_fixture(load_ref):
    """Sanity check of the comparison implementation used below."""
    ref = load_ref("loss_dino")
    expected = ref["teacher_probs_sinkhorn"]
    assert_close_rel(official_linear_sinkhorn(ref["teacher_logits"], ref["teacher_temp"]), expected)


@pytest.mark.parametrize("n_iterations", [1, 2, 3, 5])
def test_equals_linear_domain_on_ordinary_logits(n_iterations):
    logits = _logits(scale=0.7)
    assert_close_rel(sinkhorn_knopp(logits, 0.07, n_iterations), official_linear_sinkhorn(logits, 0.07, n_iterations))


def test_stable_on_huge_logits(load_ref):
    logits = load_ref("loss_dino")["teacher_logits"] * 1000
    naive = official_linear_sinkhorn(logits, 0.07)
    assert not torch.isfinite(naive).all(), "the plain exp should overflow here"
    # subtracting only the global max avoids inf but underflows whole samples to 0 -> 0/0
    shifted = official_linear_sinkhorn(logits, 0.07, subtract_max=True)
    assert not torch.isfinite(shifted).all()

    probs = sinkhorn_knopp(logits, 0.07)
    assert torch.isfinite(probs).all()
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(logits.shape[0]), atol=1e-5, rtol=0)


def test_stable_on_huge_logits_wide_range():
    """Samples whose logits lie ~1e4 below the others still get a proper distribution."""
    logits = _logits(m=16, k=64, scale=50.0)
    logits[:8] -= 1000.0
    probs = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(16), atol=1e-5, rtol=0)


def test_marginals():
    m, k = 32, 16
    logits = _logits(m, k, scale=0.5)
    probs = sinkhorn_knopp(logits, 0.1)
    # the last normalisation is per sample: each row sums to exactly 1
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(m), atol=1e-6, rtol=0)
    # after 3 iterations the prototype marginals equal the reference's (not yet converged) ...
    torch.testing.assert_close(probs.sum(dim=0), official_linear_sinkhorn(logits, 0.1).sum(dim=0), atol=1e-6, rtol=1e-5)
    # ... and with enough iterations every prototype receives B/K of the mass
    converged = sinkhorn_knopp(logits, 0.1, n_iterations=100)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((k,), m / k), atol=1e-4, rtol=0)
    torch.testing.assert_close(converged.sum(dim=1), torch.ones(m), atol=1e-6, rtol=0)


def test_sample_count_only_rescales():
    """B enters as a uniform scale that the final Q *= B undoes: the count does not change the targets."""
    logits = _logits()
    base = sinkhorn_knopp(logits, 0.07)
    other = sinkhorn_knopp(logits, 0.07, n_masked_patches_tensor=torch.tensor(1000))
    torch.testing.assert_close(base, other, atol=1e-7, rtol=1e-5)


def test_bf16_input_is_computed_in_fp32():
    logits = _logits(scale=0.7).bfloat16()
    probs = sinkhorn_knopp(logits, 0.07)
    assert probs.dtype == torch.float32
    assert torch.equal(probs, sinkhorn_knopp(logits.float(), 0.07))
    assert_close_rel(probs, official_linear_sinkhorn(logits.float().double(), 0.07).float())


def test_no_gradients_and_input_untouched():
    logits = _logits().requires_grad_(True)
    before = logits.detach().clone()
    probs = sinkhorn_knopp(logits, 0.07)
    assert not probs.requires_grad
    assert torch.equal(logits.detach(), before)


def test_bad_arguments():
    with pytest.raises(ValueError, match="samples, prototypes"):
        sinkhorn_knopp(torch.zeros(2, 3, 4), 0.1)
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(torch.zeros(2, 3), 0.1, n_iterations=0)


def test_no_collectives_without_process_group(monkeypatch):
    import torch.distributed as dist

    def fail(*args, **kwargs):
        raise AssertionError("all_reduce called in a single process")

    monkeypatch.setattr(dist, "all_reduce", fail)
    assert not dist.is_initialized()
    probs = sinkhorn_knopp(_logits(), 0.07, n_masked_patches_tensor=torch.tensor(24))
    assert math.isclose(probs.sum().item(), 24.0, rel_tol=1e-5)


def test_fast_and_log_domain_paths_agree_and_fallback_is_taken_only_when_needed():
    from geodino.losses.sinkhorn import _linear_domain, _log_domain

    logits = _logits(m=40, k=512, scale=0.7) / 0.07
    count = torch.tensor(40.0, dtype=torch.float64)
    fast, degenerate = _linear_domain(logits.clone(), 3, None, count.float(), 512)
    assert not degenerate
    assert_close_rel(fast, _log_domain(logits.clone(), 3, None, count, 512), what="fast vs log domain")
    # whole samples ~1000/τ below every prototype's best sample underflow to an empty row: fallback
    wide = _logits(m=16, k=64, scale=50.0)
    wide[:8] -= 1000.0
    _, degenerate = _linear_domain(wide / 0.04, 3, None, torch.tensor(16.0), 64)
    assert degenerate


def test_accurate_at_the_reference_size():
    """K = 65536 prototypes, 273 masked patches: sums over 65536 terms stay within the 1e-5 budget."""
    logits = _logits(m=273, k=65536, scale=0.4, seed=3)  # |t / τ| up to ~25, as cosine logits at τ = 0.07
    expected = official_linear_sinkhorn(logits.double(), 0.07).float()  # float64 reference
    assert_close_rel(sinkhorn_knopp(logits, 0.07), expected, rtol=1e-5, what="SK at K=65536")


@pytest.mark.parametrize("k", [100, 512, 1000, 4096])
def test_chunked_row_sums_equal_the_plain_product(k):
    from geodino.losses.sinkhorn import _row_dot

    q, u = torch.rand(7, k, dtype=torch.float64), torch.rand(k, dtype=torch.float64)
    torch.testing.assert_close(_row_dot(q, u, chunk=256), q @ u, rtol=1e-12, atol=0)
