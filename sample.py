"""
Sample ImageNet images with DiT^DH on RAE latents: the authors' released weights by default, or your own checkpoint.

    python sample.py --class 207                              # 4 golden retrievers -> samples.png
    python sample.py --class 207 360 88 --n 8 --autoguidance  # AutoGuidance with the released guide (w = 1.42 at 256)
    python sample.py --class 207 --cfg 2.0 --cfg-interval 0 0.7   # CFG, only where the shifted time t <= 0.7
    python sample.py --resolution 512 --class 88 --autoguidance   # 512 px (guide w = 1.5)
    python sample.py --ckpt runs/dit/checkpoints/0100000.pt --class 207   # our own training (EMA weights)
    torchrun --nproc_per_node=8 sample.py --num-samples 50000 --out samples.npz --autoguidance   # FID set
    torchrun --nproc_per_node=8 sample.py --num-samples 50000 --out samples.npz --autoguidance --compile  # faster

Pipeline: noise z ~ N(0, I) [B, 768, h, w] -> Euler (or Heun) on the shifted grid from t = 1 to t = shift(0.001),
velocity from the DiT (guided or not) -> RAE decoder -> pixels in [0, 1] -> 8 bits.

--num-samples N --out x.npz writes the ADM evaluator's format (arr_0 = uint8 [N, H, W, 3], arr_1 = the labels,
exactly N / 1000 per class in a fixed shuffled order). Sample i always gets the noise of (--seed, i): the set does not
depend on the number of GPUs or the batch size. Finished batches wait in x.npz.parts/, where an interrupted run
resumes. Pixels are rounded, floor(255 x + 0.5), as DiT and torchvision save them (README: differences).
"""
import argparse
import json
import math
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import rae
from files import load_state_dict_file, save_grid, to_uint8, write_images_npy
from runtime import barrier, choose_precision, cleanup_ddp, one_line_errors, print0, rank0_first, set_tf32, setup_ddp


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    p.add_argument('--class', dest='classes', type=int, nargs='+',
                   help="class ids (default: 8 ImageNet classes, or the model's first 8)")
    p.add_argument('--unconditional', action='store_true', help='null label everywhere')
    p.add_argument('--n', type=int, default=4, help='samples per class in the PNG grid')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--steps', type=int, default=50, help='grid points (the released 50 = 49 updates)')
    p.add_argument('--sampler', default='euler', help='euler | heun')
    p.add_argument('--cfg', type=float, default=1.0, help='classifier-free guidance scale w (1 = off)')
    p.add_argument('--cfg-interval', type=float, nargs=2, default=[0.0, 1.0], metavar=('T_MIN', 'T_MAX'),
                   help='guide only where t_min <= t <= t_max (shifted time, 1 = noise); also for AutoGuidance')
    p.add_argument('--autoguidance', nargs='?', const='released', metavar='W',
                   help='AutoGuidance scale (alone: the released 1.42 / 1.5)')
    p.add_argument('--guide', help='guide checkpoint for AutoGuidance (default: the released DiT^DH-S)')
    p.add_argument('--resolution', type=int, default=256, help='256 | 512')
    p.add_argument('--ckpt', help='DiT file (default: the released DiT^DH-XL); diffusion_train.py ones bring their RAE')
    p.add_argument('--model', help='the preset of a bare --ckpt / --guide state dict (e.g. DiTDH-XL)')
    p.add_argument('--decoder', help="local RAE decoder file (default: the released or the run's)")
    p.add_argument('--stats', help="latent statistics stat.pt (default: the released or the run's)")
    p.add_argument('--num-samples', type=int, help='write an ADM npz of this many samples')
    p.add_argument('--out', help='output .png (grid) or .npz (with --num-samples)')
    p.add_argument('--batch-size', type=int, default=32, help='per device')
    p.add_argument('--device', help='default: cuda if available, else cpu')
    p.add_argument('--precision', default='auto', help='auto | fp32 | bf16: the DiT under bf16 autocast or not; '
                   'auto: bf16 where the hardware has bf16 units (runtime.choose_precision); the authors use fp32')
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the DiT and the guide: minutes of compilation, then faster steps (long runs)')
    p.add_argument('--tf32', action=argparse.BooleanOptionalAction, default=True, help='TF32 matmuls on GPU')
    a = p.parse_args(argv)
    a.out = a.out or ('samples.npz' if a.num_samples else 'samples.png')
    if a.autoguidance not in (None, 'released'):
        try:
            a.autoguidance = float(a.autoguidance)
        except ValueError:
            raise ValueError(f'--autoguidance expects a scale w, e.g. 1.42 (got {a.autoguidance!r})') from None
    return a


