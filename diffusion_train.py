"""
Stage 2 of RAE: train a diffusion transformer (DiT^DH or LightningDiT) on the latents of a frozen representation
encoder (paper §4, §5, App. F).

    python diffusion_train.py configs/tiny.py                                   # a CPU, minutes: toy data, tiny RAE
    torchrun --standalone --nproc_per_node=8 diffusion_train.py configs/xl.py   # DiT^DH-XL on DINOv2-B, 256 px
    torchrun --standalone --nproc_per_node=8 diffusion_train.py configs/xl.py --mode=stats     # -> out_dir/stat.pt
    torchrun --standalone --nproc_per_node=8 diffusion_train.py configs/xl.py --mode=cache --latent_cache=/ssd/lat

Config files, then --key=value, override the defaults below (training.configure); a run resumes by itself.

The flow (§4.2, rae.flow_loss): x_t = (1 - t) x + t eps (t = 0 data, 1 noise), loss |v_theta(x_t, t, y) - (eps - x)|^2;
t is logit-normal (or uniform) on [0, 0.999], shifted towards noise by alpha = sqrt(C h w / 4096) (sqrt(48) at 256 px).
The eps, t and label drop of a sample are seeded by (global_seed, step, its row in the global batch) (rae.step_draws):
a run gives the same numbers on 1 or 8 GPUs, with or without gradient accumulation, and after a resume.
"""
import contextlib
import functools
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from files import save_grid, to_uint8
from rae import RAE, Decoder, build_dit, decoder_arch, flow_loss, guided_velocity, sample_ode, shift_alpha, step_draws
from runtime import barrier, choose_precision, cleanup_ddp, one_line_errors, print0, rank0_first, set_tf32, setup_ddp
from training import (ImageFolder, Metrics, check_config, configure, lr_linear_decay, make_ema, make_loader, resume,
                      save_checkpoint, start_log, step_flops, unreadable, update_ema, write_toy_encoder,
                      write_toy_images)

_imported = set(globals())  # the config is what the block below defines
# -----------------------------------------------------------------------------------------------------------
# Defaults: DiT^DH-XL on DINOv2-B latents at 256 px, the paper's recipe (configs/xl.py spells it out)
# I/O
out_dir = 'runs/dit'                # log.txt, stat.pt, checkpoints/<step>.pt, samples/<step>.png
mode = 'train'                      # 'train'; 'stats': latent statistics -> out_dir/stat.pt; 'cache': -> latent_cache
data_path = 'data/imagenet/train'   # ImageNet-style folder root/<class>/<image>; labels in sorted folder order
latent_cache = None                 # a folder written by --mode=cache: train from it, no encoder in the step
cache_dtype = 'float16'             # 1.0 TB for ImageNet at 256 px (both flips); 'float32' (2x) = bit-exact losses
toy = False                         # True: first write a toy data set and tiny random RAE files (configs/tiny.py)
# the RAE (rae.RAE.from_pretrained); None = the released file for (encoder, image_size), downloaded once
encoder = 'dinov2-b'                # dinov2-s/b/l, siglip2-b, mae-b
encoder_weights = None              # a local file in the published layout
encoder_overrides = None            # preset changes, e.g. dict(width=32, depth=2, ...) for a tiny random file
decoder = None                      # decodes the preview grids and FID samples
stats = None                        # latent statistics stat.pt; False: none (raw encoder tokens)
image_size = 256
stats_mean = True                   # --mode=stats: False saves mean=None (variance only, like the released DINOv2-B)
# the diffusion model
model = 'DiTDH-XL'                  # DiTDH-S/B/L/XL (+ 2-layer 2048-wide head, §5) or LightningDiT-S/B/L/XL (§4)
hidden_size = None                  # with depth and num_heads: a size outside the presets (pairs for 'DiTDH')
depth = None
num_heads = None
num_classes = 1000
class_dropout = 0.1                 # labels -> the null class: trains the unconditional model for guidance
# the flow (§4.2)
time_dist = 'logit-normal'          # of t before the shift: 'logit-normal' (released configs) or 'uniform' (paper)
shift = None                        # alpha; None: sqrt(C*h*w / 4096)
# optimisation (App. F)
global_batch = 1024                 # over all ranks and accumulation steps
grad_accum = 1                      # micro-batches per optimizer step
epochs = 800
max_steps = None                    # stop earlier (the lr schedule still counts epochs)
lr = 2e-4                           # AdamW; constant for lr_decay_start epochs, then linear ...
lr_final = 2e-5                     # ... to this at epoch lr_decay_end
lr_decay_start = 40
lr_decay_end = 800
betas = (0.9, 0.95)
weight_decay = 0.0
grad_clip = 1.0                     # clip the global gradient norm (0: off)
ema_decay = 0.9995
# system
device = None                       # None: CUDA when available; 'cpu'
ddp_timeout = 10                    # minutes a rank waits for the others before the job ends naming the rank
precision = 'auto'                  # bf16 autocast where the hardware has bf16 units, else fp32 (runtime.py); or
                                    # 'bf16' / 'fp32' (TF32 matmuls on a GPU either way)
