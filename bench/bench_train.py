"""Speed of the diffusion_train.py training step: ms/step and img/s for fp32 / bf16, eager / compiled, from the latent
cache / from images through the encoder, and the analytic FLOPs per image (so MFU can be read off on a GPU).

    python bench/bench_train.py                                   # DiT^DH-S, batch 8, CPU: all 8 combinations
    python bench/bench_train.py --model DiTDH-XL --batch 128 --device cuda --precisions bf16   # MFU on one GPU

A step is the loop body of diffusion_train.py: latents (memory-mapped cache, or PNGs through ImageFolder and a
random-weight DINOv2-B encoder at 224 px), the per-row draws, forward, backward, clip, AdamW, EMA. Data loading runs
in the step (workers=0), so "images" includes PNG decoding. FLOPs: matmuls and attention counted by
torch.utils.flop_counter on a meta-device copy (forward + backward, the encoder not counted).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffusion_train as dt  # noqa: E402
from rae import ENCODERS, RAE, Encoder, build_dit, flow_loss, shift_alpha, step_draws  # noqa: E402
from runtime import set_tf32  # noqa: E402
from training import ImageFolder, make_ema, update_ema  # noqa: E402

# dense peak TFLOP/s of the tensor cores (fp32 runs as TF32)
PEAK_TFLOPS = {'H100': {'bf16': 989, 'fp32': 495}, 'H200': {'bf16': 989, 'fp32': 495},
               'A100': {'bf16': 312, 'fp32': 156}}


def train_flops_per_image(name, latent_shape, num_classes=1000):
    """Forward + backward FLOPs of one image, counted on a meta-device model (no memory, no compute)."""
    with torch.device('meta'):
        model = build_dit(name, input_size=latent_shape[1], in_channels=latent_shape[0], num_classes=num_classes,
                          class_dropout_prob=0.0)
    model = model.to('meta')  # the sin-cos tables are built on the CPU from numpy
    x = torch.zeros(1, *latent_shape, device='meta')
    with FlopCounterMode(display=False) as counter:
        model(x, torch.zeros(1, device='meta'), torch.zeros(1, dtype=torch.long, device='meta')).sum().backward()
    return counter.get_total_flops()


def make_sources(root, batch, latent_shape, image_size=256):
    """A latent cache (float16) and a folder of random PNGs, two batches each."""
    os.makedirs(os.path.join(root, 'cache'))
    rng = np.random.default_rng(0)
    np.save(os.path.join(root, 'cache', 'latents.npy'), rng.standard_normal((2 * batch, 2, *latent_shape), np.float32)
            .astype(np.float16))
    np.save(os.path.join(root, 'cache', 'labels.npy'), np.zeros(2 * batch, np.int64))
    os.makedirs(os.path.join(root, 'images', 'c0'))
    for i in range(2 * batch):
        Image.fromarray(rng.integers(0, 256, (image_size, image_size * 5 // 4, 3), np.uint8)).save(
            os.path.join(root, 'images', 'c0', f'{i}.png'))
    return dt.LatentCache(os.path.join(root, 'cache')), ImageFolder(os.path.join(root, 'images'), image_size, flip=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='DiTDH-S')
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--precisions', default='fp32,bf16')
    ap.add_argument('--compile', default='0,1', help='0: eager, 1: torch.compile; "0,1" both')
    ap.add_argument('--sources', default='cache,images')
    ap.add_argument('--steps', type=int, default=2, help='timed steps per row')
    ap.add_argument('--warmup', type=int, default=1, help='untimed steps first (compilation happens here)')
    ap.add_argument('--threads', type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cuda = dev.type == 'cuda'
    set_tf32(True)
    latent_shape = (768, 16, 16)  # DINOv2-B at 256 px
    alpha = shift_alpha(latent_shape)
    flops = train_flops_per_image(a.model, latent_shape)
    gpu = torch.cuda.get_device_name(dev) if cuda else 'cpu'
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    print(f'{a.model}, batch {a.batch}, latents {list(latent_shape)}, {gpu}, {a.threads} threads: '
          f'{flops / 1e9:.1f} GFLOP per image per training step (forward + backward)')
    torch.manual_seed(0)
    rae = RAE(Encoder(**ENCODERS['dinov2-b'], name='dinov2-b'), None, None, torch.ones(latent_shape)).to(dev)
    with tempfile.TemporaryDirectory() as tmp:
        sources = dict(zip(('cache', 'images'), make_sources(tmp, a.batch, latent_shape)))
        print(f'{"precision":>9} {"mode":>8} {"source":>7} {"warm-up s":>10} {"ms/step":>9} {"img/s":>8} {"MFU":>6} '
              f'{"speed-up":>9}')
        baseline = None  # ms/step of the first row (fp32 eager from the cache by default)
        for precision in a.precisions.split(','):
            ctx = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == 'bf16')
            for compiled in map(int, a.compile.split(',')):
                torch.manual_seed(0)
                model = build_dit(a.model, input_size=latent_shape[1], in_channels=latent_shape[0],
                                  class_dropout_prob=0.0).to(dev)
                ema = make_ema(model)
                net = torch.compile(model) if compiled else model
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4,
                                        betas=(0.9, 0.95), weight_decay=0, fused=cuda)
                for source in a.sources.split(','):
                    loader = torch.utils.data.DataLoader(sources[source], a.batch, shuffle=False, num_workers=0)
                    it = iter(())
                    step, rows = 0, torch.arange(a.batch)

                    def train_step():
                        nonlocal it, step
                        try:
                            inputs, y = next(it)
                        except StopIteration:
                            it = iter(loader)
                            inputs, y = next(it)
                        inputs = inputs.to(dev, non_blocking=True)
                        x = rae.normalize(inputs) if source == 'cache' else rae.encode(inputs)
                        eps, t, drop = step_draws(0, step, rows, a.batch, latent_shape, 'logit-normal', alpha, 0.1,
                                                     dev)
                        y = torch.where(drop, 1000, y.to(dev))
                        with ctx:
                            loss = flow_loss(net, x, y, alpha, eps=eps, t=t)
                        (loss.sum() / a.batch).backward()
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        update_ema(ema, model, 0.9995)
                        step += 1
                        loss.sum().item()  # waits for the device

                    t0 = time.perf_counter()
                    for _ in range(a.warmup):
                        train_step()
                    t1 = time.perf_counter()
                    for _ in range(a.steps):
                        train_step()
                    ms = (time.perf_counter() - t1) / a.steps * 1000
                    ips = a.batch / ms * 1000
                    mfu = f'{ips * flops / (peak[precision] * 1e12):.1%}' if peak else '-'
                    baseline = baseline or ms
                    print(f'{precision:>9} {"compiled" if compiled else "eager":>8} {source:>7} {t1 - t0:>10.1f} '
                          f'{ms:>9.0f} {ips:>8.2f} {mfu:>6} {baseline / ms:>8.2f}x', flush=True)


if __name__ == '__main__':
    main()
