"""Speed and FLOP accounting of the diffusion_train.py training step: ms/step, img/s, achieved TFLOP/s and MFU for
fp32 / bf16 / auto, eager / compiled, from the latent cache / from images through the encoder, with and without
activation checkpointing.

    python bench/bench_train.py                                   # DiT^DH-S, batch 8, CPU: all 8 combinations
    python bench/bench_train.py --model DiTDH-XL --batch 128 --device cuda --precisions bf16 --compile 1   # MFU
    python bench/bench_train.py --model DiTDH-XL --flops-only --analytic   # the FLOP count alone: any machine, seconds

What it prints, top to bottom:
  - FLOPs of one training step per image, counted by torch.utils.flop_counter.FlopCounterMode on the model's own
    code (its forward + backward of rae.flow_loss, run on meta-device stand-ins of its weights: shapes only, no
    memory, no compute). The "images" source adds the forward of the frozen encoder; the cache path has none.
    Counted are the matmuls, convolutions and attention (as the counter does); element-wise work is not.
  - the peak MFU divides by, per precision: on a GPU the dense datasheet peak for its name (PEAK_TFLOPS: bf16, and
    TF32 for fp32 rows, since fp32 matmuls run as TF32 here); on a CPU (or an unknown GPU) the speed of a large
    torch.mm in the row's dtype, measured in this run. --peak-tflops overrides both.
  - one row per (precision, mode, source): warm-up s, ms/step, img/s, TFLOP/s (counted FLOPs / step time), MFU
    and the speed-up over the first row (house rule: ratios against a baseline measured in the same run)
  - saved MB: what autograd keeps for backward in one step (eager rows on a CPU; the weights aside, their bf16
    casts under autocast included), with and without --checkpoint; on a GPU the peak allocated memory instead
  - bf16 against fp32, checkpointing against none (step time, and saved memory), auto against the better of fp32
    and bf16: the ratios on this machine, next to the targets (checkpointing <= 1.35x the time for >= 2x less
    memory; auto never slower)
  - --analytic: the counted forward against an analytic count from the layer sizes (ratio ~1.000 expected), and
    for DiT^DH-XL the paper's Table 18 figure (145.03 "GFlops" = GMACs forward per 256 px image). The paper counts
    the head's adaLN modulation once per image; in the released model the head is modulated per token (its
    condition s is a token map), which adds ~15 GMAC: both conventions are printed.

A step is the loop body of diffusion_train.py: latents (memory-mapped cache, or PNGs through ImageFolder and a
random-weight DINOv2-B encoder at 224 px), the per-row draws, forward, backward, clip, AdamW, EMA. Data loading runs
in the step (workers=0), so "images" includes PNG decoding (bench/bench_data.py measures the data path alone).
"""
import argparse
import contextlib
import itertools
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
import diffusion_train as dt  # noqa: E402
from rae import DDT_HEAD, DIT_SIZES, ENCODERS, RAE, Encoder, build_dit, flow_loss, shift_alpha, step_draws  # noqa
from runtime import choose_precision, set_tf32  # noqa: E402
from training import ImageFolder, make_ema, step_flops, update_ema  # noqa: E402

# Dense (no sparsity) datasheet peaks in TFLOP/s by a substring of torch.cuda.get_device_name: (bf16, fp32 as TF32).
# Checked in order, so the more specific names come first ('H100 PCIe' before 'H100', 'A100' before 'A10').
PEAK_TFLOPS = [('H100 PCIe', 756, 378), ('H100 NVL', 835, 418), ('H200 NVL', 835, 418), ('H100', 989, 495),
               ('H200', 989, 495), ('A100', 312, 156), ('L40S', 362, 183), ('A10G', 125, 62.5), ('A10', 125, 62.5),
               ('L4', 121, 60), ('RTX 4090', 165, 82.6),
               ('V100', 125, 15.7)]  # V100: the fp16 tensor-core peak (no bf16, no TF32; fp32 is plain FP32)
# Table 18, 256 px, DINOv2-B latents [768, 16, 16]. The counter gives 161.58 GMAC for our DiT^DH-XL, equal to the
# analytic count; 146.61 with the head modulated once per image (the paper's convention, and its Table 15 head
# figure 26.78 matches it), ~1% above the paper's 145.03.
PAPER_FORWARD_GMACS = {'DiTDH-XL': 145.03}
LATENT_SHAPE = (768, 16, 16)  # DINOv2-B at 256 px


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# -----------------------------------------------------------------------------------------------------------
# FLOPs: counted, and analytic