compile = True                      # torch.compile the training forward (the EMA copy stays eager)
grad_checkpoint = False             # recompute each transformer block's activations in backward: less memory,
                                    # one more forward per step
global_seed = 0
workers = 8                         # data loader processes per rank
# logging, previews, evaluation, checkpoints (in optimizer steps; 0 = never)
log_every = 100
sample_every = 10000                # an EMA sample grid out_dir/samples/<step>.png
sample_classes = (207, 360, 387, 974, 88, 979, 417, 279)
sample_steps = 50                   # Euler steps of the ODE sampler (App. F)
fid_every = 0                       # online FID of fid_samples EMA samples (a monitor; report sample.py + fid.py)
fid_samples = 10000
fid_reference = 'imagenet256'       # fid.py reference batch name or .npz
ckpt_every = 5000
ckpt_keep = 3
wandb_log = False                   # also send the metrics and preview grids to Weights & Biases (needs wandb)
wandb_project = 'nano-rae'
wandb_run_name = None               # None: wandb names the run
_DEFAULTS = {k: v for k, v in globals().items() if k not in _imported}


def seed_of(*keys):
    """A 64-bit seed from a tuple of ints (numpy's SeedSequence hash)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


# -----------------------------------------------------------------------------------------------------------
# Latents: encoding a rank's share of the images, the exact statistics, and the cache

class LatentCache(torch.utils.data.Dataset):
    """Raw latents of --mode=cache (latents.npy [N, 2, C, h, w]: each image, then its mirror) through a memory map;
    item (index, epoch) is the mirror image when ImageFolder(seed=seed) would flip that image in that epoch."""

    def __init__(self, root, seed=0):
        for name in ('latents.npy', 'labels.npy'):
            if not os.path.isfile(os.path.join(root, name)):
                raise SystemExit(f'{root}: no {name}; write the cache first with --mode=cache --latent_cache={root}')
        self.root, self.seed, self._latents = root, seed, None
        self.labels = np.load(os.path.join(root, 'labels.npy'))
        self.shape = np.load(os.path.join(root, 'latents.npy'), mmap_mode='r').shape

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, item):
        i, epoch = item if isinstance(item, tuple) else (item, 0)
        if self._latents is None:  # opened in each worker: a pickled memmap would be read in full
            self._latents = np.load(os.path.join(self.root, 'latents.npy'), mmap_mode='r')
        flip = np.random.default_rng([self.seed, epoch, i]).random() < 0.5  # ImageFolder's draw for a centre crop
        return torch.from_numpy(self._latents[i, int(flip)].astype(np.float32)), int(self.labels[i])


@torch.no_grad()
def encode_shard(rae, data, rank, world_size, batch_size, workers, device):
    """Yield (indices, raw latents [B, 2, C, h, w]: image and mirror, labels) of images rank::world_size, in order."""
    indices = range(rank, len(data), world_size)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, indices), batch_size, num_workers=workers,
                                         pin_memory=device.type == 'cuda')
    for b, (x, y) in enumerate(tqdm(loader, desc='encoding', disable=rank != 0)):
        x = x.to(device, non_blocking=True)
        z = rae.encode(torch.cat([x, x.flip(-1)]))  # fp32, no autocast: the same numbers as the training step
        yield torch.tensor(indices[b * batch_size:b * batch_size + len(x)]), torch.stack(z.chunk(2), dim=1), y


def moments(z):
    """(count, mean, sum of squared deviations) over dim 0, in float64."""
    z = z.double()
    mean = z.mean(0)
    return len(z), mean, ((z - mean) ** 2).sum(0)


def merge_moments(a, b):
    """Chan et al.'s pairwise update: the moments of the union of two sets from the moments of each."""
    (n1, m1, s1), (n2, m2, s2) = a, b
    if n1 == 0 or n2 == 0:
        return b if n1 == 0 else a
    n, delta = n1 + n2, m2 - m1
    return n, m1 + delta * (n2 / n), s1 + s2 + delta ** 2 * (n1 * n2 / n)


