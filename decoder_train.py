"""
Stage 1 of RAE: train a ViT decoder on the tokens of a frozen representation encoder (paper §3, §4.3, App. E.2).

The decoder's objective, on images x in [0,1] and reconstructions x_hat = D(E(x) + n), n ~ noise (§4.3):

    L = |x_hat - x|_1 + w_P * LPIPS(x, x_hat) + w_G * lambda * GAN(x_hat)        w_P = 1, w_G = 0.75

GAN(x_hat) = -mean Disc(DiffAug(x_hat)), Disc = trainable StyleGAN-T heads on frozen DINO ViT-S/8 features,
trained with a hinge loss; lambda balances the two gradients at the decoder's last layer (Esser et al. 2021).

Reading order: LPIPS, the DINO discriminator, DiffAug, the losses.
"""
import hashlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import rae

# -----------------------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018): a perceptual distance from a frozen VGG16 with learned per-channel weights

VGG16_URL = 'https://download.pytorch.org/models/vgg16-397923af.pth'  # torchvision's ImageNet VGG16
VGG16_SHA256_PREFIX = '397923af'  # torchvision names its files after the first 8 hex digits of their sha256
LPIPS_URL = 'https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1'  # LPIPS v0.1 heads (taming vgg.pth)
LPIPS_MD5 = 'd507d7349b931f0638a25a48a722f98a'
VGG16_STAGES = (2, 2, 3, 3, 3)  # 3x3 convolutions per stage; LPIPS taps the last ReLU of every stage