def meta_dit(name, latent_shape=LATENT_SHAPE, **kwargs):
    """The build_dit model on the meta device (no memory, no init cost): for counting FLOPs of any size anywhere."""
    with torch.device('meta'):
        return build_dit(name, input_size=latent_shape[1], in_channels=latent_shape[0], class_dropout_prob=0.0,
                         **kwargs)


def _block_macs(width, tokens, mlp_hidden, mlp_matrices=3, modulations=1):
    """One pre-norm transformer block: qkv + proj (4 N D^2), the MLP (N D h per matrix: SwiGLU 3, GELU MLP 2),
    attention (QK^T and AV, 2 N^2 D) and the adaLN linear (6 D^2 per modulation vector: 1 an image, N a token map;
    0 in a ViT encoder block)."""
    return tokens * (4 * width ** 2 + mlp_matrices * width * mlp_hidden) + 2 * tokens ** 2 * width + \
        modulations * 6 * width ** 2


def analytic_forward_macs(name, latent_shape=LATENT_SHAPE, head_per_token=True):
    """Multiply-accumulates of one image's forward through a build_dit preset, from its layer sizes (None for a
    size outside the presets). head_per_token=False counts the DiT^DH head's modulation once per image, as the
    paper's Table 18 does; the model modulates its head per token."""
    family, _, size = name.partition('-')
    if size not in DIT_SIZES:
        return None
    C, N = latent_shape[0], latent_shape[1] * latent_shape[2]
    D, depth, _ = DIT_SIZES[size]
    swiglu = lambda d: int(2 * int(4 * d) / 3)  # noqa: E731  (rae.DiTBlock's hidden size, mlp_ratio 4)
    time_mlp = 512 * D + D * D  # Fourier features [sin, cos] of 256 frequencies -> D -> D
    if family == 'LightningDiT':
        return (N * C * D + time_mlp + depth * _block_macs(D, N, swiglu(D))
                + 2 * D * D + N * D * C)  # final layer: per-image adaLN (shift, scale), then the linear map
    H, head_depth, _ = DDT_HEAD
    m = N * C * D + time_mlp + depth * _block_macs(D, N, swiglu(D))  # backbone, conditioned per image
    m += (N * D * H if D != H else 0) + N * C * H  # s_projector; x_embedder (the head's own view of x_t)
    per = N if head_per_token else 1
    m += head_depth * _block_macs(H, N, swiglu(H), modulations=per)  # the DDT head, conditioned by the token map s
    return m + per * 2 * H * H + N * H * C  # final layer


