"""
Stage 1 of RAE: train a ViT decoder on the tokens of a frozen representation encoder (paper §3, §4.3, App. E.2).

The decoder's objective, on images x in [0,1] and reconstructions x_hat = D(E(x) + n), n ~ noise (§4.3):

    L = |x_hat - x|_1 + w_P * LPIPS(x, x_hat) + w_G * lambda * GAN(x_hat)        w_P = 1, w_G = 0.75

GAN(x_hat) = -mean Disc(DiffAug(x_hat)), Disc = trainable StyleGAN-T heads on frozen DINO ViT-S/8 features,
trained with a hinge loss; lambda balances the two gradients at the decoder's last layer (Esser et al. 2021).

    torchrun --standalone --nproc_per_node=8 decoder_train.py configs/decoder_xl.py --data_path=/data/imagenet/train
    python decoder_train.py configs/decoder_tiny.py                                   # CPU, no network, ~10 s
    python decoder_train.py configs/decoder_tiny.py --mode=reconstruct --image=photo.jpg   # crop | recon -> recon.png
    python decoder_train.py configs/decoder_xl.py --mode=eval --decoder=released --val_path=/data/imagenet/val \
        --rfid_reference=val256.npz                         # PSNR and rFID (statistics: python fid.py --write-ref)
Reading order: the config, LPIPS, the DINO discriminator, DiffAug, the losses, the two update steps, main.
"""
import math
import os
import sys
import time
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

import fid
import rae
from files import center_crop_arr, download, load_state_dict_file, open_rgb, save_grid, to_uint8
from runtime import barrier, choose_precision, cleanup_ddp, one_line_errors, print0, rank0_first, set_tf32, setup_ddp
from training import (ImageFolder, Metrics, check_config, configure, latest_checkpoint, lr_warmup_cosine, make_ema,
                      make_loader, resume, save_checkpoint, start_log, unreadable, unwrap, update_ema,
                      write_toy_encoder, write_toy_images)

_imported = set(globals())  # the config is what the block below defines
# -----------------------------------------------------------------------------------------------------------
# The config. Defaults: the recipe of the released decoders (DINOv2-B, ViT-XL decoder, 256 px, 16 epochs;
# configs/decoder_xl.py). Config files are executed over them, then --key=value overrides; main() reads them,
# the functions below get what they need as arguments. A run resumes from its newest checkpoint.
# I/O
out_dir = 'runs/decoder'            # log.txt and checkpoints/<step>.pt
mode = 'train'                      # 'train'; 'eval': PSNR + rFID of a decoder; 'reconstruct': one image file
data_path = 'data/imagenet/train'   # ImageNet-style folder root/<class>/<image>
val_path = None                     # images for PSNR and rFID after the ADM centre crop (ImageNet val); None: no eval
rfid_reference = None               # fid.py statistics of those crops: python fid.py --write-ref REF.npz VAL_PATH
eval_every = 0                      # steps between evaluations of the EMA decoder (0: at the end of training only)
eval_images = 0                     # the first N images of val_path in sorted order (0: all)
image = None                        # mode='reconstruct': an image file; writes recon_out = centre crop | reconstruction
recon_out = 'recon.png'             # where mode='reconstruct' writes
decoder = None                      # for eval/reconstruct: a checkpoint or decoder file, 'released'; None: newest
toy = False                         # True: first write random-weight stand-ins for missing weight files, and toy images
# the autoencoder
encoder = 'dinov2-b'                # rae.ENCODERS: dinov2-s/b/l, siglip2-b, mae-b (frozen)
encoder_weights = None              # a local file in the published layout; None downloads it
encoder_overrides = None            # preset changes, e.g. dict(width=32, depth=2, ...) for a tiny random file
decoder_size = 'XL'                 # rae.DECODERS: B, L, XL
decoder_arch = None                 # dict(width=, depth=, heads=, mlp_hidden=) instead of a preset
decoder_patch = 16                  # p_d: image_size / p_d tokens a side; 32 decodes 16 x 16 tokens to 512 px (§6.1)
image_size = 256                    # random crops of a 1.5x short-side resize (384 px at 256), no flips
noise_tau = 0.8                     # z + sigma eps, sigma ~ tau U(0, 1) per image, in training steps only (§4.3)
# losses (App. E.2)
perceptual_weight = 1.0             # LPIPS from the first step
disc_weight = 0.75                  # w_G, times the adaptive lambda
disc_start_epoch = 8                # the GAN loss joins the decoder's objective from this epoch ...
disc_update_start_epoch = 6         # ... and the discriminator trains from this one
lpips_weights = None                # (torchvision VGG16 file, LPIPS heads file); None downloads both
disc_weights = None                 # the DINO ViT-S/8 backbone file; None downloads the published one
disc_overrides = None               # preset changes for that backbone (tiny stand-ins)
disc_key_depths = (2, 5, 8, 11)     # blocks whose tokens get a head, besides the last output
# optimisation: AdamW for the decoder and the discriminator heads alike
global_batch = 512                  # over all ranks (64 per GPU on 8)
epochs = 16                         # App. E.2; 2502 steps each at batch 512
lr = 2e-4                           # linear from 0 over warmup_epochs, then cosine to lr_final at epoch lr_decay_end
lr_final = 2e-5
warmup_epochs = 1
lr_decay_end = 16                   # the epoch the cosine reaches lr_final
betas = (0.9, 0.95)                 # as the released decoders were trained (an earlier recipe had (0.5, 0.9))
weight_decay = 0.0
ema_decay = 0.9978                  # per step, no warm-up
# system
device = None                       # None: CUDA when available; 'cpu'
precision = 'auto'                  # bf16 autocast where the hardware has bf16 units, else fp32; 'bf16'/'fp32' force
compile = True                      # torch.compile the RAE, LPIPS and the discriminator's backbone, after the EMA copy
grad_checkpoint = False             # recompute each decoder block in backward: less memory, one more forward
global_seed = 0                     # model init; rank r draws from global_seed * world + r
workers = 8                         # data loader processes per rank
log_every = 100                     # steps between log lines (means over ranks and steps)
ckpt_every = 0                      # steps between checkpoints, besides the one closing every epoch (0: those only)
ckpt_keep = 3                       # checkpoints kept (the newest)
ddp_timeout = 10                    # minutes a rank waits for the others before the job ends naming the rank
wandb_log = False                   # also send the metrics to Weights & Biases (needs wandb)
wandb_project = 'nano-rae'
wandb_run_name = None               # None: wandb names the run
_DEFAULTS = {k: v for k, v in globals().items() if k not in _imported}

