"""
Training plumbing shared by decoder_train.py (stage 1) and diffusion_train.py (stage 2): config overrides and
checks, an ImageNet-style image folder and its resumable loader, EMA, checkpoints with exact resume, learning-rate
schedules, the toy encoder and images of the smoke runs, the run log, the metrics files (and wandb) and the FLOP
count of a training step. The scripts show the order of use.
"""
import ast
import colorsys
import contextlib
import copy
import errno
import itertools
import json
import math
import multiprocessing
import os
import platform
import random
import re
import secrets
import subprocess
import sys
import types

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode

from files import IMAGE_EXTS, center_crop_arr, open_rgb, published_state_dict
from rae import ENCODERS, PUBLISHED, Encoder, flow_loss
from runtime import print0

# -----------------------------------------------------------------------------------------------------------
# Config: nanoGPT's configurator, without its warts (rank-0 printing, int->float, None defaults, '=' in
# values, misspelled names in config files, CWD-dependent exec of the configurator itself)

CONFIG_TYPES = (bool, int, float, str, tuple, list, dict, type(None))


def _checked(key, value, default, where):
    if default is None or type(value) is type(default):  # `is`: True is no int, 1 is no bool
        return value
    if type(default) is float and type(value) is int:
        return float(value)
    raise SystemExit(f'{where}: {key} = {value!r} is a {type(value).__name__}, '
                     f'but its default {default!r} is a {type(default).__name__}')


def configure(defaults, argv):
    """Resolve the config: `defaults` (a script's globals(): its public plain values), then each argument in order,
    `--key=value` (ast.literal_eval, else the plain string) or a config file (relative to the CWD) exec'd over the
    current values ('_' names in it are private). Unknown names and type changes are one-line errors."""
    config = {k: v for k, v in defaults.items() if not k.startswith('_') and isinstance(v, CONFIG_TYPES)}
    original = dict(config)
    for arg in argv:
        if arg.startswith('--'):
            key, eq, raw = arg[2:].partition('=')  # split at the first '=': values may contain '='
            if not eq:
                raise SystemExit(f'{arg}: expected --key=value')
            if key not in config:
                raise SystemExit(f'unknown config key {key!r} (from the command line {arg})')
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
            if isinstance(original[key], str) and not isinstance(value, str):
                value = raw  # --run_name=001 stays a string
            config[key] = _checked(key, value, original[key], 'command line')
            print0(f'config: {key} = {config[key]!r} (command line)')
            continue
        if not os.path.isfile(arg):
            raise SystemExit(f'config file {arg} not found (paths are relative to {os.getcwd()})')
        scope = dict(config)
        with open(arg) as f:
            exec(compile(f.read(), arg, 'exec'), scope)
        for key, value in scope.items():
            if key.startswith('_') or isinstance(value, types.ModuleType):
                continue
            if key not in config:
                raise SystemExit(f'{arg}: unknown config key {key!r} (not a default of this script)')
            value = _checked(key, value, original[key], arg)
            if value != config[key] or type(value) is not type(config[key]):
                print0(f'config: {key} = {value!r} ({arg})')
            config[key] = value
    return config


def check_config(config, choices=None, types=None, positive=(), non_negative=(), fractions=()):
    """A script's value checks, each a one-line error naming the key: choices {key: allowed}, types {key: type(s)}
    for keys whose default is None (None stays allowed), positive (> 0), non_negative, fractions (in [0, 1))."""
    for key, allowed in (choices or {}).items():
        if config[key] not in allowed:
            raise SystemExit(f'{key}={config[key]!r}: choose one of {", ".join(map(str, allowed))}')
    for key, kinds in (types or {}).items():
        value, kinds = config[key], kinds if isinstance(kinds, tuple) else (kinds,)
        if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise SystemExit(f'{key}={value!r}: expected {" or ".join(k.__name__ for k in kinds)} (or None)')
    for keys, ok, words in [(positive, lambda v: v > 0, '> 0'), (non_negative, lambda v: v >= 0, '>= 0'),
                            (fractions, lambda v: 0 <= v < 1, 'in [0, 1)')]:
        for key in keys:
            if config[key] is not None and not ok(config[key]):  # nan fails every comparison
                raise SystemExit(f'{key}={config[key]!r}: must be {words}')


