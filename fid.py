"""
FID, sFID, Inception Score, Precision and Recall exactly as the ADM evaluator computes them
(openai/guided-diffusion `evaluations/evaluator.py`, the protocol RAE reports its numbers with), with its
TensorFlow Inception-v3 graph written out by hand in PyTorch.

  python fid.py samples.npz imagenet256                          # IS, FID, sFID, Precision, Recall
  python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz       # the same with a local reference batch
  python fid.py samples_folder/ imagenet512 --batch-size 200      # a folder of same-size images works too
  python fid.py --write-ref val256.npz /data/imagenet/val --image-size 256 --keep-images 10000
  python fid.py recon.npz val256.npz                              # rFID against the statistics written above

Samples are uint8 images (N, H, W, 3) under `arr_0` in an .npz (what sample.py writes), read in batches straight
from the zip; any H = W works (resized to 299 as the TF graph did). From Python (e.g. online FID in training):

  model = fid.InceptionV3.from_pretrained().to('cuda')
  ref = fid.load_reference('imagenet256')                          # load once, reuse
  metrics = fid.evaluate(uint8_nhwc_batches, ref, model=model, pr=False)
"""
import argparse
import os
import sys
import warnings
import zipfile
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from files import (NpzImages, center_crop_arr, check_format, copy_weights, download, list_images,
                   load_state_dict_file, open_rgb, write_images_npy)
from runtime import one_line_errors, set_tf32

# The pytorch-fid port of the 2015-12-05 TF graph that ADM's evaluator runs (566 keys, torchvision layout).
INCEPTION_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                 'pt_inception-2015-12-05-6726825d.pth')
# ADM's reference batches: precomputed train-set statistics plus 10k images for precision/recall.
ADM_REF_BASE = 'https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/'
ADM_REFS = {'imagenet256': '256/VIRTUAL_imagenet256_labeled.npz',
            'imagenet512': '512/VIRTUAL_imagenet512.npz',  # sic: no "_labeled" at 512
            'imagenet128': '128/VIRTUAL_imagenet128_labeled.npz',
            'imagenet64': '64/VIRTUAL_imagenet64_labeled.npz'}


@contextmanager
def exact_fp32():
    """True fp32 inside: TF32 off for matmuls and cuDNN, no autocast (the TF graph ran in full fp32)."""
    old = set_tf32(False)
    try:
        with torch.autocast('cuda', enabled=False), torch.autocast('cpu', enabled=False):
            yield
    finally:
        set_tf32(old)


# -----------------------------------------------------------------------------------------------------------
# The network: Inception-v3 as in the 2015 TF graph (the "FID Inception")

def tf1_resize(x, size=299):
    """Bilinear resize with TF1's legacy ResizeBilinear rule: src = i * in/out, no half-pixel offset (PyTorch's
    align_corners=False is ~0.07 px off at 256 -> 299, which moves FID measurably). The lerps run in the TF CPU
    kernel's order (along x, then y): bit-identical to TF in float32."""
    def taps(n_in):
        ftype = np.float64 if x.dtype == torch.float64 else np.float32  # TF: the scale in float, then i * scale
        src = np.arange(size, dtype=ftype) * (ftype(n_in) / ftype(size))
        i0 = np.floor(src)
        i1 = np.minimum(i0 + 1, n_in - 1)  # TF: min(ceil(src), n-1); the same wherever the weight is > 0
        to = lambda a, dtype: torch.from_numpy(a).to(x.device, dtype)
        return to(i0, torch.long), to(i1, torch.long), to(src - i0, x.dtype)

    y0, y1, wy = taps(x.shape[-2])
    x0, x1, wx = taps(x.shape[-1])
    left, right = x[..., x0], x[..., x1]
    rows = left + (right - left) * wx                         # (B, C, H, size)
    top, bottom = rows[..., y0, :], rows[..., y1, :]
    return top + (bottom - top) * wy[:, None]                 # (B, C, size, size)