def check_args(a):
    """Everything that can be checked before loading a model, one line each."""
    if a.resolution not in rae.RELEASED_DITS:
        raise ValueError(f'--resolution {a.resolution}: released checkpoints exist for '
                         f'{" and ".join(map(str, rae.RELEASED_DITS))} px only')
    if a.sampler not in ('euler', 'heun') or a.precision not in ('auto', 'fp32', 'bf16'):
        raise ValueError(f'--sampler must be euler or heun, --precision auto, fp32 or bf16 (got {a.sampler}, '
                         f'{a.precision})')
    if a.steps < 2 or a.n < 1 or a.batch_size < 1 or (a.num_samples is not None and a.num_samples < 1):
        raise ValueError('--steps must be >= 2, --n, --batch-size and --num-samples >= 1')
    if not math.isfinite(a.cfg) or (isinstance(a.autoguidance, float) and not math.isfinite(a.autoguidance)):
        raise ValueError(f'--cfg and --autoguidance take finite scales (got {a.cfg}, {a.autoguidance})')
    if not 0 <= a.cfg_interval[0] <= a.cfg_interval[1] <= 1:  # nan fails too
        raise ValueError(f'--cfg-interval {a.cfg_interval[0]} {a.cfg_interval[1]}: expected 0 <= T_MIN <= T_MAX <= 1')
    if a.guide and a.autoguidance is None:
        raise ValueError('--guide is the AutoGuidance guide: add --autoguidance (released scale) or --autoguidance W')
    if a.cfg != 1 and a.autoguidance is not None:
        raise ValueError('use either --cfg or --autoguidance, not both')
    if a.cfg != 1 and a.unconditional:
        raise ValueError('--cfg needs class labels; unconditional sampling can use --autoguidance')
    bad = [c for c in a.classes or [] if not 0 <= c < 1000]
    if bad:  # before any download (checked again against the model's own classes once it is loaded)
        raise ValueError(f'--class {bad[0]} is outside [0, 999]')
    if a.num_samples is not None and a.classes:
        raise ValueError('--class does not go with --num-samples: the FID set is balanced over all classes')
    for flag, path in [('--ckpt', a.ckpt), ('--guide', a.guide), ('--decoder', a.decoder), ('--stats', a.stats)]:
        if path and not os.path.exists(path):  # before any download
            raise ValueError(f'{flag} {path}: file not found')
    if (a.num_samples is not None) != a.out.endswith('.npz'):
        raise ValueError('an .npz --out goes with --num-samples N, a grid is written as .png')
    parent = Path(a.out).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK) or Path(a.out).is_dir():
        raise ValueError(f'cannot write {a.out}: {parent} is not a writable directory')
    if int(os.environ.get('WORLD_SIZE', 1)) > 1 and a.num_samples is None:
        raise ValueError('torchrun is for --num-samples N --out x.npz; a grid needs one process')


