"""
nano RAE: Diffusion Transformers with Representation Autoencoders, the models in one file.

An image's way through this file, top to bottom:
  pixels [B,3,256,256] in [0,1]
    -> Encoder: a frozen, published ViT (DINOv2-B with registers, SigLIP2-B, MAE-B)     tokens [B,256,768]
    -> RAE.encode: tokens as a 2D map, normalised by the latent statistics             latent x [B,768,16,16]
    -> flow: x_t = (1 - t) x + t eps, a DiT (LightningDiT or DiT^DH) predicts v = eps - x
    -> sampler: integrate dx/dt = v from t = 1 (noise) to t ~ 0 (data)                  latent
    -> RAE.decode: a trained ViT decoder maps tokens back to pixels                     images [B,3,256,256]

Downloads and file formats live in files.py (diffusers' AutoencoderRAE folders in diffusers_format.py); what stays
here is what loads the published weights into each model.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from files import copy_weights, download, hf_url, load_published, load_state_dict_file, load_stats, model_state_dict

HF_REPO = 'nyu-visionx/RAE-collections'  # the authors' released decoders, statistics and DiTs


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


def run_block(model, block, *args):
    """block(*args); while `model` trains with model.grad_checkpoint set (the training scripts' key), through
    torch.utils.checkpoint: the block's activations are recomputed in backward instead of kept, less memory for one
    more block forward. Non-reentrant, the variant that works under torch.compile and DDP."""
    if model.training and model.grad_checkpoint:
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# The published encoders. pos_grid is the side of the stored position-embedding grid; input_size the side images
# are resized to (224 for DINOv2 gives 16x16 tokens at patch 14, like 256 at patch 16); antialias follows how
# transformers interpolates that model's position embeddings; layout names the table of PUBLISHED below.
_DINOV2 = dict(patch=14, pos_grid=37, input_size=224, registers=4, layerscale=True, eps=1e-6, antialias=True,
               layout='dinov2')
ENCODERS = {
    'dinov2-s': dict(_DINOV2, width=384, depth=12, heads=6, repo='facebook/dinov2-with-registers-small'),
    'dinov2-b': dict(_DINOV2, width=768, depth=12, heads=12, repo='facebook/dinov2-with-registers-base'),
    'dinov2-l': dict(_DINOV2, width=1024, depth=24, heads=16, repo='facebook/dinov2-with-registers-large'),
    'siglip2-b': dict(width=768, depth=12, heads=12, patch=16, pos_grid=16, input_size=256, cls=False, act='tanh',
                      eps=1e-6, mean=(0.5,) * 3, std=(0.5,) * 3, layout='siglip2',
                      repo='google/siglip2-base-patch16-256'),
    'mae-b': dict(width=768, depth=12, heads=12, patch=16, pos_grid=14, input_size=256, eps=1e-12, layout='mae',
                  repo='facebook/vit-mae-base'),
    # DINO v1 ViT-S/8: the frozen discriminator backbone of decoder training (its MLP uses tanh GELU there)
    'dino-s8': dict(width=384, depth=12, heads=6, patch=8, pos_grid=28, input_size=224, act='tanh', eps=1e-6,
                    layout='dino', file=(HF_REPO, 'discs/dino_vit_small_patch8_224.pth')),
}

# Published key names, our module -> theirs, per layout: (prefix of the tower in the file, names outside the blocks,
# prefix of block {i}, names inside a block). A tuple is concatenated along dim 0: our fused qkv = [q; k; v].
# Every tensor takes the .weight / .bias of its module; other tensors in the file (text tower, MAE decoder,
# mask token, the final LayerNorm's affine, which RAE drops) are not read.
_HF_QKV = tuple(f'attention.attention.{n}' for n in ('query', 'key', 'value'))
_HF_VIT_BLOCK = {'norm1': 'layernorm_before', 'attn.qkv': _HF_QKV, 'attn.proj': 'attention.output.dense',
                 'norm2': 'layernorm_after', 'fc1': 'intermediate.dense', 'fc2': 'output.dense'}
PUBLISHED = {
    'dinov2': ('', {'patch_embed': 'embeddings.patch_embeddings.projection', 'cls_token': 'embeddings.cls_token',
                    'pos_embed': 'embeddings.position_embeddings', 'register_tokens': 'embeddings.register_tokens'},
               'encoder.layer.{i}.', {'norm1': 'norm1', 'attn.qkv': _HF_QKV, 'attn.proj': 'attention.output.dense',
                                      'norm2': 'norm2', 'fc1': 'mlp.fc1', 'fc2': 'mlp.fc2',
                                      'ls1': 'layer_scale1.lambda1', 'ls2': 'layer_scale2.lambda1'}),
    'siglip2': ('vision_model.', {'patch_embed': 'embeddings.patch_embedding',
                                  'pos_embed': 'embeddings.position_embedding.weight'},  # [N, C]: no CLS
                'encoder.layers.{i}.', {'norm1': 'layer_norm1', 'norm2': 'layer_norm2', 'fc1': 'mlp.fc1',
                                        'fc2': 'mlp.fc2', 'attn.proj': 'self_attn.out_proj',
                                        'attn.qkv': ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj')}),
    'mae': ('vit.', {'patch_embed': 'embeddings.patch_embeddings.projection', 'cls_token': 'embeddings.cls_token',
                     'pos_embed': 'embeddings.position_embeddings'}, 'encoder.layer.{i}.', _HF_VIT_BLOCK),
    'dino': ('', {'patch_embed': 'patch_embed.proj', 'cls_token': 'cls_token', 'pos_embed': 'pos_embed'},  # timm
             'blocks.{i}.', {'norm1': 'norm1', 'attn.qkv': 'attn.qkv', 'attn.proj': 'attn.proj', 'norm2': 'norm2',
                             'fc1': 'mlp.fc1', 'fc2': 'mlp.fc2'}),
    'decoder': ('', {'embed': 'decoder_embed', 'cls_token': 'trainable_cls_token', 'pos_embed': 'decoder_pos_embed',
                     'norm': 'decoder_norm', 'pred': 'decoder_pred'}, 'decoder_layers.{i}.', _HF_VIT_BLOCK),
}

class Encoder(nn.Module):
    """A frozen ViT representation encoder: images in [0,1] -> normalised patch tokens [B, N, C]."""

    def __init__(self, width, depth, heads, patch, pos_grid, input_size, registers=0, cls=True, layerscale=False,
                 act='gelu', eps=1e-6, antialias=False, mean=IMAGENET_MEAN, std=IMAGENET_STD, name='vit',
                 layout='dinov2', **unused):
        super().__init__()
        self.name, self.patch, self.input_size, self.antialias, self.layout = name, patch, input_size, antialias, layout
        self.check_inputs = True  # the training scripts turn it off: their loaders give [0, 1] by construction
        self.n_prefix = int(cls) + registers  # tokens in front of the patch tokens (CLS, registers)
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if cls else None
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, width)) if registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, int(cls) + pos_grid ** 2, width))  # CLS row first, if any
        self.blocks = nn.ModuleList(Block(width, heads, 4 * width, eps, act, layerscale) for _ in range(depth))
        # The final LayerNorm without affine (RAE §3): tokens are standardised per token over channels.
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def embed(self, x):
        """Normalised pixels [B,3,H,W] -> [CLS, registers, patches] tokens with position embeddings."""
        x = self.patch_embed(x)  # (B, C, h, w)
        h, w = x.shape[-2:]
        n_cls = int(self.cls_token is not None)
        cls_pos, grid = self.pos_embed[:, :n_cls], self.pos_embed[:, n_cls:]
        g = math.isqrt(grid.shape[1])
        if (h, w) != (g, g):  # another token grid: the stored one, bicubic-interpolated
            grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(h, w), mode='bicubic', align_corners=False,
                                 antialias=self.antialias).to(grid.dtype)
            grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        x = x.flatten(2).transpose(1, 2) + grid  # (B, h*w, C), row-major tokens
        cls = [] if self.cls_token is None else [self.cls_token + cls_pos]
        registers = [] if self.register_tokens is None else [self.register_tokens]  # no position embedding
        return torch.cat([p.expand(len(x), -1, -1) for p in cls + registers] + [x], dim=1)

    def forward(self, images):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'{self.name}: expected images [B,3,H,W], got shape {tuple(images.shape)}')
        if self.check_inputs and not torch.compiler.is_compiling():  # one host sync: not in a training step
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
        overrides (width=, depth=, pos_grid=, ...) change the preset, e.g. for a tiny random file (tests)."""
        if name not in ENCODERS:
            raise ValueError(f'unknown encoder {name!r}; choose one of {", ".join(ENCODERS)}')
        cfg = dict(ENCODERS[name], name=name, **overrides)
        cfg['input_size'] = input_size or cfg['input_size']
        if weights is None:
            weights = download(hf_url(*cfg.get('file', (cfg['repo'], 'model.safetensors'))))
        model = cls(**cfg)
        load_published(model, load_state_dict_file(weights), PUBLISHED[model.layout], weights)
        return model.eval().requires_grad_(False)


def sincos_2d(width, grid):
    """Fixed 2D sin-cos position embedding [grid*grid, width] (MAE recipe), row-major tokens: channels [0, width/2)
    encode the column, the rest the row, each half [sin(p w_i), cos(p w_i)], w_i = 10000^(-i / (width/4))."""
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing='ij')
    halves = [np.outer(p.reshape(-1), omega) for p in (cols, rows)]
    emb = np.concatenate([f(h) for h in halves for f in (np.sin, np.cos)], axis=1)
    return torch.from_numpy(emb).float()