# -----------------------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018): a perceptual distance from a frozen VGG16 with learned per-channel weights

VGG16_URL = 'https://download.pytorch.org/models/vgg16-397923af.pth'  # torchvision's ImageNet VGG16
VGG16_SHA256_PREFIX = '397923af'  # torchvision names its files after the first 8 hex digits of their sha256
LPIPS_URL = 'https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1'  # LPIPS v0.1 heads (vgg.pth)
LPIPS_MD5 = 'd507d7349b931f0638a25a48a722f98a'
VGG16_STAGES = (2, 2, 3, 3, 3)  # 3x3 convolutions per stage; LPIPS taps the last ReLU of every stage


class LPIPS(nn.Module):
    """LPIPS-VGG: sum over 5 VGG16 taps of the spatial mean of w . (f(x) - f(y))^2 on channel-unit-normalised f."""

    def __init__(self, widths=(64, 128, 256, 512, 512)):
        super().__init__()
        layers, c_in, self.taps = [], 3, []
        for stage, (n_convs, width) in enumerate(zip(VGG16_STAGES, widths)):
            if stage > 0:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(n_convs):
                layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU()]
                c_in = width
            self.taps.append(len(layers) - 1)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 = 3, 8, 15, 22, 29
        # torchvision's vgg16().features[:30], same indices: its ImageNet weights load as they are (default init)
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in widths)  # learned non-negative weights
        # VGG's ImageNet normalisation written for inputs in [-1, 1] (LPIPS' "scaling layer")
        self.register_buffer('shift', torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('scale', torch.tensor([.458, .448, .450]).view(1, 3, 1, 1), persistent=False)
        self.register_load_state_dict_pre_hook(self._rename_published)
        self.requires_grad_(False).eval()

    def vgg_taps(self, x):
        """Images in [-1, 1] -> the 5 VGG16 feature maps LPIPS compares."""
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out

    def forward(self, x, y):
        """Per-sample distance [B] between image batches x, y in [-1, 1]."""
        d = 0
        for fx, fy, lin in zip(self.vgg_taps(x), self.vgg_taps(y), self.lins):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels, per pixel
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = d + lin((fx - fy) ** 2).mean(dim=(1, 2, 3))  # 1x1 conv to one channel, then spatial mean
        return d

    @staticmethod
    def _rename_published(module, state_dict, prefix, *args):
        """Accept the published LPIPS module's key names too (net.sliceK.j, linK.model.1, scaling_layer.*)."""
        offsets = [0] + [t + 1 for t in module.taps[:-1]]  # first features index of each slice: 0, 4, 9, 16, 23
        for key in [k for k in state_dict if k.startswith(prefix)]:
            name = key[len(prefix):]
            parts = name.split('.')
            if name.startswith('net.slice'):  # published slices re-index VGG layers from 0: net.slice2.1 = features.5
                new = f'features.{offsets[int(parts[1][5:]) - 1] + int(parts[2])}.{parts[3]}'
            elif name.startswith('lin') and parts[1:3] == ['model', '1']:  # Dropout at index 0 holds nothing
                new = f'lins.{parts[0][3:]}.{parts[3]}'
            elif name.startswith('scaling_layer.'):  # constants of the method; refuse a file that disagrees
                value = state_dict.pop(key)
                if not torch.allclose(value.float().cpu(), getattr(module, parts[1]).float().cpu()):
                    raise ValueError(f'LPIPS weights with another input scaling: {name} = {value.flatten().tolist()}')
                continue
            else:
                continue
            state_dict[prefix + new] = state_dict.pop(key)

    @classmethod
    def from_pretrained(cls, vgg_weights=None, lin_weights=None):
        """The published LPIPS-VGG; each file is downloaded (and checksummed) unless a local path is given."""
        vgg_weights = vgg_weights or download(VGG16_URL, sha256=VGG16_SHA256_PREFIX)
        lin_weights = lin_weights or download(LPIPS_URL, filename='lpips/vgg.pth', md5=LPIPS_MD5)
        vgg, lin = load_state_dict_file(vgg_weights), load_state_dict_file(lin_weights)
        first_convs = [f'features.{i}.weight' for i in (0, 5, 10, 17, 24)]  # fix the width of each stage
        if not all(k in vgg for k in first_convs):
            raise ValueError(f'{vgg_weights}: not torchvision VGG16 weights (no features.N.weight keys)')
        sd = {k: v for k, v in vgg.items() if k.startswith('features.') and int(k.split('.')[1]) < 30}
        sd.update({k: v for k, v in lin.items() if k.startswith('lin')})  # the file may hold more; heads only
        model = cls(widths=tuple(vgg[k].shape[0] for k in first_convs))
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            why = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
            raise ValueError(f'{vgg_weights} + {lin_weights}: not VGG16 + LPIPS weights ({why})') from None
        return model


# -----------------------------------------------------------------------------------------------------------
# The discriminator: frozen DINO ViT-S/8 features + trainable per-token heads (StyleGAN-T, App. E.2)

class SNConv1d(nn.Module):
    """Conv1d with spectral normalisation (Miyato et al. 2018): W / sigma_max(W), sigma by power iteration."""

    def __init__(self, c_in, c_out, kernel_size=1):
        super().__init__()
        self.bias = nn.Parameter(torch.empty(c_out))  # bias first: the key order of published discriminator files
        self.weight_orig = nn.Parameter(torch.empty(c_out, c_in, kernel_size))
        nn.init.kaiming_uniform_(self.weight_orig, a=math.sqrt(5))  # nn.Conv1d's default initialisation
        nn.init.uniform_(self.bias, -1 / math.sqrt(c_in * kernel_size), 1 / math.sqrt(c_in * kernel_size))
        # Running estimates of the top singular vectors of W viewed as [c_out, c_in * k] (names: torch's hook)
        self.register_buffer('weight_u', F.normalize(torch.randn(c_out), dim=0, eps=1e-12))
        self.register_buffer('weight_v', F.normalize(torch.randn(c_in * kernel_size), dim=0, eps=1e-12))

    def normalized_weight(self):
        W = self.weight_orig.flatten(1)
        if self.training:  # one power iteration per training forward; eval uses the stored u, v
            with torch.no_grad():
                self.weight_v.copy_(F.normalize(torch.mv(W.t(), self.weight_u), dim=0, eps=1e-12))
                self.weight_u.copy_(F.normalize(torch.mv(W, self.weight_v), dim=0, eps=1e-12))
        # clones: u, v are saved for backward, and the next training forward updates the buffers in place
        u, v = self.weight_u.clone(), self.weight_v.clone()
        return self.weight_orig / torch.dot(u, torch.mv(W, v))  # / sigma

    def forward(self, x):  # (B, c_in, N) -> (B, c_out, N)
        k = self.weight_orig.shape[-1]
        x = F.pad(x, (k // 2, k // 2), mode='circular') if k > 1 else x  # tokens wrap around: circular padding
        return F.conv1d(x, self.normalized_weight(), self.bias)


class BatchNormLocal(nn.Module):
    """Per-sample batch norm: each channel standardised over the N tokens of its own sample (virtual batch of 1)."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x):  # (B, C, N); statistics in fp32, even under autocast
        x = x.float()
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight[:, None] + self.bias[:, None]


class ResidualBlock(nn.Module):
    """out = (fn(x) + x) / sqrt(2): the sum of two unit-variance paths, rescaled to unit variance."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return (self.fn(x) + x) / math.sqrt(2)


def disc_head(width, kernel_size):
    """One head: token map [B, C, N] -> one logit per token [B, 1, N]."""
    def conv_bn_lrelu(k):
        return nn.Sequential(SNConv1d(width, width, k), BatchNormLocal(width), nn.LeakyReLU(0.2))
    return nn.Sequential(conv_bn_lrelu(1), ResidualBlock(conv_bn_lrelu(kernel_size)), SNConv1d(width, 1, 1))


class Discriminator(nn.Module):
    """Frozen DINO ViT features after a few blocks (and the last), each scored per token by a trainable head.

    The heads normalise per sample (BatchNormLocal), not over the batch (README: differences). Only the heads are
    parameters, so state_dict() is heads only (the published files' key names) and the backbone can never train."""

    def __init__(self, dino, key_depths=(2, 5, 8, 11), kernel_size=9):
        super().__init__()
        if not all(0 <= d < len(dino.blocks) for d in key_depths):
            raise ValueError(f'key_depths {tuple(key_depths)} outside the backbone\'s {len(dino.blocks)} blocks')
        dino = dino.eval().requires_grad_(False)
        with torch.no_grad():  # key biases zeroed, as in training; softmax ignores them (q.b_k: one constant a row)
            for block in dino.blocks:
                block.attn.qkv.bias.view(3, -1)[1] = 0  # the fused bias is [q; k; v]
        self._dino = [dino]  # in a list, not a submodule: no backbone in parameters(), state_dict() or DDP
        self.key_depths = tuple(key_depths)
        width = dino.patch_embed.out_channels
        self.heads = nn.ModuleList(disc_head(width, kernel_size) for _ in range(len(key_depths) + 1))  # + the last

    @property
    def dino(self):
        return self._dino[0]

    def _apply(self, fn, recurse=True):  # .to(device) / .cuda() / .double() move the backbone too
        self.dino._apply(fn)
        return super()._apply(fn, recurse)

    def features(self, x):
        """Images in [-1, 1] -> DINO patch tokens, final output first, then after each key block: [B, C, N] each."""
        dino = self.dino
        x = F.interpolate(x, size=(dino.input_size, dino.input_size), mode='bilinear', align_corners=False)
        x = x * (0.5 / dino.std) + (0.5 - dino.mean) / dino.std  # = ((x + 1) / 2 - mean) / std
        x = dino.embed(x)  # (B, 1 + N, C): CLS + 28 x 28 patches at 224 px
        feats = []
        for i, block in enumerate(dino.blocks):
            x = block(x)
            if i in self.key_depths:
                feats.append(x[:, dino.n_prefix:].transpose(1, 2))  # CLS dropped, no final norm
        return [x[:, dino.n_prefix:].transpose(1, 2)] + feats

    def forward(self, x):
        """Images [B, 3, H, W] in [-1, 1] -> logits [B, heads * N], one per token per head."""
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, self.features(x))], dim=1)


