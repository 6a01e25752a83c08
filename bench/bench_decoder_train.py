"""Decoder-training step time on the CPU for a small decoder, fp32 and bf16 autocast, and where the step goes.

    python bench/bench_decoder_train.py [--image-size 128] [--batch 2] [--iters 5] [--threads 1] [--disc-input 112]
                                        [--precisions fp32,bf16]

One step = what decoder_train.py runs once the GAN loss is on: generator_step (encode with latent noise, decode,
L1 + LPIPS + lambda-weighted GAN loss, backward, AdamW), the EMA update and discriminator_step (a fresh eval-mode
reconstruction, two discriminator forwards, backward, AdamW). All networks have random weights and the published
widths: DINOv2-B encoder, LPIPS on the full VGG16, DINO ViT-S/8 discriminator backbone; the decoder is small
(--width, --depth). The discriminator resizes to 224 px in training; --disc-input lowers that to keep CPU runs short.

The shares come from timing each part alone, as the step uses it: the frozen encoder (2 forwards: G and D step), the
decoder (forward + backward + AdamW, a no-grad forward, the EMA), LPIPS (forward + one backward to its input), the
discriminator (G step: forward + one backward to its input; D step: 2 forwards, backward, AdamW); "other" is the
step minus their sum (L1, lambda's last-layer gradients and norms, DiffAug, 8-bit rounding, Python).
"""
import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decoder_train as dt  # noqa: E402
import rae  # noqa: E402
from training import update_ema, make_ema  # noqa: E402


def timed(fns, iters):
    """{name: median ms} with the functions run in turn, round after round (a busy machine drifts)."""
    times = {name: [] for name in fns}
    for i in range(iters + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i:  # the first round warms up
                times[name].append((time.perf_counter() - t0) * 1000)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--image-size', type=int, default=128, help='training crop (decoder patch 16: (size/16)^2 tokens)')
    ap.add_argument('--batch', type=int, default=2)
    ap.add_argument('--width', type=int, default=384, help='decoder width (heads = width / 64, MLP 4x)')
    ap.add_argument('--depth', type=int, default=6, help='decoder blocks')
    ap.add_argument('--disc-input', type=int, default=112, help='discriminator input size (training: 224)')
    ap.add_argument('--iters', type=int, default=5, help='rounds timed (medians), after one warm-up round')
    ap.add_argument('--threads', type=int, default=1, help='1: steady figures on a shared machine')
    ap.add_argument('--precisions', default='fp32,bf16', help='bf16 autocast is emulated (slow) on CPUs without it')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    grid = args.image_size // 16
    enc = rae.Encoder(**dict(rae.ENCODERS['dinov2-b'], input_size=grid * 14)).eval()
    enc.check_inputs = False  # as decoder_train.py trains: no range check (a host sync) in the step
    dec = rae.Decoder(768, args.width, args.depth, args.width // 64, 4 * args.width, grid=grid, patch=16)
    model = rae.RAE(enc, dec, noise_tau=0.8).train()
    lpips = dt.LPIPS()
    disc = dt.Discriminator(rae.Encoder(**dict(rae.ENCODERS['dino-s8'], input_size=args.disc_input)))
    ema = make_ema(dec)
    opt = torch.optim.AdamW(dec.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size)
    print(f'decoder {sum(p.numel() for p in dec.parameters()) / 1e6:.1f}M ({args.width} wide, {args.depth} blocks) '
          f'on {grid}x{grid} DINOv2-B tokens, {args.image_size} px, batch {args.batch}, discriminator at '
          f'{args.disc_input} px, {args.threads} threads')

    for precision in args.precisions.split(','):
        ctx = torch.autocast('cpu', dtype=torch.bfloat16) if precision == 'bf16' else nullcontext()

        def step():
            dt.generator_step(model, lpips, disc, opt, x, True, ctx)
            update_ema(ema, dec, 0.9978)
            dt.discriminator_step(model, disc, opt_d, x, ctx)

        def encoder():
            with ctx:
                model.encode(x), model.eval().encode(x)
            model.train()

        z = model.encode(x)

        def decoder():
            with ctx:
                out = model.decode(z)
            out.float().sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad(), ctx:
                model.decode(z)
            update_ema(ema, dec, 0.9978)

        recon = x.clone().requires_grad_(True)

        def perceptual():
            with ctx:
                d = lpips(x * 2 - 1, recon * 2 - 1).mean()
            torch.autograd.grad(d, recon)

        def discriminator():
            disc.eval().requires_grad_(False)
            with ctx:
                g = dt.generator_loss(disc(dt.diffaug(recon * 2 - 1)))
            torch.autograd.grad(g, recon)
            disc.train().requires_grad_(True)
            with ctx:
                loss = dt.discriminator_loss(disc(dt.diffaug(x * 2 - 1)), disc(dt.diffaug(x * 2 - 1)))
            loss.backward()
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)

        parts = timed({'step': step, 'encoder': encoder, 'decoder': decoder, 'LPIPS': perceptual,
                       'discriminator': discriminator}, args.iters)
        total = parts.pop('step')
        parts['other'] = total - sum(parts.values())
        print(f'{precision}: {total:.0f} ms/step ({args.batch * 1000 / total:.1f} img/s); '
              + ', '.join(f'{k} {v:.0f} ms ({100 * v / total:.0f}%)' for k, v in parts.items()))


if __name__ == '__main__':
    main()