def unpatchify(x, p, c):
    """Tokens [B, h*h, p*p*c] -> [B, c, h*p, h*p]: token (r, q) fills a p x p block, channels last per pixel."""
    B, N, _ = x.shape
    h = math.isqrt(N)
    x = torch.einsum('nhwpqc->nchpwq', x.reshape(B, h, h, p, p, c))
    return x.reshape(B, c, h * p, h * p)


# ViT decoder sizes (the released decoders are all XL; note XL's MLP is 4096, not 4 x 1152)
DECODERS = {'B': dict(width=768, depth=12, heads=12, mlp_hidden=3072),
            'L': dict(width=1024, depth=24, heads=16, mlp_hidden=4096),
            'XL': dict(width=1152, depth=28, heads=16, mlp_hidden=4096)}


class Decoder(nn.Module):
    """MAE-style ViT decoder: tokens [B, N, C] -> encoder-normalised pixels [B, 3, grid*p_d, grid*p_d]."""
    grad_checkpoint = False  # True: each block recomputed in backward (run_block)

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
        if N != self.grid ** 2:  # another token count: resize the embedded token grid bilinearly
            n = math.isqrt(N)
            x = x.transpose(1, 2).reshape(B, D, n, n)
            x = F.interpolate(x, size=(self.grid, self.grid), mode='bilinear', align_corners=False)
            x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = run_block(self, block, x)
        return unpatchify(self.pred(self.norm(x))[:, 1:], self.patch, 3)  # CLS dropped

    @classmethod
    def from_state_dict(cls, sd, path='decoder', **arch):
        """A decoder of architecture `arch` (token_dim, width, depth, heads, mlp_hidden, grid, patch) holding sd,
        in our layout or the released one (HF ViTMAE decoder names; some files lack the CLS token or the table)."""
        model = cls(**arch)
        if 'decoder_embed.weight' in sd:
            return load_published(model, sd, PUBLISHED['decoder'], path, optional=('cls_token', 'pos_embed'))
        return copy_weights(model, sd, path)


