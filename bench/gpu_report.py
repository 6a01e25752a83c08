"""One markdown table of what one CUDA GPU does with this project's workloads, in under ten minutes.

    python bench/gpu_report.py                          # on a CUDA machine: every row, under 10 min (--budget-s)
    python bench/gpu_report.py --only train,fid         # some sections: train, checkpoint, decoder, sample, fid
    python bench/gpu_report.py --tiny                   # tiny models, 1-2 steps, CPU or GPU: a smoke test of the script
    python bench/gpu_report.py --tiny --no-compile      # the same without torch.compile (seconds on a CPU)

Without CUDA and without --tiny it exits with one line. Every network has random weights and nothing is downloaded:
throughput does not depend on the weights. Rows (the table goes to stdout, progress to stderr):
  train       DiT^DH-XL training step as diffusion_train.py runs it (step_draws, bf16 autocast flow_loss, backward,
              clip, fused AdamW, EMA), torch.compile, per-GPU batch 64 and 128: from the latent cache (the step starts
              at latents) and from images (the frozen DINOv2-B encoder runs in the step, fp32 as in training). Inputs
              are random tensors already on the GPU: bench/bench_data.py measures the loader.
  checkpoint  the same with activation checkpointing (cache rows): skipped, saying so, while rae's DiTs take no
              grad_checkpoint option (it is detected, never emulated here)
  decoder     decoder-XL training step as decoder_train.py runs it once the GAN loss is on (generator_step, EMA,
              discriminator_step; DINOv2-B encoder, LPIPS-VGG16, DINO ViT-S/8 discriminator), bf16, compiled as
              decoder_train.py compiles it, batch 64 (the recipe's 512 over 8 GPUs)
  sample      the 50-point Euler grid (49 updates) of DiT^DH-XL with AutoGuidance (DiT^DH-S guide, w = 1.42) and
              with CFG (w = 1.5) on its interval t <= 0.7 (README's example), bf16 autocast, compiled and eager, then
              the ViT-XL decoder in fp32 and 8-bit images on the host (as sample.py): images/s
  fid         Inception-v3 features for FID (fid.extract_features on uint8 256 px batches of 200, exact fp32 as
              fid.py runs it, host-to-device copies included)
Columns: img/s; TFLOP/s = FLOPs per image (torch.utils.flop_counter: DiT steps as bench/bench_train.py counts them,
the other rows counted on one eager call at batch 2) x img/s; MFU = TFLOP/s / the peak (bf16 dense datasheet peak by
device name as bench_train.py, --peak-tflops overrides; the fid row: a torch.mm in exact fp32, measured); peak memory
= torch.cuda.max_memory_allocated over the row (weights, optimizer states, activations); warm-up s: the untimed
first calls, compilation included. A row that does not fit in memory says OOM.
"""
import argparse
import datetime
import gc
import inspect
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402
import decoder_train  # noqa: E402
import fid  # noqa: E402
import rae  # noqa: E402
from files import to_uint8  # noqa: E402
from runtime import set_tf32  # noqa: E402
from training import make_ema, update_ema  # noqa: E402

SECTIONS = ('train', 'checkpoint', 'decoder', 'sample', 'fid')
FULL = dict(label='DiT^DH-XL', decoder_label='decoder-XL', dit=('DiTDH-XL', {}), guide=('DiTDH-S', {}),
            latent_shape=(768, 16, 16), image_size=256,
            encoder=dict(rae.ENCODERS['dinov2-b'], name='dinov2-b'),
            decoder=dict(token_dim=768, **rae.DECODERS['XL'], grid=16, patch=16),
            disc=dict(rae.ENCODERS['dino-s8'], name='dino-s8'), disc_key_depths=(2, 5, 8, 11), lpips={},
            train_batches=(64, 128), decoder_batch=64, sample_batch=128, fid_batch=200, fid_batches=5,
            steps=10, warmup=3, decoder_steps=5, decoder_warmup=2)