def load_models(a, device):
    """(RAE decoder, DiT, AutoGuidance guide or None, alpha (the run's shift, else rae.shift_alpha), guide scale)."""
    model = rae.load_dit(a.ckpt, a.model) if a.ckpt else rae.released_dit(a.resolution)  # refuses other files
    run = load_state_dict_file(a.ckpt).get('config', {}) if a.ckpt else {}  # a diffusion_train.py run: its RAE
    stats = a.stats or run.get('stats')  # None: released; False: the run trained on raw tokens
    autoencoder = rae.RAE.from_pretrained(run.get('encoder', 'dinov2-b'), run.get('image_size', a.resolution),
                                          a.decoder or run.get('decoder'), stats, load_encoder=False,
                                          encoder_overrides=run.get('encoder_overrides'))
    guide, scale = None, a.autoguidance or 1.0
    if a.autoguidance is not None:
        guide = (rae.load_dit(a.guide, a.model) if a.guide else rae.released_dit(a.resolution, guide=True)).to(device)
        scale = rae.RELEASED_DITS[a.resolution]['autoguidance'] if a.autoguidance == 'released' else a.autoguidance
    want = (autoencoder.decoder.embed.in_features,) + (autoencoder.decoder.grid,) * 2  # the [C, h, w] it decodes
    for name, m in [('--ckpt' if a.ckpt else 'DiT', model), ('--guide' if a.guide else 'guide', guide)]:
        if m is None:
            continue
        got = (m.in_channels, m.input_size, m.input_size)
        if got != want:
            raise ValueError(f'{name} is a model of {list(got)} latents, but the RAE decodes {list(want)}: '
                             f'a checkpoint of another encoder or resolution (--decoder, --resolution)')
        if m.num_classes != model.num_classes:
            raise ValueError(f'{name} has {m.num_classes} classes, the DiT {model.num_classes}')
    model = model.to(device)
    if a.compile:  # static shapes: one graph per batch size (a last, smaller batch; CFG's doubled batch)
        model = torch.compile(model, dynamic=False)
        guide = guide if guide is None else torch.compile(guide, dynamic=False)
    return autoencoder.to(device).eval(), model, guide, run.get('shift') or rae.shift_alpha(want), scale


@torch.no_grad()
def sample_batch(a, models, idx, labels, progress=False):
    """Samples idx (a range) of labels [N] -> uint8 images [B, H, W, 3] (numpy); models as load_models gives them.
    Sample i starts from its own noise z_i ~ N(0, I), seeded by (seed, i): independent of batching and world size."""
    autoencoder, model, guide, alpha, scale = models
    device = next(model.parameters()).device
    shape = (model.in_channels, model.input_size, model.input_size)
    z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(a.seed * 2 ** 32 + i)) for i in idx])
    velocity = rae.guided_velocity(model, labels[idx.start:idx.stop].to(device), cfg_scale=a.cfg,
                                   cfg_interval=a.cfg_interval, guide=guide, guide_scale=scale)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == 'bf16'):
        x = rae.sample_ode(velocity, z.to(device), a.steps, alpha, method=a.sampler, progress=progress)
    return to_uint8(autoencoder.decode(x.float())).cpu().numpy()  # the decoder in fp32