# -----------------------------------------------------------------------------------------------------------
# The Representation Autoencoder

# Released files in nyu-visionx/RAE-collections, by (encoder, image resolution); all ViT-XL decoders, patch 16
RELEASED_DECODERS = {('dinov2-b', 256): 'decoders/dinov2/wReg_base/ViTXL_n08/model.pt',
                     ('dinov2-b', 512): 'decoders/dinov2/wReg_base/ViTXL_n08_i512/model.pt',
                     ('siglip2-b', 256): 'decoders/siglip2/base_p16_i256/ViTXL_n08/model.pt',
                     ('mae-b', 256): 'decoders/mae/base_p16/ViTXL_n08/model.pt'}
RELEASED_STATS = {('dinov2-b', 256): 'stats/dinov2/wReg_base/imagenet1k/stat.pt',
                  ('dinov2-b', 512): 'stats/dinov2/wReg_base/imagenet1k_512/stat.pt',
                  ('siglip2-b', 256): 'stats/siglip2/base_p16_i256/ImageNet1k/stat.pt',
                  ('mae-b', 256): 'stats/mae/base_p16/ImageNet1k/stat.pt'}
# The same RAEs as diffusers AutoencoderRAE repositories (encoder, decoder and statistics in one file), with the
# DINOv2-S and -L ones that RAE-collections lacks; from_pretrained reads these for names without a file above.
RELEASED_DIFFUSERS = {('dinov2-b', 256): 'nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08',
                      ('dinov2-b', 512): 'nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08-i512',
                      ('dinov2-s', 256): 'nyu-visionx/RAE-dinov2-wReg-small-ViTXL-n08',
                      ('dinov2-l', 256): 'nyu-visionx/RAE-dinov2-wReg-large-ViTXL-n08',
                      ('siglip2-b', 256): 'nyu-visionx/RAE-siglip2-base-p16-i256-ViTXL-n08',
                      ('mae-b', 256): 'nyu-visionx/RAE-mae-base-p16-ViTXL-n08'}