# tiny: 4 x 4 latents of 32 channels from 64 px images (a 2-block width-32 encoder at 56 px), a 32 px decoder
TINY = dict(label='tiny DiT^DH', decoder_label='tiny decoder',
            dit=('DiTDH', dict(hidden_size=(32, 64), depth=(2, 1), num_heads=(2, 2))),
            guide=('DiTDH', dict(hidden_size=(16, 64), depth=(1, 1), num_heads=(1, 2))), latent_shape=(32, 4, 4),
            image_size=64, encoder=dict(rae.ENCODERS['dinov2-b'], name='dinov2-b', width=32, depth=2, heads=2,
                                        pos_grid=4, input_size=56),
            decoder=dict(token_dim=32, width=64, depth=2, heads=1, mlp_hidden=128, grid=4, patch=8),
            disc=dict(rae.ENCODERS['dino-s8'], name='dino-s8', width=32, depth=4, heads=2, pos_grid=4, input_size=32),
            disc_key_depths=(1, 3), lpips=dict(widths=(8, 16, 16, 32, 32)),
            train_batches=(2, 4), decoder_batch=2, sample_batch=2, fid_batch=2, fid_batches=1,
            steps=1, warmup=1, decoder_steps=1, decoder_warmup=1)


class Skipped(Exception):
    """A row that cannot run here, with the reason."""


def sync(dev):
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)


def timed(fn, warmup, steps, dev):
    """(seconds of the warm-up calls, seconds per timed call)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(dev)
    t1 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(dev)
    return t1 - t0, (time.perf_counter() - t1) / steps


def counted_flops(fn):
    """FLOPs of one call of fn (matmuls, convolutions, attention), as torch.utils.flop_counter counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def new_dit(c, dev, which='dit', checkpoint=False):
    """A random-weight DiT of config c, built on dev. checkpoint=True asks for activation checkpointing: through a
    grad_checkpoint keyword of build_dit / the DiT class or a grad_checkpoint attribute of the model; Skipped when
    neither exists."""
    name, kwargs = c[which]
    kwargs = dict(kwargs, input_size=c['latent_shape'][1], in_channels=c['latent_shape'][0], class_dropout_prob=0.0)
    cls = rae.DiTDH if name.startswith('DiTDH') else rae.LightningDiT
    takes = any('grad_checkpoint' in inspect.signature(f).parameters for f in (rae.build_dit, cls.__init__))
    if checkpoint and takes:
        kwargs['grad_checkpoint'] = True
    with torch.device(dev):
        model = rae.build_dit(name, **kwargs).to(dev)  # .to: the sin-cos tables are built on the CPU
    if checkpoint and not takes:
        if not hasattr(model, 'grad_checkpoint'):
            raise Skipped(f'rae.{cls.__name__} has no grad_checkpoint option yet (issue 14, item 4)')
        model.grad_checkpoint = True
    return model


def dit_train(c, dev, batch, source, compiled, peak, checkpoint=False):
    """diffusion_train.py's step on random inputs already on the device."""
    torch.manual_seed(0)
    latent_shape, cuda = c['latent_shape'], dev.type == 'cuda'
    model = new_dit(c, dev, checkpoint=checkpoint)
    ema = make_ema(model)
    net = torch.compile(model, dynamic=False) if compiled else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, betas=(0.9, 0.95),
                            weight_decay=0, fused=cuda)
    encoder = rae.Encoder(**c['encoder']) if source == 'images' else None
    autoencoder = rae.RAE(encoder, None, None, torch.ones(latent_shape)).to(dev)
    if encoder is not None:
        encoder.check_inputs = False  # as diffusion_train.py: no range check (a host sync) in the step
        inputs = torch.rand(batch, 3, c['image_size'], c['image_size'], device=dev)
    else:
        inputs = torch.randn(batch, *latent_shape, device=dev)
    labels = torch.randint(0, model.num_classes, (batch,), device=dev)
    alpha, rows, step = rae.shift_alpha(latent_shape), torch.arange(batch), [0]

    def train_step():
        x = (autoencoder.normalize(inputs) if encoder is None else autoencoder.encode(inputs)).contiguous()
        eps, t, drop = rae.step_draws(0, step[0], rows, batch, latent_shape, 'logit-normal', alpha, 0.1, dev)
        y = torch.where(drop, model.num_classes, labels)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = rae.flow_loss(net, x, y, alpha, eps=eps, t=t)
        (loss.sum() / batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.9995)
        step[0] += 1

    warm, seconds = timed(train_step, c['warmup'], c['steps'], dev)
    flops = bench_train.step_flops(model, latent_shape, encoder, c['image_size'])
    return dict(img_s=batch / seconds, flops=flops, peak=peak, warm=warm)


