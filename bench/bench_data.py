"""Images/s of the training data paths per DataLoader worker, and how many workers one GPU needs to keep up.

    python bench/bench_data.py                                      # 256 JPEGs of 500x375, a 512-image latent cache
    python bench/bench_data.py --workers 0,4,8 --mfu 0.45 --peak-tflops 989   # on the GPU machine: its own CPUs
    python bench/bench_data.py --images 8 --items 32 --latents 8 --workers 0,1 --batch 4   # a smoke run, seconds

Writes its own data into a temporary folder (--dir: put it on the disk the training data lives on):
  - --images JPEGs of --size (500x375, the most common ImageNet size): smooth random colour fields with noise, at
    quality 90; their mean file size is printed next to ImageNet train's (~110 KB: decode time grows with it)
  - a latent cache in diffusion_train.py's format (latents.npy [N, 2, 768, 16, 16] float16 + labels.npy)

Prints one row per data path and worker count: img/s, img/s per worker and MB/s read from the files.
  decode               files.open_rgb alone (JPEG decode to RGB)
  centre crop + flip   training.ImageFolder(crop='center', flip=True): diffusion_train.py reading images
  random crop          training.ImageFolder(crop='random'): decoder_train.py (stage 1 uses no flips)
  latent cache         diffusion_train.LatentCache, warm (from the page cache) and cold (the file evicted first
                       with posix_fadvise(DONTNEED), each latent read once: from the disk, unless the disk is a
                       RAM disk or a virtual one the host caches)
workers 0 is the main process alone (one worker's work without the hand-over); N > 0 is a DataLoader with N worker
processes, batches of --batch (pinned when CUDA is there, as training.make_loader), timed from the first batch on.
--items items are read per row, in shuffled passes over the files (a pass is an epoch: the flips change).

Then the demand: --model's training step at --mfu of --peak-tflops (FLOPs per image counted as bench_train.py
counts them: with the DINOv2-B forward when reading images, without from the cache) gives the img/s one GPU eats,
and the workers per GPU each path needs at the per-worker rate of the workers-0 row (more workers on the same cores
do not go faster: compare the N > 0 rows against it).
"""
import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402
from diffusion_train import LatentCache  # noqa: E402
from files import open_rgb  # noqa: E402
from rae import ENCODERS, Encoder  # noqa: E402
from training import ImageFolder  # noqa: E402