def sfid_features(branch1x1):
    """ADM's sFID vector: first 7 channels of Mixed_6d.branch1x1 [B,192,17,17], flattened in H, W, C order."""
    return branch1x1[:, :7].permute(0, 2, 3, 1).flatten(1)  # (B, 17*17*7 = 2023); TF tensors are NHWC


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TF's value) -> ReLU."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)  # in place: a third less activation memory


# TF's SAME average pooling divides by the number of real pixels: padding is not counted
POOLS = {'avg': lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False),
         'max': lambda x: F.max_pool2d(x, 3, stride=1, padding=1),
         'max/2': lambda x: F.max_pool2d(x, 3, stride=2)}


class Mixed(nn.Module):
    """An Inception block: branches side by side on one input, their outputs concatenated on channels. A branch
    is a chain of steps: a pool (a key of POOLS), a conv (name, c_out, kernel[, stride]), or a list of convs that
    all read the step's input (the 1x3 | 3x1 pairs of Mixed_7b, 7c). Stride-1 convs keep the size (TF's SAME
    padding), stride-2 ones do not pad (VALID)."""

    def __init__(self, c_in, branches):
        super().__init__()
        self.plan = []  # per branch, its steps: a pool name or the names of the convs
        for branch in branches:
            c, steps = c_in, []
            for step in branch:
                if isinstance(step, str):
                    steps.append(step)
                    continue
                convs = step if isinstance(step, list) else [step]
                for name, c_out, kernel, *stride in convs:
                    self.add_module(name, BasicConv2d(c, c_out, kernel, *stride, padding=0 if stride else 'same'))
                steps.append([name for name, *_ in convs])
                c = c_out
            self.plan.append(steps)

    def branches(self, x):
        outs = []
        for steps in self.plan:
            ys = [x]
            for step in steps:
                ys = [POOLS[step](ys[0])] if isinstance(step, str) else [getattr(self, n)(ys[0]) for n in step]
            outs += ys
        return outs

    def forward(self, x):
        return torch.cat(self.branches(x), 1)


def inception_a(c_in, pool_features):
    """35x35 block (Mixed_5b-5d): 1x1 | 5x5 | double 3x3 | avg-pool."""
    return Mixed(c_in, [[('branch1x1', 64, 1)],
                        [('branch5x5_1', 48, 1), ('branch5x5_2', 64, 5)],
                        [('branch3x3dbl_1', 64, 1), ('branch3x3dbl_2', 96, 3), ('branch3x3dbl_3', 96, 3)],
                        ['avg', ('branch_pool', pool_features, 1)]])


def inception_b(c_in):
    """Grid reduction 35 -> 17 (Mixed_6a): strided 3x3 | double 3x3 | max-pool."""
    return Mixed(c_in, [[('branch3x3', 384, 3, 2)],
                        [('branch3x3dbl_1', 64, 1), ('branch3x3dbl_2', 96, 3), ('branch3x3dbl_3', 96, 3, 2)],
                        ['max/2']])


def inception_c(c_in, c7):
    """17x17 block (Mixed_6b-6e) with factorised 7x7 convolutions (1x7 then 7x1)."""
    return Mixed(c_in, [[('branch1x1', 192, 1)],
                        [('branch7x7_1', c7, 1), ('branch7x7_2', c7, (1, 7)), ('branch7x7_3', 192, (7, 1))],
                        [('branch7x7dbl_1', c7, 1), ('branch7x7dbl_2', c7, (7, 1)), ('branch7x7dbl_3', c7, (1, 7)),
                         ('branch7x7dbl_4', c7, (7, 1)), ('branch7x7dbl_5', 192, (1, 7))],
                        ['avg', ('branch_pool', 192, 1)]])


def inception_d(c_in):
    """Grid reduction 17 -> 8 (Mixed_7a): 3x3 | 7x7 then 3x3 | max-pool."""
    return Mixed(c_in, [[('branch3x3_1', 192, 1), ('branch3x3_2', 320, 3, 2)],
                        [('branch7x7x3_1', 192, 1), ('branch7x7x3_2', 192, (1, 7)), ('branch7x7x3_3', 192, (7, 1)),
                         ('branch7x7x3_4', 192, 3, 2)],
                        ['max/2']])