def decoder_train_row(c, dev, batch, compiled, peak):
    """decoder_train.py's step once the GAN loss is on: generator_step, the EMA, discriminator_step."""
    torch.manual_seed(0)
    cuda = dev.type == 'cuda'
    encoder = rae.Encoder(**c['encoder'])
    encoder.check_inputs = False
    decoder = rae.Decoder(**c['decoder'])
    autoencoder = rae.RAE(encoder, decoder, noise_tau=0.8).to(dev)
    ema = make_ema(decoder)
    lpips = decoder_train.LPIPS(**c['lpips']).to(dev)
    disc = decoder_train.Discriminator(rae.Encoder(**c['disc']), c['disc_key_depths']).to(dev)
    opt = torch.optim.AdamW(decoder.parameters(), 2e-4, (0.9, 0.95), weight_decay=0, fused=cuda)
    opt_d = torch.optim.AdamW(disc.parameters(), 2e-4, (0.9, 0.95), weight_decay=0, fused=cuda)
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16)
    size = c['decoder']['grid'] * c['decoder']['patch']
    images = torch.rand(batch, 3, size, size, device=dev)

    def step(model, perceptual, x):
        decoder_train.generator_step(model, perceptual, disc, opt, x, True, ctx)
        update_ema(ema, decoder, 0.9978)
        decoder_train.discriminator_step(model, disc, opt_d, x, ctx)

    flops = counted_flops(lambda: step(autoencoder, lpips, images[:2])) / 2  # eager, before compiling
    donated = torch._functorch.config.donated_buffer
    try:
        if compiled:  # as decoder_train.py compiles
            torch._functorch.config.donated_buffer = False  # lambda backpropagates the graph thrice
            autoencoder, lpips = torch.compile(autoencoder), torch.compile(lpips)
            for block in disc.dino.blocks:
                block.compile()
        warm, seconds = timed(lambda: step(autoencoder, lpips, images), c['decoder_warmup'], c['decoder_steps'],
                              dev)
    finally:
        torch._functorch.config.donated_buffer = donated
    return dict(img_s=batch / seconds, flops=flops, peak=peak, warm=warm)


