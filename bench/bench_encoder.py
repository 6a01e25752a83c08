"""Encoder forward time: our hand-written ViT vs the transformers model with the same (random) weights.

    python bench/bench_encoder.py [--encoder dinov2-b] [--batch 8] [--iters 5] [--threads 2]

Prints ms per batch for both and the ratio transformers/ours (> 1.0 means ours is faster). Needs transformers.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rae  # noqa: E402


def hf_model(name):
    import transformers as T
    c = rae.ENCODERS[name]
    common = dict(hidden_size=c['width'], num_hidden_layers=c['depth'], num_attention_heads=c['heads'],
                  intermediate_size=4 * c['width'], patch_size=c['patch'])
    if name.startswith('dinov2'):
        return T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**common, image_size=518))
    if name == 'siglip2-b':
        return T.SiglipVisionModel(T.SiglipVisionConfig(**common, image_size=256))
    if name == 'mae-b':
        return T.ViTMAEModel(T.ViTMAEConfig(**common, image_size=224, mask_ratio=0.0))
    raise SystemExit(f'no transformers counterpart for {name}')


def timed(fn, iters):
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--encoder', default='dinov2-b', choices=['dinov2-s', 'dinov2-b', 'dinov2-l', 'siglip2-b', 'mae-b'])
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--iters', type=int, default=5)
    ap.add_argument('--threads', type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = hf_model(args.encoder).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = rae.Encoder.from_pretrained(args.encoder, weights=d)
    size = ours.input_size
    x = torch.rand(args.batch, 3, size, size)  # already at the encoder's input size: no resize in either
    pixels = (x - ours.mean) / ours.std
    kw = {}
    if args.encoder == 'mae-b':  # MAE's random masking off: a fixed token order, no tokens dropped
        kw = dict(noise=torch.arange((size // ours.patch) ** 2).float().expand(args.batch, -1),
                  interpolate_pos_encoding=True)
    with torch.inference_mode():
        t_ours = timed(lambda: ours(x), args.iters)
        t_ref = timed(lambda: ref(pixel_values=pixels, **kw), args.iters)
    print(f'{args.encoder} batch {args.batch} at {size}px, {args.threads} threads: ours {t_ours:.0f} ms, '
          f'transformers {t_ref:.0f} ms, ratio {t_ref / t_ours:.2f}x')


if __name__ == '__main__':
    main()
