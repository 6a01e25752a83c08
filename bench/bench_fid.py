"""
Inception feature throughput (images/s) and peak host memory of fid.py's streaming path.

  python bench/bench_fid.py                          # 1,000 random 256x256 images, batch 50 and 200, CPU (+ GPU)
  python bench/bench_fid.py --n 200 --devices cpu    # a quicker CPU-only run

Each (device, batch size) runs in a fresh process so its peak resident memory is its own. "beyond model" is the
peak minus the resident memory once the network is built: what streaming the .npz and the activations cost.
Throughput does not depend on the weights, so the network is randomly initialised (no download).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fid  # noqa: E402


def rss_mb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def worker(npz, batch_size, device):
    model = fid.InceptionV3().eval().requires_grad_(False).to(device)
    base = rss_mb()
    src = fid.NpzImages(npz)
    warm = next(src.batches(batch_size))  # first call: allocator and kernel selection, not counted
    with torch.no_grad():
        model(torch.from_numpy(warm).to(device).permute(0, 3, 1, 2))
    if device == 'cuda':
        torch.cuda.synchronize()
    t = time.perf_counter()
    pool3, stats, stats_s = fid.extract_features(model, src.batches(batch_size), len(src), progress=False)
    stats.mu_sigma(), stats_s.mu_sigma()
    if device == 'cuda':
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    out = dict(device=device, batch=batch_size, images=len(src), seconds=round(dt, 2),
               img_per_s=round(len(src) / dt, 2), rss_model_mb=round(base), peak_rss_mb=round(peak),
               beyond_model_mb=round(peak - base), threads=torch.get_num_threads())
    if device == 'cuda':
        out['gpu'] = torch.cuda.get_device_name()
        out['gpu_peak_mb'] = round(torch.cuda.max_memory_allocated() / 2**20)
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument('--n', type=int, default=1000, help='images in the benchmark .npz')
    p.add_argument('--size', type=int, default=256, help='image side')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[50, 200])
    p.add_argument('--devices', nargs='+', default=['cpu'] + (['cuda'] if torch.cuda.is_available() else []))
    p.add_argument('--worker', nargs=3, metavar=('NPZ', 'BATCH', 'DEVICE'), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), args.worker[2])
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, 'bench.npz')
        images = np.random.RandomState(0).randint(0, 256, (args.n, args.size, args.size, 3), dtype=np.uint8)
        np.savez(npz, arr_0=images)
        del images
        print(f'{args.n} images {args.size}x{args.size}, {os.path.getsize(npz) / 2**20:.0f} MB npz, '
              f'torch {torch.__version__}, {os.cpu_count()} CPUs')
        for device in args.devices:
            for b in args.batch_sizes:
                subprocess.run([sys.executable, __file__, '--worker', npz, str(b), device], check=True)


if __name__ == '__main__':
    main()