def checked(path, algorithm, expected):
    """path if its hex digest starts with expected; else the file is removed (so a retry downloads it again)."""
    h = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    if not h.hexdigest().startswith(expected):
        os.remove(path)
        raise ValueError(f'{path}: {algorithm} {h.hexdigest()} does not match the published {expected}; '
                         'the file was removed, run again to download it anew')
    return path


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
        # torchvision's vgg16().features[:30], same indices, so its ImageNet weights load as they are. The
        # weights are always loaded (published VGG16 + LPIPS heads), hence PyTorch's default init here.
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
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f'LPIPS: expected two image batches [B,3,H,W] of one shape, got {tuple(x.shape)} and '
                             f'{tuple(y.shape)}')
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
            if name.startswith('net.slice'):  # official slices re-index VGG layers from 0: net.slice2.1 = features.5
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
        if vgg_weights is None:
            vgg_weights = checked(rae.download(VGG16_URL), 'sha256', VGG16_SHA256_PREFIX)
        if lin_weights is None:
            lin_weights = checked(rae.download(LPIPS_URL, filename='lpips/vgg.pth'), 'md5', LPIPS_MD5)
        vgg, lin = rae.load_state_dict_file(vgg_weights), rae.load_state_dict_file(lin_weights)
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
        self.bias = nn.Parameter(torch.empty(c_out))  # bias first: the reference's state_dict order
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
        sigma = torch.dot(u, torch.mv(W, v))
        return self.weight_orig / sigma

    def forward(self, x):  # (B, c_in, N) -> (B, c_out, N)
        k = self.weight_orig.shape[-1]
        x = F.pad(x, (k // 2, k // 2), mode='circular') if k > 1 else x  # tokens wrap around: circular padding
        return F.conv1d(x, self.normalized_weight(), self.bias)


class BatchNormLocal(nn.Module):
    """Per-sample batch norm: each channel standardised over the N tokens of its own sample (virtual batch of 1)."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):  # (B, C, N); statistics in fp32 even under autocast, as the reference
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

    Paper App. E.2 says standard batch norm; the released code normalises per sample (BatchNormLocal), as here.
    Only the heads are parameters, so state_dict() is heads only (the reference's key names) and the backbone
    can never train. NOTE for the training loop: the reference's D step calls the unwrapped discriminator, so its
    gradients are not all-reduced across ranks (each rank trains its own D); ours must go through the DDP wrapper.
    """

    def __init__(self, dino, key_depths=(2, 5, 8, 11), kernel_size=9):
        super().__init__()
        if not all(0 <= d < len(dino.blocks) for d in key_depths):
            raise ValueError(f'key_depths {tuple(key_depths)} outside the backbone\'s {len(dino.blocks)} blocks')
        dino = dino.eval().requires_grad_(False)
        with torch.no_grad():  # the reference zeroes every key bias; softmax ignores it (it adds q.b_k to a whole row)
            for block in dino.blocks:
                width = block.attn.qkv.bias.shape[0] // 3
                block.attn.qkv.bias[width:2 * width] = 0
        self._dino = [dino]  # in a list, not a submodule: no backbone in parameters(), state_dict() or DDP
        self.key_depths = tuple(key_depths)
        width = dino.patch_embed.out_channels
        self.heads = nn.ModuleList(disc_head(width, kernel_size) for _ in range(len(key_depths) + 1))

    @property
    def dino(self):
        return self._dino[0]

    def _apply(self, fn, recurse=True):  # .to(device) / .cuda() / .double() move the backbone too
        self.dino._apply(fn)
        return super()._apply(fn, recurse)

    def features(self, x):
        """Images in [-1, 1] -> DINO patch tokens, final output first, then after each key block: [B, C, N] each."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f'discriminator: expected images [B,3,H,W], got shape {tuple(x.shape)}')
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

    @classmethod
    def from_pretrained(cls, weights=None, **kwargs):
        """Heads on the published DINO ViT-S/8 (downloaded unless weights is a local file)."""
        return cls(rae.Encoder.from_pretrained('dino-s8', weights), **kwargs)


# -----------------------------------------------------------------------------------------------------------
# DiffAugment (Zhao et al. 2020), the StyleGAN-T variant: applied to real and fake images before D

def diffaug(x, translation=0.125, brightness=0.5, saturation=1.0, contrast=0.5):
    """Random per-sample translation (up to translation * size, zero fill), brightness + U(-b, b),
    saturation x U(1-s, 1+s) around the channel mean, contrast x U(1-c, 1+c) around the image mean.

    Draws follow the reference exactly (3 coins on the CPU generator, then U(0,1) [7, B] on x's device), so a
    seeded call reproduces it bitwise; rows 5, 6 are its cutout offsets (cutout is off in RAE's config).
    """
    x = x.float()
    torch.rand(3)  # the reference's on/off coins per op; with probability 1 all are on, but they advance the RNG
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


def adaptive_weight(rec_loss, gan_loss, last_layer, max_weight=1e4):
    """lambda = |grad_W rec| / (|grad_W gan| + 1e-6) at the decoder's last layer W, clamped and detached.

    Norms in fp32 whatever the autocast state (the reference computed lambda inside autocast until its PR #43).
    """
    g_rec, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_gan, = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    return (g_rec.float().norm() / (g_gan.float().norm() + 1e-6)).clamp(0, max_weight).detach()


def decoder_loss(recon, images, lpips, disc=None, last_layer=None, perceptual_weight=1.0, disc_weight=0.75,
                 augment=diffaug):
    """The decoder's objective: L1 + w_P LPIPS, plus w_G lambda GAN once disc is given -> (loss, logs).

    disc should be in eval mode here (no power iteration, as in the reference's G step).
    """
    rec, l1, perceptual = recon_loss(recon, images, lpips, perceptual_weight)
    logs = {'l1': l1.detach(), 'lpips': perceptual.detach()}
    if disc is None:
        return rec, logs
    gan = generator_loss(disc(augment(recon * 2 - 1)))
    weight = adaptive_weight(rec, gan, last_layer)
    logs.update(gan=gan.detach(), gan_weight=weight)
    return rec + disc_weight * weight * gan, logs


def to_8bit(x):
    """Fake images as the discriminator sees them: clamped to [-1, 1] and rounded to 8 bits, like a saved PNG."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