def inception_e(c_in, pool):
    """8x8 block (Mixed_7b, 7c) with expanded 1x3 / 3x1 branches."""
    return Mixed(c_in, [[('branch1x1', 320, 1)],
                        [('branch3x3_1', 384, 1), [('branch3x3_2a', 384, (1, 3)), ('branch3x3_2b', 384, (3, 1))]],
                        [('branch3x3dbl_1', 448, 1), ('branch3x3dbl_2', 384, 3),
                         [('branch3x3dbl_3a', 384, (1, 3)), ('branch3x3dbl_3b', 384, (3, 1))]],
                        [pool, ('branch_pool', 192, 1)]])


class InceptionV3(nn.Module):
    """The FID Inception-v3: uint8 images of any size -> pool3 [B,2048] and sFID features [B,2023]."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)     # 299 -> 149
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)              # 147
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)   # 147, then max-pool -> 73
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)             # 71, then max-pool -> 35
        self.Mixed_5b = inception_a(192, pool_features=32)       # 256 channels
        self.Mixed_5c = inception_a(256, pool_features=64)       # 288
        self.Mixed_5d = inception_a(288, pool_features=64)       # 288
        self.Mixed_6a = inception_b(288)                         # 768 @ 17
        self.Mixed_6b = inception_c(768, c7=128)
        self.Mixed_6c = inception_c(768, c7=160)
        self.Mixed_6d = inception_c(768, c7=160)
        self.Mixed_6e = inception_c(768, c7=192)
        self.Mixed_7a = inception_d(768)                         # 1280 @ 8
        self.Mixed_7b = inception_e(1280, pool='avg')            # 2048
        # the 2015 graph max-pools in its last block, most likely a slip that every FID keeps
        self.Mixed_7c = inception_e(2048, pool='max')            # 2048
        self.fc = nn.Linear(2048, 1008)  # TF softmax/logits: 1008 classes (1000 + unused)

    @classmethod
    def from_pretrained(cls, weights=None):
        """The 2015 TF weights as ported by pytorch-fid (downloaded once to the cache), or a local file."""
        path = weights or download(INCEPTION_URL)
        return cls().load_weights(load_state_dict_file(path), what=str(path))

    def load_weights(self, state_dict, what='Inception weights'):
        """Copy a state dict with the pytorch-fid key names; BatchNorm step counters may be absent."""
        # the counters are unused in eval mode; torch-fidelity's converter does not write them
        counters = {k: v for k, v in self.state_dict().items() if k.endswith('num_batches_tracked')}
        copy_weights(self, {**counters, **state_dict}, what)
        return self.eval().requires_grad_(False)

    def forward(self, images):
        """images: uint8 (or float in 0..255) [B,3,H,W] -> (pool3 [B,2048], spatial [B,2023])."""
        with exact_fp32():
            x = tf1_resize(images.to(self.fc.weight.dtype), 299)
            x = (x - 128) / 128  # the graph's Sub 128, Mul 1/128: 255 maps to 0.9921875, not 1
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, 3, stride=2)                                   # (B, 64, 73, 73)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, 3, stride=2)                                   # (B, 192, 35, 35)
            x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                 # (B, 288, 35, 35)
            x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))                 # (B, 768, 17, 17)
            branches = self.Mixed_6d.branches(x)
            spatial = sfid_features(branches[0])  # TF 'mixed_6/conv' = Mixed_6d.branch1x1 after BN + ReLU
            x = self.Mixed_6e(torch.cat(branches, 1))
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                 # (B, 2048, 8, 8)
            return x.mean((2, 3)), spatial                                     # pool3 = TF 'pool_3'

    def logits(self, pool3):
        """ADM's IS input: pool3 @ W with the bias dropped (it feeds softmax/logits/MatMul, before the add)."""
        with exact_fp32():
            return pool3 @ self.fc.weight.T


# -----------------------------------------------------------------------------------------------------------
# Reading images: an .npz streamed batch by batch (files.NpzImages), or a folder