def analytic_encoder_macs(encoder):
    """Multiply-accumulates of one image's forward through a ViT Encoder (patch embedding and blocks)."""
    D, p = encoder.patch_embed.out_channels, encoder.patch
    n = (encoder.input_size // p) ** 2
    block = encoder.blocks[0]
    mlp = block.fc1.out_features
    return n * 3 * p * p * D + len(encoder.blocks) * _block_macs(D, n + encoder.n_prefix, mlp, 2, modulations=0)


def print_analytic(name, latent_shape, encoder=None, image_size=256):
    """Counted against analytic forward MACs per image (and the paper's figure where it has one)."""
    counted = step_flops(meta_dit(name, latent_shape), latent_shape, forward_only=True) / 2
    analytic = analytic_forward_macs(name, latent_shape)
    if analytic is None:
        print(f'{name}: counted forward {counted / 1e9:.2f} GMAC per image; no analytic count outside the presets')
    else:
        paper = analytic_forward_macs(name, latent_shape, head_per_token=False)
        print(f'{name} forward per image: counted {counted / 1e9:.2f} GMAC, analytic {analytic / 1e9:.2f} GMAC '
              f'(counted / analytic {counted / analytic:.4f})' +
              (f'; head modulated once per image (the paper\'s convention): {paper / 1e9:.2f} GMAC'
               if paper != analytic else ''))
    if name in PAPER_FORWARD_GMACS and tuple(latent_shape) == LATENT_SHAPE:
        print(f'  paper Table 18: {PAPER_FORWARD_GMACS[name]:.2f} GMAC ("GFlops"); counted / paper '
              f'{counted / 1e9 / PAPER_FORWARD_GMACS[name]:.4f}')
    train = step_flops(meta_dit(name, latent_shape), latent_shape) / 2
    print(f'  training step (forward + backward) / forward, counted: {train / counted:.3f} (3, less the input '
          f'gradient of the patch embeddings: x_t needs none)')
    if encoder is not None:
        ce = step_flops(meta_dit(name, latent_shape), latent_shape, encoder, image_size) / 2 - train
        ae = analytic_encoder_macs(encoder)
        print(f'  encoder {encoder.name} forward: counted {ce / 1e9:.2f} GMAC, analytic {ae / 1e9:.2f} GMAC '
              f'(counted / analytic {ce / ae:.4f})')


# -----------------------------------------------------------------------------------------------------------
# Peaks

def matmul_tflops(device, dtype, n=2048, reps=3):
    """TFLOP/s of the best of `reps` n x n torch.mm in dtype, after one untimed call."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def peak_tflops(device, precision, override=None, n=2048):
    """(TFLOP/s, where it comes from) that MFU divides by for a row in `precision` ('fp32' or 'bf16')."""
    if override:
        return override, '--peak-tflops'
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        for key, bf16, fp32 in PEAK_TFLOPS:
            if key in name:
                kind = 'bf16' if precision == 'bf16' else 'TF32'
                return (bf16 if precision == 'bf16' else fp32), f'{key} datasheet, dense {kind}'
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float32
    return matmul_tflops(device, dtype, n), f'measured: torch.mm {n}x{n} {precision}'


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)'


# -----------------------------------------------------------------------------------------------------------

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
    ap.add_argument('--precisions', default='fp32,bf16,auto', help="'auto': what runtime.choose_precision picks")
    ap.add_argument('--compile', default='0,1', help='0: eager, 1: torch.compile; "0,1" both')
    ap.add_argument('--sources', default='cache,images')
    ap.add_argument('--checkpoint', default='0', help='grad_checkpoint off (0) / on (1); "0,1" both')
    ap.add_argument('--steps', type=int, default=2, help='timed steps per row')
    ap.add_argument('--warmup', type=int, default=1, help='untimed steps first (compilation happens here)')
    ap.add_argument('--threads', type=int, default=torch.get_num_threads())
    ap.add_argument('--peak-tflops', type=float, default=None, help='the peak MFU divides by (default: see above)')
    ap.add_argument('--peak-size', type=int, default=2048, help='side of the torch.mm that measures a CPU peak')
    ap.add_argument('--analytic', action='store_true', help='print counted vs analytic forward MACs')
    ap.add_argument('--flops-only', action='store_true', help='print the FLOP counts (and --analytic) and exit')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cuda = dev.type == 'cuda'
    set_tf32(True)
    latent_shape = LATENT_SHAPE
    alpha = shift_alpha(latent_shape)
    torch.manual_seed(0)
    rae = RAE(Encoder(**ENCODERS['dinov2-b'], name='dinov2-b'), None, None, torch.ones(latent_shape)).to(dev)
    rae.encoder.check_inputs = False  # as diffusion_train.py: ImageFolder gives [0, 1]; the check syncs each step
    probe = meta_dit(a.model, latent_shape)
    flops = {'cache': step_flops(probe, latent_shape), 'images': step_flops(probe, latent_shape, rae.encoder)}
    print(f'{a.model}, batch {a.batch}, latents {list(latent_shape)}, {device_name(dev)}: FLOPs per image of a '
          f'training step (counted, forward + backward): {flops["cache"] / 1e9:.1f} G from the cache, '
          f'{flops["images"] / 1e9:.1f} G from images (+ the DINOv2-B forward)')
    if a.analytic:
        print_analytic(a.model, latent_shape, rae.encoder)
    if a.flops_only:
        return
    precisions = a.precisions.split(',')
    resolved = {p: 'fp32' if choose_precision(p, dev)[0] is None else 'bf16' for p in precisions}
    if 'auto' in precisions:
        print(f"auto: {choose_precision('auto', dev)[1]}")
    peaks = {p: peak_tflops(dev, p, a.peak_tflops, a.peak_size) for p in set(resolved.values())}
    print('peak: ' + '; '.join(f'{p} {v:.3g} TFLOP/s ({src})' for p, (v, src) in peaks.items()))
    with tempfile.TemporaryDirectory() as tmp:
        sources = dict(zip(('cache', 'images'), make_sources(tmp, a.batch, latent_shape)))
        print(f'{"precision":>11} {"mode":>8} {"source":>7} {"ckpt":>4} {"warm-up s":>10} {"ms/step":>9} {"img/s":>8} '
              f'{"TFLOP/s":>8} {"MFU":>6} {"saved MB":>9} {"speed-up":>9}')
        baseline, ms_of, mb_of = None, {}, {}  # ms/step of the first row (fp32 eager, cache), ms and MB of each row
        for precision, checkpoint in itertools.product(precisions, map(int, a.checkpoint.split(','))):
            ctx = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=resolved[precision] == 'bf16')
            for compiled in map(int, a.compile.split(',')):
                torch.manual_seed(0)
                model = build_dit(a.model, input_size=latent_shape[1], in_channels=latent_shape[0],
                                  class_dropout_prob=0.0).to(dev)
                model.grad_checkpoint = bool(checkpoint)
                ema = make_ema(model)
                net = torch.compile(model) if compiled else model
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4,
                                        betas=(0.9, 0.95), weight_decay=0, fused=cuda)
                for source in a.sources.split(','):
                    loader = torch.utils.data.DataLoader(sources[source], a.batch, shuffle=False, num_workers=0)
                    it = iter(())
                    step, rows = 0, torch.arange(a.batch)

                    saved = {}  # storage -> bytes of what autograd keeps for backward (eager: the hooks see it)

                    def keep(t):
                        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                        return t

                    def train_step(measure=False):
                        nonlocal it, step
                        try:
                            inputs, y = next(it)
                        except StopIteration:
                            it = iter(loader)
                            inputs, y = next(it)
                        inputs = inputs.to(dev, non_blocking=True)
                        x = (rae.normalize(inputs) if source == 'cache' else rae.encode(inputs)).contiguous()
                        eps, t, drop = step_draws(0, step, rows, a.batch, latent_shape, 'logit-normal', alpha, 0.1,
                                                  dev)
                        y = torch.where(drop, 1000, y.to(dev))
                        hooks = torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t)
                        with ctx, hooks if measure else contextlib.nullcontext():
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
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(dev)
                    t1 = time.perf_counter()
                    for _ in range(a.steps):
                        train_step()
                    ms = (time.perf_counter() - t1) / a.steps * 1000
                    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
                    mb = None
                    if cuda:  # the peak of everything, the weights and optimizer state included
                        mb = torch.cuda.max_memory_allocated(dev) / 2 ** 20
                    elif not compiled:  # activations: what one step's forward saves for backward, weights aside
                        saved.clear()
                        train_step(measure=True)
                        mb = sum(b for s, b in saved.items() if s not in weights) / 2 ** 20
                    memory = f'{"-":>9}' if mb is None else f'{mb:>8.0f}*' if cuda else f'{mb:>9.0f}'
                    ips = a.batch / ms * 1000
                    tflops = ips * flops[source] / 1e12
                    baseline = baseline or ms
                    mode = 'compiled' if compiled else 'eager'
                    ms_of[precision, mode, source, checkpoint] = ms
                    mb_of[precision, mode, source, checkpoint] = mb
                    label = f'auto={resolved[precision]}' if precision == 'auto' else precision
                    print(f'{label:>11} {mode:>8} {source:>7} {checkpoint:>4} {t1 - t0:>10.1f} {ms:>9.0f} {ips:>8.2f} '
                          f'{tflops:>8.3g} {tflops / peaks[resolved[precision]][0]:>6.1%} {memory} '
                          f'{baseline / ms:>8.2f}x', flush=True)
        for (precision, mode, source, checkpoint), ms in ms_of.items():
            if precision == 'fp32' and ('bf16', mode, source, checkpoint) in ms_of:
                print(f'bf16 vs fp32 here, {mode}, {source}, checkpoint {checkpoint}: bf16 step time / fp32 step '
                      f'time = {ms_of["bf16", mode, source, checkpoint] / ms:.2f}')
            if checkpoint and (precision, mode, source, 0) in ms_of:
                without, mb = mb_of[precision, mode, source, 0], mb_of[precision, mode, source, checkpoint]
                memory = ''
                if without and mb:
                    what = 'peak memory, weights and optimizer included,' if cuda else 'saved activation memory'
                    memory = f', {what} without / with = {without / mb:.1f}x (activations: target >= 2)'
                print(f'grad_checkpoint, {precision}, {mode}, {source}: step time with / without = '
                      f'{ms / ms_of[precision, mode, source, 0]:.2f} (target <= 1.35){memory}')
            if precision == 'auto' and all((p, mode, source, checkpoint) in ms_of for p in ('fp32', 'bf16')):
                best = min(ms_of[p, mode, source, checkpoint] for p in ('fp32', 'bf16'))
                print(f'auto vs the better of fp32 and bf16, {mode}, {source}, checkpoint {checkpoint}: '
                      f'{ms / best:.2f} (target <= 1; noise aside)')
        if cuda:
            print('* peak memory allocated on the GPU (MB), weights and optimizer state included')


if __name__ == '__main__':
    main()