# -----------------------------------------------------------------------------------------------------------
# DiffAugment (Zhao et al. 2020), the StyleGAN-T variant: applied to real and fake images before D

def diffaug(x, translation=0.125, brightness=0.5, saturation=1.0, contrast=0.5):
    """Per-sample translation (up to translation * size, zero fill), brightness + U(-b, b), saturation x U(1-s, 1+s)
    around the channel mean, contrast x U(1-c, 1+c) around the image mean. The draws (3 coins on the CPU generator,
    then U(0,1) [7, B] on x's device; rows 5, 6 would place the unused cutout) match the golden vectors bitwise."""
    x = x.float()
    torch.rand(3)  # one coin per op; all are on with probability 1, but they advance the RNG
    B, _, H, W = x.shape
    r = torch.rand(7, B, 1, 1, device=x.device)
    dh, dw = round(translation * H), round(translation * W)
    shift_h = (r[0] * (2 * dh + 1)).floor().long() - dh  # (B, 1, 1) integers in [-dh, dh]
    shift_w = (r[1] * (2 * dw + 1)).floor().long() - dw
    rows = torch.arange(H, device=x.device).view(1, H, 1) + shift_h  # out[i, j] = in[i + shift_h, j + shift_w]
    cols = torch.arange(W, device=x.device).view(1, 1, W) + shift_w
    inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)  # (B, H, W)
    batch = torch.arange(B, device=x.device).view(B, 1, 1)
    x = x.permute(0, 2, 3, 1)[batch, rows.clamp(0, H - 1), cols.clamp(0, W - 1)]  # (B, H, W, C)
    x = torch.where(inside[..., None], x, 0).permute(0, 3, 1, 2).contiguous()  # NCHW memory: bitwise means
    r = r[..., None]  # (7, B, 1, 1, 1)
    x = x + (r[2] * (2 * brightness) - brightness)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (r[3] * (2 * saturation) + (1 - saturation)) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (r[4] * (2 * contrast) + (1 - contrast)) + mean


