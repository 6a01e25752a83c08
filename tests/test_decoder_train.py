"""Decoder-training parts (LPIPS, DINO discriminator, DiffAug, losses) against the reference and closed forms."""
import hashlib
import io
import json
import math

import pytest
import torch

import decoder_train as dt
import rae

NARROW = (8, 16, 32, 32, 32)  # the golden LPIPS' VGG widths {64: 8, 128: 16, 256: 32, 512: 32}
TINY_DINO = dict(width=32, depth=4, heads=2, patch=8, pos_grid=28, input_size=224, act='tanh', eps=1e-6)


def load(golden_dir, name):
    if not (golden_dir / name).exists():
        pytest.skip(f'golden file {name} not available')
    return torch.load(golden_dir / name)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.detach(), b.detach(), rtol=tol, atol=tol)


def random_lpips(seed=0):
    torch.manual_seed(seed)
    m = dt.LPIPS(NARROW)
    with torch.no_grad():
        for lin in m.lins:
            lin.weight.abs_()  # the published heads are non-negative
    return m


def published_lpips_keys(sd, taps=(3, 8, 15, 22, 29)):
    """Our LPIPS state dict under the official module's names, mapped by hand (net.sliceK.j, linK.model.1)."""
    starts = [0] + [t + 1 for t in taps[:-1]]
    out = {'scaling_layer.shift': torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1),
           'scaling_layer.scale': torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)}
    for k, v in sd.items():
        a, i, s = k.split('.')
        if a == 'features':
            K = max(j for j, st in enumerate(starts) if st <= int(i))
            out[f'net.slice{K + 1}.{int(i) - starts[K]}.{s}'] = v
        else:
            out[f'lin{i}.model.1.{s}'] = v
    return out


def tiny_disc(sd, key_depths=(1, 3)):
    enc = rae.Encoder(**TINY_DINO)
    enc.load_published(sd['dino_backbone_file'])
    return dt.Discriminator(enc, key_depths=key_depths)


# ----------------------------------------------------------------------------------------------------------
# LPIPS

def test_lpips_matches_reference(golden_dir):
    g = load(golden_dir, 'lpips_narrow.pt')
    m = dt.LPIPS(NARROW)
    m.load_state_dict(g['state_dict'], strict=True)  # the official module's key names
    x, y = g['inputs']['input'], g['inputs']['target']
    for ours, theirs in zip(m.vgg_taps(x), g['outputs']['vgg_features_input'], strict=True):
        close(ours, theirs)
    d = m(x, y)
    close(d, g['outputs']['lpips_per_sample'].flatten())
    close(d.mean(), g['outputs']['lpips_mean'])


def test_lpips_zero_symmetric_positive():
    m = random_lpips()
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(m(x, x), torch.zeros(2))
    close(m(x, y), m(y, x), 1e-6)
    assert (m(x, y) > 0).all() and (m(x, x + 0.01) > 0).all()
    assert m(x, x + 0.01).max() < m(x, y).min()  # a small change is a small distance
    assert not any(p.requires_grad for p in m.parameters())


def test_lpips_loads_published_names_strictly_and_rejects_other_scaling():
    a = random_lpips(0)
    b = dt.LPIPS(NARROW)
    published = published_lpips_keys(a.state_dict())
    assert len(published) == 26 + 5 + 2
    b.load_state_dict(published, strict=True)
    x, y = torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(a(x, y), b(x, y))
    published['scaling_layer.scale'] = torch.ones(1, 3, 1, 1)
    with pytest.raises(ValueError, match='scaling'):
        b.load_state_dict(published)


def test_lpips_full_width_fits_published_key_lists(reference_dir):
    models = json.loads((reference_dir / 'state_dict_keys.json').read_text())['models']
    lists = {k.split(' ')[0]: v for k, v in models.items()}
    lpips_keys = lists['official/LPIPS']
    m = dt.LPIPS()
    sd = {k: torch.zeros(s) for k, s in lpips_keys}
    sd['scaling_layer.shift'] = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    sd['scaling_layer.scale'] = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
    m.load_state_dict(sd, strict=True)  # published LPIPS module layout
    vgg = {k: torch.zeros(s) for k, s in lists['torchvision']}  # torchvision features.N layout = ours
    heads = {k: torch.zeros(s) for k, s in lists['LPIPS']}
    m.load_state_dict({**vgg, **heads}, strict=True)


