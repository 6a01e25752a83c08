"""Sampling speed: the sampling loop per step vs the bare model forward calls it makes, measured in the same run.

    python bench/bench_sample.py [--model DiTDH-S] [--batch 2] [--steps 4] [--guidance none|cfg|ag] [--device cpu]
                                 [--precision fp32|bf16] [--decode] [--repeats 5] [--threads N]

Prints ms per forward call, ms per sampling step, the loop overhead (target <= 5%) and images/s for the released
50-point grid (49 steps; + the ViT-XL decoder with --decode). Random weights: speed does not depend on them.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rae  # noqa: E402


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='DiTDH-S')
    ap.add_argument('--batch', type=int, default=2)
    ap.add_argument('--steps', type=int, default=4, help='grid points per timed loop (steps - 1 updates)')
    ap.add_argument('--guidance', default='none', choices=['none', 'cfg', 'ag'])
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'])
    ap.add_argument('--decode', action='store_true', help='also time the ViT-XL decoder')
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--threads', type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = rae.build_dit(args.model).to(device).eval()
    guide = rae.build_dit('DiTDH-S').to(device).eval() if args.guidance == 'ag' else None
    B, alpha = args.batch, rae.shift_alpha((768, 16, 16))
    z, y = torch.randn(B, 768, 16, 16, device=device), torch.randint(0, 1000, (B,), device=device)
    velocity = rae.guided_velocity(model, y, cfg_scale=2.0 if args.guidance == 'cfg' else 1.0,
                                   guide=guide, guide_scale=1.42 if guide is not None else 1.0)
    # the forward calls one step makes, bare: the model on [x; x] for CFG, model + guide for AG
    if args.guidance == 'cfg':
        zz, tt, yy = torch.cat([z, z]), torch.full((2 * B,), 0.5, device=device), torch.cat([y, y])
        bare = lambda: model(zz, tt, yy)  # noqa: E731
    else:
        t = torch.full((B,), 0.5, device=device)
        bare = (lambda: (model(z, t, y), guide(z, t, y))) if guide is not None else (lambda: model(z, t, y))  # noqa
    n = args.steps - 1
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == 'bf16')

    def time_forward():
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            bare()
        sync(device)
        return (time.perf_counter() - t0) / n

    def time_loop():
        sync(device)
        t0 = time.perf_counter()
        rae.sample_ode(velocity, z, args.steps, alpha)
        sync(device)
        return (time.perf_counter() - t0) / n

    fwd, loop = [], []
    with torch.no_grad(), amp:
        time_forward(), time_loop()  # warm-up
        for _ in range(args.repeats):  # interleaved, so that load from other processes hits both alike
            fwd.append(time_forward())
            loop.append(time_loop())
    f, s = min(fwd), min(loop)  # best of the repeats: the least disturbed by other processes
    decode = 0.0
    if args.decode:
        decoder = rae.RAE(None, rae.Decoder()).to(device).eval()
        with torch.no_grad():
            decoder.decode(z)
            sync(device)
            t0 = time.perf_counter()
            decoder.decode(z)
            sync(device)
            decode = time.perf_counter() - t0
    per_image = (49 * s + decode) / B
    print(f'{args.model} guidance={args.guidance} batch={B} device={device} {args.precision} '
          f'threads={torch.get_num_threads()}')
    for what, ms in [('forward calls per step (bare)', fwd), ('sampling loop per step       ', loop)]:
        print(f'  {what}: best {min(ms) * 1000:9.1f} ms  (median {statistics.median(ms) * 1000:.1f}, '
              f'max {max(ms) * 1000:.1f})')
    print(f'  loop overhead: {(s / f - 1) * 100:+.2f}% (best vs best; target <= 5%)')
    if args.decode:
        print(f'  ViT-XL decode: {decode * 1000:.1f} ms per batch')
    print(f'  {1 / per_image:.4f} images/s for 50-point sampling{" + decode" if args.decode else ""} '
          f'({per_image:.1f} s per image)')


if __name__ == '__main__':
    main()
