# -----------------------------------------------------------------------------------------------------------
# The diffusion transformers: LightningDiT (the paper's "DiT") and DiT^DH (DiT + a wide, shallow DDT head)
#
# Both read the latent x_t [B, 768, 16, 16] as 256 tokens (patch size 1) and predict the velocity v [B, 768, 16, 16].
# Module attribute names are the released ones, so the authors' checkpoints load strictly. Quirks kept on purpose
# (changing any of them silently breaks the released weights): the conditioning goes through SiLU twice in DiT^DH,
# the head sees t and y only through s = SiLU(backbone_out + t_emb), the frozen tables (sin-cos position embedding,
# Fourier frequencies W, RoPE) are stored in the checkpoints and must be loaded, not recomputed.
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from rae import HF_REPO, copy_weights, download, hf_url, load_state_dict_file, sincos_2d


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
        return x * self.freqs_cos + rotated * self.freqs_sin


class RoPEAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and 2D RoPE on q and k."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3x (B, h, N, d)
        q, k = rope(q).to(v.dtype), rope(k).to(v.dtype)  # the fp32 tables would promote bf16 q, k
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


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
        self.attn = RoPEAttention(dim, heads)
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


def dit_state_dict(ckpt, what='checkpoint'):
    """The model weights in a bare state dict or a training checkpoint ({'ema': ...} preferred, else {'model': ...})."""
    if not isinstance(ckpt, dict):
        raise ValueError(f'{what}: not a state dict or checkpoint dict (got {type(ckpt).__name__})')
    for key in ('ema', 'model'):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    sd = {}
    for k, v in ckpt.items():
        while k.startswith(('module.', '_orig_mod.')):  # DDP and torch.compile wrappers
            k = k.split('.', 1)[1]
        sd[k] = v
    return sd


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
    return copy_weights(model, dit_state_dict(ckpt, what), what)


def load_dit(path, what=None):
    """A LightningDiT or DiT^DH sized from the shapes in a checkpoint file, with its weights, in eval mode.

    The frozen tables (pos_embed, t_embedder.W, RoPE) come from the file too: the released EMA weights carry slightly
    nudged copies of them, and the outputs only match the authors' if those are used.
    """
    what = what or str(path)
    sd = dit_state_dict(load_state_dict_file(path), what)
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


def sample_t(n, time_dist='logit-normal', t_max=0.999):
    """Training times on [0, t_max] before the shift: 'uniform', or 'logit-normal' (0, 1) truncated (inverse CDF)."""
    u = torch.rand(n)  # one draw of n on the CPU generator, as released
    if time_dist == 'uniform':
        return u * t_max
    if time_dist != 'logit-normal':
        raise ValueError(f'unknown time distribution {time_dist!r}; use uniform or logit-normal')
    cdf_max = 0.5 * (1 + torch.erf(torch.log(torch.tensor(t_max / (1 - t_max))) / math.sqrt(2)))  # Phi(logit t_max)
    return torch.sigmoid(math.sqrt(2) * torch.erfinv(2 * (u * cdf_max) - 1))


def flow_loss(model, x, y, alpha, time_dist='logit-normal'):
    """Per-sample loss ||v_theta(x_t, t, y) - (eps - x)||^2 / dim at shifted random times t: [B].

    The draws come in the authors' order (eps, then t, then the model's label dropout), so a seeded run matches theirs.
    """
    eps = torch.randn_like(x)
    t = time_shift(sample_t(len(x), time_dist), alpha).to(x.device)
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x + tt * eps
    return ((model(x_t, t, y) - (eps - x)) ** 2).mean(dim=(1, 2, 3))


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

    def velocity(x, t):
        inside = ((t >= t_min) & (t <= t_max)).view(-1, 1, 1, 1)
        if guide is not None and guide_scale != 1:
            v_m, v_g = model(x, t, y), guide(x, t, y)
            return torch.where(inside, v_g + guide_scale * (v_m - v_g), v_m)
        if cfg_scale != 1:  # one forward on the doubled batch [conditional, unconditional]
            null = torch.full_like(y, model.num_classes)
            v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
            return torch.where(inside, v_u + cfg_scale * (v_c - v_u), v_c)
        return model(x, t, y)

    return velocity