def test_lpips_from_pretrained_downloads_and_checks(tiny_http_server, tmp_path, monkeypatch):
    a = random_lpips(3)
    vgg = {k: v for k, v in a.state_dict().items() if k.startswith('features.')}
    vgg['classifier.0.weight'] = torch.zeros(4, 4)  # the torchvision file also holds the classifier
    lin = {f'lin{i}.model.1.weight': l.weight for i, l in enumerate(a.lins)}
    files = {}
    for name, sd in [('vgg', vgg), ('lin', lin)]:
        buf = io.BytesIO()
        torch.save(sd, buf)
        files[name] = buf.getvalue()
    sha = hashlib.sha256(files['vgg']).hexdigest()
    tiny_http_server.files = {f'/models/vgg16-{sha[:8]}.pth': files['vgg'], '/f/abc/': files['lin']}
    monkeypatch.setenv('RAE_CACHE', str(tmp_path))
    monkeypatch.setattr(dt, 'VGG16_URL', f'{tiny_http_server.url}/models/vgg16-{sha[:8]}.pth')
    monkeypatch.setattr(dt, 'VGG16_SHA256_PREFIX', sha[:8])
    monkeypatch.setattr(dt, 'LPIPS_URL', f'{tiny_http_server.url}/f/abc/?dl=1')
    monkeypatch.setattr(dt, 'LPIPS_MD5', hashlib.md5(files['lin']).hexdigest())
    b = dt.LPIPS.from_pretrained()
    x, y = torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(a(x, y), b(x, y))
    assert (tmp_path / 'lpips' / 'vgg.pth').exists()
    monkeypatch.setattr(dt, 'LPIPS_MD5', '0' * 32)  # a corrupted cache file is refused and removed
    with pytest.raises(ValueError, match='md5'):
        dt.LPIPS.from_pretrained()
    assert not (tmp_path / 'lpips' / 'vgg.pth').exists()


# ----------------------------------------------------------------------------------------------------------
# The DINO discriminator

def test_discriminator_matches_reference(golden_dir):
    g = load(golden_dir, 'dino_disc_tiny.pt')
    sd, out = g['state_dict'], g['outputs']
    disc = tiny_disc(sd)
    disc.load_state_dict(sd['disc'], strict=True)
    assert list(disc.state_dict()) == list(sd['disc'])  # heads only, the reference's names and order
    assert all(not p.requires_grad for p in disc.dino.parameters())
    for block in disc.dino.blocks:  # key third of every qkv bias zeroed
        assert torch.equal(block.attn.qkv.bias[32:64], torch.zeros(32))
    fake, real = g['inputs']['fake'], g['inputs']['real']
    disc.eval()
    with torch.no_grad():
        for ours, theirs in zip(disc.features(fake), out['backbone_activations'], strict=True):
            close(ours, theirs)
        close(disc(fake), out['logits_eval_fake'])
        close(disc(real), out['logits_eval_real'])
    assert all(torch.equal(v, sd['disc'][k]) for k, v in disc.state_dict().items())  # eval: no power iteration
    disc.train()  # the D step: fake, then real; one power iteration per call
    logits_fake, logits_real = disc(fake), disc(real)
    close(logits_fake, out['logits_train_fake'])
    close(logits_real, out['logits_train_real'])
    for k, v in disc.state_dict().items():
        close(v, sd['disc_after_train_forward'][k])
    loss = dt.discriminator_loss(logits_real, logits_fake)
    close(loss, out['hinge_d_loss'])
    loss.backward()  # two training forwards, then one backward: the in-place u, v updates must not break it
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad is None for p in disc.dino.parameters())
    close(dt.generator_loss(out['logits_eval_fake']), out['vanilla_g_loss'])
    assert disc.dino.training is False


def test_discriminator_s8_layout_and_frozen_backbone(reference_dir):
    models = json.loads((reference_dir / 'state_dict_keys.json').read_text())['models']
    heads = next(v for k, v in models.items() if k.startswith('official/DinoDisc heads'))
    torch.manual_seed(0)
    disc = dt.Discriminator(rae.Encoder(**dict(rae.ENCODERS['dino-s8'], name='dino-s8')))
    assert [[k, list(v.shape)] for k, v in disc.state_dict().items()] == heads
    assert sum(p.numel() for p in disc.parameters()) == sum(p.numel() for p in disc.heads.parameters())
    disc.double()  # dtype/device moves reach the backbone, which is not a submodule
    assert disc.dino.patch_embed.weight.dtype == torch.float64
    disc.train()
    assert not disc.dino.training