def latent_stats(rae, data, rank, world_size, batch_size, workers, device):
    """Exact per-channel, per-position mean and (population) variance [C, h, w] of the raw latents of every image
    and its mirror image (the two views training draws), float64, merged across ranks in rank order."""
    acc = (0, 0.0, 0.0)
    for _, z, _ in encode_shard(rae, data, rank, world_size, batch_size, workers, device):
        acc = merge_moments(acc, moments(z.flatten(0, 1)))
    parts = [acc]
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, (acc[0], acc[1].cpu(), acc[2].cpu()))
    n, mean, m2 = functools.reduce(merge_moments, parts)  # the same list in the same order on every rank
    return mean, m2 / n


def write_cache(rae, data, root, dtype, rank, world_size, batch_size, workers, device, latent_shape):
    """Encode every image and its mirror once into root/latents.npy [N, 2, C, h, w] (+ labels.npy); each rank
    writes its own rows of one memory-mapped file, renamed into place when all are done."""
    tmp = os.path.join(root, 'latents.npy.tmp')
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        np.lib.format.open_memmap(tmp, mode='w+', dtype=np.dtype(dtype), shape=(len(data), 2, *latent_shape))
    barrier()
    out = np.load(tmp, mmap_mode='r+')
    labels = torch.zeros(len(data), dtype=torch.int64, device=device)
    for idx, z, y in encode_shard(rae, data, rank, world_size, batch_size, workers, device):
        out[idx.numpy()] = z.cpu().numpy().astype(dtype)
        labels[idx.to(device)] = y.to(device)
    out.flush()
    if world_size > 1:
        dist.all_reduce(labels)  # each rank filled its own rows, zeros elsewhere
    if rank == 0:
        np.save(os.path.join(root, 'labels.npy'), labels.cpu().numpy())
        os.replace(tmp, os.path.join(root, 'latents.npy'))
    barrier()


# -----------------------------------------------------------------------------------------------------------
# EMA samples: preview grids and online FID

@torch.no_grad()
def ema_images(ema, rae, y, noise, num_steps, alpha, ctx):
    """uint8 images [B, H, W, 3] (as a PNG holds them) from the EMA model: Euler ODE from t = 1 to t ~ 0, unguided."""
    with ctx:
        z = sample_ode(guided_velocity(ema, y), noise, num_steps, alpha)
    return to_uint8(rae.decode(z.float()))


_FID = {}  # the Inception network and reference statistics, loaded once