# -----------------------------------------------------------------------------------------------------------
# Losses (App. E.2)

def recon_loss(recon, images, lpips, perceptual_weight=1.0):
    """L1 + w_P LPIPS on images in [0, 1] (LPIPS sees [-1, 1]; recon unclamped) -> (total, l1, lpips)."""
    l1 = (recon - images).abs().mean()
    perceptual = lpips(images * 2 - 1, recon * 2 - 1).mean()
    return l1 + perceptual_weight * perceptual, l1, perceptual


def generator_loss(logits_fake):
    """The decoder's adversarial loss: -mean D(fake)."""
    return -logits_fake.float().mean()


def discriminator_loss(logits_real, logits_fake):
    """Hinge loss: 1/2 [mean relu(1 - D(real)) + mean relu(1 + D(fake))]."""
    return 0.5 * (F.relu(1 - logits_real.float()).mean() + F.relu(1 + logits_fake.float()).mean())


def adaptive_weight(g_rec, g_gan, recon, last_layer, max_weight=1e4):
    """lambda = |grad_W rec| / (|grad_W gan| + 1e-6) at the decoder's last layer W, clamped and detached.

    g_rec, g_gan: the two losses' gradients at the reconstruction, pushed through the last layer alone (not LPIPS
    and D a second time). Norms in fp32 whatever the autocast state (README: differences)."""
    w_rec, = torch.autograd.grad(recon, last_layer, g_rec, retain_graph=True)
    w_gan, = torch.autograd.grad(recon, last_layer, g_gan, retain_graph=True)
    return (w_rec.float().norm() / (w_gan.float().norm() + 1e-6)).clamp(0, max_weight).detach()


