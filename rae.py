"""
nano RAE: Diffusion Transformers with Representation Autoencoders, in one file.

Reading order (an image's way through the model):
  pixels [B,3,256,256] in [0,1]
    -> Encoder: a frozen, published ViT (DINOv2-B with registers, SigLIP2-B, MAE-B)     tokens [B,256,768]
    -> RAE.encode: tokens as a 2D map, normalised by the latent statistics             latent x [B,768,16,16]
    -> flow: x_t = (1 - t) x + t eps, a DiT (LightningDiT or DiT^DH) predicts v = eps - x
    -> sampler: integrate dx/dt = v from t = 1 (noise) to t ~ 0 (data)                  latent
    -> RAE.decode: a trained ViT decoder maps tokens back to pixels                     images [B,3,256,256]

Sections: downloads and weight files, the ViT (encoders and decoder), the RAE, then the diffusion models,
the flow and the samplers.
"""
import hashlib
import json
import math
import os
import struct
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import requests
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

# -----------------------------------------------------------------------------------------------------------
# Downloads and weight files

HF_REPO = 'nyu-visionx/RAE-collections'  # the authors' released decoders, statistics and DiTs


def hf_url(repo_id, path, revision='main'):
    """URL of a file on the Hugging Face hub; HF_ENDPOINT points it at a mirror (the hub convention)."""
    endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')
    return f'{endpoint}/{repo_id}/resolve/{revision}/{path}'


def cache_dir():
    return Path(os.environ.get('RAE_CACHE', Path.home() / '.cache' / 'rae'))


def download(url, sha256=None, size=None, filename=None, retries=5, md5=None):
    """Fetch url into the cache once and return the local path.

    The cache path is the URL's path without the host (so an HF_ENDPOINT mirror shares the cache). Data goes to
    `<path>.part` and is renamed when complete and verified, so a crash never leaves a bad file under the final
    name; an interrupted download resumes from the partial file with an HTTP Range request. sha256 / md5: the
    published hex digest, or its first digits (torchvision names its files after 8 of them); checked once, on
    download.
    """
    rel = filename or urlparse(url).path.lstrip('/')
    if not rel or rel.endswith('/'):
        rel = hashlib.sha256(url.encode()).hexdigest()[:16]
    path = cache_dir() / rel
    if path.exists() and (size is None or path.stat().st_size == size):
        return str(path)  # cache hit: no request at all
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + '.part')
    hint = f'no network? download {url} by hand and place it at {path} (or set RAE_CACHE)'
    for attempt in range(retries):
        have = part.stat().st_size if part.exists() else 0
        headers = {'Range': f'bytes={have}-'} if have else {}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=30) as r:
                if r.status_code == 416:  # the partial file is already complete
                    break
                if r.status_code not in (200, 206):
                    raise RuntimeError(f'download of {url} failed: HTTP {r.status_code}; {hint}')
                if r.status_code == 200:
                    have = 0  # the server ignored the Range header: start over
                length = r.headers.get('Content-Length')
                total = have + int(length) if length is not None else size
                with open(part, 'ab' if have else 'wb') as f, \
                        tqdm(total=total, initial=have, unit='B', unit_scale=True, desc=path.name) as bar:
                    for chunk in r.iter_content(1 << 16):
                        f.write(chunk)
                        bar.update(len(chunk))
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            if attempt == retries - 1:
                raise RuntimeError(f'download of {url} failed ({type(e).__name__}); {hint}') from None
            time.sleep(min(2 ** attempt, 10) * 0.1)
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise RuntimeError(f'download of {url}: expected {size} bytes, got {got}; the partial file was removed')
    for algorithm, expected in (('sha256', sha256), ('md5', md5)):
        if expected is None:
            continue
        h = hashlib.new(algorithm)
        with open(part, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                h.update(block)
        if not h.hexdigest().startswith(expected):
            part.unlink()
            raise RuntimeError(f'download of {url}: {algorithm} {h.hexdigest()} != expected {expected}; file removed')
    os.replace(part, path)
    return str(path)


_ST_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
              'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
              'BOOL': torch.bool}


def load_safetensors(path):
    """Read a .safetensors file: 8-byte little-endian header length, a JSON header, then raw tensor bytes."""
    data = Path(path).read_bytes()
    try:
        (n,) = struct.unpack('<Q', data[:8])
        header = json.loads(data[8:8 + n])
    except (struct.error, ValueError, UnicodeDecodeError):
        raise ValueError(f'{path}: not a safetensors file (bad header)') from None
    header.pop('__metadata__', None)
    out = {}
    for name, info in header.items():
        begin, end = info['data_offsets']
        if 8 + n + end > len(data):
            raise ValueError(f'{path}: truncated file ({len(data)} bytes, tensor {name!r} needs {8 + n + end})')
        buf = data[8 + n + begin:8 + n + end]
        t = torch.frombuffer(bytearray(buf), dtype=_ST_DTYPES[info['dtype']]) if buf else \
            torch.empty(0, dtype=_ST_DTYPES[info['dtype']])
        out[name] = t.reshape(info['shape'])
    return out


