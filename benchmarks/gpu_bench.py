"""GPU speed of the fused ops at the ViT-B/256 shapes vs their references (run by gpu_check.sh).

Prints, per op and backend: median time (CUDA events; wall clock on a CPU), speedup vs the
reference, achieved bandwidth (minimum bytes the op must move / time) and its fraction of the
measured device-to-device copy bandwidth. ``--device cpu`` runs the same code on the CPU
(the rehearsal of the GPU check, at tiny shapes).
"""
import argparse
import statistics
import time

import torch

from addp import ops


ITERS = 50


def time_ms(fn, iters=None, warmup=5):
    iters = iters or ITERS
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(device, nbytes):
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), iters=min(20, ITERS))
    return 2 * nbytes / ms / 1e6  # GB/s: read + write


def available(op, backend, x):
    return ops.backends(x.device, backend)[op] == backend


def bench(name, op, make_call, nbytes, x, copy_gbs):
    ref_ms = time_ms(make_call("reference"))
    print(f"{name}: reference {ref_ms:.3f} ms")
    for backend in ("cpu", "triton", "cuda"):
        if not available(op, backend, x):
            print(f"{name}: {backend} unavailable")
            continue
        ms = time_ms(make_call(backend))
        gbs = nbytes / ms / 1e6
        print(f"{name}: {backend} {ms:.3f} ms  speedup {ref_ms / ms:.2f}x  "
              f"{gbs:.0f} GB/s = {gbs / copy_gbs:.2f} of copy bandwidth")


def main(args):
    global ITERS
    B, L, K, D, dev = args.B, args.L, args.K, args.D, args.device
    V, ITERS = K + 2, args.iters
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth(dev, 2 << 30 if dev == "cuda" else 64 << 20)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"device {name}; copy bandwidth {copy_gbs:.0f} GB/s; B={B} L={L} K={K} D={D} V={V}")
    for dtype in (torch.float32, torch.bfloat16):
        es = torch.tensor([], dtype=dtype).element_size()
        logits = (torch.randn(B, L, V, device=dev) * 3).to(dtype)
        codebook = torch.randn(K, D, device=dev).to(dtype)
        ids = torch.randint(0, K, (B, L), device=dev)
        mask = torch.rand(B, L, device=dev) < 0.5
        tag = str(dtype).replace("torch.", "")

        def ws(backend):
            return lambda: ops.codebook_weighted_sum(logits[..., :K], codebook, ids, mask, 1.0, backend=backend)
        bench(f"codebook_weighted_sum {tag}", "codebook_weighted_sum", ws,
              B * L * K * es + K * D * es + B * L * D * es, logits, copy_gbs)

        u1 = torch.rand(B, L, K, device=dev)
        u2 = torch.rand(B, L, device=dev, dtype=torch.float64)
        mask_len = torch.tensor(L // 3, device=dev)

        def gt(backend):
            fused = torch.ops.addp.gumbel_topk_unmask  # the dispatcher: Triton on CUDA, C++ on a CPU
            fn = {"reference": ops.gumbel_topk_unmask_reference, "triton": fused, "cpu": fused,
                  "cuda": torch.ops.addp.gumbel_topk_unmask_cuda}[backend]
            return lambda: fn(logits[..., :K], u1, u2, ids, mask, mask_len, 3.0, None)
        bench(f"gumbel_topk_unmask (noise given) {tag}", "gumbel_topk_unmask", gt,
              mask.float().mean().item() * B * L * K * (es + 4) + B * L * 26, logits, copy_gbs)

        target = torch.softmax(torch.randn(B, L, K, device=dev), -1)
        x = logits.detach().requires_grad_(True)

        def ce(backend):
            def step():
                loss = ops.soft_target_cross_entropy(x, target, mask, 0.1, backend=backend)
                return torch.autograd.grad(loss, x)
            return step
        # forward reads logits + target of masked rows; backward reads them again, writes dlogits
        frac = mask.float().mean().item()
        bench(f"soft_target_cross_entropy fwd+bwd {tag}", "soft_target_cross_entropy", ce,
              frac * 2 * B * L * (V * es + K * 4) + B * L * V * es, logits, copy_gbs)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--L", type=int, default=256)
    p.add_argument("--K", type=int, default=1024)
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--iters", type=int, default=50, help="timed calls per op and backend (median)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    main(p.parse_args())