def sampling(c, dev, batch, guidance, compiled, peak, num_steps=50):
    """sample.py's batch: guided Euler ODE under bf16 autocast, the decoder in fp32, uint8 images on the host."""
    torch.manual_seed(0)
    latent_shape = c['latent_shape']
    model = new_dit(c, dev).eval().requires_grad_(False)
    guide = new_dit(c, dev, 'guide').eval().requires_grad_(False) if guidance == 'autoguidance' else None
    autoencoder = rae.RAE(None, rae.Decoder(**c['decoder']), None, torch.ones(latent_shape)).to(dev).eval()
    alpha = rae.shift_alpha(latent_shape)
    labels = torch.randint(0, model.num_classes, (batch,), device=dev)
    kwargs = dict(guide_scale=1.42) if guide is not None else dict(cfg_scale=1.5, cfg_interval=(0.0, 0.7))

    @torch.no_grad()
    def run(net, guide_net, n):
        velocity = rae.guided_velocity(net, labels[:n], guide=guide_net, **kwargs)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            x = rae.sample_ode(velocity, torch.randn(n, *latent_shape, device=dev), num_steps, alpha)
        return to_uint8(autoencoder.decode(x.float())).cpu()

    flops = counted_flops(lambda: run(model, guide, 2)) / 2
    net, guide_net = model, guide
    if compiled:
        net = torch.compile(model, dynamic=False)
        guide_net = torch.compile(guide, dynamic=False) if guide is not None else None
    warm, seconds = timed(lambda: run(net, guide_net, batch), 1, 1, dev)  # CFG compiles two shapes: B and 2B
    return dict(img_s=batch / seconds, flops=flops, peak=peak, warm=warm)


def inception(c, dev, batch, batches):
    """fid.py's feature extraction: uint8 NHWC batches from the host, pool3 and sFID statistics accumulated."""
    model = fid.InceptionV3().eval().requires_grad_(False).to(dev)
    images = torch.randint(0, 256, (batch, c['image_size'], c['image_size'], 3), dtype=torch.uint8).numpy()
    with torch.no_grad():
        flops = counted_flops(lambda: model(torch.from_numpy(images[:2]).to(dev).permute(0, 3, 1, 2))) / 2
    with fid.exact_fp32():
        peak = bench_train.matmul_tflops(dev, torch.float32, 4096 if dev.type == 'cuda' else 1024)
    warm, seconds = timed(lambda: fid.extract_features(model, [images] * batches, progress=False), 1, 1, dev)
    return dict(img_s=batch * batches / seconds, flops=flops, peak=peak, warm=warm,
                note='MFU against a measured exact-fp32 torch.mm')