def load_state_dict_file(path):
    """A state dict from .safetensors or a torch file (or a save_pretrained directory); one-line errors."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ('model.safetensors', 'pytorch_model.bin') if (path / n).exists()]
        if not found:
            raise FileNotFoundError(f'{path}: no model.safetensors or pytorch_model.bin in this directory')
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f'weights file not found: {path}')
    if path.suffix == '.safetensors':
        return load_safetensors(path)
    try:
        try:  # mmap: a training checkpoint's other entries (optimizer moments, ...) are never read into memory
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError:  # files in torch's legacy (pre-zip) format cannot be mapped
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f'{path}: cannot be read as a torch file ({type(e).__name__}: {str(e)[:120]}); '
                         'truncated or not a checkpoint?') from None


def model_state_dict(ckpt, what='checkpoint'):
    """The model weights in a bare state dict or a training checkpoint ({'ema': ...} preferred, else {'model': ...}
    or {'state_dict': ...}), without DDP / torch.compile name prefixes."""
    if not isinstance(ckpt, dict):
        raise ValueError(f'{what}: not a state dict or checkpoint dict (got {type(ckpt).__name__})')
    for key in ('ema', 'model', 'state_dict'):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    sd = {}
    for k, v in ckpt.items():
        while k.startswith(('module.', '_orig_mod.')):  # DDP and torch.compile wrappers
            k = k.split('.', 1)[1]
        sd[k] = v
    return sd


def copy_weights(model, mapped, what, names=None):
    """Copy a {our name: tensor} dict into model with a shape check per tensor and a count check (nanoGPT).

    names maps our names to the file's names, so that errors name the key the user can find in their file.
    """
    names = names or {}
    ours = model.state_dict()
    missing = [k for k in ours if k not in mapped]
    unexpected = [k for k in mapped if k not in ours]
    if missing or unexpected:
        raise ValueError(f'{what}: weights do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}')
    for k, v in mapped.items():
        if v.shape != ours[k].shape:
            raise ValueError(f'{what}: weights for a different model: {names.get(k, k)} has shape '
                             f'{tuple(v.shape)}, expected {tuple(ours[k].shape)}')
    with torch.no_grad():
        for k, v in mapped.items():
            ours[k].copy_(v)
    return model


def set_tf32(enabled):
    """TF32 matmuls/convolutions on GPU on or off; returns the previous flags, which set_tf32 takes back to restore
    them exactly. torch >= 2.9 has a new API and refuses a mix with the legacy flags."""
    if hasattr(torch.backends.cuda.matmul, 'fp32_precision'):
        flags, name, value = [torch.backends.cuda.matmul, torch.backends.cudnn.conv], 'fp32_precision', \
            'tf32' if enabled else 'ieee'
    else:
        flags, name, value = [torch.backends.cuda.matmul, torch.backends.cudnn], 'allow_tf32', bool(enabled)
    old = [getattr(f, name) for f in flags]
    for f, v in zip(flags, enabled if isinstance(enabled, list) else [value] * len(flags)):
        setattr(f, name, v)
    return old


IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.tif', '.tiff')  # what image folders are read for


def to_uint8(images):
    """Images [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] as a PNG holds them: rounded to nearest, floor(255 x + 0.5)
    (as DiT and torchvision save; the authors' sampler truncates, a -0.5/255 bias)."""
    return images.clamp(0, 1).mul(255).add(0.5).floor().to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(images, ncol, path, pad=2):
    """uint8 [B, H, W, 3] -> one PNG, ncol images per row, pad px of black around each (torchvision's layout)."""
    images = np.asarray(images.cpu() if torch.is_tensor(images) else images)
    B, H, W, _ = images.shape
    nrow = math.ceil(B / ncol)
    grid = np.zeros((pad + nrow * (H + pad), pad + ncol * (W + pad), 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = img
    Image.fromarray(grid).save(path)


def center_crop_arr(pil_image, image_size):
    """ADM's centre crop: halve with BOX while the short side >= 2x, BICUBIC resize the short side, crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


# -----------------------------------------------------------------------------------------------------------
# The ViT: one pre-LN transformer serves every published encoder and the RAE decoder

class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (and, in the DiTs, 2D RoPE on q and k)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, rope=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3x (B, h, N, d)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-LN transformer block, x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x)) (LayerScale: DINOv2)."""

    def __init__(self, width, heads, mlp_hidden, eps, act='gelu', layerscale=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, width)
        self.act = nn.GELU(approximate='tanh' if act == 'tanh' else 'none')
        self.ls1 = nn.Parameter(torch.ones(width)) if layerscale else None
        self.ls2 = nn.Parameter(torch.ones(width)) if layerscale else None

    def forward(self, x):
        a = self.attn(self.norm1(x))
        x = x + (a if self.ls1 is None else a * self.ls1)
        m = self.fc2(self.act(self.fc1(self.norm2(x))))
        return x + (m if self.ls2 is None else m * self.ls2)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# The published encoders. pos_grid is the side of the stored position-embedding grid; input_size the side images
# are resized to (224 for DINOv2 gives 16x16 tokens at patch 14, like 256 at patch 16); antialias follows how
# transformers interpolates that model's position embeddings.
ENCODERS = {
    'dinov2-s': dict(width=384, depth=12, heads=6, patch=14, pos_grid=37, input_size=224, registers=4,
                     layerscale=True, eps=1e-6, antialias=True, repo='facebook/dinov2-with-registers-small'),
    'dinov2-b': dict(width=768, depth=12, heads=12, patch=14, pos_grid=37, input_size=224, registers=4,
                     layerscale=True, eps=1e-6, antialias=True, repo='facebook/dinov2-with-registers-base'),
    'dinov2-l': dict(width=1024, depth=24, heads=16, patch=14, pos_grid=37, input_size=224, registers=4,
                     layerscale=True, eps=1e-6, antialias=True, repo='facebook/dinov2-with-registers-large'),
    'siglip2-b': dict(width=768, depth=12, heads=12, patch=16, pos_grid=16, input_size=256, cls=False,
                      act='tanh', eps=1e-6, mean=(0.5,) * 3, std=(0.5,) * 3, repo='google/siglip2-base-patch16-256'),
    'mae-b': dict(width=768, depth=12, heads=12, patch=16, pos_grid=14, input_size=256, eps=1e-12,
                  repo='facebook/vit-mae-base'),
    # DINO v1 ViT-S/8: the frozen discriminator backbone of decoder training (its MLP uses tanh GELU there)
    'dino-s8': dict(width=384, depth=12, heads=6, patch=8, pos_grid=28, input_size=224, act='tanh', eps=1e-6,
                    file=(HF_REPO, 'discs/dino_vit_small_patch8_224.pth')),
}


class Encoder(nn.Module):
    """A frozen ViT representation encoder: images in [0,1] -> normalised patch tokens [B, N, C]."""

    def __init__(self, width, depth, heads, patch, pos_grid, input_size, registers=0, cls=True, layerscale=False,
                 mlp_hidden=None, act='gelu', eps=1e-6, antialias=False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 name='vit', **unused):
        super().__init__()
        self.name, self.patch, self.input_size, self.antialias = name, patch, input_size, antialias
        self.n_prefix = int(cls) + registers  # tokens in front of the patch tokens (CLS, registers)
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if cls else None
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, width)) if registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, int(cls) + pos_grid ** 2, width))  # CLS row first, if any
        self.blocks = nn.ModuleList(Block(width, heads, mlp_hidden or 4 * width, eps, act, layerscale)
                                    for _ in range(depth))
        # The final LayerNorm without affine (RAE §3): tokens are standardised per token over channels.
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def pos_embed_for(self, h, w):
        """The position embedding for an h x w token grid, bicubic-interpolated from the stored grid."""
        n_cls = int(self.cls_token is not None)
        cls_pos, grid = self.pos_embed[:, :n_cls], self.pos_embed[:, n_cls:]
        g = math.isqrt(grid.shape[1])
        if (h, w) != (g, g):
            grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(h, w), mode='bicubic', align_corners=False,
                                 antialias=self.antialias).to(grid.dtype)
            grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return cls_pos, grid

    def embed(self, x):
        """Normalised pixels [B,3,H,W] -> [CLS, registers, patches] tokens with position embeddings."""
        x = self.patch_embed(x)  # (B, C, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major tokens
        cls_pos, grid_pos = self.pos_embed_for(h, w)
        x = x + grid_pos
        prefix = []
        if self.cls_token is not None:
            prefix.append((self.cls_token + cls_pos).expand(len(x), -1, -1))
        if self.register_tokens is not None:  # registers carry no position embedding
            prefix.append(self.register_tokens.expand(len(x), -1, -1))
        return torch.cat(prefix + [x], dim=1)

    def forward(self, images):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'{self.name}: expected images [B,3,H,W], got shape {tuple(images.shape)}')
        if not torch.compiler.is_compiling():
            lo, hi = torch.aminmax(images.detach())
            if lo < 0 or hi > 1:
                raise ValueError(f'{self.name}: images must be in [0,1], got values in [{lo:.3g}, {hi:.3g}]')
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode='bicubic',
                                   align_corners=False)
        x = self.embed((images - self.mean) / self.std)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, self.n_prefix:]  # (B, N, C)

    @classmethod
    def from_pretrained(cls, name, weights=None, input_size=None, **overrides):
        """A published encoder by name; weights=None downloads it, weights=PATH reads a local file or folder.

        overrides (width=, depth=, heads=, pos_grid=, ...) change the preset, e.g. for a tiny random-weight file
        in the published layout (tests, CPU smoke runs).
        """
        if name not in ENCODERS:
            raise ValueError(f'unknown encoder {name!r}; choose one of {", ".join(ENCODERS)}')
        cfg = dict(ENCODERS[name], name=name, **overrides)
        if input_size is not None:
            cfg['input_size'] = input_size
        if weights is None:
            repo, file = cfg.get('file', (cfg.get('repo'), 'model.safetensors'))
            weights = download(hf_url(repo, file))
        sd = load_state_dict_file(weights)
        model = cls(**cfg)
        model.load_published(sd, weights)
        return model.eval().requires_grad_(False)

    def load_published(self, sd, what='weights'):
        """Map a published state dict (HF hub layout, or DINO v1's timm layout) to ours, key by key."""
        try:
            return self._map_published(dict(sd), what)
        except KeyError as e:
            raise ValueError(f'{what}: weights for a different model: {e.args[0]} is missing') from None

    def _map_published(self, sd, what):
        for prefix in ('vision_model.', 'vit.'):  # SiglipModel's vision tower, ViTMAEForPreTraining's encoder
            if any(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        out, src = {}, {}  # our name -> tensor, our name -> the file's name (for error messages)

        def take(ours, *theirs):  # the first present of several published spellings (hub / transformers 5.x)
            for name in theirs:
                if name in sd:
                    out[ours], src[ours] = sd[name], name
                    return
            raise KeyError(theirs[0])

        if 'blocks.0.attn.qkv.weight' in sd:  # DINO v1 (timm layout): already fused qkv
            take('patch_embed.weight', 'patch_embed.proj.weight')
            take('patch_embed.bias', 'patch_embed.proj.bias')
            take('cls_token', 'cls_token')
            take('pos_embed', 'pos_embed')
            for i in range(len(self.blocks)):
                for s in ('weight', 'bias'):
                    for a, b in [('norm1', 'norm1'), ('norm2', 'norm2'), ('attn.qkv', 'attn.qkv'),
                                 ('attn.proj', 'attn.proj'), ('fc1', 'mlp.fc1'), ('fc2', 'mlp.fc2')]:
                        take(f'blocks.{i}.{a}.{s}', f'blocks.{i}.{b}.{s}')
            return copy_weights(self, out, what, src)
        siglip = 'embeddings.patch_embedding.weight' in sd
        emb = 'embeddings.patch_embedding' if siglip else 'embeddings.patch_embeddings.projection'
        take('patch_embed.weight', emb + '.weight')
        take('patch_embed.bias', emb + '.bias')
        if siglip:  # nn.Embedding weight [N, C], no CLS
            take('pos_embed', 'embeddings.position_embedding.weight')
            out['pos_embed'] = out['pos_embed'][None]
        else:
            take('cls_token', 'embeddings.cls_token')
            take('pos_embed', 'embeddings.position_embeddings')
        if self.register_tokens is not None:
            take('register_tokens', 'embeddings.register_tokens')
        for i in range(len(self.blocks)):
            # hub names first, then transformers 5.x in-memory names (MAE there: layers.N, mlp.fc1/fc2)
            ps = [f'encoder.layers.{i}.'] if siglip else [f'encoder.layer.{i}.', f'layers.{i}.']
            q = f'blocks.{i}.'

            def alt(*names):
                return [p + n for p in ps for n in names]
            for s in ('weight', 'bias'):
                if siglip:
                    names = {'q': alt(f'self_attn.q_proj.{s}'), 'k': alt(f'self_attn.k_proj.{s}'),
                             'v': alt(f'self_attn.v_proj.{s}'), 'attn.proj': alt(f'self_attn.out_proj.{s}'),
                             'norm1': alt(f'layer_norm1.{s}'), 'norm2': alt(f'layer_norm2.{s}'),
                             'fc1': alt(f'mlp.fc1.{s}'), 'fc2': alt(f'mlp.fc2.{s}')}
                else:
                    names = {'q': alt(f'attention.attention.query.{s}', f'attention.q_proj.{s}'),
                             'k': alt(f'attention.attention.key.{s}', f'attention.k_proj.{s}'),
                             'v': alt(f'attention.attention.value.{s}', f'attention.v_proj.{s}'),
                             'attn.proj': alt(f'attention.output.dense.{s}', f'attention.o_proj.{s}'),
                             'norm1': alt(f'norm1.{s}', f'layernorm_before.{s}'),
                             'norm2': alt(f'norm2.{s}', f'layernorm_after.{s}'),
                             'fc1': alt(f'mlp.fc1.{s}', f'intermediate.dense.{s}'),
                             'fc2': alt(f'mlp.fc2.{s}', f'output.dense.{s}')}
                for ours, theirs in names.items():
                    take(q + (f'attn.{ours}.{s}' if ours in 'qkv' else f'{ours}.{s}'), *theirs)
                # fused qkv = [q; k; v] along the output dimension
                parts = [out.pop(q + f'attn.{n}.{s}') for n in 'qkv']
                src[q + f'attn.qkv.{s}'] = [src.pop(q + f'attn.{n}.{s}') for n in 'qkv'][0]  # named by q
                if len({t.shape for t in parts}) != 1:
                    raise ValueError(f'{what}: weights for a different model: q/k/v shapes differ in layer {i}')
                out[q + f'attn.qkv.{s}'] = torch.cat(parts)
            if self.blocks[i].ls1 is not None:
                take(q + 'ls1', *alt('layer_scale1.lambda1'))
                take(q + 'ls2', *alt('layer_scale2.lambda1'))
        return copy_weights(self, out, what, src)


def sincos_2d(width, grid):
    """Fixed 2D sin-cos position embedding [grid*grid, width] (MAE recipe), row-major tokens.

    Channels [0, width/2) encode the column, [width/2, width) the row; each half is [sin(p w_i), cos(p w_i)] with
    w_i = 1 / 10000^(i / (width/4)). Built in float64 like the reference, then cast.
    """
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing='ij')
    halves = [np.outer(p.reshape(-1), omega) for p in (cols, rows)]
    emb = np.concatenate([f(h) for h in halves for f in (np.sin, np.cos)], axis=1)
    return torch.from_numpy(emb).float()