# -----------------------------------------------------------------------------------------------------------
# Image folder: root/<class>/<image>, labels in sorted class order (torchvision's ImageFolder), PIL + numpy

def random_crop_arr(pil_image, image_size, rng):
    """Stage 1: BICUBIC resize of the short side to 1.5x, then a random image_size crop (torchvision's
    Resize(int) rounds the long side down, RandomCrop draws top then left)."""
    w, h = pil_image.size
    short = round(1.5 * image_size)
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    arr = np.array(pil_image.resize(size, resample=Image.BICUBIC))
    top, left = rng.integers(0, arr.shape[0] - image_size + 1), rng.integers(0, arr.shape[1] - image_size + 1)
    return arr[top:top + image_size, left:left + image_size]


class ImageFolder(torch.utils.data.Dataset):
    """ImageNet-style folder -> (float [3,S,S] in [0,1], label); flips and crops are drawn from (seed, epoch, index).
    crop: 'center' (ADM's) or 'random' (stage 1). A folder of images without class sub-folders is one class, 0."""

    def __init__(self, root, image_size, crop='center', flip=False, seed=0):
        if not os.path.isdir(root):
            raise SystemExit(f'{root}: no such image folder (expected {root}/<class>/<image>)')
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        if not classes:  # unlabeled images: an unconditional model (num_classes=1)
            classes = ['.']
        files, labels = [], []
        for label, c in enumerate(classes):
            for dirpath, _, names in sorted(os.walk(os.path.join(root, c), followlinks=True)):
                found = sorted(n for n in names if n.lower().endswith(IMAGE_EXTS))
                files += [os.path.join(dirpath, n) for n in found]
                labels += [label] * len(found)
        if not files:
            raise SystemExit(f'{root}: no images ({", ".join(IMAGE_EXTS)}) in {root}/<class>/ or {root}/')
        empty = [c for c, n in zip(classes, np.bincount(labels, minlength=len(classes))) if n == 0]
        if empty:  # their labels keep the sorted order, so that released class ids stay valid
            print0(f'warning: {len(empty)} empty class folders in {root} (labels without images): '
                   f'{", ".join(empty[:5])}')
        # numpy arrays, not lists of str: every worker touching a Python object copies its page (pytorch #13246)
        self.files, self.labels, self.classes = np.array(files), np.array(labels), classes
        self.root, self.image_size, self.crop, self.flip, self.seed = root, image_size, crop, flip, seed
        self._skipped = multiprocessing.Value('q', 0)  # shared with the DataLoader workers

    @property
    def skipped(self):
        """Unreadable images replaced so far, over all workers of this rank (each read counts once)."""
        return self._skipped.value

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        # the sampler of make_loader sends (index, epoch): a persistent worker cannot see set_epoch otherwise
        i, epoch = item if isinstance(item, tuple) else (item, 0)
        rng = np.random.default_rng([self.seed, epoch, i])
        for attempt in range(min(len(self), 100)):
            j = (i + attempt) % len(self)  # an unreadable image is replaced by the next one, deterministically
            try:
                im = open_rgb(self.files[j])
                break
            except (OSError, ValueError, SyntaxError):  # truncated, corrupt or not an image
                with self._skipped.get_lock():
                    self._skipped.value += 1
        else:
            raise RuntimeError(f'{self.root}: {attempt + 1} unreadable images in a row from {self.files[i]}')
        arr = np.array(center_crop_arr(im, self.image_size)) if self.crop == 'center' else \
            random_crop_arr(im, self.image_size, rng)
        if self.flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255), int(self.labels[j])