def plan(c, a, dev, peak):
    """[(section, workload, batch, mode, thunk)] in the order they run (the most wanted first)."""
    modes = [False] if a.no_compile else [True]  # training rows: compiled (sampling adds eager rows below)
    rows = []
    for compiled in modes:
        mode = 'compiled' if compiled else 'eager'
        for batch in c['train_batches']:
            for source, what in [('cache', 'the latent cache'), ('images', 'images (encoder in the step)')]:
                rows.append(('train', f'{c["label"]} training step, bf16, from {what}', batch, mode,
                             lambda b=batch, s=source, m=compiled: dit_train(c, dev, b, s, m, peak)))
        for batch in c['train_batches']:
            rows.append(('checkpoint', f'{c["label"]} training step, bf16, latent cache, activation checkpointing',
                         batch, mode, lambda b=batch, m=compiled: dit_train(c, dev, b, 'cache', m, peak, True)))
    rows.append(('fid', 'Inception-v3 features for FID (exact fp32)', c['fid_batch'], 'eager',
                 lambda: inception(c, dev, c['fid_batch'], c['fid_batches'])))
    for compiled in modes:
        rows.append(('decoder', f'{c["decoder_label"]} training step (GAN phase), bf16', c['decoder_batch'],
                     'compiled' if compiled else 'eager',
                     lambda m=compiled: decoder_train_row(c, dev, c['decoder_batch'], m, peak)))
    for guidance, what in [('autoguidance', 'AutoGuidance w 1.42'), ('cfg', 'CFG w 1.5 on t <= 0.7')]:
        for compiled in modes + ([False] if not a.no_compile else []):
            rows.append(('sample', f'{c["label"]} sampling, 50-point Euler grid, {what}, + decoder',
                         c['sample_batch'], 'compiled' if compiled else 'eager',
                         lambda g=guidance, m=compiled: sampling(c, dev, c['sample_batch'], g, m, peak)))
    return [r for r in rows if r[0] in a.only]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--tiny', action='store_true', help='tiny models, 1-2 steps: a smoke test (CPU or GPU)')
    ap.add_argument('--device', default=None, help='default: cuda when available, else cpu (only with --tiny)')
    ap.add_argument('--only', default=','.join(SECTIONS), help=f'comma-separated sections of {", ".join(SECTIONS)}')
    ap.add_argument('--no-compile', action='store_true', help='every row eager (the compiled rows are left out)')
    ap.add_argument('--peak-tflops', type=float, default=None, help='bf16 peak for MFU (default: by device name)')
    ap.add_argument('--budget-s', type=float, default=450, help='rows not started by then are skipped (seconds)')
    a = ap.parse_args()
    a.only = set(a.only.split(','))
    if not a.only <= set(SECTIONS):
        raise SystemExit(f'--only {",".join(sorted(a.only))}: choose from {", ".join(SECTIONS)}')
    dev = torch.device(a.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if dev.type != 'cuda' and not a.tiny:
        raise SystemExit('gpu_report.py needs a CUDA GPU (or --tiny for a smoke run of the script on this CPU)')
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: torch sees no CUDA device')
    if dev.type == 'cpu':
        torch.set_num_threads(1)  # tiny models gain nothing from a second thread, and on a busy machine it waits
    start = time.perf_counter()
    c = TINY if a.tiny else FULL
    set_tf32(True)  # as the training scripts and sample.py: fp32 matmuls outside autocast run as TF32
    peak, peak_source = bench_train.peak_tflops(dev, 'bf16', a.peak_tflops, 4096 if dev.type == 'cuda' else 512)
    rows = plan(c, a, dev, peak)
    results = []
    for section, workload, batch, mode, thunk in rows:
        gc.collect()
        if dev.type == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        torch._dynamo.reset()  # each row compiles its own graphs (and stays under the recompile limit)
        r = dict(workload=workload, batch=batch, mode=mode)
        if time.perf_counter() - start > a.budget_s:
            r['note'] = f'skipped: past --budget-s {a.budget_s:g}'
        else:
            try:
                r.update(thunk())
            except Skipped as e:
                r['note'] = f'skipped: {e}'
            except torch.OutOfMemoryError:
                r['note'] = 'OOM'
            except Exception as e:  # one failing row must not cost the whole report
                r['note'] = f'failed: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ""}'
            if dev.type == 'cuda' and 'img_s' in r:
                r['memory'] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
        results.append(r)
        print(f'[{time.perf_counter() - start:5.0f} s] {workload}, batch {batch}, {mode}: '
              + (f'{r["img_s"]:.1f} img/s' if 'img_s' in r else r['note']), file=sys.stderr, flush=True)

    name = bench_train.device_name(dev)
    print(f'GPU report {datetime.date.today()}, {name}, torch {torch.__version__}'
          + (f', CUDA {torch.version.cuda}' if dev.type == 'cuda' else '')
          + f'; bf16 peak {peak:.4g} TFLOP/s ({peak_source}); {time.perf_counter() - start:.0f} s'
          + ('; TINY MODELS: a smoke test of the script, not a measurement' if a.tiny else ''))
    print()
    print('| workload | batch/GPU | mode | img/s | TFLOP/s | MFU | peak memory GiB | warm-up s | notes |')
    print('|---|---:|---|---:|---:|---:|---:|---:|---|')
    for r in results:
        tflops = r['img_s'] * r['flops'] / 1e12 if 'img_s' in r else None
        cells = [r['workload'], str(r['batch']), r['mode'],
                 f'{r["img_s"]:.1f}' if 'img_s' in r else '-',
                 f'{tflops:.4g}' if tflops is not None else '-',
                 f'{tflops / r["peak"]:.1%}' if tflops is not None and r.get('peak') else '-',
                 f'{r["memory"]:.1f}' if 'memory' in r else '-',
                 f'{r["warm"]:.0f}' if 'warm' in r else '-', r.get('note', '')]
        print('| ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    main()