def decoder_loss(recon, images, lpips, disc=None, last_layer=None, perceptual_weight=1.0, disc_weight=0.75,
                 augment=diffaug):
    """The decoder's objective: L1 + w_P LPIPS, plus w_G lambda GAN once disc (eval mode) is given -> (loss, logs)."""
    rec, l1, perceptual = recon_loss(recon, images, lpips, perceptual_weight)
    logs = {'l1': l1.detach(), 'lpips': perceptual.detach()}
    if disc is None:
        return rec, logs
    gan = generator_loss(disc(augment(recon * 2 - 1)))
    with torch.autocast(recon.device.type, enabled=False):  # lambda outside autocast (README: differences)
        g_rec, = torch.autograd.grad(rec, recon, retain_graph=True)  # LPIPS backward, once
        g_gan, = torch.autograd.grad(gan, recon, retain_graph=True)  # D backward, once
        weight = adaptive_weight(g_rec, g_gan, recon, last_layer)
    logs.update(gan=gan.detach(), gan_weight=weight)
    # The value of rec + w_G lambda gan, with the gradient g_rec + w_G lambda g_gan at recon: backward() goes on
    # into the decoder only, instead of through LPIPS and D again.
    g = (g_rec + disc_weight * weight * g_gan).detach()
    surrogate = (recon * g).sum()
    return (rec + disc_weight * weight * gan).detach() + surrogate - surrogate.detach(), logs


def quantize_8bit(x):
    """Fakes as D sees them: clamped to [-1, 1] and rounded to a saved PNG's 256 levels, still floats in [-1, 1]."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def psnr(x, y):
    """Per-image PSNR [B] in dB of images in [0, 1]: 10 log10(1 / MSE), MSE floored at 1e-10 (100 dB)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


# -----------------------------------------------------------------------------------------------------------
# The two update steps: no host sync in either (the logs stay tensors until a log step)

