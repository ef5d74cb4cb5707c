"""Time one DINOv3 pretraining step (teacher + student forward, DINO + iBOT + KoLeo with
Sinkhorn-Knopp, backward, AdamW, EMA) through geodino's real trainer, with a breakdown.

    python benchmarks/train_step.py --arch vits16 --batch 4 --global-size 224 --local-size 96 \
        --n-local 8 --prototypes 65536 --steps 5 --threads 2

The comparison point (issue "The SSL trainer"): the reference implementation's full step takes about
4.4 s at that setting on the project's 2-core machine (0.9 img/s, fp32). Data loading is timed
separately (multi-crop of a 512² RGB image per sample) and is not part of the step.

The student is built as `geodino train model=<arch>` builds it: the model config's training stochastic
depth (`--drop-path` overrides it; the reference's is 0.3) and the released architecture's registers
(`--storage-tokens 0` gives the reference's training ViT-S). The CPU allocator cache of
`geodino.cpu.keep_freed_memory` is on unless `--no-malloc-cache`. Because a shared machine's speed
drifts, the table also gives the step's FLOPs and the machine's fp32 matmul rate measured around the
run; compare step times only between runs made back to back.
The last line is `geodino step: median <s> s, <n> img/s`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

REFERENCE_STEP_S = 4.4


class _SameBatch:
    """Feeds the trainer one pre-built batch forever (isolates the step from data loading)."""

    def __init__(self, batch):
        self.batch = batch

    def iterate(self, start):
        b = start
        while True:
            yield b, self.batch
            b += 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vits16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--prototypes", type=int, default=65536)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--bottleneck", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--drop-path", type=float, default=None,
                    help="student stochastic depth; default: the model config's, as `geodino train model=<arch>` uses")
    ap.add_argument("--storage-tokens", type=int, default=None,
                    help="register tokens; default: the released architecture's (4); the reference's training "
                         "default ViT-S has 0")
    ap.add_argument("--no-malloc-cache", action="store_true",
                    help="leave glibc's allocator at its defaults (geodino.cpu.keep_freed_memory off)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print the N ops with the most self time (torch.profiler, all steps)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc_cache = False
    if args.device == "cpu" and not args.no_malloc_cache:
        from geodino.cpu import keep_freed_memory

        malloc_cache = keep_freed_memory()

    from geodino.cli import compose
    from geodino.data.collate import collate_data_and_cast
    from geodino.data.masking import MaskingGenerator
    from geodino.data.multicrop import MultiCropAugmentation
    from geodino.models import build_backbone, set_stochastic_depth
    from geodino.train.loop import Trainer, TrainSettings
    from geodino.train.ssl import SSLMetaArch

    n = args.prototypes
    cfg = compose("train", [
        f"model={args.arch}",
        f"stage.crops.global_crops_size={args.global_size}", f"stage.crops.local_crops_size={args.local_size}",
        f"stage.crops.local_crops_number={args.n_local}",
        f"stage.dino.head_n_prototypes={n}", f"stage.dino.head_hidden_dim={args.hidden}",
        f"stage.dino.head_bottleneck_dim={args.bottleneck}",
        f"stage.ibot.head_n_prototypes={n}", f"stage.ibot.head_hidden_dim={args.hidden}",
        f"stage.ibot.head_bottleneck_dim={args.bottleneck}",
        f"train.iterations={args.steps + 1}", f"train.batch_size={args.batch}", "train.checkpoint_every=0",
        "progress=false", "optim.warmup_iterations=0", "optim.freeze_last_layer_iterations=0",
    ])
    torch.manual_seed(0)
    arch_kw = {} if args.storage_tokens is None else {"n_storage_tokens": args.storage_tokens}
    backbone = build_backbone(str(cfg.model.name), in_chans=3, **arch_kw)
    drop_path = args.drop_path if args.drop_path is not None else float(cfg.model.get("drop_path_rate") or 0.0)
    set_stochastic_depth(backbone, drop_path)
    meta = SSLMetaArch(backbone, cfg.stage)

    # data: real multi-crop on a synthetic 512² RGB image, timed per sample
    aug = MultiCropAugmentation(args.global_size, args.local_size, args.n_local)
    img = (torch.rand(3, 512, 512) * 255).to(torch.uint8)
    t = time.perf_counter()
    samples = [aug(img, generator=torch.Generator().manual_seed(i)) for i in range(args.batch)]
    side = args.global_size // 16
    batch = collate_data_and_cast(samples, n_tokens=side * side,
                                  mask_generator=MaskingGenerator((side, side), rng=0), random_state=0)
    data_s = time.perf_counter() - t

    gflop = _step_gflop(meta, batch, args.device)
    sgemm_before = _sgemm_gflops(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(meta, _SameBatch(batch), TrainSettings.from_cfg(cfg), tmp, torch.device(args.device))
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                rows = trainer.fit()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
        else:
            rows = trainer.fit()
    sgemm = (sgemm_before + _sgemm_gflops(args.device)) / 2
    rows = rows[1:]  # the first step warms allocators and caches
    keys = ["time_teacher", "time_student_forward", "time_backward", "time_optim", "time_step"]
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    n_img = args.batch
    print(f"{'setting':<22} arch={args.arch} batch={args.batch} global={args.global_size} local={args.local_size}x{args.n_local} "
          f"prototypes={n} threads={args.threads} device={args.device}")
    print(f"{'student':<22} drop_path={drop_path} (sample drop), malloc cache {'on' if malloc_cache else 'off'}, fp32")
    print(f"{'data (multi-crop)':<22} {data_s / args.batch * 1000:8.1f} ms/img (not part of the step)")
    print(f"{'teacher forward + SK':<22} {med['time_teacher']:8.3f} s")
    print(f"{'student forward+loss':<22} {med['time_student_forward']:8.3f} s")
    print(f"{'backward':<22} {med['time_backward']:8.3f} s")
    print(f"{'clip + AdamW + EMA':<22} {med['time_optim']:8.3f} s")
    print(f"{'step (median)':<22} {med['time_step']:8.3f} s  = {med['time_step'] / REFERENCE_STEP_S:.2f}x the reference's {REFERENCE_STEP_S} s")
    print(f"{'step work':<22} {gflop:8.1f} GFLOP (matmul, attention, conv; torch FlopCounterMode)")
    print(f"{'machine sgemm':<22} {sgemm:8.1f} GFLOP/s (2920x384 @ 384x1536, median, before/after mean); "
          f"matmul floor {gflop / sgemm:.2f} s, step = {med['time_step'] / (gflop / sgemm):.2f}x the floor")
    print(f"peak RSS: {_peak_rss_mb():.0f} MiB")
    print(f"geodino step: median {med['time_step']:.3f} s, {n_img / med['time_step']:.2f} img/s")


def _step_gflop(meta, batch, device: str) -> float:
    """FLOPs of one forward_backward (teacher, student, heads, losses, backward) as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = meta.to(device).train()
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        meta.forward_backward(batch, teacher_temp=0.07)
    meta.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def _sgemm_gflops(device: str, reps: int = 9) -> float:
    """This machine's fp32 matmul rate right now, on a shape the ViT-S step uses (a reference point for
    comparing step times measured at different moments on a shared machine)."""
    a = torch.randn(2920, 384, device=device)
    b = torch.randn(384, 1536, device=device)
    times = []
    for _ in range(reps + 2):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * 2920 * 384 * 1536 / statistics.median(times[2:]) / 1e9


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