def write_npz(a, models, rank, world):
    """Sample a.num_samples images in batches (batch b on rank b % world), then pack arr_0/arr_1 on rank 0."""
    N, bs, model = a.num_samples, a.batch_size, models[1]
    if a.unconditional:
        labels = torch.full((N,), model.num_classes)
    elif N % model.num_classes:
        raise ValueError(f'--num-samples {N} is not a multiple of the {model.num_classes} classes (balanced labels)')
    else:  # exactly N / num_classes of each class, shuffled with a fixed seed (so every rank agrees)
        labels = torch.arange(model.num_classes).repeat(N // model.num_classes)
        labels = labels[torch.randperm(N, generator=torch.Generator().manual_seed(a.seed))]
    parts = Path(a.out + '.parts')
    # what the batches depend on (compiled = eager to float tolerance; precision as run() resolved it)
    run = {k: v for k, v in vars(a).items() if k not in ('classes', 'n', 'out', 'device', 'compile')}
    if rank == 0:
        parts.mkdir(exist_ok=True)
        if not (parts / 'run.json').exists():
            (parts / 'run.json').write_text(json.dumps(run))
    barrier()
    old = json.loads((parts / 'run.json').read_text())  # every rank checks, so that all stop together
    diff = [f'{k} {old.get(k)!r} -> {v!r}' for k, v in run.items() if k in old and old[k] != v]
    if diff:
        raise ValueError(f'{parts} holds a different run ({", ".join(diff)}); delete it or choose another --out')
    n_batches = math.ceil(N / bs)
    done = {b for b in range(n_batches) if (parts / f'{b:06d}.npy').exists()}
    if rank == 0 and done:
        print(f'resuming: {len(done)} of {n_batches} batches already in {parts}')
    todo = [b for b in range(rank, n_batches, world) if b not in done]
    for b in tqdm(todo, desc=f'sampling {N} images', disable=rank != 0):
        images = sample_batch(a, models, range(b * bs, min(N, (b + 1) * bs)), labels)
        np.save(parts / f'{b:06d}.tmp.npy', images)
        os.replace(parts / f'{b:06d}.tmp.npy', parts / f'{b:06d}.npy')  # a killed run never leaves half a batch
    barrier()
    if rank == 0:  # np.savez's layout (arr_0, arr_1 in a zip), streamed part by part
        files = [parts / f'{b:06d}.npy' for b in range(n_batches)]
        shape = (N, *np.load(files[0], mmap_mode='r').shape[1:])
        with zipfile.ZipFile(a.out + '.tmp', 'w', zipfile.ZIP_STORED, allowZip64=True) as zf:
            write_images_npy(zf, shape, (np.load(p) for p in tqdm(files, desc=f'packing {a.out}', leave=False)))
            with zf.open('arr_1.npy', 'w') as f:
                np.lib.format.write_array(f, labels.numpy().astype(np.int64))
        os.replace(a.out + '.tmp', a.out)
        shutil.rmtree(parts)
        print(f'wrote {a.out}: arr_0 = uint8 images {list(shape)}, arr_1 = labels')


def run(a):
    check_args(a)
    rank, _, world, device, _ = setup_ddp(a.device)
    set_tf32(a.tf32)
    amp_dtype, why = choose_precision(a.precision, device)
    a.precision = 'fp32' if amp_dtype is None else 'bf16'  # the choice 'auto' made here, as sample_batch reads it
    print0(f'precision: {why}')
    with rank0_first():  # rank 0 downloads; the others then hit the cache
        models = load_models(a, device)
    model = models[1]
    if a.num_samples is not None:
        write_npz(a, models, rank, world)
    else:
        # DiT's sample.py classes for ImageNet models; the first (up to 8) classes of any other (one class: 0)
        classes = a.classes or ([207, 360, 387, 974, 88, 979, 417, 279] if model.num_classes == 1000
                                else list(range(min(8, model.num_classes))))
        bad = [c for c in classes if c >= model.num_classes and not a.unconditional]  # [0, 999] was checked before
        if bad:
            raise ValueError(f'--class {bad[0]} is outside [0, {model.num_classes - 1}]')
        y = torch.full((a.n,), model.num_classes) if a.unconditional else torch.tensor(classes).repeat_interleave(a.n)
        images = np.concatenate([sample_batch(a, models, range(i, min(i + a.batch_size, len(y))), y, progress=True)
                                 for i in range(0, len(y), a.batch_size)])
        save_grid(images, a.n, a.out)
        what = 'unconditional' if a.unconditional else f'class {", ".join(map(str, classes))}'
        print(f'wrote {a.out}: {len(images)} samples ({what}), {a.n} per row')
    cleanup_ddp()


def main(argv=None):
    with one_line_errors():
        run(parse_args(argv))


if __name__ == '__main__':
    main()