class DecodeOnly(torch.utils.data.Dataset):
    """The JPEG decode of ImageFolder's files alone: uint8 [H, W, 3] tensors."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        i = item[0] if isinstance(item, tuple) else item
        return torch.from_numpy(np.asarray(open_rgb(self.files[i])).copy())


def write_jpegs(folder, n, size, seed=0):
    """n JPEGs of size (w, h) in folder/c0: a 32x24 random colour grid, bicubic-upsampled, plus N(0, 22^2) noise,
    quality 90 (~110 KB at 500x375, like ImageNet's mean). Returns the mean file size in bytes."""
    os.makedirs(os.path.join(folder, 'c0'))
    rng, total = np.random.default_rng(seed), 0
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        noisy = np.asarray(field, dtype=np.float32) + rng.normal(0, 22, (size[1], size[0], 3))
        path = os.path.join(folder, 'c0', f'{i:06d}.JPEG')
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        total += os.path.getsize(path)
    return total / n


def write_latents(folder, n, latent_shape, seed=0):
    """A latent cache of n images as diffusion_train.py --mode=cache writes it (float16, each image and its mirror)."""
    os.makedirs(folder)
    z = np.lib.format.open_memmap(os.path.join(folder, 'latents.npy'), mode='w+', dtype=np.float16,
                                  shape=(n, 2, *latent_shape))
    rng = np.random.default_rng(seed)
    for i in range(n):
        z[i] = rng.standard_normal((2, *latent_shape), np.float32)
    z.flush()
    del z
    np.save(os.path.join(folder, 'labels.npy'), np.zeros(n, np.int64))


def evict(path):
    """Drop a file's pages from the page cache (written back first): the next reads come from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def rate(dataset, workers, batch, items, before=None):
    """Items/s of a DataLoader over `items` (index, epoch) pairs, a shuffled pass over the dataset per epoch (as
    training reads: random order defeats the disk's read-ahead), from its first batch on."""
    rng, n = np.random.default_rng(0), len(dataset)
    order = [(int(i), e) for e in range(math.ceil(items / n)) for i in rng.permutation(n)][:items]
    if before:
        before()
    loader = torch.utils.data.DataLoader(dataset, batch, sampler=order, num_workers=workers,
                                         pin_memory=torch.cuda.is_available())
    it = iter(loader)
    next(it)  # the workers' start-up is not the data path's speed
    t0, n = time.perf_counter(), 0
    for b in it:
        n += len(b[0]) if isinstance(b, (list, tuple)) else len(b)
    return n / max(time.perf_counter() - t0, 1e-9)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--images', type=int, default=256, help='JPEG files written')
    ap.add_argument('--size', type=int, nargs=2, default=(500, 375), metavar=('W', 'H'))
    ap.add_argument('--image-size', type=int, default=256, help='training crop')
    ap.add_argument('--latents', type=int, default=512, help='images in the latent cache (786 KB each)')
    ap.add_argument('--items', type=int, default=1024, help='items read per row')
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--workers', default='0,2', help='comma-separated DataLoader worker counts (0 is always run)')
    ap.add_argument('--model', default='DiTDH-XL', help='the DiT whose step rate sets the demand')
    ap.add_argument('--mfu', type=float, default=0.45, help='model FLOPs utilisation assumed for the demand')
    ap.add_argument('--peak-tflops', type=float, default=989.0, help='the GPU peak (default: H100/H200 SXM bf16)')
    ap.add_argument('--gpus', type=int, default=8, help='GPUs per machine, for the total number of cores needed')
    ap.add_argument('--dir', default=None, help='where the temporary data goes (default: the system temp dir)')
    a = ap.parse_args()
    torch.set_num_threads(1)  # a data worker is one thread; the main process here is one worker
    workers = sorted({0, *map(int, a.workers.split(','))})
    latent_shape = bench_train.LATENT_SHAPE
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    print(f'{cores} CPU cores usable here, torch {torch.__version__}, {a.items} items a row, batch {a.batch}')
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        jpeg_bytes = write_jpegs(os.path.join(tmp, 'images'), a.images, tuple(a.size))
        write_latents(os.path.join(tmp, 'cache'), a.latents, latent_shape)
        latent_file = os.path.join(tmp, 'cache', 'latents.npy')
        latent_bytes = 2 * math.prod(latent_shape)  # one view (image or mirror) of float16 is read an item
        print(f'{a.images} JPEGs {a.size[0]}x{a.size[1]}, mean {jpeg_bytes / 1e3:.0f} KB (ImageNet train: ~110 KB); '
              f'latent cache of {a.latents} images, {latent_bytes / 1e3:.0f} KB read an item')
        folder = os.path.join(tmp, 'images')
        paths = {'decode': (DecodeOnly(ImageFolder(folder, a.image_size).files), jpeg_bytes, None),
                 'centre crop + flip': (ImageFolder(folder, a.image_size, 'center', flip=True), jpeg_bytes, None),
                 'random crop': (ImageFolder(folder, a.image_size, 'random'), jpeg_bytes, None),
                 'latent cache warm': (LatentCache(os.path.join(tmp, 'cache')), latent_bytes, None),
                 'latent cache cold': (LatentCache(os.path.join(tmp, 'cache')), latent_bytes,
                                       lambda: evict(latent_file))}
        print(f'{"data path":>20} {"workers":>7} {"img/s":>9} {"per worker":>10} {"MB/s":>8}')
        per_worker = {}
        for name, (data, nbytes, before) in paths.items():
            for w in workers:
                r = rate(data, w, a.batch, min(a.items, len(data)) if before else a.items, before)
                per_worker.setdefault(name, r)  # workers 0: one process doing one worker's work
                print(f'{name:>20} {w:>7} {r:>9.1f} {r / max(w, 1):>10.1f} {r * nbytes / 1e6:>8.1f}', flush=True)

    with torch.device('meta'):
        encoder = Encoder(**ENCODERS['dinov2-b'], name='dinov2-b')
    dit = bench_train.meta_dit(a.model, latent_shape)
    flops = {'cache': bench_train.step_flops(dit, latent_shape),
             'images': bench_train.step_flops(dit, latent_shape, encoder, a.image_size)}
    demand = {k: a.mfu * a.peak_tflops * 1e12 / v for k, v in flops.items()}
    print(f'{a.model} at {a.mfu:.0%} MFU of {a.peak_tflops:g} TFLOP/s: {flops["images"] / 1e9:.0f} GFLOP an image '
          f'from images -> {demand["images"]:.0f} img/s per GPU; {flops["cache"] / 1e9:.0f} GFLOP from the cache '
          f'-> {demand["cache"]:.0f} img/s per GPU')
    for name, source in [('centre crop + flip', 'images'), ('latent cache warm', 'cache'),
                         ('latent cache cold', 'cache')]:
        need = math.ceil(demand[source] / per_worker[name])
        print(f'  {name}: {demand[source]:.0f} img/s / {per_worker[name]:.1f} img/s a worker -> {need} '
              f'worker{"s" if need > 1 else ""} per GPU ({need * a.gpus} cores for {a.gpus} GPUs; {cores} here)')


if __name__ == '__main__':
    main()