def _readable(items):
    """DataLoader collate: (uint8 batch of the readable images or None, their indices, indices of unreadable)."""
    good = [(a, i) for a, i in items if a is not None]
    return np.stack([a for a, _ in good]) if good else None, [i for _, i in good], [i for a, i in items if a is None]


class FolderImages:
    """A folder (searched recursively) of same-size images, decoded in parallel; `crop` applies ADM's centre crop.
    Unreadable files are skipped and counted (`skipped`; the first is named on stderr); `indices` are the file
    indices of the batch last yielded."""

    def __init__(self, folder, crop=None, workers=None):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f'{folder}: no such folder')
        self.files, self.crop, self.skipped, self.indices = list_images(folder), crop, 0, []
        self.workers = min(8, os.cpu_count() or 1) if workers is None else workers
        if crop is None:  # headers only: a size mismatch fails now, not an hour into the run
            size = None
            for p in self.files:
                with suppress(OSError, SyntaxError), Image.open(p) as im:  # unreadable: skipped when read
                    size = size or (im.size, p)
                    if im.size != size[0]:
                        raise ValueError(f'{p}: image size {im.size[0]}x{im.size[1]} differs from '
                                         f'{size[1].name} ({size[0][0]}x{size[0][1]}); samples must share one size')

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):  # for the DataLoader: (the image, or None when unreadable; its index)
        try:
            im = open_rgb(self.files[i])
        except (OSError, ValueError, SyntaxError):  # truncated, corrupt or not an image: skipped and counted
            return None, i
        return np.array(center_crop_arr(im, self.crop) if self.crop else im), i

    def batches(self, batch_size):
        loader = torch.utils.data.DataLoader(self, batch_size, num_workers=self.workers, collate_fn=_readable)
        for b, self.indices, bad in loader:
            if bad and not self.skipped:
                print(f'warning: {self.files[bad[0]]} is unreadable: skipped (and counted)', file=sys.stderr)
            self.skipped += len(bad)
            if b is not None:
                yield b
        if self.skipped:
            print(f'{self.skipped} unreadable images skipped in total', file=sys.stderr)


def open_images(path, workers=None):
    """Samples from an .npz (`arr_0`) or a folder of images: an object with len() and batches(batch_size)."""
    return FolderImages(str(path), workers=workers) if os.path.isdir(path) else NpzImages(path)


# -----------------------------------------------------------------------------------------------------------
# The metrics, each as ADM computes it

class FeatureStats:
    """Running mean and unbiased covariance (np.mean / np.cov semantics) in float64, keeping no features."""

    def __init__(self):
        self.n, self.shift, self.sum, self.outer = 0, None, 0, 0

    def update(self, feats):
        x = feats.double()
        if self.shift is None:  # centring on the first batch keeps x^T x free of cancellation
            self.shift = x.mean(0)
        x = x - self.shift
        self.n += len(x)
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def mu_sigma(self):
        if self.n < 2:
            raise ValueError(f'statistics need at least 2 images, got {self.n}')
        mean = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return (self.shift + mean).cpu().numpy(), sigma.cpu().numpy()


