"""Two gloo processes (torch.multiprocessing, no torchrun): the collective paths of the losses equal the
single-process computation on the full batch."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from geodino.losses import DINOLoss, koleo_loss_distributed, sinkhorn_knopp

WORLD = 2
M, K, D = 12, 64, 16


def _data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(M, K, generator=g) * 0.8
    feats = torch.randn(16, D, generator=g)
    feats[5] = feats[12] + 1e-3 * torch.randn(D, generator=g)  # a near-duplicate across the two halves
    return logits, feats


def _worker(rank: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        logits, feats = _data()
        out = {}
        half = slice(rank * M // 2, (rank + 1) * M // 2)
        out["sk_half"] = sinkhorn_knopp(logits[half], 0.07)
        subgroup = dist.new_group([0, 1])
        out["sk_subgroup"] = sinkhorn_knopp(logits[half], 0.07, process_group=subgroup)
        # unequal local batches (5 + 7 rows); the iBOT variant counts masked patches
        uneven = slice(0, 5) if rank == 0 else slice(5, M)
        n_local = torch.tensor(uneven.stop - uneven.start)
        out["sk_uneven"] = sinkhorn_knopp(logits[uneven], 0.07, n_masked_patches_tensor=n_local)
        out["n_local_after"] = n_local
        big = logits * 1000
        out["sk_big"] = sinkhorn_knopp(big[half], 0.07)

        x = feats[rank * 8 : (rank + 1) * 8].clone().requires_grad_(True)
        loss = koleo_loss_distributed(x, group_size=16)
        loss.backward()
        out["koleo16"], out["koleo16_grad"] = loss.detach(), x.grad
        out["koleo8"] = koleo_loss_distributed(feats[rank * 8 : (rank + 1) * 8], group_size=8)

        module = DINOLoss(K)
        module.update_center(logits[half])
        module.apply_center_update()
        out["center"] = module.center
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_rank_gloo_matches_single_process(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    import torch.multiprocessing as mp

    # fork, as DataLoader workers do (each child sets one thread first): spawning would re-import torch
    # in both children, which alone takes ~10 s on a loaded 2-core machine
    context = mp.start_processes(
        _worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):  # re-raises a child's exception
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-rank gloo workers did not finish within 60 s")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    logits, feats = _data()

    full = sinkhorn_knopp(logits, 0.07)
    for key in ("sk_half", "sk_subgroup"):
        torch.testing.assert_close(torch.cat([r0[key], r1[key]]), full, rtol=1e-5, atol=1e-7, msg=key)
    torch.testing.assert_close(torch.cat([r0["sk_uneven"], r1["sk_uneven"]]), full, rtol=1e-5, atol=1e-7)
    assert r0["n_local_after"].item() == 5 and r1["n_local_after"].item() == 7
    big_full = sinkhorn_knopp(logits * 1000, 0.07)
    torch.testing.assert_close(torch.cat([r0["sk_big"], r1["sk_big"]]), big_full, rtol=1e-5, atol=1e-7)

    # one group across both ranks: the mean of the per-rank losses is the single-process loss, and the
    # autograd all-gather sums both ranks' contributions (DDP then divides by the world size)
    x = feats.clone().requires_grad_(True)
    single = koleo_loss_distributed(x, group_size=16)
    single.backward()
    torch.testing.assert_close((r0["koleo16"] + r1["koleo16"]) / 2, single.detach())
    grads = torch.cat([r0["koleo16_grad"], r1["koleo16_grad"]])
    torch.testing.assert_close(grads / WORLD, x.grad, rtol=1e-5, atol=1e-7)
    # groups of 8 = one rank each: no neighbours across ranks
    torch.testing.assert_close((r0["koleo8"] + r1["koleo8"]) / 2, koleo_loss_distributed(feats, group_size=8))

    expected_center = 0.1 * logits.mean(0, keepdim=True)
    torch.testing.assert_close(r0["center"], expected_center)
    torch.testing.assert_close(r1["center"], expected_center)