def unreadable(data, device):
    """' | N unreadable images skipped' summed over all ranks (collective), or '' (none, or not an ImageFolder)."""
    n = torch.tensor([float(getattr(data, 'skipped', 0))], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(n)
    return f' | {int(n.item())} unreadable images skipped' if n.item() else ''


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start an epoch at a given batch and yields (index, epoch) pairs."""

    def __init__(self, dataset, rank, world_size, seed, batch_size):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.start = batch_size, 0

    def set_epoch(self, epoch, start_batch=0):
        super().set_epoch(epoch)
        self.start = start_batch * self.batch_size

    def __iter__(self):
        return iter([(i, self.epoch) for i in list(super().__iter__())[self.start:]])

    def __len__(self):
        return max(0, self.num_samples - self.start)


def make_loader(dataset, batch_size, rank=0, world_size=1, seed=0, workers=4):
    """-> (loader, sampler) with `batch_size` images per rank. Call sampler.set_epoch(epoch, start_batch) before
    each epoch; the permutation depends on (seed, epoch) only, so a resumed epoch continues exactly."""
    sampler = ResumableSampler(dataset, rank, world_size, seed, batch_size)
    if len(sampler) < batch_size:
        raise SystemExit(f'{len(dataset)} images make no full batch of {batch_size} on each of {world_size} ranks')
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
        generator=torch.Generator())  # own generator: starting the workers must not consume the global RNG
    return loader, sampler


# -----------------------------------------------------------------------------------------------------------
# EMA and unwrapping

def unwrap(model):
    """The plain nn.Module under DDP (.module) and torch.compile (._orig_mod) wrappers; anything else as is."""
    while isinstance(model, DDP) or hasattr(model, '_orig_mod'):
        model = model.module if isinstance(model, DDP) else model._orig_mod
    return model


def make_ema(model):
    """A frozen eval-mode copy of the plain module, made before compiling. A patched m.forward (torch.compile(...))
    is refused: deepcopy would keep that bound method, so the EMA would run the live weights (README: differences)."""
    model = unwrap(model)
    patched = [name or 'model' for name, m in model.named_modules() if 'forward' in vars(m)]
    if patched:
        raise ValueError(f'{patched[0]}.forward is patched (torch.compile(m.forward)?): make the EMA first, '
                         f'then compile the module as a whole')
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model over all parameters (one fused lerp); buffers are copied."""
    model = unwrap(model)
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


# -----------------------------------------------------------------------------------------------------------
# Checkpoints: <dir>/<step:07d>.pt, written atomically, the last `keep` kept, every rank's RNG inside

def rng_state():
    np_state = np.random.get_state()  # stored as tensors and ints, so torch.load(weights_only=True) reads it
    return {'torch': torch.get_rng_state(), 'python': random.getstate(),
            'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if state['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def list_checkpoints(ckpt_dir):
    """[(step, path)] sorted by step; temp files and foreign names are ignored."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = (re.fullmatch(r'(\d+)\.pt', n) for n in os.listdir(ckpt_dir))
    return sorted((int(m[1]), os.path.join(ckpt_dir, m[0])) for m in names if m)


def latest_checkpoint(ckpt_dir):
    """Path of the highest-step checkpoint in ckpt_dir, or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def save_checkpoint(ckpt_dir, *, step, epoch, batch, config, keep=3, **state):
    """Collective: rank 0 writes {state..., step, epoch, batch (of `epoch`, consumed), config, rng: [per rank]} to
    ckpt_dir/<step>.pt; modules unwrapped, optimizers by state_dict(), anything else as is. keep=None keeps all."""
    rngs = [rng_state()]
    if dist.is_initialized():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state())
    if not dist.is_initialized() or dist.get_rank() == 0:
        state = {k: unwrap(v).state_dict() if hasattr(v, 'state_dict') else v for k, v in state.items()}
        state.update(step=step, epoch=epoch, batch=batch, config=config, rng=rngs)
        os.makedirs(ckpt_dir, exist_ok=True)
        path = os.path.join(ckpt_dir, f'{step:07d}.pt')
        try:
            with open(path + '.tmp', 'wb') as f:  # a crash mid-write leaves a .tmp, never a truncated .pt
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:  # torch's writer words a full disk as 'file write failed'
            os.remove(path + '.tmp')
            full = getattr(e, 'errno', None) == errno.ENOSPC or 'write failed' in str(e)
            why = 'no space left on device' if full else (getattr(e, 'strerror', None) or str(e).splitlines()[0])
            raise SystemExit(f'{why} while writing {path} (the previous checkpoints are kept)') from None
        os.replace(path + '.tmp', path)
        fd = os.open(ckpt_dir, os.O_RDONLY)  # the rename itself survives a power cut only once the folder is synced
        os.fsync(fd)
        os.close(fd)
        old = [p for _, p in list_checkpoints(ckpt_dir)[:-keep]] if keep else []
        old += [os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if n.endswith('.pt.tmp')]  # earlier crashes
        for p in old:
            os.remove(p)
    if dist.is_initialized():
        dist.barrier()


def resume(ckpt_dir, config, **objects):
    """load_checkpoint of the newest readable checkpoint in ckpt_dir, or None. An unreadable one (truncated by a
    copy or a quota, empty, not a checkpoint) is renamed aside to <name>.bad, never deleted, with one warning."""
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except Exception as e:  # every rank sees the same file; rank 0 moves it aside
            if int(os.environ.get('RANK', 0)) == 0 and os.path.exists(path):
                os.replace(path, path + '.bad')
            print0(f'warning: {path} is unreadable ({type(e).__name__}); renamed to {os.path.basename(path)}.bad, '
                   'trying the one before')
            continue
        return load_checkpoint(path, config, **objects)
    return None


def load_checkpoint(path, config=None, **objects):
    """Restore each object (model=..., ema=..., optimizer=...) from its entry, and this rank's RNG states; returns
    the checkpoint dict. Call it last before the loop: a random draw in between would shift every stream. With
    the run's config, another global_batch is refused: its data position (batches of an epoch) means other images."""
    # mmap: tensors are paged in as each load_state_dict copies them (not 8 ranks x 13 GB in host memory at once)
    ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    if config and ckpt['config'].get('global_batch') != config['global_batch']:
        raise SystemExit(f'{path} was trained with global_batch={ckpt["config"].get("global_batch")}, not '
                         f'{config["global_batch"]}: start in another out_dir')
    for key, obj in objects.items():
        if key not in ckpt:
            raise SystemExit(f'{path}: no {key!r} entry (it has {", ".join(ckpt)})')
        try:
            unwrap(obj).load_state_dict(ckpt[key])
        except (RuntimeError, ValueError, KeyError) as e:  # another model size, or another optimizer
            diff = [k for k in config or {} if ckpt['config'].get(k) != config[k]]
            raise SystemExit(f'{path}: its {key} does not fit this run ({str(e).splitlines()[0][:100]}); config '
                             f'keys that differ: {", ".join(diff) or "none"}; start in another out_dir') from None
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(ckpt['rng']) == world:
        set_rng_state(ckpt['rng'][rank])
    else:
        print0(f'{path}: saved by {len(ckpt["rng"])} ranks, resumed on {world}: random streams start afresh')
    return dict(ckpt, path=path)


# -----------------------------------------------------------------------------------------------------------
# Learning-rate schedules (pure functions of the optimizer step; scripts turn epochs into steps)

def lr_linear_decay(step, base, final, decay_start, decay_end):
    """Stage 2: `base` until decay_start, linear to `final` at decay_end, `final` after."""
    p = min(max((step - decay_start) / max(1, decay_end - decay_start), 0.0), 1.0)
    return base + (final - base) * p


def lr_warmup_cosine(step, base, final, warmup, decay_end):
    """Stage 1: linear warm-up base * (step + 1) / warmup, then cosine to `final` at decay_end, `final` after."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min((step - warmup) / max(1, decay_end - warmup), 1.0)
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * p))


# -----------------------------------------------------------------------------------------------------------
# Toy stand-ins and the run log

def write_toy_encoder(path, name='dinov2-b', overrides=None, seed=0):
    """A random-weight Encoder (the `name` preset with `overrides`) saved under its published names, so that the
    offline smoke runs (configs/tiny.py, configs/decoder_tiny.py, the tests) go through the real loading code."""
    with torch.random.fork_rng(devices=[]):  # the caller's stream is left untouched
        torch.manual_seed(seed)
        enc = Encoder(**dict(ENCODERS[name], name=name, **(overrides or {})))
        with torch.no_grad():  # the published files carry non-zero embeddings
            for p in (enc.cls_token, enc.register_tokens, enc.pos_embed):
                if p is not None:
                    p.normal_(std=0.5)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    torch.save(published_state_dict(enc, PUBLISHED[enc.layout]), path)
    return enc


def write_toy_images(folder, num_classes, per_class, size, seed=0):
    """folder/class<k>/<i>.png for the smoke runs: a noisy background of class k's hue with a square of the opposite
    colour at a random place, sides in [size, 1.5 size): classes a tiny model tells apart, crops that differ."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        os.makedirs(os.path.join(folder, f'class{c:03d}'), exist_ok=True)
        colour = 255 * np.array(colorsys.hsv_to_rgb(c / num_classes, 0.8, 0.9))
        for i in range(per_class):
            h, w = rng.integers(size, size * 3 // 2, size=2)
            img = np.clip(colour + rng.normal(0, 20, (h, w, 3)), 0, 255)
            top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
            img[top:top + h // 3, left:left + w // 3] = 255 - colour
            Image.fromarray(img.astype(np.uint8)).save(os.path.join(folder, f'class{c:03d}', f'{i:03d}.png'))


def start_log(out_dir, config, device):
    """Rank 0 appends a header (git commit, torch, device, command, config as a loadable config file) to
    out_dir/log.txt; returns log(msg), which prints and appends on rank 0 and does nothing elsewhere."""
    if int(os.environ.get('RANK', 0)) != 0:
        return lambda msg: None

    def git(*args):
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(['git', *args], cwd=here, capture_output=True, text=True).stdout.strip()
    try:
        commit = git('rev-parse', 'HEAD') or 'unknown'
        commit += ' (uncommitted changes)' if git('status', '--porcelain', '--untracked-files=no') else ''
    except OSError:
        commit = 'unknown (no git)'
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else (platform.processor() or 'cpu')
    world = dist.get_world_size() if dist.is_initialized() else 1
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'log.txt')

    def log(msg):
        print(msg, flush=True)
        with open(path, 'a') as f:
            f.write(msg + '\n')

    log(f'# git {commit}\n# torch {torch.__version__}, {world} x {name}\n# {" ".join(sys.argv)}\n'
        + '\n'.join(f'{k} = {v!r}' for k, v in config.items()))
    return log


# -----------------------------------------------------------------------------------------------------------
# Metrics: out_dir/metrics.jsonl and out_dir/loss.png for every run, Weights & Biases when asked (rank 0 only)

class Metrics:
    """One JSON object per log step in out_dir/metrics.jsonl, the loss and lr curves in out_dir/loss.png (drawn with
    PIL), and with wandb_log the same numbers and the preview grids in a Weights & Biases run (imported only then)
    that a restart resumes. A run resuming at `step` first drops the records after it: the curves go on without
    duplicates. Off rank 0 every method does nothing."""

    def __init__(self, out_dir, config, step=0, wandb_log=False, wandb_project='nano-rae', wandb_run_name=None):
        self.active, self.wandb, self.records = int(os.environ.get('RANK', 0)) == 0, None, []
        self.path, self.plot_path = os.path.join(out_dir, 'metrics.jsonl'), os.path.join(out_dir, 'loss.png')
        if not self.active:
            return
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    with contextlib.suppress(ValueError):  # a line cut short by a crash is dropped
                        self.records.append(json.loads(line))
        self.records = [r for r in self.records if isinstance(r, dict) and r.get('step', 0) <= step]
        with open(self.path + '.tmp', 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in self.records)
        os.replace(self.path + '.tmp', self.path)
        if wandb_log:
            import wandb  # optional: only runs that ask for it need the package
            id_path = os.path.join(out_dir, 'wandb_id.txt')  # the run id, so that a restart resumes the same run
            if not os.path.exists(id_path):
                with open(id_path, 'w') as f:
                    f.write(secrets.token_hex(4))
            with open(id_path) as f:
                run_id = f.read().strip()
            self.wandb = wandb.init(project=wandb_project, name=wandb_run_name, id=run_id, resume='allow',
                                    config=config)

    def log(self, step, **values):
        """Append {'step': step, **values} (numbers as Python floats/ints), send it to wandb, redraw loss.png."""
        if not self.active:
            return
        record = {'step': step, **{k: v if isinstance(v, (int, str)) else float(v) for k, v in values.items()}}
        self.records.append(record)
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        self.plot()

    def image(self, key, path, step):
        if self.wandb is not None:
            import wandb
            self.wandb.log({key: wandb.Image(path)}, step=step)

    def plot(self, keys=('loss', 'lr'), size=(640, 360), margin=40):
        """loss.png: each key against the step, scaled to its own range (the legend gives it), written atomically."""
        curves = {k: [(r['step'], r[k]) for r in self.records if k in r] for k in keys}
        if not self.active or len(curves[keys[0]]) < 2:
            return
        W, H = size
        im = Image.new('RGB', size, 'white')
        draw = ImageDraw.Draw(im)
        steps = [s for curve in curves.values() for s, _ in curve]
        s0, s1 = min(steps), max(steps)
        draw.rectangle([margin, margin // 2, W - margin, H - margin], outline=(170, 170, 170))
        draw.text((margin, H - margin + 6), f'step {s0}', fill='black')
        draw.text((W - 2 * margin - 20, H - margin + 6), f'step {s1}', fill='black')
        for i, (key, curve) in enumerate(c for c in curves.items() if c[1]):
            values = [v for _, v in curve]
            lo, hi = min(values), max(values)
            xy = [(margin + (s - s0) / max(s1 - s0, 1) * (W - 2 * margin),
                   H - margin - (v - lo) / ((hi - lo) or 1) * (H - 1.5 * margin)) for s, v in curve]
            colour = [(200, 30, 30), (30, 90, 200), (30, 150, 60)][i % 3]
            draw.line(xy, fill=colour, width=2) if len(xy) > 1 else draw.point(xy, fill=colour)
            draw.text((margin + 6 + 170 * i, margin // 2 + 4), f'{key} {lo:.4g} .. {hi:.4g}', fill=colour)
        im.save(self.plot_path + '.tmp.png')
        os.replace(self.plot_path + '.tmp.png', self.plot_path)


# -----------------------------------------------------------------------------------------------------------
# FLOPs of a training step, counted on the model's own code (the first log line; bench/ turns them into MFU)

def meta_like(module):
    """{name: meta tensor} for every parameter and buffer: functional_call(module, meta_like(module), args) runs the
    module's own forward on shapes only."""
    return {n: torch.empty_like(t, device='meta').requires_grad_(t.requires_grad)
            for n, t in itertools.chain(module.named_parameters(), module.named_buffers())}


def step_flops(dit, latent_shape=(768, 16, 16), encoder=None, image_size=256, forward_only=False, batch=2):
    """FLOPs per image of one diffusion training step of `dit` (forward + backward of flow_loss; forward_only: the
    DiT forward alone), plus the no-grad forward of `encoder` on image_size images when one is given, counted by
    FlopCounterMode on meta tensors. Any instance works (real weights, or one built under torch.device('meta'))."""
    with FlopCounterMode(display=False) as counter:
        if encoder is not None:
            check, encoder.check_inputs = encoder.check_inputs, False  # a range check cannot read meta values
            try:
                with torch.no_grad():
                    functional_call(encoder, meta_like(encoder), (torch.zeros(batch, 3, image_size, image_size,
                                                                              device='meta'),))
            finally:
                encoder.check_inputs = check
        state = meta_like(dit)
        # model FLOPs: checkpointing's recomputation is not counted (and it would rerun blocks on the real weights)
        recompute, dit.grad_checkpoint = dit.grad_checkpoint, False
        x = torch.zeros(batch, *latent_shape, device='meta')
        y, t = torch.zeros(batch, dtype=torch.long, device='meta'), torch.zeros(batch, device='meta')
        if forward_only:
            functional_call(dit, state, (x, t, y))
        else:
            flow_loss(lambda *a: functional_call(dit, state, a), x, y, 1.0, eps=torch.zeros_like(x), t=t).sum() \
                .backward()
        dit.grad_checkpoint = recompute
    return counter.get_total_flops() / batch