@torch.no_grad()
def online_fid(ema, rae, n, reference, latent_shape, alpha, num_steps, ctx, seed, rank, world_size, batch_size):
    """FID of n unguided EMA samples (uniform random classes) against a fid.py reference batch. Every rank samples
    its share and keeps only Inception pool3 features [n/world, 2048]; rank 0 returns the FID, others None."""
    import fid
    device = next(ema.parameters()).device
    if not _FID:  # only rank 0 needs the reference statistics
        with rank0_first():
            _FID.update(net=fid.InceptionV3.from_pretrained().to(device),
                        ref=fid.load_reference(reference) if rank == 0 else None)
    g = torch.Generator().manual_seed(seed_of(seed, rank))
    share = -(-n // world_size)

    def batches():
        for i in range(0, share, batch_size):
            b = min(batch_size, share - i)
            y = torch.randint(ema.num_classes, (b,), generator=g).to(device)
            x = torch.randn(b, *latent_shape, generator=g).to(device)
            yield ema_images(ema, rae, y, x, num_steps, alpha, ctx)

    pool3 = fid.extract_features(_FID['net'], batches(), share, 'online FID', progress=rank == 0)[0]
    if world_size > 1:
        parts = [torch.empty_like(pool3) for _ in range(world_size)]
        dist.all_gather(parts, pool3)
        pool3 = torch.cat(parts)
    if rank != 0:
        return None
    stats = fid.FeatureStats()
    stats.update(pool3[:n])
    return fid.frechet_distance(*stats.mu_sigma(), _FID['ref']['mu'], _FID['ref']['sigma'])


# -----------------------------------------------------------------------------------------------------------
# The script

def main(argv):
    config = configure(_DEFAULTS, argv)
    globals().update(config)
    check_config(config, choices=dict(mode=('train', 'stats', 'cache'), precision=('auto', 'bf16', 'fp32'),
                                      cache_dtype=('float16', 'float32'), time_dist=('logit-normal', 'uniform')),
                 types=dict(max_steps=int, shift=(int, float), latent_cache=str, encoder_weights=str, decoder=str,
                            encoder_overrides=dict, stats=(str, bool), device=str, hidden_size=(int, tuple, list),
                            depth=(int, tuple, list), num_heads=(int, tuple, list), wandb_run_name=str),
                 positive=('global_batch', 'grad_accum', 'epochs', 'max_steps', 'lr', 'image_size', 'num_classes',
                           'sample_steps', 'fid_samples', 'shift', 'ddp_timeout'),
                 non_negative=('lr_final', 'weight_decay', 'grad_clip', 'workers', 'log_every', 'sample_every',
                               'fid_every', 'ckpt_every', 'ckpt_keep', 'lr_decay_start', 'lr_decay_end'),
                 fractions=('ema_decay', 'class_dropout'))
    if hidden_size is not None:  # a size outside the presets: pairs (backbone, head) for DiT^DH, ints otherwise
        pair = model == 'DiTDH'
        for key, value in [('hidden_size', hidden_size), ('depth', depth), ('num_heads', num_heads)]:
            if (isinstance(value, (tuple, list)) and len(value) == 2) != pair or value is None:
                raise SystemExit(f'{key}={value!r}: model={model!r} with hidden_size set takes '
                                 f'{"(backbone, head) pairs" if pair else "ints"} for hidden_size, depth and num_heads')
    rank, _, world_size, dev, is_master = setup_ddp(device, ddp_timeout)
    if global_batch % (world_size * grad_accum):
        raise SystemExit(f'global_batch={global_batch} is not divisible by {world_size} ranks x '
                         f'grad_accum={grad_accum}')
    micro = global_batch // (world_size * grad_accum)  # images per forward on each rank
    if mode == 'cache' and not latent_cache:
        raise SystemExit('--mode=cache writes to latent_cache: give --latent_cache=FOLDER')
    set_tf32(True)  # fp32 matmuls outside autocast (and precision='fp32') run as TF32 on a GPU
    amp_dtype, why = choose_precision(precision, dev)
    ctx = torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    log = start_log(out_dir, config, dev)
    log(f'precision: {why}')
    if toy and is_master and not all(os.path.exists(p) for p in (data_path, encoder_weights, decoder)):
        make_toy(data_path, encoder_weights, decoder, image_size, encoder, encoder_overrides, num_classes)
    barrier()  # the other ranks wait for the toy files

    # The frozen RAE: never DDP-wrapped, never compiled here, always fp32. Statistics and the cache hold raw tokens.
    from_cache = mode == 'train' and latent_cache is not None
    with rank0_first(), one_line_errors():
        rae = RAE.from_pretrained(encoder, image_size, decoder, stats=False if mode != 'train' else stats,
                                  encoder_weights=encoder_weights, load_encoder=not from_cache,
                                  encoder_overrides=encoder_overrides).to(dev)
    if rae.encoder is not None:  # ImageFolder gives [0, 1] by construction; the range check would sync every step
        rae.encoder.check_inputs = False
    if from_cache:
        data = LatentCache(latent_cache, seed=global_seed)
        latent_shape, want = data.shape[2:], (rae.decoder.embed.in_features, rae.decoder.grid, rae.decoder.grid)
        if latent_shape != want:
            raise SystemExit(f'{latent_cache}: latents {list(latent_shape)}, but the decoder reads {list(want)}')
    else:
        data = ImageFolder(data_path, image_size, 'center', flip=mode == 'train', seed=global_seed)
        latent_shape = (rae.encoder.patch_embed.out_channels,) + (rae.encoder.input_size // rae.encoder.patch,) * 2
    if data.labels.max() >= num_classes or max(sample_classes) >= num_classes:
        raise SystemExit(f'num_classes={num_classes}, but the data has {data.labels.max() + 1} classes and '
                         f'sample_classes go up to {max(sample_classes)}')

    if mode != 'train' and len(data) < world_size:
        raise SystemExit(f'{data_path}: {len(data)} images for {world_size} ranks')
    if mode == 'stats':
        mean, var = latent_stats(rae, data, rank, world_size, micro, workers, dev)
        skipped = unreadable(data, dev)  # collective
        if is_master:  # the released format: {'mean': [C,h,w] or None, 'var': [C,h,w]}; mean None = variance only
            path = os.path.join(out_dir, 'stat.pt')
            torch.save({'mean': mean.float().cpu() if stats_mean else None, 'var': var.float().cpu()}, path + '.tmp')
            os.replace(path + '.tmp', path)
            log(f'{path}: mean and variance {list(var.shape)} over {2 * len(data)} latents (both flips); '
                f'mean |mean| {mean.abs().mean():.4f}, mean var {var.mean():.4f}{skipped}')
        return cleanup_ddp()
    if mode == 'cache':
        write_cache(rae, data, latent_cache, cache_dtype, rank, world_size, micro, workers, dev, latent_shape)
        skipped = unreadable(data, dev)
        log(f'{latent_cache}: {len(data)} images x 2 flips of {list(latent_shape)} latents ({cache_dtype}){skipped}')
        return cleanup_ddp()

    loader, sampler = make_loader(data, micro, rank, world_size, global_seed, workers)
    steps_per_epoch = sampler.num_samples // (micro * grad_accum)
    total_steps = max_steps or epochs * steps_per_epoch
    alpha = shift or shift_alpha(latent_shape)

    # The model is initialised from global_seed on every rank; then each rank gets its own stream.
    torch.manual_seed(global_seed)
    try:  # labels are dropped by step_draws, not by the model: class_dropout_prob=0
        dit = build_dit(model, hidden_size, depth, num_heads, input_size=latent_shape[1], in_channels=latent_shape[0],
                        num_classes=num_classes, class_dropout_prob=0.0).to(dev)
    except ValueError as e:
        raise SystemExit(f'model={model!r}: {e}') from None
    dit.grad_checkpoint = grad_checkpoint  # read by rae.run_block in training forwards only
    ema = make_ema(dit)  # a plain eager copy: made before any compile/DDP wrapper exists (see training.make_ema)
    torch.manual_seed(global_seed * world_size + rank)
    opt = torch.optim.AdamW([p for p in dit.parameters() if p.requires_grad], lr=lr, betas=betas,
                            weight_decay=weight_decay, fused=dev.type == 'cuda')
    width = dit.final_layer.linear.in_features
    in_step = None if from_cache else rae.encoder  # the encoder is counted unless the latents come from the cache
    flops = step_flops(dit, latent_shape, in_step, image_size)
    log(f'{model}: {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M parameters on latents {list(latent_shape)}, '
        f'{flops / 1e9:.4g} GFLOP per image per step (forward + backward{", encoder" if in_step else ""}), '
        f'alpha {alpha:.4f}, {world_size} ranks x {micro} x {grad_accum} micro-batches, '
        f'{steps_per_epoch} steps/epoch, {total_steps} steps')
    if width < latent_shape[0]:
        log(f'warning: width {width} < token dim {latent_shape[0]}: by Theorem 1 (§4.1) the loss stays above '
            f'{(latent_shape[0] - width) / latent_shape[0]:.3f}')

    ckpt_dir = os.path.join(out_dir, 'checkpoints')
    step, epoch, batch = 0, 0, 0  # batch = micro-batches of `epoch` consumed
    if c := resume(ckpt_dir, config, model=dit, ema=ema, optimizer=opt):
        # another number of ranks or accumulation steps goes on exactly: the draws do not depend on the split
        step, epoch, batch = c['step'], c['epoch'], c['batch'] // c['config']['grad_accum'] * grad_accum
        log(f'resumed from {c["path"]}: step {step}, epoch {epoch}, batch {batch}')
    metrics = Metrics(out_dir, config, step, wandb_log, wandb_project, wandb_run_name)  # metrics.jsonl, loss.png
    if step >= total_steps:
        raise SystemExit(f'nothing to train: {out_dir} is at step {step} of {total_steps} (raise max_steps or epochs)')
    ddp = DDP(dit, broadcast_buffers=False) if world_size > 1 else dit
    net = torch.compile(ddp) if compile else ddp  # compiled DDP: dynamo splits the graph at the gradient buckets

    sampler.set_epoch(epoch, start_batch=batch)
    micro_batches = iter(loader)
    bar = tqdm(total=total_steps, initial=step, disable=not is_master, desc='training', unit='step')
    sums = torch.zeros(2, dtype=torch.float64, device=dev)  # loss and grad-norm sums since the last log
    logged, t0 = step, time.perf_counter()
    while step < total_steps:
        if batch == steps_per_epoch * grad_accum:  # epoch done; its last images (< one global batch) are left out
            epoch, batch = epoch + 1, 0
            sampler.set_epoch(epoch)
            micro_batches = iter(loader)
        lr_now = lr_linear_decay(step, lr, lr_final, lr_decay_start * steps_per_epoch, lr_decay_end * steps_per_epoch)
        for group in opt.param_groups:
            group['lr'] = lr_now
        for m in range(grad_accum):
            inputs, y = next(micro_batches)
            batch += 1
            inputs = inputs.to(dev, non_blocking=True)
            # contiguous: the encoder's token map is a transposed view, and a strided input takes other kernels
            x = (rae.normalize(inputs) if from_cache else rae.encode(inputs)).contiguous()  # [micro, C, h, w]
            rows = rank + world_size * (m * micro + torch.arange(micro))  # DistributedSampler deals rows round-robin
            eps, t, drop = step_draws(global_seed, step, rows, global_batch, latent_shape, time_dist, alpha,
                                      class_dropout, dev)
            y = torch.where(drop, num_classes, y.to(dev))  # the null class
            # the gradient is the mean over the global batch: DDP averages ranks, we average micro-batches
            with ddp.no_sync() if m < grad_accum - 1 and world_size > 1 else contextlib.nullcontext():
                with ctx:
                    loss = flow_loss(net, x, y, alpha, eps=eps, t=t)  # [micro]
                (loss.sum() / (micro * grad_accum)).backward()
            sums[0] += loss.detach().sum()
        grad_norm = torch.nn.utils.clip_grad_norm_(dit.parameters(), grad_clip or math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, dit, ema_decay)
        step += 1
        sums[1] += grad_norm
        bar.update()

        if (log_every and step % log_every == 0) or step == total_steps:
            if world_size > 1:
                dist.all_reduce(sums)  # loss at log time only: no sync in the step
            dt, skipped, n = time.perf_counter() - t0, unreadable(data, dev), step - logged
            loss_mean, grad_mean = (sums[0] / (global_batch * n)).item(), (sums[1] / world_size / n).item()
            log(f'step {step}/{total_steps} | epoch {epoch} | loss {loss_mean:.6f} | grad {grad_mean:.4f} | '
                f'lr {lr_now:.3e} | {n / dt:.2f} steps/s | {n * global_batch / dt:.1f} img/s{skipped}')
            metrics.log(step, epoch=epoch, loss=loss_mean, grad_norm=grad_mean, lr=lr_now,
                        img_per_s=n * global_batch / dt)
            sums.zero_()
        if is_master and sample_every and (step % sample_every == 0 or step == total_steps):
            y = torch.tensor(sample_classes, device=dev)
            # fixed noise from its own generator: a preview never moves the training streams
            noise = torch.randn(len(y), *latent_shape, generator=torch.Generator().manual_seed(0)).to(dev)
            os.makedirs(os.path.join(out_dir, 'samples'), exist_ok=True)
            path = os.path.join(out_dir, 'samples', f'{step:07d}.png')
            save_grid(ema_images(ema, rae, y, noise, sample_steps, alpha, ctx), 4, path)
            metrics.image('samples', path, step)
        if fid_every and step % fid_every == 0:
            score = online_fid(ema, rae, fid_samples, fid_reference, latent_shape, alpha, sample_steps, ctx,
                               seed_of(global_seed, step), rank, world_size, micro)
            if is_master:
                log(f'step {step} | FID {score:.3f} ({fid_samples} EMA samples, {sample_steps} Euler steps, unguided)')
                metrics.log(step, FID=score)
        if (ckpt_every and step % ckpt_every == 0) or step == total_steps:
            save_checkpoint(ckpt_dir, step=step, epoch=epoch, batch=batch, config=config, keep=ckpt_keep,
                            model=dit, ema=ema, optimizer=opt)
        if log_every and step % log_every == 0:
            logged, t0 = step, time.perf_counter()  # previews, FID and checkpoints at log steps are not timed
    bar.close()
    cleanup_ddp()


# -----------------------------------------------------------------------------------------------------------
# Toy data for CPU smoke runs (configs/tiny.py): the real loading code runs on random weights, without network

def make_toy(data_path, encoder_file, decoder_file, image_size, encoder, overrides, num_classes, per_class=24):
    """Write data_path/class<k>/<i>.png (a coloured square on a background of the class's hue, random sizes),
    a tiny random DINOv2 encoder (hub layout) and a matching random decoder (our layout)."""
    write_toy_images(data_path, num_classes, per_class, image_size)
    enc = write_toy_encoder(encoder_file, encoder, overrides)
    grid = enc.input_size // enc.patch
    run = dict(encoder=encoder, encoder_overrides=overrides, decoder_size='XL', decoder_patch=image_size // grid,
               decoder_arch=dict(width=64, depth=1, heads=1, mlp_hidden=128), image_size=image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dec = Decoder(**decoder_arch(run))
    os.makedirs(os.path.dirname(decoder_file) or '.', exist_ok=True)
    torch.save({'model': dec.state_dict(), 'config': run}, decoder_file)  # as a decoder_train.py checkpoint
    print0(f'toy data: {num_classes} x {per_class} images in {data_path}, random RAE {encoder_file}, {decoder_file}')


if __name__ == '__main__':
    main(sys.argv[1:])