def decoder_arch(config):
    """Decoder(**arch) of a decoder_train.py run config (the `config` stored in its checkpoints)."""
    width = dict(ENCODERS[config['encoder']], **(config.get('encoder_overrides') or {}))['width']
    return dict(token_dim=width, **(config.get('decoder_arch') or DECODERS[config['decoder_size']]),
                grid=config['image_size'] // config['decoder_patch'], patch=config['decoder_patch'])


class RAE(nn.Module):
    """Frozen encoder + trained decoder; the latent is the encoder's token map, normalised per channel+position."""

    def __init__(self, encoder, decoder, mean=None, var=None, noise_tau=0.0, pixel_mean=IMAGENET_MEAN,
                 pixel_std=IMAGENET_STD):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder  # encoder may be None when only decoding (sampling)
        self.noise_tau = noise_tau
        if encoder is not None:
            encoder.requires_grad_(False)
            pixel_mean, pixel_std = encoder.mean.flatten().tolist(), encoder.std.flatten().tolist()
        # The decoder predicts pixels in the encoder's normalisation; these map them back to [0,1].
        self.register_buffer('pixel_mean', torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('pixel_std', torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        # Per channel and position; no mean is variance-only normalisation (the released DINOv2-B statistics), no
        # statistics at all the identity (0 and 1 change no value).
        std = torch.ones(()) if var is None else torch.sqrt(var.float() + 1e-5)  # eps as released
        self.register_buffer('latent_mean', torch.zeros(()) if mean is None else mean.float(), persistent=False)
        self.register_buffer('latent_std', std, persistent=False)

    def normalize(self, z):
        return (z - self.latent_mean) / self.latent_std

    def denormalize(self, x):
        return x * self.latent_std + self.latent_mean

    @torch.no_grad()
    def encode(self, images):
        """Images [B,3,H,W] in [0,1] -> latent [B,C,h,w]."""
        if self.encoder is None:
            raise RuntimeError('this RAE was built without an encoder (decode only)')
        z = self.encoder(images)  # (B, N, C), LayerNorm'd tokens
        if self.training and self.noise_tau > 0:
            # Noise-augmented decoding (§4.3): sigma ~ tau * U(0, 1) per sample, as the released decoders were
            # trained (the paper's text says |N(0, tau^2)|; README's table of differences).
            sigma = self.noise_tau * torch.rand((len(z), 1, 1), device=z.device, dtype=z.dtype)
            z = z + sigma * torch.randn_like(z)
        B, N, C = z.shape
        h = math.isqrt(N)
        return self.normalize(z.transpose(1, 2).reshape(B, C, h, h))  # token n = row * h + col

    def decode(self, latent):
        """Latent [B,C,h,w] -> images [B,3,H,W], nominally in [0,1] (not clamped)."""
        x = self.decoder(self.denormalize(latent).flatten(2).transpose(1, 2))
        return x * self.pixel_std + self.pixel_mean

    def forward(self, images):
        return self.decode(self.encode(images))

    @classmethod
    def from_pretrained(cls, encoder='dinov2-b', resolution=None, decoder=None, stats=None, encoder_weights=None,
                        load_encoder=True, encoder_overrides=None, arch=None):
        """The released RAE for (encoder, resolution, 256 unless given); decoder / stats may be local files instead of
        downloads. A decoder_train.py checkpoint is built from the run config it stores, any other file as a released
        ViT-XL decoder at patch 16 unless arch (Decoder's keywords) says otherwise. load_encoder=False: decode only
        (sampling); stats=False: no latent normalisation (decoder training works on raw tokens). encoder or decoder
        may be a diffusers AutoencoderRAE folder or hub repository (from_diffusers; encoder_* and arch unused), and a
        name without a RAE-collections decoder (dinov2-s, dinov2-l) loads its RELEASED_DIFFUSERS repository."""
        key = (encoder, resolution or 256)
        if decoder is None and key not in RELEASED_DECODERS:
            decoder = RELEASED_DIFFUSERS.get(key)
        from diffusers_format import is_diffusers  # the diffusers folder format builds on this module
        if encoder not in ENCODERS and is_diffusers(encoder) or is_diffusers(decoder):
            source, name = (decoder, encoder) if encoder in ENCODERS else (encoder, None)
            return cls.from_diffusers(source, name, resolution, stats, load_encoder)
        resolution = resolution or 256
        if encoder not in ENCODERS:
            raise ValueError(f'unknown encoder {encoder!r}; choose one of {", ".join(ENCODERS)}')
        for given, table, what in [(decoder, RELEASED_DECODERS, 'decoder'), (stats, RELEASED_STATS, 'statistics')]:
            if given is None and key not in table:
                have = ', '.join(f'{e}@{r}' for e, r in table)
                raise ValueError(f'no released {what} for {encoder} at {resolution} px (released: {have}); '
                                 f'pass a local file instead')
        decoder = decoder or download(hf_url(HF_REPO, RELEASED_DECODERS[key]))
        if stats is not False:
            stats = stats or download(hf_url(HF_REPO, RELEASED_STATS[key]))
        ckpt = load_state_dict_file(decoder)
        run = ckpt.get('config') if isinstance(ckpt, dict) else None
        overrides = encoder_overrides or {}
        cfg = dict(ENCODERS[encoder], **overrides)
        arch = arch or (decoder_arch(run) if isinstance(run, dict) else
                        dict(DECODERS['XL'], token_dim=cfg['width'], grid=resolution // 16, patch=16))
        sd = {k.removeprefix('decoder.'): v for k, v in model_state_dict(ckpt, decoder).items()
              if not k.startswith('encoder.')}  # a decoder_train.py checkpoint holds the decoder alone
        dec = Decoder.from_state_dict(sd, decoder, **arch)
        kw = {'input_size': dec.grid * cfg['patch'], **overrides}  # DINOv2: 224 px gives the decoder's 16 x 16 tokens
        enc = Encoder.from_pretrained(encoder, encoder_weights, **kw) if load_encoder else None
        mean, var = load_stats(stats) if stats is not False else (None, None)
        return cls(enc, dec, mean, var, pixel_mean=cfg.get('mean', IMAGENET_MEAN),
                   pixel_std=cfg.get('std', IMAGENET_STD)).eval()

    @classmethod
    def from_diffusers(cls, source, encoder=None, resolution=None, stats=None, load_encoder=True):
        """An RAE from a diffusers AutoencoderRAE folder or hub repository (diffusers_format.py reads the format).
        encoder and resolution, when given, must be what the file holds; stats and load_encoder as in
        from_pretrained."""
        import diffusers_format  # it builds on this module
        return diffusers_format.load_rae(source, encoder, resolution, stats, load_encoder, cls)

    def save_pretrained(self, folder, classic=False):
        """This RAE as a diffusers AutoencoderRAE folder (config.json, diffusion_pytorch_model.safetensors) that
        AutoencoderRAE.from_pretrained and from_diffusers load: the encoder under the names of transformers >= 5.18
        (DINOv2), 5.9 (MAE), 5.6 (SigLIP), or with classic=True of earlier versions."""
        import diffusers_format
        diffusers_format.save_rae(self, folder, classic)


# -----------------------------------------------------------------------------------------------------------
# The diffusion transformers: LightningDiT (the paper's "DiT") and DiT^DH (DiT + a wide, shallow DDT head)
#
# Both map (x_t [B, 768, 16, 16], t [B] in [0, 1] with 1 = noise, y [B] class ids with num_classes = null) to the
# velocity v [B, 768, 16, 16], reading x_t as 256 tokens (patch size 1).
# Module attribute names are the released ones, so the authors' checkpoints load strictly. Quirks kept on purpose
# (changing any of them silently breaks the released weights): the conditioning goes through SiLU twice in DiT^DH,
# the head sees t and y only through s = SiLU(backbone_out + t_emb), the frozen tables (sin-cos position embedding,
# Fourier frequencies W, RoPE) are stored in the checkpoints and must be loaded, not recomputed.

class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (eps 1e-6); the learned gain is applied after casting back."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * self.weight


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

    def __init__(self, head_dim, grid):
        super().__init__()
        d = head_dim // 2  # channels per axis
        freqs = 1.0 / 10000.0 ** (torch.arange(0, d, 2)[:d // 2].float() / d)  # (d/2,)
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
    """LightningDiT block: RMSNorm, RoPE attention, SwiGLU, adaLN-Zero modulation x (1 + scale) + shift by c."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(2 * int(dim * mlp_ratio) / 3))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):  # x (B, N, D); c (B, 1, D) one vector per sample, or (B, N, D) one per token
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa, rope)
        return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class FinalLayer(nn.Module):
    """RMSNorm, adaLN modulation (shift, scale; no gate), linear map back to patch pixels."""

    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


def init_dit(model, embedders):
    """Both DiTs' init: xavier patch embeddings, N(0, 0.02) label table and time MLP, and adaLN-Zero (every block
    starts as the identity, the output as 0)."""
    for emb in embedders:
        nn.init.xavier_uniform_(emb.proj.weight.view(emb.proj.weight.shape[0], -1))
        nn.init.zeros_(emb.proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for layer in [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.adaLN_modulation[-1],
                                                                    model.final_layer.linear]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


class LightningDiT(nn.Module):
    """The paper's DiT (LightningDiT): c = t_emb + y_emb modulates every block; the baseline of §4."""
    grad_checkpoint = False  # True: each block recomputed in backward (run_block)

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
        for m in self.modules():  # a global xavier pass first (LightningDiT only; DiT^DH keeps PyTorch's default)
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        init_dit(self, [self.x_embedder])

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = (self.t_embedder(t) + self.y_embedder(y))[:, None]  # (B, 1, D); no SiLU here (each block has one)
        for block in self.blocks:
            x = run_block(self, block, x, c, self.feat_rope)
        return unpatchify(self.final_layer(x, c), self.patch_size, self.in_channels)


class DiTDH(nn.Module):
    """DiT^DH (§5): a DiT backbone M turns (x_t, t, y) into per-token conditions s; a wide, shallow head H gives v."""
    grad_checkpoint = False  # True: each block recomputed in backward (run_block)

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
        init_dit(self, [self.x_embedder, self.s_embedder])

    def forward(self, x, t, y):
        t = self.t_embedder(t)  # (B, H1)
        c = F.silu(t + self.y_embedder(y))[:, None]  # (B, 1, H1); the blocks apply SiLU again (as released)
        s = self.s_embedder(x) + self.pos_embed  # (B, N, H1)
        for block in self.blocks[:self.depth[0]]:
            s = run_block(self, block, s, c, self.enc_feat_rope)
        s = self.s_projector(F.silu(s + t[:, None]))  # (B, N, H2): per-token condition; y enters only via s
        x = self.x_embedder(x)  # (B, N, H2)
        for block in self.blocks[self.depth[0]:]:
            x = run_block(self, block, x, s, self.dec_feat_rope)
        return unpatchify(self.final_layer(x, s), self.patch_size, self.in_channels)


# Sizes (width / depth / heads). DiT^DH adds the paper's 2-layer, 2048-wide, 16-head DDT head to every backbone.
# Parameters (incl. the frozen APE and W): DiT^DH-S 196.5M, -B 294.3M, -L 621.7M, -XL 838.7M; LightningDiT-XL 677.3M.
DIT_SIZES = {'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16), 'XL': (1152, 28, 16)}
DDT_HEAD = (2048, 2, 16)


def build_dit(name, hidden_size=None, depth=None, num_heads=None, **kwargs):
    """A fresh model: a preset ('DiTDH-XL', 'LightningDiT-B', ...) or a family ('DiTDH', 'LightningDiT') with
    hidden_size / depth / num_heads (pairs for DiTDH). kwargs: input_size, in_channels, num_classes, ..."""
    family, _, size = name.partition('-')
    if family not in ('DiTDH', 'LightningDiT') or (size not in DIT_SIZES if size else hidden_size is None):
        raise ValueError(f'unknown model {name!r}; choose DiTDH-<size> or LightningDiT-<size> with size in '
                         f'{"/".join(DIT_SIZES)}, or DiTDH / LightningDiT with hidden_size, depth and num_heads')
    if size and hidden_size is not None:
        raise ValueError(f'{name} is a preset: give hidden_size / depth / num_heads with DiTDH or LightningDiT')
    if size:  # DiT^DH: (backbone, head) pairs
        hidden_size, depth, num_heads = zip(DIT_SIZES[size], DDT_HEAD) if family == 'DiTDH' else DIT_SIZES[size]
    cls = DiTDH if family == 'DiTDH' else LightningDiT
    return cls(hidden_size=hidden_size, depth=depth, num_heads=num_heads, **kwargs)


RELEASED_DITS = {  # DiT^DH-XL on DINOv2-B latents, and the early DiT^DH-S used as its AutoGuidance guide (App. D)
    256: dict(model='DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-XL/stage2_model.pt',
              guide='DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-S_ep14/stage2_model.pt', autoguidance=1.42),
    512: dict(model='DiTs/Dinov2/wReg_base/ImageNet512/DiTDH-XL_ep400/stage2_model.pt',
              guide='DiTs/Dinov2/wReg_base/ImageNet512/DiTDH-S_ep20/stage2_model.pt', autoguidance=1.5),
}


def load_dit(path, name=None, **kwargs):
    """A LightningDiT or DiT^DH holding a file's weights, in eval mode: a diffusion_train.py checkpoint is built from
    its run config (EMA weights), any other file from `name` and build_dit's kwargs. Channels and grid are read off
    the file, and so are the frozen tables: the released EMA weights carry slightly nudged copies of them."""
    ckpt = load_state_dict_file(path)
    run = ckpt.get('config') if isinstance(ckpt, dict) else None
    if isinstance(run, dict):
        if 'model' not in run:
            raise ValueError(f'{path}: not a DiT checkpoint (a decoder_train.py checkpoint?)')
        name, kwargs = run['model'], dict(hidden_size=run.get('hidden_size'), depth=run.get('depth'),
                                          num_heads=run.get('num_heads'), num_classes=run['num_classes'])
    sd = model_state_dict(ckpt, path)
    if 'x_embedder.proj.weight' not in sd or 'pos_embed' not in sd:
        raise ValueError(f'{path}: not a LightningDiT / DiT^DH state dict (no x_embedder.proj.weight, pos_embed)')
    if name is None:
        raise ValueError(f'{path}: a bare state dict does not say which DiT it holds; name its preset, e.g. '
                         f"load_dit(path, 'DiTDH-XL')")
    _, in_channels, _, patch = sd['x_embedder.proj.weight'].shape
    with torch.device('meta'):  # no time spent on a random init that is overwritten anyway
        model = build_dit(name, input_size=math.isqrt(sd['pos_embed'].shape[1]) * patch, patch_size=patch,
                          in_channels=in_channels, **kwargs)
    return copy_weights(model.to_empty(device='cpu'), sd, path).eval()


def released_dit(resolution=256, guide=False):
    """The authors' DiT^DH-XL for 256 or 512 px (guide=True: the DiT^DH-S AutoGuidance guide), downloaded once."""
    if resolution not in RELEASED_DITS:
        raise ValueError(f'no released DiT^DH for {resolution} px (released: {", ".join(map(str, RELEASED_DITS))})')
    path = RELEASED_DITS[resolution]['guide' if guide else 'model']
    return load_dit(download(hf_url(HF_REPO, path)), 'DiTDH-S' if guide else 'DiTDH-XL')


# -----------------------------------------------------------------------------------------------------------
# Rectified flow (§4.2, App. I), in the paper's convention throughout:
#   x_t = (1 - t) x + t eps,  t = 0 data, t = 1 noise;  the model predicts v = eps - x;  loss = MSE.
# High-dimensional latents need noisier training and sampling times: every t (training draws and the sampling grid)
# goes through the shift t' = alpha t / (1 + (alpha - 1) t), alpha = sqrt(C*H*W / 4096) (sqrt(48) at 256 px).

def shift_alpha(latent_shape):
    """alpha = sqrt(effective data dimension / 4096), e.g. (768, 16, 16) -> sqrt(48) = 6.93."""
    return math.sqrt(math.prod(latent_shape) / 4096)


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


def step_draws(seed, step, rows, global_batch, latent_shape, time_dist, alpha, class_dropout, device):
    """The training draws of `rows` of the global batch at optimizer step `step`: eps [B, C, h, w], shifted t [B]
    and label drops [B] (to the null class, which trains the unconditional model for guidance). (seed, step) hashes
    to global_batch + 1 seeds: t and drops of the whole batch come from the last, eps of row r from seed r, so row r
    is the same sample on any number of ranks, with any grad_accum and after a resume."""
    seeds = np.random.SeedSequence([seed, step]).generate_state(global_batch + 1, np.uint64).tolist()
    g = torch.Generator().manual_seed(seeds[-1])
    t = time_shift(sample_t(global_batch, time_dist, generator=g), alpha)[rows]
    drop = (torch.rand(global_batch, generator=g) < class_dropout)[rows]
    g = torch.Generator(device)  # own generators: the rank's streams stay untouched
    eps = torch.stack([torch.randn(latent_shape, generator=g.manual_seed(seeds[r]), device=device)
                       for r in rows.tolist()])
    return eps, t.to(device), drop.to(device)


def flow_loss(model, x, y, alpha, time_dist='logit-normal', eps=None, t=None):
    """Per-sample loss ||v_theta(x_t, t, y) - (eps - x)||^2 / dim at shifted random times t: [B]. Unless given (as
    diffusion_train.py gives step_draws'), eps then t are drawn here and the model drops labels: the release's order."""
    eps = torch.randn_like(x) if eps is None else eps
    t = time_shift(sample_t(len(x), time_dist), alpha).to(x.device) if t is None else t
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x + tt * eps
    return ((model(x_t, t, y).float() - (eps - x)) ** 2).mean(dim=(1, 2, 3))  # fp32 loss under bf16 autocast


# -----------------------------------------------------------------------------------------------------------
# Samplers and guidance

def sample_grid(num_steps=50, alpha=1.0):
    """The released grid: 1 - linspace(0, 0.999, num_steps), shifted; 1.0 down to 0.0069 at alpha = sqrt(48)."""
    return time_shift(1 - torch.linspace(0, 0.999, num_steps), alpha)


@torch.no_grad()
def sample_ode(velocity, x, num_steps=50, alpha=1.0, method='euler', trajectory=False, progress=False):
    """Integrate dx/dt = v(x, t) from t = 1 (noise) down the grid in num_steps - 1 Euler or Heun (2 calls) updates.
    Like the released sampler it stops at t = shift(0.001), not 0. trajectory=True: all num_steps states."""
    if method not in ('euler', 'heun'):
        raise ValueError(f'unknown sampler {method!r}; use euler or heun')
    grid = sample_grid(num_steps, alpha).to(x.device)
    states = [x]
    for i in tqdm(range(num_steps - 1), desc='sampling', disable=not progress):
        t, dt = grid[i].expand(len(x)), grid[i + 1] - grid[i]
        v = velocity(x, t).to(x.dtype)
        if method == 'heun':
            v = (v + velocity(x + dt * v, grid[i + 1].expand(len(x))).to(x.dtype)) / 2
        x = x + dt * v
        if trajectory:
            states.append(x)
    return torch.stack(states) if trajectory else x


def guided_velocity(model, y, cfg_scale=1.0, cfg_interval=(0.0, 1.0), guide=None, guide_scale=1.0):
    """v(x_t, t) for the sampler: plain, CFG or AutoGuidance (w = 1: none), guided where t_min <= t <= t_max, tested
    per sample on the model's own (shifted) time, inclusive, for both DiTs (README's table of differences).
      CFG (null label):         v = v_u + w (v_c - v_u)
      AutoGuidance (App. D):    v = v_g + w (v_m - v_g), v_g from a weaker guide model given the same labels"""
    autoguidance, cfg = guide is not None and guide_scale != 1, cfg_scale != 1
    if cfg and autoguidance:
        raise ValueError('use either CFG or AutoGuidance, not both')
    if not (cfg or autoguidance):
        return lambda x, t: model(x, t, y)
    t_min, t_max = cfg_interval
    w = guide_scale if autoguidance else cfg_scale
    y_cfg = torch.cat([y, torch.full_like(y, model.num_classes)]) if cfg else None  # [conditional, null]

    def velocity(x, t):
        inside = (t >= t_min) & (t <= t_max)
        if (t_min > 0 or t_max < 1) and not inside.any():  # outside the interval: no guidance forward (one sync)
            return model(x, t, y)
        if autoguidance:
            v, v_weak = model(x, t, y), guide(x, t, y)
        else:  # v_c and v_u from one forward on the doubled batch
            v, v_weak = model(torch.cat([x, x]), torch.cat([t, t]), y_cfg).chunk(2)
        return torch.where(inside.view(-1, 1, 1, 1), v_weak + w * (v - v_weak), v)

    return velocity