def _sqrtm(a):
    # scipy >= 1.16 deprecates `disp` (removed in 1.18) and warns on singular input; we warn ourselves below
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)) in float64, with ADM's safeguards (samples first)."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2))
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # a (near-)singular product: regularise both covariances and retry
        warnings.warn(f'fid calculation produces singular product; adding {eps} to diagonal of cov estimates')
        offset = np.eye(len(sigma1)) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # round-off can leave a small imaginary part (dropped by .real below)
    if np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        raise ValueError(f'sqrtm has a large imaginary component {np.max(np.abs(covmean.imag)):.3g}')
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def inception_score(logits, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) per consecutive split of 5000 (no shuffle), averaged; float32 like ADM."""
    p = torch.softmax(torch.as_tensor(logits).float(), dim=1).cpu().numpy()
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def pairwise_sq_distances(u, v):
    """ADM's DistanceBlock: ||u||^2 - 2 u.v + ||v||^2 clamped at 0, in fp16 with each op rounded to fp16 (products
    accumulated in fp32 as a GPU GEMM does); the block is redone in fp32 if any fp16 value is inf or NaN."""
    with exact_fp32():
        u16, v16 = u.half().float(), v.half().float()
        nu = (u16 * u16).half().float().sum(1).half()
        nv = (v16 * v16).half().float().sum(1).half()
        d = (nu[:, None] - 2 * (u16 @ v16.T).half()) + nv[None]  # half arithmetic: each op rounds to fp16
        if torch.isfinite(d).all():
            return d.clamp(min=0).float()
        u, v = u.float(), v.float()
        return ((u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None]).clamp(min=0)


def manifold_radii(feats, k=3, block=10000):
    """Squared distance from each point to its k-th nearest neighbour within the set (index k counts itself)."""
    if len(feats) <= k:
        raise ValueError(f'precision/recall need more than k={k} points, got {len(feats)}')
    radii = []
    for i in range(0, len(feats), block):
        nearest = None  # the k+1 smallest distances of each row so far: the same as a partition of the full row
        for j in range(0, len(feats), block):
            d = pairwise_sq_distances(feats[i:i + block], feats[j:j + block])
            d = d if nearest is None else torch.cat([nearest, d], 1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def precision_recall(ref, samples, k=3, block=10000):
    """Improved precision/recall (Kynkaanniemi et al. 2019) on pool3 features, as ADM's ManifoldEstimator: the
    fractions of samples inside some reference point's k-NN ball and of reference points inside some sample's.
    Distances run reference-by-sample, ADM's orientation (fp16 rounding is not symmetric)."""
    ref, samples = torch.as_tensor(ref), torch.as_tensor(samples, device=torch.as_tensor(ref).device)
    r_ref, r_samples = manifold_radii(ref, k, block), manifold_radii(samples, k, block)
    ref_in, samples_in = (torch.zeros(len(a), dtype=torch.bool, device=ref.device) for a in (ref, samples))
    for i in range(0, len(ref), block):
        for j in range(0, len(samples), block):
            d = pairwise_sq_distances(ref[i:i + block], samples[j:j + block])
            ref_in[i:i + block] |= (d <= r_samples[None, j:j + block]).any(1)
            samples_in[j:j + block] |= (d <= r_ref[i:i + block, None]).any(0)
    return samples_in.double().mean().item(), ref_in.double().mean().item()


# -----------------------------------------------------------------------------------------------------------
# Evaluation

def load_reference(reference):
    """An ADM-style reference .npz, or one by name (imagenet256, imagenet512, ...) downloaded once from ADM's
    bucket -> {mu, sigma, mu_s, sigma_s (float64), images (NpzImages or None)}."""
    path = download(ADM_REF_BASE + ADM_REFS[reference]) if reference in ADM_REFS else reference
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: no such file (named references: {", ".join(ADM_REFS)})')
    check_format(path, '.npz')
    try:
        with np.load(path) as f:
            keys = set(f.files)
            if 'mu' not in keys or 'sigma' not in keys:
                raise ValueError(f'{path}: no precomputed mu/sigma (it holds {sorted(keys)}); not a reference '
                                 'batch: write one with `python fid.py --write-ref OUT.npz FOLDER`')
            ref = {k: np.asarray(f[k], np.float64) for k in ('mu', 'sigma', 'mu_s', 'sigma_s') if k in keys}
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f'{path}: not a readable .npz ({e})') from None
    for k, s, d in (('mu', 'sigma', 2048), ('mu_s', 'sigma_s', 2023)):
        shapes = tuple(ref[a].shape if a in ref else None for a in (k, s))  # both absent, or both of the right size
        if shapes != (None, None) and shapes != ((d,), (d, d)):
            raise ValueError(f'{path}: {k}/{s} have shapes {shapes[0]}/{shapes[1]}, expected ({d},)/({d}, {d})')
    ref['images'] = NpzImages(path) if 'arr_0' in keys else None
    return ref