def generator_step(model, lpips, disc, opt, images, use_gan, ctx, perceptual_weight=1.0, disc_weight=0.75):
    """One decoder update on noise-augmented latents: L1 + LPIPS, plus the lambda-weighted GAN loss once use_gan.
    model: the RAE as trained (compiled, DDP-wrapped or plain); disc: the plain discriminator."""
    disc.eval().requires_grad_(False)  # a fixed critic here: stored spectral norms, no gradients into the heads
    with ctx:
        recon = model(images)  # train mode: encode, add noise, decode
        loss, logs = decoder_loss(recon.float(), images, lpips, disc if use_gan else None,
                                  unwrap(model).decoder.pred.weight, perceptual_weight, disc_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return dict(logs, loss=loss.detach())


def discriminator_step(model, disc, opt_d, images, ctx):
    """One hinge update of the heads on fresh reconstructions made without latent noise, quantised to 8 bits.
    disc: the discriminator as trained, through its DDP wrapper on several ranks (README: differences)."""
    model.eval()  # no noise augmentation
    with torch.no_grad(), ctx:
        fake = quantize_8bit(model(images).float() * 2 - 1)
    model.train()
    unwrap(disc).train().requires_grad_(True)  # train mode: one power iteration per forward
    with ctx:
        logits_fake = disc(diffaug(fake))
        logits_real = disc(diffaug(images * 2 - 1))
    loss = discriminator_loss(logits_real, logits_fake)
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    return {'d_loss': loss.detach(), 'd_acc': (logits_real > logits_fake).float().mean().detach()}


@torch.no_grad()
def evaluate(model, folder, image_size, n=0, reference=None, inception=None, batch_size=32, workers=0):
    """({'PSNR': mean per-image dB, 'rFID': ...}, images) of model's 8-bit reconstructions of the image_size ADM
    centre crops of folder (the first n sorted; 0: all). rFID compares them with `reference`, statistics of the same
    crops (fid.py --write-ref; README: differences). Ranks split the images; rank 0 runs Inception on them all."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    dev = next(model.parameters()).device
    src = fid.FolderImages(folder, crop=image_size, workers=min(workers, 4))
    files = src.files[:n or None]
    src.files = files[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=dev)  # PSNR sum, images

    def batches():
        local = src.batches(batch_size)
        while True:
            b = next(local, None)  # None once this rank's share is read
            y = torch.zeros(0, image_size, image_size, 3, dtype=torch.uint8, device=dev)
            if b is not None:
                x = torch.from_numpy(b).to(dev).permute(0, 3, 1, 2).float() / 255
                y = to_uint8(model(x)).contiguous()  # rounded, not truncated (README: differences)
                total.add_(torch.stack([psnr(y.permute(0, 3, 1, 2).float() / 255, x).sum(),
                                        torch.tensor(len(x), device=dev)]))
            if world > 1:  # ranks skip different unreadable files: gather the sizes, then the padded batches
                sizes = [0] * world
                dist.all_gather_object(sizes, len(y))
                if not any(sizes):
                    return
                parts = [y.new_empty((batch_size, *y.shape[1:])) for _ in range(world)]
                dist.all_gather(parts, torch.cat([y, y.new_zeros(batch_size - len(y), *y.shape[1:])]))
                y = torch.cat([part[:n] for part, n in zip(parts, sizes)])
            elif b is None:
                return
            yield from y.split(200)  # fid.py's GPU batch: Inception activations stay ~4 GB next to training

    out = {}
    if reference is not None and rank == 0:
        out['rFID'] = fid.evaluate(batches(), reference, model=inception, pr=False, progress=False)['FID']
    else:
        for _ in batches():
            pass
    if world > 1:
        dist.all_reduce(total)
    if not total[1]:
        raise SystemExit(f'{folder}: no readable images among the {len(files)} chosen')
    return {'PSNR': (total[0] / total[1]).item(), **out}, int(total[1])


def write_toy(c, seed=0):
    """Random-weight stand-ins in the published layouts for each weight file config c names that does not exist,
    and 2 x 32 synthetic images (training.write_toy_images) if c's data_path is missing: loading code runs as is."""
    torch.manual_seed(seed)
    for weights, name, overrides in [(c['encoder_weights'], c['encoder'], c['encoder_overrides']),
                                     (c['disc_weights'], 'dino-s8', c['disc_overrides'])]:
        if weights and not os.path.exists(weights):
            write_toy_encoder(weights, name, overrides, seed)
            print0(f'toy: wrote {weights} ({name} in its published layout, random weights)')
    if c['lpips_weights'] and not os.path.exists(c['lpips_weights'][0]):
        m = LPIPS(widths=(8, 16, 32, 32, 32))  # a narrow VGG16, and non-negative heads
        heads = {f'lin{i}.model.1.weight': lin.weight.abs() for i, lin in enumerate(m.lins)}
        for path, sd in zip(c['lpips_weights'], (m.features.state_dict(prefix='features.'), heads)):
            os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
            torch.save({k: v.detach().clone().contiguous() for k, v in sd.items()}, path)
            print0(f'toy: wrote {path} (torchvision VGG16 / LPIPS heads layout, random weights)')
    if not os.path.exists(c['data_path']):
        write_toy_images(c['data_path'], 2, 32, c['image_size'] * 3 // 2, seed)
        print0(f'toy: wrote 64 synthetic images to {c["data_path"]}')


def main(argv):
    config = configure(_DEFAULTS, argv)
    globals().update(config)  # main reads the config by name; the functions above get theirs as arguments
    sizes = (decoder_size,) if decoder_arch else tuple(rae.DECODERS)  # decoder_arch replaces the preset
    check_config(config, choices=dict(mode=('train', 'eval', 'reconstruct'), decoder_size=sizes,
                                      precision=('auto', 'bf16', 'fp32')),
                 types=dict(val_path=str, rfid_reference=str, image=str, decoder=str, encoder_weights=str,
                            disc_weights=str, device=str, encoder_overrides=dict, decoder_arch=dict,
                            disc_overrides=dict, lpips_weights=(tuple, list), wandb_run_name=str),
                 positive=('image_size', 'decoder_patch', 'global_batch', 'epochs', 'lr', 'log_every', 'ddp_timeout'),
                 non_negative=('eval_every', 'eval_images', 'noise_tau', 'perceptual_weight', 'disc_weight',
                               'disc_start_epoch', 'disc_update_start_epoch', 'lr_final', 'warmup_epochs',
                               'lr_decay_end', 'weight_decay', 'workers', 'ckpt_every', 'ckpt_keep'),
                 fractions=('ema_decay',))
    if lpips_weights is not None and len(lpips_weights) != 2:
        raise SystemExit(f'lpips_weights={lpips_weights!r}: expected (VGG16 file, LPIPS heads file)')
    rank, _, world_size, dev, is_master = setup_ddp(device, ddp_timeout)
    if global_batch % world_size or image_size % decoder_patch:
        raise SystemExit(f'global_batch={global_batch} must divide by {world_size} ranks and image_size={image_size} '
                         f'by decoder_patch={decoder_patch}')
    if (mode == 'reconstruct' and not image) or (mode == 'eval' and not val_path):
        raise SystemExit(f"mode={mode!r} needs {'--image=FILE' if mode == 'reconstruct' else '--val_path=FOLDER'}")
    if mode == 'reconstruct':  # read before any weights load: a missing, empty or corrupt file fails at once
        try:
            photo = open_rgb(image)
        except (OSError, ValueError) as e:
            raise SystemExit(f'--image={image}: not a readable image ({e})') from None
    set_tf32(True)
    amp_dtype, why = choose_precision(precision, dev)
    ctx = torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    if toy and is_master:
        write_toy(config)
    barrier()  # the other ranks wait for the toy files

    # The networks, one name each: the frozen encoder `enc`, the decoder `dec` and its EMA `ema`, `lpips`, the
    # discriminator `disc`; `autoencoder` (RAE(enc, dec)) and `ddp_disc` are the training handles: compiled, then DDP
    torch.manual_seed(global_seed)  # the initial decoder and heads are the same on every rank
    with rank0_first(), one_line_errors():  # missing or wrong weight files and failed downloads end in one line
        reference, inception = None, None
        if rfid_reference and val_path and mode != 'reconstruct' and is_master:  # rank 0 alone runs Inception
            reference, inception = fid.load_reference(rfid_reference), fid.InceptionV3.from_pretrained().to(dev)
        if mode != 'train':  # a checkpoint's EMA decoder, built from the config it stores; a decoder file; 'released'
            path = decoder or latest_checkpoint(os.path.join(out_dir, 'checkpoints'))
            if not path:
                raise SystemExit(f'no checkpoint in {out_dir}/checkpoints: train first, or give --decoder=FILE or '
                                 '--decoder=released')
            autoencoder = rae.RAE.from_pretrained(encoder, image_size, decoder=None if path == 'released' else path,
                                                  stats=False, encoder_weights=encoder_weights,
                                                  encoder_overrides=encoder_overrides).to(dev).eval()
        else:
            patch = (encoder_overrides or {}).get('patch', rae.ENCODERS[encoder]['patch'])
            enc = rae.Encoder.from_pretrained(encoder, encoder_weights, image_size // decoder_patch * patch,
                                              **(encoder_overrides or {}))  # DINOv2: 224 px, 16 x 16 tokens at 256
            lpips = LPIPS.from_pretrained(*(lpips_weights or (None, None))).to(dev)
            dino = rae.Encoder.from_pretrained('dino-s8', disc_weights, **(disc_overrides or {}))  # published ViT-S/8
            disc = Discriminator(dino, disc_key_depths).to(dev)  # with fresh heads
    if mode == 'reconstruct':  # the ADM centre crop and its reconstruction, side by side
        crop = np.array(center_crop_arr(photo, image_size))
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].float().div(255).to(dev)
        with torch.no_grad():
            y = to_uint8(autoencoder(x))
        save_grid(np.stack([crop, y[0].cpu().numpy()]), 2, recon_out, pad=0)
        print(f'wrote {recon_out}: {image} (centre crop) | reconstruction, '
              f'PSNR {psnr(y.permute(0, 3, 1, 2).float() / 255, x).item():.2f} dB')
        return cleanup_ddp()
    if mode == 'eval':
        scores, n = evaluate(autoencoder, val_path, image_size, eval_images, reference, inception,
                             global_batch // world_size, workers)
        print0(f'{n} images of {val_path}: ' + ', '.join(f'{k} {v:.4f}' for k, v in scores.items()))
        return cleanup_ddp()
    enc.check_inputs = False  # the loader gives [0, 1] by construction; the range check would sync every step
    dec = rae.Decoder(**rae.decoder_arch(config))  # the architecture its checkpoints' config rebuilds
    dec.grad_checkpoint = grad_checkpoint  # read by rae.run_block in training forwards only
    autoencoder = rae.RAE(enc, dec, noise_tau=noise_tau).to(dev)  # raw tokens: latent statistics are for stage 2
    ema = make_ema(dec)  # before compiling (README: differences)
    opt, opt_d = (torch.optim.AdamW(m.parameters(), lr, betas, weight_decay=weight_decay, fused=dev.type == 'cuda')
                  for m in (dec, disc))  # the decoder's and the discriminator heads'
    if compile:
        torch._functorch.config.donated_buffer = False  # lambda backpropagates the graph thrice (retain_graph)
        autoencoder, lpips = torch.compile(autoencoder), torch.compile(lpips)
        for block in disc.dino.blocks:  # the frozen backbone only: compiled heads would keep a power-iteration
            block.compile()  # buffer for backward that the D step's second forward overwrites in place
    # DDP on several ranks, buffers not broadcast: the RAE's are constants, and the heads' power iterations stay
    # equal on all ranks because their weights do (same seed, averaged gradients)
    autoencoder, ddp_disc = (DDP(m, broadcast_buffers=False) if world_size > 1 else m for m in (autoencoder, disc))

    data = ImageFolder(data_path, image_size, 'random', flip=False, seed=global_seed)
    loader, sampler = make_loader(data, global_batch // world_size, rank, world_size, global_seed, workers)
    steps_per_epoch, last = len(loader), epochs * len(loader)
    torch.manual_seed(global_seed * world_size + rank)  # latent noise and DiffAug: one stream per rank
    log = start_log(out_dir, config, dev)
    log(f'precision: {why}')
    log(f'decoder {sum(p.numel() for p in dec.parameters()) / 1e6:.1f}M parameters on {encoder} tokens; '
        f'{len(data)} images: {steps_per_epoch} steps/epoch of {global_batch // world_size} x {world_size} ranks')
    ckpt_dir = os.path.join(out_dir, 'checkpoints')
    step, epoch, batch = 0, 0, 0  # batch = batches of `epoch` consumed; resume last: it restores the random streams
    if c := resume(ckpt_dir, config, model=dec, ema=ema, optimizer=opt, disc=disc, optimizer_d=opt_d):
        step, epoch, batch = c['step'], c['epoch'], c['batch']
        log(f'resumed from {c["path"]}: step {step}, epoch {epoch}, batch {batch}')
    metrics = Metrics(out_dir, config, step, wandb_log, wandb_project, wandb_run_name)  # metrics.jsonl, loss.png

    bar = tqdm(total=last, initial=step, disable=not is_master, desc='training', unit='step')
    stats, t0 = defaultdict(list), time.perf_counter()
    for epoch in range(epoch, epochs):
        sampler.set_epoch(epoch, start_batch=batch)
        for batch, (images, _) in enumerate(loader, start=batch + 1):
            images = images.to(dev, non_blocking=True)
            lr_now = lr_warmup_cosine(step, lr, lr_final, warmup_epochs * steps_per_epoch,
                                      lr_decay_end * steps_per_epoch)
            for group in opt.param_groups + opt_d.param_groups:  # one schedule for G and D (README: differences)
                group['lr'] = lr_now
            logs = generator_step(autoencoder, lpips, disc, opt, images, epoch >= disc_start_epoch, ctx,
                                  perceptual_weight, disc_weight)
            update_ema(ema, dec, ema_decay)
            if epoch >= disc_update_start_epoch:
                logs.update(discriminator_step(autoencoder, ddp_disc, opt_d, images, ctx))
            step += 1
            bar.update()
            for k, v in logs.items():
                stats[k].append(v)
            if step % log_every == 0:  # means over the steps since the last line and over the ranks
                n, keys = len(stats['loss']), sorted(stats)
                means = torch.stack([torch.stack(stats[k]).float().mean() for k in keys]) / world_size
                if world_size > 1:
                    dist.all_reduce(means)  # the sum of the ranks' shares
                seconds, skipped = time.perf_counter() - t0, unreadable(data, dev)
                losses = ' '.join(f'{k} {v:.9g}' for k, v in zip(keys, means.tolist()))  # 9 digits: fp32 exactly
                log(f'step {step}/{last} | epoch {epoch} | {losses} | lr {lr_now:.3e} | {n / seconds:.2f} steps/s | '
                    f'{n * global_batch / seconds:.1f} img/s{skipped}')
                metrics.log(step, epoch=epoch, **dict(zip(keys, means.tolist())), lr=lr_now,
                            img_per_s=n * global_batch / seconds)
                stats, t0 = defaultdict(list), time.perf_counter()
            if (ckpt_every and step % ckpt_every == 0) or batch == steps_per_epoch:
                save_checkpoint(ckpt_dir, step=step, epoch=epoch, batch=batch, config=config, keep=ckpt_keep,
                                model=dec, ema=ema, optimizer=opt, disc=disc, optimizer_d=opt_d)
            if val_path and (step == last or (eval_every and step % eval_every == 0)):
                scores, n = evaluate(rae.RAE(enc, ema).to(dev).eval(), val_path, image_size, eval_images,
                                     reference, inception, global_batch // world_size, workers)  # no noise
                log(f'eval step {step} | EMA decoder on {n} images of {val_path}: '
                    + ', '.join(f'{k} {v:.4f}' for k, v in scores.items()))
                metrics.log(step, **scores)
            if step % log_every == 0:
                t0 = time.perf_counter()  # throughput leaves out checkpoints and evaluations
        batch = 0
    bar.close()
    if is_master:  # the final EMA decoder with its encoder as a diffusers AutoencoderRAE (no latent statistics)
        try:
            rae.RAE(enc, ema).save_pretrained(os.path.join(out_dir, 'diffusers'))
            log(f'wrote {out_dir}/diffusers: the EMA decoder and its encoder in the diffusers AutoencoderRAE layout')
        except ValueError as e:
            log(f'no diffusers export: {e}')
    cleanup_ddp()


if __name__ == '__main__':
    main(sys.argv[1:])