def test_spectral_norm_top_singular_value_is_one():
    torch.manual_seed(0)
    conv = dt.SNConv1d(8, 16, kernel_size=3).train()
    for _ in range(100):
        W = conv.normalized_weight()
    assert abs(torch.linalg.svdvals(W.detach().flatten(1))[0].item() - 1) < 1e-4
    sigma = torch.linalg.svdvals(conv.weight_orig.detach().flatten(1))[0]
    close(conv.weight_orig / W, sigma.expand_as(W), 1e-4)
    u = conv.weight_u.clone()
    conv.eval()
    conv.normalized_weight()
    assert torch.equal(conv.weight_u, u)  # eval mode: no power iteration
    # the conv itself: circular padding, so a token shift of the input shifts the output the same way
    x = torch.randn(2, 8, 12)
    close(conv(x.roll(3, dims=-1)), conv(x).roll(3, dims=-1), 1e-5)


def test_batchnorm_local_standardises_each_sample():
    bn = dt.BatchNormLocal(4)
    x = torch.randn(3, 4, 50) * 5 + 2
    y = bn(x)
    close(y.mean(-1), torch.zeros(3, 4), 1e-5)
    close(y.var(-1, unbiased=False), torch.full((3, 4), 1.0), 1e-4)
    close(bn(x[:1]), y[:1], 1e-6)  # independent of the rest of the batch


# ----------------------------------------------------------------------------------------------------------
# DiffAug

def test_diffaug_matches_reference_bitwise(golden_dir):
    g = load(golden_dir, 'diffaug.pt')
    torch.manual_seed(int(g['inputs']['cutout0/seed']))
    assert torch.equal(dt.diffaug(g['inputs']['x']), g['outputs']['cutout0'])


def test_diffaug_translation_zero_fill_and_identity():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(5)
    torch.rand(3)
    r = torch.rand(7, 4, 1, 1)
    after = torch.rand(1)
    torch.manual_seed(5)
    y = dt.diffaug(x, brightness=0, saturation=0, contrast=0)
    assert torch.equal(torch.rand(1), after)  # consumed exactly 3 + 7 B draws
    for b in range(4):  # d = round(0.125 * 16) = 2; out[i, j] = x[i + sh, j + sw], 0 outside
        sh, sw = (int(math.floor(r[k, b].item() * 5)) - 2 for k in (0, 1))
        want = torch.zeros(3, 16, 16)
        want[:, max(0, -sh):16 - max(0, sh), max(0, -sw):16 - max(0, sw)] = \
            x[b, :, max(0, sh):16 - max(0, -sh), max(0, sw):16 - max(0, -sw)]
        close(y[b], want, 1e-6)
    y0 = dt.diffaug(x, translation=0, brightness=0, saturation=0, contrast=0)
    assert y0.shape == x.shape
    close(y0, x, 1e-6)


def test_diffaug_colour_ranges():
    torch.manual_seed(0)
    x = torch.rand(256, 3, 8, 8) * 2 - 1
    y = dt.diffaug(x, translation=0, saturation=0, contrast=0)
    shift = (y - x).mean(dim=(1, 2, 3))
    close(y - x, shift.view(-1, 1, 1, 1).expand_as(x), 1e-6)  # brightness: one constant per sample
    assert shift.min() >= -0.5 and shift.max() <= 0.5 and shift.max() - shift.min() > 0.9
    y = dt.diffaug(x, translation=0, brightness=0, saturation=0)
    ratio = (y - y.mean(dim=(1, 2, 3), keepdim=True)).std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
    assert ratio.min() >= 0.5 - 1e-5 and ratio.max() <= 1.5 + 1e-5 and ratio.max() - ratio.min() > 0.9


# ----------------------------------------------------------------------------------------------------------
# Losses