@torch.no_grad()
def extract_features(model, batches, total=None, desc='Inception', progress=True):
    """uint8 NHWC batches -> (pool3 [N,2048] float32, FeatureStats pool3, FeatureStats sFID). Only pool3 (8 KB an
    image, needed for IS and precision/recall) is kept; the covariances accumulate as we go."""
    pool3, stats, stats_s = [], FeatureStats(), FeatureStats()
    with tqdm(total=total, desc=desc, unit='img', disable=not progress) as bar:
        for b in batches:
            if b.dtype != (torch.uint8 if torch.is_tensor(b) else np.uint8) or b.ndim != 4 or b.shape[-1] != 3:
                raise ValueError(f'sample batches must be uint8 (B, H, W, 3), got {b.dtype} {tuple(b.shape)}')
            p, s = model(torch.as_tensor(b).to(model.fc.weight.device, non_blocking=True).permute(0, 3, 1, 2))
            pool3.append(p.float())
            stats.update(p)
            stats_s.update(s)
            bar.update(len(b))
    if not pool3:
        raise ValueError('no images to evaluate')
    return torch.cat(pool3), stats, stats_s


def _setup(model, device, batch_size):
    """The pretrained network unless one is given; batch 200 on a GPU, 50 on CPU (there ~1.1 GB of activations)."""
    if model is None:
        model = InceptionV3.from_pretrained().to(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    return model, batch_size or (200 if model.fc.weight.is_cuda else 50)


def evaluate(samples, reference, model=None, device=None, batch_size=None, pr=True, workers=None, progress=True):
    """IS, FID, sFID, Precision, Recall of samples against a reference batch, as ADM's evaluator prints them.
    samples: an .npz / folder path, open_images() of one, or an iterable of uint8 (B, H, W, 3) batches (numpy or
    torch, any device; quantise generated images first, as the saved .npz would be).
    reference: a name (imagenet256, imagenet512), an .npz path, or the dict of load_reference (reused, and the
    reference images' pool3 features are cached in it). sFID and P/R are left out when the reference lacks
    mu_s/sigma_s or images."""
    ref = reference if isinstance(reference, dict) else load_reference(reference)
    if pr and ref.get('images') is not None and len(ref['images']) < 4:
        raise ValueError(f'precision/recall need at least 4 reference images (k = 3), got {len(ref["images"])}')
    if isinstance(samples, (str, Path)):
        samples = open_images(samples, workers)
    model, batch_size = _setup(model, device, batch_size)
    total = len(samples) if hasattr(samples, 'batches') else None
    batches = samples if total is None else samples.batches(batch_size)
    pool3, stats, stats_s = extract_features(model, batches, total, 'samples', progress)
    mu, sigma = stats.mu_sigma()
    out = {'IS': inception_score(model.logits(pool3)), 'FID': frechet_distance(mu, sigma, ref['mu'], ref['sigma'])}
    if 'mu_s' in ref:
        out['sFID'] = frechet_distance(*stats_s.mu_sigma(), ref['mu_s'], ref['sigma_s'])
    if pr and ref.get('images') is not None:
        if 'pool3' not in ref:
            imgs = ref['images']
            ref['pool3'] = extract_features(model, imgs.batches(batch_size), len(imgs), 'reference', progress)[0]
        out['Precision'], out['Recall'] = precision_recall(ref['pool3'].to(pool3.device), pool3)
    return out


@torch.no_grad()
def write_reference(folder, out, image_size, keep_images=0, model=None, device=None, batch_size=None,
                    workers=None, seed=0, progress=True):
    """Reference statistics of a folder (e.g. ImageNet val for rFID) after ADM's centre crop to image_size.
    Writes mu, sigma, mu_s, sigma_s and, with keep_images > 0, that many cropped images as arr_0 (a fixed random
    subset of the files, in folder order; unreadable ones are skipped) for precision/recall. The chosen images wait
    in a memory-mapped temporary file next to `out`: memory stays at one batch."""
    src = FolderImages(folder, crop=image_size, workers=workers)
    keep = np.zeros(len(src), bool)
    keep[np.random.RandomState(seed).permutation(len(src))[:keep_images]] = True
    model, batch_size = _setup(model, device, batch_size)
    part, n, shape = f'{out}.part', 0, (int(keep.sum()), image_size, image_size, 3)
    chosen = np.lib.format.open_memmap(part + '.arr_0', 'w+', np.uint8, shape) if keep.any() else np.zeros(shape, 'u1')

    def keeping(batches):  # copies the chosen images out on their way through the network
        nonlocal n
        for b in batches:
            mine = b[keep[src.indices]]
            chosen[n:n + len(mine)], n = mine, n + len(mine)
            yield b
        if src.skipped == len(src):
            raise ValueError(f'{folder}: no readable images')

    try:
        _, stats, stats_s = extract_features(model, keeping(src.batches(batch_size)), len(src), 'reference', progress)
        with zipfile.ZipFile(part, 'w') as zf:
            if keep.any():
                write_images_npy(zf, (n, *shape[1:]), (chosen[i:i + 1000] for i in range(0, n, 1000)))
            for name, a in zip(('mu', 'sigma', 'mu_s', 'sigma_s'), (*stats.mu_sigma(), *stats_s.mu_sigma())):
                with zf.open(name + '.npy', 'w', force_zip64=True) as f:
                    np.lib.format.write_array(f, a)
        os.replace(part, out)
    finally:
        del chosen
        for p in (part, part + '.arr_0'):
            if os.path.exists(p):
                os.remove(p)
    return out


# -----------------------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('samples', help='.npz with arr_0 = uint8 (N, H, W, 3), or a folder of same-size images; '
                                   'with --write-ref: the folder of reference images')
    p.add_argument('reference', nargs='?', help=f'reference batch: .npz with mu, sigma, mu_s, sigma_s [, arr_0], '
                                                f'or a name downloaded from ADM: {", ".join(ADM_REFS)}')
    p.add_argument('--write-ref', metavar='OUT.npz', help='instead of evaluating, write reference statistics of '
                                                          'the folder SAMPLES (ADM centre crop) to OUT.npz')
    p.add_argument('--image-size', type=int, default=256, help='centre-crop size for --write-ref (default 256)')
    p.add_argument('--keep-images', type=int, default=0, help='with --write-ref: also store this many cropped '
                                                              'images as arr_0 for precision/recall (ADM: 10000)')
    p.add_argument('--batch-size', type=int, default=None, help='images per Inception batch (default: 200 on a '
                                                                 'GPU, 50 on CPU, ~1.1 GB of activations there)')
    p.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    p.add_argument('--workers', type=int, default=None, help='image decoding processes for folders')
    p.add_argument('--no-pr', action='store_true', help='skip precision/recall (and embedding the 10k references)')
    p.add_argument('--weights', default=None, help='local copy of pt_inception-2015-12-05-6726825d.pth')
    args = p.parse_args(argv)
    if args.write_ref is None and args.reference is None:
        p.error('a reference is needed: a .npz path or one of ' + ', '.join(ADM_REFS))
    with one_line_errors():  # a bad input or a download without network: one line on stderr, exit status 1
        device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
        if args.write_ref:
            if not os.path.isdir(args.samples):
                raise FileNotFoundError(f'{args.samples}: no such folder')
            model = InceptionV3.from_pretrained(args.weights).to(device)
            write_reference(args.samples, args.write_ref, args.image_size, args.keep_images, model,
                            batch_size=args.batch_size, workers=args.workers)
            print(f'wrote {args.write_ref}')
            return
        ref = load_reference(args.reference)   # check both inputs before the slow part
        src = open_images(args.samples, args.workers)
        model = InceptionV3.from_pretrained(args.weights).to(device)
        m = evaluate(src, ref, model, batch_size=args.batch_size, pr=not args.no_pr)
    print('Computing evaluations...')
    for k, v in m.items():  # ADM's lines, in its order
        print(f'{"Inception Score" if k == "IS" else k}: {v}')


if __name__ == '__main__':
    main()