# ViT decoder sizes (the released decoders are all XL; note XL's MLP is 4096, not 4 x 1152)
DECODERS = {'B': dict(width=768, depth=12, heads=12, mlp_hidden=3072),
            'L': dict(width=1024, depth=24, heads=16, mlp_hidden=4096),
            'XL': dict(width=1152, depth=28, heads=16, mlp_hidden=4096)}


class Decoder(nn.Module):
    """MAE-style ViT decoder: tokens [B, N, C] -> encoder-normalised pixels [B, 3, grid*p_d, grid*p_d]."""

    def __init__(self, token_dim=768, width=1152, depth=28, heads=16, mlp_hidden=4096, grid=16, patch=16):
        super().__init__()
        self.grid, self.patch = grid, patch  # p_d is independent of the encoder's patch (§6.1: p_d=32 -> 512 px)
        self.embed = nn.Linear(token_dim, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))  # trainable, dropped at the output
        pos = torch.cat([torch.zeros(1, width), sincos_2d(width, grid)])[None]  # (1, 1 + grid^2, width), CLS row 0
        self.register_buffer('pos_embed', pos)  # frozen, but saved: released files carry an EMA-nudged copy
        self.blocks = nn.ModuleList(Block(width, heads, mlp_hidden, eps=1e-12) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.pred = nn.Linear(width, patch * patch * 3)

    def forward(self, tokens):
        x = self.embed(tokens)  # (B, N, D)
        B, N, D = x.shape
        if N != self.grid ** 2:  # another token count: resize the embedded token grid bilinearly (reference rule)
            n = math.isqrt(N)
            x = x.transpose(1, 2).reshape(B, D, n, n)
            x = F.interpolate(x, size=(self.grid, self.grid), mode='bilinear', align_corners=False)
            x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.pred(self.norm(x))[:, 1:]  # (B, grid^2, p*p*3)
        p, g = self.patch, self.grid
        x = x.reshape(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # (B, 3, g, p, g, p): channels last per patch
        return x.reshape(B, 3, g * p, g * p)

    @classmethod
    def from_state_dict(cls, sd, heads=None, what='decoder'):
        """A decoder sized from its weights, in our layout or the released (HF ViTMAE decoder) layout.

        Shapes fix everything but the head count: 16 for widths 1152/1024, 12 for 768, else width // 64.
        """
        sd = {k.removeprefix('module.').removeprefix('_orig_mod.'): v for k, v in sd.items()}
        released = 'decoder_embed.weight' in sd
        if not released and 'embed.weight' not in sd:
            raise ValueError(f'{what}: not a decoder state dict (no decoder_embed.weight / embed.weight)')
        width, token_dim = sd['decoder_embed.weight' if released else 'embed.weight'].shape
        layer = 'decoder_layers.{}.intermediate.dense.weight' if released else 'blocks.{}.fc1.weight'
        depth = 0
        while layer.format(depth) in sd:
            depth += 1
        out = sd['decoder_pred.weight' if released else 'pred.weight'].shape[0]
        pos = sd.get('decoder_pos_embed' if released else 'pos_embed')
        grid = math.isqrt(pos.shape[1] - 1) if pos is not None else 16
        heads = heads or {1152: 16, 1024: 16, 768: 12}.get(width, max(1, width // 64))
        model = cls(token_dim, width, depth, heads, sd[layer.format(0)].shape[0], grid, math.isqrt(out // 3))
        if not released:
            return copy_weights(model, sd, what)
        m = {'embed.weight': sd['decoder_embed.weight'], 'embed.bias': sd['decoder_embed.bias'],
             'cls_token': sd.get('trainable_cls_token', model.cls_token.detach()),  # absent in some released files
             'pos_embed': pos if pos is not None else model.pos_embed,
             'norm.weight': sd['decoder_norm.weight'], 'norm.bias': sd['decoder_norm.bias'],
             'pred.weight': sd['decoder_pred.weight'], 'pred.bias': sd['decoder_pred.bias']}
        for i in range(depth):
            p, q = f'decoder_layers.{i}.', f'blocks.{i}.'
            for s in ('weight', 'bias'):
                m[q + f'attn.qkv.{s}'] = torch.cat([sd[p + f'attention.attention.{n}.{s}'] for n in ('query', 'key', 'value')])
                for ours, theirs in [('attn.proj', 'attention.output.dense'), ('fc1', 'intermediate.dense'),
                                     ('fc2', 'output.dense'), ('norm1', 'layernorm_before'), ('norm2', 'layernorm_after')]:
                    m[q + f'{ours}.{s}'] = sd[p + f'{theirs}.{s}']
        unused = [k for k in sd if not k.startswith(('decoder_', 'trainable_cls_token'))]
        if unused or len(sd) - ('trainable_cls_token' in sd) - (pos is not None) != 6 + 16 * depth:
            raise ValueError(f'{what}: unexpected keys in a released decoder file: {unused[:3]}')
        return copy_weights(model, m, what)


# -----------------------------------------------------------------------------------------------------------
# The Representation Autoencoder

# Released files in nyu-visionx/RAE-collections, by (encoder, image resolution)
RELEASED_DECODERS = {('dinov2-b', 256): 'decoders/dinov2/wReg_base/ViTXL_n08/model.pt',
                     ('dinov2-b', 512): 'decoders/dinov2/wReg_base/ViTXL_n08_i512/model.pt',
                     ('siglip2-b', 256): 'decoders/siglip2/base_p16_i256/ViTXL_n08/model.pt',
                     ('mae-b', 256): 'decoders/mae/base_p16/ViTXL_n08/model.pt'}
RELEASED_STATS = {('dinov2-b', 256): 'stats/dinov2/wReg_base/imagenet1k/stat.pt',
                  ('dinov2-b', 512): 'stats/dinov2/wReg_base/imagenet1k_512/stat.pt',
                  ('siglip2-b', 256): 'stats/siglip2/base_p16_i256/ImageNet1k/stat.pt',
                  ('mae-b', 256): 'stats/mae/base_p16/ImageNet1k/stat.pt'}


def load_stats(path):
    """Latent statistics {'mean': [C,h,w] or None, 'var': [C,h,w]} as written by the authors' stat script."""
    stats = load_state_dict_file(path)
    if not isinstance(stats, dict) or 'var' not in stats:
        raise ValueError(f'{path}: not a latent statistics file (expected a dict with "mean" and "var")')
    return stats.get('mean'), stats['var']


class RAE(nn.Module):
    """Frozen encoder + trained decoder; the latent is the encoder's token map, normalised per channel+position."""

    def __init__(self, encoder, decoder, mean=None, var=None, noise_tau=0.0, eps=1e-5,
                 pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder  # encoder may be None when only decoding (sampling)
        self.noise_tau, self.eps = noise_tau, eps
        if encoder is not None:
            encoder.requires_grad_(False)
            pixel_mean, pixel_std = encoder.mean.flatten().tolist(), encoder.std.flatten().tolist()
        # The decoder predicts pixels in the encoder's normalisation; these map them back to [0,1].
        self.register_buffer('pixel_mean', torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('pixel_std', torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        # Variance-only normalisation (mean None) is what the released DINOv2-B statistics do.
        self.register_buffer('latent_mean', None if mean is None else mean.float(), persistent=False)
        self.register_buffer('latent_var', None if var is None else var.float(), persistent=False)

    def normalize(self, z):
        if self.latent_mean is not None:
            z = z - self.latent_mean
        return z if self.latent_var is None else z / torch.sqrt(self.latent_var + self.eps)

    def denormalize(self, x):
        if self.latent_var is not None:
            x = x * torch.sqrt(self.latent_var + self.eps)
        return x if self.latent_mean is None else x + self.latent_mean

    @torch.no_grad()
    def encode(self, images):
        """Images [B,3,H,W] in [0,1] -> latent [B,C,h,w]."""
        if self.encoder is None:
            raise RuntimeError('this RAE was built without an encoder (decode only)')
        z = self.encoder(images)  # (B, N, C), LayerNorm'd tokens
        if self.training and self.noise_tau > 0:
            # Noise-augmented decoding (§4.3). The paper's text draws sigma from |N(0, tau^2)|; the released
            # decoders were trained with sigma ~ tau * U(0, 1) per sample, which is what we do.
            sigma = self.noise_tau * torch.rand((len(z), 1, 1), device=z.device, dtype=z.dtype)
            z = z + sigma * torch.randn_like(z)
        B, N, C = z.shape
        h = math.isqrt(N)
        return self.normalize(z.transpose(1, 2).reshape(B, C, h, h))  # token n = row * h + col

    def decode(self, latent):
        """Latent [B,C,h,w] -> images [B,3,H,W], nominally in [0,1] (not clamped)."""
        z = self.denormalize(latent)
        x = self.decoder(z.flatten(2).transpose(1, 2))
        return x * self.pixel_std + self.pixel_mean

    def forward(self, images):
        return self.decode(self.encode(images))

    @classmethod
    def from_pretrained(cls, encoder='dinov2-b', resolution=256, decoder=None, stats=None, encoder_weights=None,
                        load_encoder=True, noise_tau=0.0, encoder_overrides=None):
        """The released RAE for (encoder, resolution); decoder/stats may be local paths instead of downloads.

        load_encoder=False builds a decode-only RAE (sampling needs no encoder weights). stats=False: no latent
        normalisation (decoder training works on raw tokens). encoder_overrides: see Encoder.from_pretrained.
        """
        if encoder not in ENCODERS:
            raise ValueError(f'unknown encoder {encoder!r}; choose one of {", ".join(ENCODERS)}')
        key = (encoder, resolution)
        for given, table, what in [(decoder, RELEASED_DECODERS, 'decoder'), (stats, RELEASED_STATS, 'statistics')]:
            if given is None and key not in table:
                have = ', '.join(f'{e}@{r}' for e, r in table)
                raise ValueError(f'no released {what} for {encoder} at {resolution} px (released: {have}); '
                                 f'pass a local file instead')
        decoder = decoder or download(hf_url(HF_REPO, RELEASED_DECODERS[key]))
        if stats is not False:
            stats = stats or download(hf_url(HF_REPO, RELEASED_STATS[key]))
        sd = model_state_dict(load_state_dict_file(decoder), str(decoder))  # a decoder_train.py checkpoint too
        sd = {k.removeprefix('decoder.'): v for k, v in sd.items() if not k.startswith('encoder.')}
        dec = Decoder.from_state_dict(sd, what=str(decoder))
        cfg = ENCODERS[encoder]
        enc = None
        if load_encoder:
            enc = Encoder.from_pretrained(encoder, encoder_weights, **{'input_size': dec.grid * cfg['patch'],
                                                                       **(encoder_overrides or {})})
        mean, var = load_stats(stats) if stats is not False else (None, None)
        return cls(enc, dec, mean, var, noise_tau, pixel_mean=cfg.get('mean', IMAGENET_MEAN),
                   pixel_std=cfg.get('std', IMAGENET_STD)).eval()


# -----------------------------------------------------------------------------------------------------------
# The diffusion transformers: LightningDiT (the paper's "DiT") and DiT^DH (DiT + a wide, shallow DDT head)
#
# Both read the latent x_t [B, 768, 16, 16] as 256 tokens (patch size 1) and predict the velocity v [B, 768, 16, 16].
# Module attribute names are the released ones, so the authors' checkpoints load strictly. Quirks kept on purpose
# (changing any of them silently breaks the released weights): the conditioning goes through SiLU twice in DiT^DH,
# the head sees t and y only through s = SiLU(backbone_out + t_emb), the frozen tables (sin-cos position embedding,
# Fourier frequencies W, RoPE) are stored in the checkpoints and must be loaded, not recomputed.


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (eps 1e-6); the learned gain is applied after casting back."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class SwiGLU(nn.Module):
    """SwiGLU feed-forward w3(SiLU(x1) * x2), [x1, x2] = w12(x); hidden int(2/3 * 4D) keeps a 4D MLP's FLOPs."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)  # x1 (the first half) is the gated one
        return self.w3(F.silu(x1) * x2)


class RoPE2D(nn.Module):
    """2D RoPE (EVA-02 style): the first half of head_dim rotates with the token's row, the second with its column."""

    def __init__(self, head_dim, grid, theta=10000.0):
        super().__init__()
        d = head_dim // 2  # channels per axis
        freqs = 1.0 / theta ** (torch.arange(0, d, 2)[:d // 2].float() / d)  # (d/2,)
        f = torch.outer(torch.arange(grid).float(), freqs).repeat_interleave(2, dim=-1)  # (grid, d): pairs share a freq
        f = torch.cat([f[:, None, :].expand(grid, grid, d), f[None, :, :].expand(grid, grid, d)], dim=-1)  # (r, c, hd)
        # Tokens are row-major (n = row * grid + col). Persistent: the released checkpoints carry these tables.
        self.register_buffer('freqs_cos', f.cos().reshape(grid * grid, head_dim))
        self.register_buffer('freqs_sin', f.sin().reshape(grid * grid, head_dim))

    def forward(self, x):  # x: (B, heads, N, head_dim)
        rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)  # each pair (a, b) -> (-b, a)
        return (x * self.freqs_cos + rotated * self.freqs_sin).type_as(x)  # fp32 tables would promote bf16 q, k


class PatchEmbed(nn.Module):
    """Latent [B, C, H, W] -> tokens [B, (H/p)(W/p), D] in row-major order (a strided conv, as in DiT)."""

    def __init__(self, in_channels, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Gaussian Fourier features [sin 2pi t W, cos 2pi t W] of the flow time t in [0, 1] (not x1000), then an MLP."""

    def __init__(self, dim, n_freqs=256):
        super().__init__()
        self.W = nn.Parameter(torch.randn(n_freqs), requires_grad=False)  # frozen random frequencies, saved
        self.mlp = nn.Sequential(nn.Linear(2 * n_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        f = t[:, None] * self.W[None] * 2 * math.pi  # (B, 256)
        return self.mlp(torch.cat([f.sin(), f.cos()], dim=-1))


class LabelEmbedder(nn.Module):
    """Class embedding with an extra null class (index num_classes); training drops labels to null with prob p."""

    def __init__(self, num_classes, dim, dropout_prob=0.1):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y):
        if self.training and self.dropout_prob > 0:  # one rand(B) draw per forward: trains the unconditional model
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)


class DiTBlock(nn.Module):
    """LightningDiT block: RMSNorm, RoPE attention, SwiGLU, adaLN-Zero modulation by c (per sample or per token)."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(2 * int(dim * mlp_ratio) / 3))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):  # x (B, N, D); c (B, 1, D) one vector per sample, or (B, N, D) one per token
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """RMSNorm, adaLN modulation (shift, scale; no gate), linear map back to patch pixels."""

    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x, p, c):
    """Tokens [B, h*w, p*p*c] -> latent [B, c, h*p, w*p]."""
    B, N, _ = x.shape
    h = math.isqrt(N)
    x = torch.einsum('nhwpqc->nchpwq', x.reshape(B, h, h, p, p, c))
    return x.reshape(B, c, h * p, h * p)


class LightningDiT(nn.Module):
    """The paper's DiT (LightningDiT): c = t_emb + y_emb modulates every block; the baseline of §4."""

    def __init__(self, input_size=16, patch_size=1, in_channels=768, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000):
        super().__init__()
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.input_size = input_size
        grid = input_size // patch_size
        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(sincos_2d(hidden_size, grid)[None], requires_grad=False)  # (1, N, D), frozen
        self.feat_rope = RoPE2D(hidden_size // num_heads, grid)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():  # a global xavier pass (LightningDiT only; DiT^DH keeps PyTorch's default)
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                       self.final_layer.linear]:
            nn.init.zeros_(layer.weight)  # adaLN-Zero: every block starts as the identity, the output as 0
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y):
        """x_t [B, C, H, W], t [B] in [0, 1] (1 = noise), y [B] class ids (num_classes = null) -> v [B, C, H, W]."""
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = (self.t_embedder(t) + self.y_embedder(y))[:, None]  # (B, 1, D); no SiLU here (each block has one)
        for block in self.blocks:
            x = block(x, c, self.feat_rope)
        return unpatchify(self.final_layer(x, c), self.patch_size, self.in_channels)


class DiTDH(nn.Module):
    """DiT^DH (§5): a DiT backbone M turns (x_t, t, y) into per-token conditions s; a wide, shallow head H gives v."""

    def __init__(self, input_size=16, patch_size=1, in_channels=768, hidden_size=(1152, 2048), depth=(28, 2),
                 num_heads=(16, 16), mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000):
        super().__init__()
        (H1, H2), (d1, d2), (n1, n2) = hidden_size, depth, num_heads
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.input_size, self.depth = input_size, (d1, d2)
        grid = input_size // patch_size
        self.x_embedder = PatchEmbed(in_channels, H2, patch_size)  # the head's own view of x_t (no APE)
        self.s_embedder = PatchEmbed(in_channels, H1, patch_size)  # the backbone's input
        self.s_projector = nn.Linear(H1, H2) if H1 != H2 else nn.Identity()
        self.t_embedder = TimestepEmbedder(H1)
        self.y_embedder = LabelEmbedder(num_classes, H1, class_dropout_prob)
        self.pos_embed = nn.Parameter(sincos_2d(H1, grid)[None], requires_grad=False)  # (1, N, H1), frozen
        self.enc_feat_rope = RoPE2D(H1 // n1, grid)
        self.dec_feat_rope = RoPE2D(H2 // n2, grid)
        # One list as released: blocks[:d1] are the backbone (width H1), blocks[d1:] the head (width H2).
        self.blocks = nn.ModuleList([DiTBlock(H1, n1, mlp_ratio) for _ in range(d1)] +
                                    [DiTBlock(H2, n2, mlp_ratio) for _ in range(d2)])
        self.final_layer = FinalLayer(H2, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # No global xavier pass here (unlike LightningDiT): other Linear layers keep PyTorch's default init.
        for emb in (self.x_embedder, self.s_embedder):
            nn.init.xavier_uniform_(emb.proj.weight.view(emb.proj.weight.shape[0], -1))
            nn.init.zeros_(emb.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                       self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y):
        """x_t [B, C, H, W], t [B] in [0, 1] (1 = noise), y [B] class ids (num_classes = null) -> v [B, C, H, W]."""
        d1 = self.depth[0]
        t = self.t_embedder(t)  # (B, H1)
        c = F.silu(t + self.y_embedder(y))[:, None]  # (B, 1, H1); the blocks apply SiLU again (as released)
        s = self.s_embedder(x) + self.pos_embed  # (B, N, H1)
        for block in self.blocks[:d1]:
            s = block(s, c, self.enc_feat_rope)
        s = self.s_projector(F.silu(s + t[:, None]))  # (B, N, H2): per-token condition; y enters only via s
        x = self.x_embedder(x)  # (B, N, H2)
        for block in self.blocks[d1:]:
            x = block(x, s, self.dec_feat_rope)
        return unpatchify(self.final_layer(x, s), self.patch_size, self.in_channels)


# Sizes (width / depth / heads). DiT^DH adds the paper's 2-layer, 2048-wide, 16-head DDT head to every backbone.
# Parameters (incl. the frozen APE and W): DiT^DH-S 196.5M, -B 294.3M, -L 621.7M, -XL 838.7M; LightningDiT-XL 677.3M.
DIT_SIZES = {'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16), 'XL': (1152, 28, 16)}
DDT_HEAD = (2048, 2, 16)


def build_dit(name, **kwargs):
    """'DiTDH-XL', 'LightningDiT-B', ...: a freshly initialised model of that preset (kwargs: input_size, ...)."""
    family, _, size = name.partition('-')
    if family not in ('DiTDH', 'LightningDiT') or size not in DIT_SIZES:
        raise ValueError(f'unknown model {name!r}; choose DiTDH-<size> or LightningDiT-<size> with size in '
                         f'{"/".join(DIT_SIZES)}')
    width, depth, heads = DIT_SIZES[size]
    if family == 'LightningDiT':
        return LightningDiT(hidden_size=width, depth=depth, num_heads=heads, **kwargs)
    return DiTDH(hidden_size=(width, DDT_HEAD[0]), depth=(depth, DDT_HEAD[1]), num_heads=(heads, DDT_HEAD[2]),
                 **kwargs)


# -----------------------------------------------------------------------------------------------------------
# Checkpoints: the released DiTs (nyu-visionx/RAE-collections) and our own

RELEASED_DITS = {  # DiT^DH-XL on DINOv2-B latents, and the early DiT^DH-S used as its AutoGuidance guide (App. D)
    256: dict(model='DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-XL/stage2_model.pt',
              guide='DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-S_ep14/stage2_model.pt', autoguidance=1.42),
    512: dict(model='DiTs/Dinov2/wReg_base/ImageNet512/DiTDH-XL_ep400/stage2_model.pt',
              guide='DiTs/Dinov2/wReg_base/ImageNet512/DiTDH-S_ep20/stage2_model.pt', autoguidance=1.5),
}


def dit_config(sd, what='checkpoint'):
    """(model class, constructor kwargs) read off the tensor shapes of a LightningDiT / DiT^DH state dict."""
    need = ['x_embedder.proj.weight', 'pos_embed', 'y_embedder.embedding_table.weight', 'blocks.0.norm1.weight']
    if any(k not in sd for k in need):
        raise ValueError(f'{what}: not a LightningDiT / DiT^DH state dict (missing {[k for k in need if k not in sd]})')
    width, in_channels, patch_size = sd['x_embedder.proj.weight'].shape[:3]
    kw = dict(input_size=math.isqrt(sd['pos_embed'].shape[1]) * patch_size, patch_size=patch_size,
              in_channels=in_channels, num_classes=sd['y_embedder.embedding_table.weight'].shape[0] - 1)
    n_blocks = sum(1 for k in sd if k.startswith('blocks.') and k.endswith('.norm1.weight'))
    ddt = 's_embedder.proj.weight' in sd
    ropes = ['enc_feat_rope.freqs_cos', 'dec_feat_rope.freqs_cos'] if ddt else ['feat_rope.freqs_cos']
    if any(k not in sd for k in ropes):  # the head count is read off the RoPE table width (= head_dim)
        raise ValueError(f'{what}: no RoPE tables ({", ".join(k for k in ropes if k not in sd)}) in this state dict')
    if not ddt:
        head_dim = sd['feat_rope.freqs_cos'].shape[1]
        return LightningDiT, dict(kw, hidden_size=width, depth=n_blocks, num_heads=width // head_dim)
    H1, H2 = sd['s_embedder.proj.weight'].shape[0], width
    if H1 == H2:
        raise ValueError(f'{what}: backbone and head have the same width {H1}, so the depth split cannot be read off '
                         'the shapes; build the model with build_dit/DiTDH and use load_dit_weights')
    d1 = sum(1 for i in range(n_blocks) if sd[f'blocks.{i}.norm1.weight'].shape[0] == H1)
    heads = (H1 // sd['enc_feat_rope.freqs_cos'].shape[1], H2 // sd['dec_feat_rope.freqs_cos'].shape[1])
    return DiTDH, dict(kw, hidden_size=(H1, H2), depth=(d1, n_blocks - d1), num_heads=heads)


def load_dit_weights(model, ckpt, what='checkpoint'):
    """Load a state dict or checkpoint into model strictly; a mismatch names missing, unexpected, mis-shaped keys."""
    return copy_weights(model, model_state_dict(ckpt, what), what)


def load_dit(path, what=None):
    """A LightningDiT or DiT^DH sized from the shapes in a checkpoint file, with its weights, in eval mode.

    The frozen tables (pos_embed, t_embedder.W, RoPE) come from the file too: the released EMA weights carry slightly
    nudged copies of them, and the outputs only match the authors' if those are used.
    """
    what = what or str(path)
    sd = model_state_dict(load_state_dict_file(path), what)
    cls, kwargs = dit_config(sd, what)
    with torch.device('meta'):  # no time spent on a random init that is overwritten anyway
        model = cls(**kwargs)
    model = model.to_empty(device='cpu')
    return copy_weights(model, sd, what).eval()


def released_dit(resolution=256, guide=False):
    """The authors' DiT^DH-XL for 256 or 512 px (guide=True: the DiT^DH-S AutoGuidance guide), downloaded once."""
    if resolution not in RELEASED_DITS:
        raise ValueError(f'no released DiT^DH for {resolution} px (released: {", ".join(map(str, RELEASED_DITS))})')
    path = RELEASED_DITS[resolution]['guide' if guide else 'model']
    return load_dit(download(hf_url(HF_REPO, path)), what=path)


# -----------------------------------------------------------------------------------------------------------
# Rectified flow (§4.2, App. I), in the paper's convention throughout:
#   x_t = (1 - t) x + t eps,  t = 0 data, t = 1 noise;  the model predicts v = eps - x;  loss = MSE.
# High-dimensional latents need noisier training and sampling times: every t (training draws and the sampling grid)
# goes through the shift t' = alpha t / (1 + (alpha - 1) t), alpha = sqrt(C*H*W / 4096) (sqrt(48) at 256 px).

def shift_alpha(latent_shape, base_dim=4096):
    """alpha = sqrt(effective data dimension / 4096), e.g. (768, 16, 16) -> sqrt(48) = 6.93."""
    return math.sqrt(math.prod(latent_shape) / base_dim)


def time_shift(t, alpha):
    return alpha * t / (1 + (alpha - 1) * t)


def sample_t(n, time_dist='logit-normal', t_max=0.999, generator=None):
    """Training times on [0, t_max] before the shift: 'uniform', or 'logit-normal' (0, 1) truncated (inverse CDF)."""
    u = torch.rand(n, generator=generator)  # one draw of n on a CPU generator, as released
    if time_dist == 'uniform':
        return u * t_max
    if time_dist != 'logit-normal':
        raise ValueError(f'unknown time distribution {time_dist!r}; use uniform or logit-normal')
    cdf_max = 0.5 * (1 + torch.erf(torch.log(torch.tensor(t_max / (1 - t_max))) / math.sqrt(2)))  # Phi(logit t_max)
    return torch.sigmoid(math.sqrt(2) * torch.erfinv(2 * (u * cdf_max) - 1))


def flow_loss(model, x, y, alpha, time_dist='logit-normal', eps=None, t=None):
    """Per-sample loss ||v_theta(x_t, t, y) - (eps - x)||^2 / dim at shifted random times t: [B].

    The draws come in the authors' order (eps, then t, then the model's label dropout), so a seeded run matches theirs.
    eps [B, C, h, w] and shifted t [B] may be given instead: diffusion_train.py draws them per row of the global
    batch, so that a sample's noise does not depend on the rank or micro-batch it lands on.
    """
    eps = torch.randn_like(x) if eps is None else eps
    t = time_shift(sample_t(len(x), time_dist), alpha).to(x.device) if t is None else t
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x + tt * eps
    return ((model(x_t, t, y).float() - (eps - x)) ** 2).mean(dim=(1, 2, 3))  # fp32 loss under bf16 autocast


def sample_grid(num_steps=50, alpha=1.0):
    """The released grid: 1 - linspace(0, 0.999, num_steps), shifted; 1.0 down to 0.0069 at alpha = sqrt(48)."""
    return time_shift(1 - torch.linspace(0, 0.999, num_steps), alpha)


@torch.no_grad()
def sample_ode(velocity, x, num_steps=50, alpha=1.0, method='euler', trajectory=False, progress=False):
    """Integrate dx/dt = v(x, t) from t = 1 (x = noise) down the grid: num_steps points = num_steps - 1 updates.

    Like the released sampler, the last point is t = shift(0.001), not 0: the sample keeps a trace of noise.
    Heun uses two velocity calls per update. trajectory=True returns all num_steps states [num_steps, B, ...].
    """
    if method not in ('euler', 'heun'):
        raise ValueError(f'unknown sampler {method!r}; use euler or heun')
    grid = sample_grid(num_steps, alpha).to(x.device)
    states = [x]
    for i in tqdm(range(num_steps - 1), desc='sampling', disable=not progress):
        t, dt = grid[i].expand(len(x)), grid[i + 1] - grid[i]
        v = velocity(x, t).to(x.dtype)
        if method == 'heun':
            v_next = velocity(x + dt * v, grid[i + 1].expand(len(x))).to(x.dtype)
            v = (v + v_next) / 2
        x = x + dt * v
        if trajectory:
            states.append(x)
    return torch.stack(states) if trajectory else x


def guided_velocity(model, y, cfg_scale=1.0, cfg_interval=(0.0, 1.0), guide=None, guide_scale=1.0):
    """v(x_t, t) for the sampler: plain, CFG, or AutoGuidance, guided only where t_min <= t <= t_max.

    CFG (null label):         v = v_u + w (v_c - v_u)
    AutoGuidance (App. D):    v = v_g + w (v_m - v_g), v_g from a weaker guide model given the same labels
    The interval is tested per sample on the model's own (shifted) time, inclusive, as in the authors' DiT^DH. (Their
    LightningDiT.forward_with_cfg inverts it - guidance OUTSIDE the listed intervals - and tests t[0] for the whole
    batch; we apply the same per-sample rule to both models.) w = 1 means no guidance.
    """
    if cfg_scale != 1 and guide is not None and guide_scale != 1:
        raise ValueError('use either CFG or AutoGuidance, not both')
    t_min, t_max = cfg_interval
    autoguidance, cfg = guide is not None and guide_scale != 1, cfg_scale != 1
    y_cfg = torch.cat([y, torch.full_like(y, model.num_classes)]) if cfg else None  # [conditional, null]

    def velocity(x, t):
        if not (autoguidance or cfg):
            return model(x, t, y)
        inside = (t >= t_min) & (t <= t_max)
        if (t_min > 0 or t_max < 1) and not inside.any():  # outside the interval: no guidance forward (one sync)
            return model(x, t, y)
        inside = inside.view(-1, 1, 1, 1)
        if autoguidance:
            v_m, v_g = model(x, t, y), guide(x, t, y)
            return torch.where(inside, v_g + guide_scale * (v_m - v_g), v_m)
        v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), y_cfg).chunk(2)  # one forward on the doubled batch
        return torch.where(inside, v_u + cfg_scale * (v_c - v_u), v_c)

    return velocity