def test_decoder_loss_matches_reference(golden_dir):
    g = load(golden_dir, 'stage1_gloss_tiny.pt')
    sd, out = g['state_dict'], g['outputs']
    decoder = rae.Decoder.from_state_dict(sd['decoder'], heads=4)
    model = rae.RAE(None, decoder)  # ImageNet pixel normalisation, no latent statistics
    lpips = dt.LPIPS(NARROW)
    lpips.load_state_dict(sd['lpips'])
    disc = tiny_disc(sd).eval()
    disc.load_state_dict(sd['disc'])
    images = g['inputs']['images']
    recon = model.decode(g['inputs']['z_tokens_2d'])
    close(recon, out['recon'])
    rec, l1, perceptual = dt.recon_loss(recon, images, lpips)
    close(l1, out['rec_loss'])
    close(perceptual, out['lpips_loss'])
    close(rec, out['recon_total'])
    logits = disc(recon * 2 - 1)
    close(logits, out['logits_fake'])
    gan = dt.generator_loss(logits)
    close(gan, out['gan_loss'])
    W = decoder.pred.weight  # the reference's decoder_pred.weight
    close(torch.autograd.grad(rec, W, retain_graph=True)[0], out['grad_recon_total_wrt_decoder_pred'])
    close(torch.autograd.grad(gan, W, retain_graph=True)[0], out['grad_gan_wrt_decoder_pred'])
    close(dt.adaptive_weight(rec, gan, W), out['adaptive_weight'])
    total, logs = dt.decoder_loss(recon, images, lpips, disc, W, augment=lambda x: x)  # golden: no DiffAug
    close(total, out['total_loss'])
    close(logs['gan_weight'], out['adaptive_weight'])
    total.backward()
    assert decoder.pred.weight.grad is not None and all(p.grad is None for p in lpips.parameters())


def test_adaptive_weight_is_the_gradient_norm_ratio():
    torch.manual_seed(0)
    W = torch.randn(3, 4, requires_grad=True)
    x, t = torch.randn(4), torch.randn(3)
    rec = ((W @ x - t) ** 2).sum()
    gan = torch.sin(W).sum() * 0.3
    g_rec = 2 * torch.outer(W.detach() @ x - t, x)  # d/dW |Wx - t|^2
    g_gan = 0.3 * torch.cos(W.detach())
    lam = dt.adaptive_weight(rec, gan, W)
    close(lam, g_rec.norm() / (g_gan.norm() + 1e-6), 1e-6)
    assert not lam.requires_grad
    rec.backward()  # the graph was retained for the real backward
    assert dt.adaptive_weight((W ** 2).sum(), (W * 0).sum(), W).item() == 1e4  # clamped at max_weight


def test_hinge_and_generator_losses_on_known_logits():
    real = torch.tensor([[2.0, 0.5, -1.0]])
    fake = torch.tensor([[-2.0, 0.0, 1.5]])
    # relu(1 - real) = [0, 0.5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2.5] -> mean 7/6; half the sum = 1
    assert dt.discriminator_loss(real, fake).item() == pytest.approx(1.0, abs=1e-7)
    assert dt.discriminator_loss(torch.full((2, 5), 3.0), torch.full((2, 5), -4.0)).item() == 0
    assert dt.generator_loss(fake).item() == pytest.approx(1 / 6, abs=1e-7)


def test_to_8bit_grid():
    x = torch.linspace(-1.5, 1.5, 1001)
    q = dt.to_8bit(x)
    k = (q + 1) * 127.5
    close(k, k.round(), 1e-4)  # on the 256-level grid
    assert q.min() == -1 and q.max() == 1
    assert (q - x.clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-6
    assert torch.equal(dt.to_8bit(q), q)
    # 0 -> 127.5, which rounds half to even: level 128
    assert dt.to_8bit(torch.tensor([0.0])).item() == pytest.approx(128 / 127.5 - 1, abs=1e-6)


def test_decoder_loss_without_discriminator_is_l1_plus_lpips():
    lpips = random_lpips()
    torch.manual_seed(2)
    images, recon = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    loss, logs = dt.decoder_loss(recon, images, lpips, perceptual_weight=0.5)
    close(loss, (recon - images).abs().mean() + 0.5 * lpips(images * 2 - 1, recon * 2 - 1).mean(), 1e-6)
    assert set(logs) == {'l1', 'lpips'}



@pytest.mark.gpu
def test_lpips_and_discriminator_on_cuda_match_cpu():
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    lpips = random_lpips()
    torch.manual_seed(0)
    disc = dt.Discriminator(rae.Encoder(**TINY_DINO), key_depths=(1, 3)).eval()
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    want_lpips, want_logits = lpips(x, y), disc(x).detach()
    lpips.cuda(), disc.cuda()  # the backbone moves with the heads
    assert disc.dino.patch_embed.weight.is_cuda
    close(lpips(x.cuda(), y.cuda()).cpu(), want_lpips, 1e-4)
    close(disc(x.cuda()).cpu(), want_logits, 1e-4)
