"""Decoder training: its parts (LPIPS, DINO discriminator, DiffAug, losses) against the reference and closed forms,
then the script (overfitting real photos, exact resume after SIGKILL, the GAN phases, PSNR/rFID, reconstruct)."""
import copy
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import decoder_train as dt
import fid
import rae
from files import center_crop_arr
from test_dit import grads_and_saved
from training import make_ema, update_ema

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
    rae.load_published(enc, sd['dino_backbone_file'], rae.PUBLISHED['dino'], 'dino_disc_tiny.pt')
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
    monkeypatch.setenv('RAE_CACHE', str(tmp_path / 'fresh'))
    monkeypatch.setattr(dt, 'LPIPS_MD5', '0' * 32)  # a download that does not match is refused and removed
    with pytest.raises(RuntimeError, match='md5'):
        dt.LPIPS.from_pretrained()
    assert not list((tmp_path / 'fresh' / 'lpips').iterdir())


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
    decoder = rae.Decoder.from_state_dict(sd['decoder'], token_dim=16, width=64, depth=2, heads=4, mlp_hidden=128,
                                          grid=4, patch=4)  # the golden constructor: 16 patches of 4 px
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
    g_rec, g_gan = (torch.autograd.grad(loss, recon, retain_graph=True)[0] for loss in (rec, gan))
    close(dt.adaptive_weight(g_rec, g_gan, recon, W), out['adaptive_weight'])
    total, logs = dt.decoder_loss(recon, images, lpips, disc, W, augment=lambda x: x)  # golden: no DiffAug
    close(total, out['total_loss'])
    close(logs['gan_weight'], out['adaptive_weight'])
    total.backward()  # through the decoder only, with the gradient of rec + 0.75 lambda gan
    close(W.grad, out['grad_recon_total_wrt_decoder_pred'] + 0.75 * out['adaptive_weight'] *
          out['grad_gan_wrt_decoder_pred'])
    assert all(p.grad is None for p in lpips.parameters())


def test_adaptive_weight_is_the_gradient_norm_ratio():
    torch.manual_seed(0)
    W = torch.randn(3, 4, requires_grad=True)
    x, t = torch.randn(4), torch.randn(3)
    recon = W @ x  # the last layer
    y = recon.detach()
    d_rec, d_gan = 2 * (y - t), 0.3 * torch.cos(y)  # the gradients at recon of |recon - t|^2 and 0.3 sum sin(recon)
    lam = dt.adaptive_weight(d_rec, d_gan, recon, W)
    close(lam, torch.outer(d_rec, x).norm() / (torch.outer(d_gan, x).norm() + 1e-6), 1e-6)  # d/dW = outer(., x)
    assert not lam.requires_grad
    assert dt.adaptive_weight(d_rec, d_gan * 0, recon, W).item() == 1e4  # clamped at max_weight
    recon.sum().backward()  # the graph was retained for the real backward


def test_hinge_and_generator_losses_on_known_logits():
    real = torch.tensor([[2.0, 0.5, -1.0]])
    fake = torch.tensor([[-2.0, 0.0, 1.5]])
    # relu(1 - real) = [0, 0.5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2.5] -> mean 7/6; half the sum = 1
    assert dt.discriminator_loss(real, fake).item() == pytest.approx(1.0, abs=1e-7)
    assert dt.discriminator_loss(torch.full((2, 5), 3.0), torch.full((2, 5), -4.0)).item() == 0
    assert dt.generator_loss(fake).item() == pytest.approx(1 / 6, abs=1e-7)


def test_quantize_8bit_grid():
    x = torch.linspace(-1.5, 1.5, 1001)
    q = dt.quantize_8bit(x)
    k = (q + 1) * 127.5
    close(k, k.round(), 1e-4)  # on the 256-level grid
    assert q.min() == -1 and q.max() == 1
    assert (q - x.clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-6
    assert torch.equal(dt.quantize_8bit(q), q)
    # 0 -> 127.5, which rounds half to even: level 128
    assert dt.quantize_8bit(torch.tensor([0.0])).item() == pytest.approx(128 / 127.5 - 1, abs=1e-6)


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


# ----------------------------------------------------------------------------------------------------------
# The training script, on tiny random-weight stand-ins written by its own toy=True code (configs/decoder_tiny.py)

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / 'configs' / 'decoder_tiny.py')
TINY_ENCODER = dict(width=32, depth=2, heads=2, pos_grid=4)  # as configs/decoder_tiny.py


@pytest.fixture
def one_thread():
    # The suite shares 2 cores with other work: for models this small a second thread only waits for the first.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def script(*args, out_dir):
    """decoder_train.py on the tiny config, one thread, as a subprocess (tiny models; its own globals)."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return [sys.executable, str(REPO / 'decoder_train.py'), TINY_CONFIG, f'--out_dir={out_dir}', *args], env


def run(*args, out_dir):
    cmd, env = script(*args, out_dir=out_dir)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def toy_args(d, **changes):
    """The tiny config's weight files and images under d (written by write_toy if missing); fp32, whatever 'auto'
    would choose on this CPU (the numbers the tests compare)."""
    args = {'data_path': f'{d}/images', 'encoder_weights': f'{d}/dinov2.pt', 'disc_weights': f'{d}/dino_s8.pt',
            'lpips_weights': (f'{d}/vgg16.pt', f'{d}/lpips.pt'), 'toy': False, 'val_path': None, 'precision': 'fp32',
            **changes}
    return [f'--{k}={v!r}' if not isinstance(v, str) else f'--{k}={v}' for k, v in args.items()]


def write_toy(d, **changes):
    """The script's own toy writer, in process, with the config it would run with."""
    dt.write_toy(dt.configure(dt._DEFAULTS, [TINY_CONFIG, *toy_args(d, **changes)]))


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp('toy')
    write_toy(d)
    (d / 'images' / 'class000' / '999_corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not an image')
    return d


def log_lines(out_dir):
    """{step: 'step N/T | epoch E | losses | lr X'} (the last time each step was logged) and the whole log."""
    text = (Path(out_dir) / 'log.txt').read_text()
    steps = {}
    for line in text.splitlines():
        if line.startswith('step '):
            steps.setdefault(int(line.split()[1].split('/')[0]), []).append(' | '.join(line.split(' | ')[:4]))
    return steps, text


@pytest.fixture(scope='module')
def runs(toy, tmp_path_factory):
    """Run a: 32 uninterrupted steps (8 per epoch: D from step 9, GAN from step 17). Run b: the same, SIGKILLed
    once its step-12 checkpoint exists, then started again: it resumes from its newest checkpoint."""
    d = tmp_path_factory.mktemp('runs')
    args = toy_args(toy) + ['--ckpt_every=4', '--log_every=1']
    run(*args, out_dir=d / 'a')
    cmd, env = script(*args, out_dir=d / 'b')
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (d / 'b' / 'checkpoints' / '0000012.pt').exists():
            assert p.poll() is None, 'run b ended before its step-12 checkpoint'
            time.sleep(0.01)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    killed_at = max(int(f.stem) for f in (d / 'b' / 'checkpoints').glob('*.pt'))
    assert killed_at < 32
    run(*args, out_dir=d / 'b')
    return d, killed_at


def test_resume_after_sigkill_equals_uninterrupted(runs):
    d, killed_at = runs
    a, _ = log_lines(d / 'a')
    b, text = log_lines(d / 'b')
    assert f'resumed from {d / "b" / "checkpoints"}' in text
    assert sorted(a) == sorted(b) == list(range(1, 33))
    for step in a:  # every logged loss to fp32 precision, including steps logged again after the resume
        assert all(line == a[step][0] for line in b[step]), (step, a[step], b[step])
    ca, cb = (torch.load(d / r / 'checkpoints' / '0000032.pt', weights_only=True) for r in 'ab')
    for key in ('model', 'ema', 'disc'):
        assert ca[key].keys() == cb[key].keys()
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key]), key
    # metrics.jsonl: one record per step, the steps logged again after the resume replace the killed run's
    ra, rb = ([json.loads(line) for line in (d / r / 'metrics.jsonl').read_text().splitlines()] for r in 'ab')
    assert [r['step'] for r in rb] == [r['step'] for r in ra] == list(range(1, 33))
    assert all(x.pop('img_per_s') and y.pop('img_per_s') and x == y for x, y in zip(ra, rb))  # all but the speed
    assert {'l1', 'lpips', 'loss', 'lr', 'epoch'} <= ra[0].keys() and (d / 'b' / 'loss.png').is_file()


def test_gan_phases_switch_on_at_their_epochs(runs):
    d, _ = runs
    steps, text = log_lines(d / 'a')
    keys = {s: set(line[0].split(' | ')[2].split()[::2]) for s, line in steps.items()}
    base = {'loss', 'l1', 'lpips'}
    assert all(keys[s] == base for s in range(1, 9))  # epoch 0: L1 + LPIPS only
    assert all(keys[s] == base | {'d_loss', 'd_acc'} for s in range(9, 17))  # epoch 1: D trains, unused
    assert all(keys[s] == base | {'d_loss', 'd_acc', 'gan', 'gan_weight'} for s in range(17, 33))
    for s in range(17, 33):
        v = dict(zip(*[iter(steps[s][0].split(' | ')[2].split())] * 2))
        lam, loss = float(v['gan_weight']), float(v['loss'])
        assert 0 < lam < 1e4
        # the logged total is the objective: L1 + 1.0 LPIPS + 0.75 lambda GAN (one step a line)
        assert loss == pytest.approx(float(v['l1']) + float(v['lpips']) + 0.75 * lam * float(v['gan']), rel=1e-5)
    assert 'unreadable images skipped' in text  # the corrupt file in the folder: replaced and counted


def test_log_says_the_precision_after_its_header(runs):
    d, _ = runs
    lines = log_lines(d / 'a')[1].splitlines()
    assert next(line for line in lines if not line.startswith('#') and ' = ' not in line) == \
        "precision: fp32 (precision='fp32')"  # toy_args force it; 'auto' would ask the CPU (runtime.choose_precision)


def test_discriminator_step_updates_only_the_heads(one_thread):
    torch.manual_seed(0)
    enc = rae.Encoder(**dict(rae.ENCODERS['dinov2-b'], **TINY_ENCODER, input_size=56))
    model = rae.RAE(enc, rae.Decoder(32, 64, 2, 1, 128, grid=4, patch=8), noise_tau=0.8).train()
    disc = dt.Discriminator(rae.Encoder(**dict(TINY_DINO, pos_grid=4, input_size=32)), key_depths=(1, 3))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0)
    images = torch.rand(3, 3, 32, 32)
    frozen = {**{f'rae.{k}': v.clone() for k, v in model.state_dict().items()},
              **{f'dino.{k}': v.clone() for k, v in disc.dino.state_dict().items()}}
    heads, ref_disc = copy.deepcopy(disc.state_dict()), copy.deepcopy(disc).train()
    torch.manual_seed(1)
    logs = dt.discriminator_step(model, disc, opt_d, images, nullcontext())
    assert model.training  # put back in train mode for the next generator step
    # the loss by hand: 8-bit eval-mode reconstructions (no latent noise: no draws), DiffAug on fake then real
    torch.manual_seed(1)
    with torch.no_grad():
        fake = model.eval()(images).clamp(0, 1)
    fake = torch.round((fake * 2 - 1 + 1) * 127.5) / 127.5 - 1
    lf, lr = ref_disc(dt.diffaug(fake)), ref_disc(dt.diffaug(images * 2 - 1))
    want = 0.5 * (torch.relu(1 - lr).mean() + torch.relu(1 + lf).mean())
    assert logs['d_loss'].item() == pytest.approx(want.item(), abs=1e-6)
    after = {**{f'rae.{k}': v for k, v in model.state_dict().items()},
             **{f'dino.{k}': v for k, v in disc.dino.state_dict().items()}}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # encoder, decoder, DINO backbone untouched
    assert all(p.grad is None for p in model.parameters())
    changed = [k for k, v in disc.state_dict().items() if not torch.equal(v, heads[k])]
    # every head tensor moved (weights, biases, norms, power-iteration vectors) but the u of the 1-logit output
    # convolutions, a unit vector of length 1
    assert changed == [k for k, v in heads.items() if not (k.endswith('weight_u') and v.shape == (1,))]


def test_decoder_grad_checkpoint_gives_the_same_gradients(one_thread):
    """decoder.grad_checkpoint (decoder_train.py's key): each block recomputed in backward, the same gradients to
    1e-6 absolute (fp32 on a CPU: bitwise), from a fraction of the saved tensors (tests/test_dit.py for the DiTs)."""
    torch.manual_seed(0)
    dec = rae.Decoder(32, 64, 2, 1, 128, grid=4, patch=8).train()
    tokens = (torch.randn(2, 16, 32),)
    plain, saved_plain = grads_and_saved(dec, tokens, False)
    ckpt, saved_ckpt = grads_and_saved(dec, tokens, True)
    assert ckpt.keys() == plain.keys() and len(plain) == len(list(dec.parameters()))
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=0, atol=1e-6, msg=k)
    assert saved_ckpt < saved_plain / 2


def test_training_step_makes_no_host_sync(one_thread, monkeypatch):
    """G step, EMA update and D step as main() runs them on a GPU (range check off, fused AdamW): no tensor is read
    back to the host (.item(), bool(), aminmax, ...), so a CUDA step never waits for the device."""
    torch.manual_seed(0)
    enc = rae.Encoder(**dict(rae.ENCODERS['dinov2-b'], **TINY_ENCODER, input_size=56))
    enc.check_inputs = False
    model = rae.RAE(enc, rae.Decoder(32, 64, 2, 1, 128, grid=4, patch=8), noise_tau=0.8).train()
    disc = dt.Discriminator(rae.Encoder(**dict(TINY_DINO, pos_grid=4, input_size=32)), key_depths=(1, 3))
    opt, opt_d = (torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in (model.decoder, disc))
    ema, lpips, images = make_ema(model.decoder), random_lpips(), torch.rand(2, 3, 32, 32)
    reads = []
    for name in ('item', 'tolist', '__bool__', '__float__', '__int__', 'cpu', 'numpy'):
        def read(*args, _name=name, _orig=getattr(torch.Tensor, name), **kwargs):
            reads.append(_name)
            return _orig(*args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)
    monkeypatch.setattr(torch, 'aminmax', lambda *a, **k: reads.append('aminmax'))
    logs = dt.generator_step(model, lpips, disc, opt, images, True, nullcontext())
    update_ema(ema, model.decoder, 0.9)
    logs.update(dt.discriminator_step(model, disc, opt_d, images, nullcontext()))
    monkeypatch.undo()
    assert reads == [] and sorted(logs) == ['d_acc', 'd_loss', 'gan', 'gan_weight', 'l1', 'loss', 'lpips']


DDP_SCRIPT = '''
import sys, torch, torch.distributed as dist
from contextlib import nullcontext
sys.path.insert(0, {repo!r})
import decoder_train as dt, rae, runtime
rank, _, world, dev, _ = runtime.setup_ddp('cpu')
torch.manual_seed(0)  # the same model and heads on both ranks
model = rae.RAE(rae.Encoder(**{enc!r}), rae.Decoder(32, 64, 1, 1, 64, grid=4, patch=8))
disc = dt.Discriminator(rae.Encoder(**{dino!r}), key_depths=(1,))
ddp_disc = torch.nn.parallel.DistributedDataParallel(disc)
opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-2)
torch.manual_seed(1 + rank)  # different images on each rank
start = torch.cat([p.detach().flatten().clone() for p in disc.parameters()])
for _ in range(2):
    dt.discriminator_step(model, ddp_disc, opt_d, torch.rand(2, 3, 32, 32), nullcontext())
heads = torch.cat([p.detach().flatten() for p in disc.parameters()])
both = [torch.empty_like(heads) for _ in range(world)]
dist.all_gather(both, heads)
assert not torch.equal(heads, start) and torch.equal(both[0], both[1]), 'heads differ across ranks'
print('synced', flush=True)
del ddp_disc  # its reducer holds the process group: freed now, not during interpreter shutdown (gloo may abort)
runtime.cleanup_ddp()
'''


def test_discriminator_gradients_are_synchronised_across_ranks(tmp_path):
    """The D step goes through DDP: two ranks with different images end with the same heads (the reference's bare
    call would train one D per rank)."""
    path = tmp_path / 'd_step.py'
    enc = dict(rae.ENCODERS['dinov2-b'], **TINY_ENCODER, input_size=56)
    dino = dict(TINY_DINO, depth=2, pos_grid=4, input_size=32)
    path.write_text(DDP_SCRIPT.format(repo=str(REPO), enc=enc, dino=dino))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0 and r.stdout.count('synced') == 2, r.stderr[-3000:]


def test_overfits_four_real_photos(toy, tmp_path):
    """A tiny decoder (128 wide, 2 blocks) on a tiny random encoder overfits 4 scikit-image photos: above 20 dB PSNR
    on their 32 px centre crops within 200 steps (4 per batch; ~21.6 dB measured), from ~11 dB at the start."""
    skimage_data = pytest.importorskip('skimage.data')
    photos, copies = tmp_path / 'photos' / 'class0', tmp_path / 'copies' / 'class0'
    photos.mkdir(parents=True)
    copies.mkdir(parents=True)
    for name in ('astronaut', 'chelsea', 'coffee', 'rocket'):
        Image.fromarray(getattr(skimage_data, name)()).save(photos / f'{name}.png')
        for i in range(25):  # 100 files: 25 steps an epoch, so 8 epochs (and 8 checkpoints) for 200 steps
            (copies / f'{name}_{i}.png').symlink_to(photos / f'{name}.png')
    wide = dict(encoder_weights=f'{tmp_path}/dinov2_128.pt', encoder_overrides=dict(TINY_ENCODER, width=128),
                decoder_arch=dict(width=128, depth=2, heads=2, mlp_hidden=256))
    write_toy(toy, **wide)
    args = toy_args(toy, **wide, data_path=str(copies.parent), val_path=str(photos.parent), noise_tau=0.0,
                    disc_update_start_epoch=10 ** 6, disc_start_epoch=10 ** 6, global_batch=4, epochs=8,
                    lr=2e-3, lr_final=2e-4, lr_decay_end=8, ema_decay=0.0, log_every=25, eval_every=25)
    run(*args, out_dir=tmp_path / 'run')
    evals = [float(line.split('PSNR ')[1]) for line in (tmp_path / 'run' / 'log.txt').read_text().splitlines()
             if line.startswith('eval step')]
    assert len(evals) == 8 and evals[0] < evals[-1] and evals[-1] > 20, evals
    records = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    assert [round(r['PSNR'], 4) for r in records if 'PSNR' in r] == evals  # the log's 4 decimals
    # the logged PSNR, recomputed with numpy from the EMA weights of the last checkpoint (ema_decay 0: = model)
    ckpt = torch.load(tmp_path / 'run' / 'checkpoints' / '0000200.pt', weights_only=True)
    dec = rae.Decoder(128, 128, 2, 2, 256, grid=4, patch=8)
    dec.load_state_dict(ckpt['ema'])
    enc = rae.Encoder.from_pretrained('dinov2-b', wide['encoder_weights'], 56, **wide['encoder_overrides'])
    model = rae.RAE(enc, dec).eval()
    crops = np.stack([np.array(center_crop_arr(Image.open(p).convert('RGB'), 32))
                      for p in sorted(photos.iterdir())])
    with torch.no_grad():
        out = model(torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255)
    out = out.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    mse = ((out / 255.0 - crops / 255.0) ** 2).reshape(4, -1).mean(1)
    assert np.mean(10 * np.log10(1 / mse)) == pytest.approx(evals[-1], abs=1e-4)


def test_psnr_closed_form():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 0.5
    y = x + torch.tensor([0.1, 0.01], dtype=torch.float64).view(2, 1, 1, 1)  # MSE 1e-2 and 1e-4: 20 and 40 dB
    torch.testing.assert_close(dt.psnr(x, y), torch.tensor([20.0, 40.0], dtype=torch.float64), rtol=0, atol=1e-9)
    assert dt.psnr(x, x).tolist() == [100.0, 100.0]  # MSE floored at 1e-10
    noise = torch.randn(1, 3, 16, 16, dtype=torch.float64) * 0.05
    want = 10 * math.log10(1 / (noise.double() ** 2).mean().item())
    assert dt.psnr(x[:1].repeat(1, 1, 2, 2) + noise, x[:1].repeat(1, 1, 2, 2)).item() == pytest.approx(want, abs=1e-9)


class Identity(torch.nn.Module):
    """The perfect autoencoder (one parameter: evaluate() reads the device from it)."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x + self.p


@pytest.fixture
def val_folder(tmp_path):
    folder = tmp_path / 'val' / 'x'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):  # different sizes and aspect ratios: the crop matters
        Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 60 - 5 * i, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    return tmp_path / 'val'


def test_rfid_sees_the_crops_the_reference_statistics_were_made_from(val_folder, monkeypatch):
    """What evaluate() hands fid.evaluate: the 8-bit reconstructions of the same ADM centre crops that
    `fid.py --write-ref` reads (so the identity autoencoder gets rFID 0), the first eval_images in sorted order."""
    seen = []

    def fake_evaluate(batches, reference, model=None, pr=True, progress=True):
        seen.extend(torch.as_tensor(b).clone() for b in batches)
        assert reference == {'ref': 1} and model == 'inception' and pr is False
        return {'FID': 1.5}

    monkeypatch.setattr(fid, 'evaluate', fake_evaluate)
    metrics, n = dt.evaluate(Identity(), str(val_folder), 32, 4, {'ref': 1}, 'inception', batch_size=3)
    assert metrics == {'PSNR': 100.0, 'rFID': 1.5} and n == 4
    crops = np.concatenate(list(fid.FolderImages(str(val_folder), crop=32, workers=0).batches(5)))  # write_reference
    assert torch.equal(torch.cat(seen), torch.from_numpy(crops[:4]))


@pytest.mark.slow
def test_rfid_of_perfect_reconstructions_is_zero(val_folder, tmp_path, one_thread):
    """The whole path with a random-weight Inception: reference statistics written by fid.py, identity -> rFID 0."""
    torch.manual_seed(0)
    inception = fid.InceptionV3().eval()  # random weights: the statistics are compared, not their meaning
    fid.write_reference(str(val_folder), str(tmp_path / 'ref.npz'), 32, model=inception, batch_size=5, workers=0,
                        progress=False)
    metrics, n = dt.evaluate(Identity(), str(val_folder), 32, 0, fid.load_reference(str(tmp_path / 'ref.npz')),
                             inception, batch_size=5)
    assert n == 5 and metrics['PSNR'] == 100.0
    assert abs(metrics['rFID']) < 1e-3, metrics


@pytest.mark.parametrize('name', ['decoder_xl', 'decoder_b', 'decoder_siglip2', 'decoder_mae', 'decoder_xl_512',
                                  'decoder_tiny'])
def test_configs_load_and_fit_their_encoders(name, capsys):
    c = dt.configure(dt._DEFAULTS, [str(REPO / 'configs' / f'{name}.py')])
    enc = dict(rae.ENCODERS[c['encoder']], **(c['encoder_overrides'] or {}))
    tokens = c['image_size'] // c['decoder_patch']  # the decoder's grid = the encoder's token grid
    assert c['image_size'] % c['decoder_patch'] == 0 and enc['patch'] in (14, 16)
    assert c['decoder_arch'] or c['decoder_size'] in rae.DECODERS
    assert (tokens, c['image_size']) == {'decoder_xl_512': (16, 512), 'decoder_tiny': (4, 32)}.get(name, (16, 256))
    if name != 'decoder_tiny':  # the recipe: only the autoencoder differs
        assert (c['global_batch'], c['epochs'], c['lr'], c['lr_final'], c['ema_decay'], c['noise_tau'],
                c['disc_start_epoch'], c['disc_update_start_epoch'], c['betas']) == \
            (512, 16, 2e-4, 2e-5, 0.9978, 0.8, 8, 6, (0.9, 0.95))


@pytest.fixture
def restore_globals(monkeypatch):
    for k in dt._DEFAULTS:  # main() writes its config into the module's globals
        monkeypatch.setattr(dt, k, getattr(dt, k))


def test_reconstruct_writes_crop_and_reconstruction_side_by_side(runs, toy, tmp_path):
    d, _ = runs
    try:
        photo = Image.fromarray(__import__('skimage.data').data.chelsea())  # a real photo, 451 x 300
    except ImportError:
        photo = Image.open(sorted((toy / 'images' / 'class001').iterdir())[0])
    photo.save(tmp_path / 'photo.png')
    r = run(*toy_args(toy), '--mode=reconstruct', f'--image={tmp_path}/photo.png', f'--recon_out={tmp_path}/pair.png',
            out_dir=d / 'a')
    pair = np.array(Image.open(tmp_path / 'pair.png'))
    assert pair.shape == (32, 64, 3)
    crop = np.array(center_crop_arr(photo.convert('RGB'), 32))
    assert np.array_equal(pair[:, :32], crop)
    # the right half by hand: the checkpoint's EMA decoder (not the live one) on the encoder's tokens
    ckpt = torch.load(d / 'a' / 'checkpoints' / '0000032.pt', weights_only=True)
    dec = rae.Decoder(32, 64, 2, 1, 128, grid=4, patch=8)
    dec.load_state_dict(ckpt['ema'])
    model = rae.RAE(rae.Encoder.from_pretrained('dinov2-b', f'{toy}/dinov2.pt', 56, **TINY_ENCODER), dec).eval()
    with torch.no_grad():
        want = model(torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255)
    assert np.array_equal(pair[:, 32:], want[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy())
    db = 10 * np.log10(1 / ((pair[:, 32:] / 255.0 - crop / 255.0) ** 2).mean())
    assert f'PSNR {db:.2f} dB' in r.stdout


@pytest.mark.parametrize('change, message', [
    (['--data_path=/no/such/folder'], '/no/such/folder: no such image folder'),
    (['--encoder_weights=/no/such/file.pt'], 'weights file not found: /no/such/file.pt'),
    (['--learning_rate=1e-4'], "unknown config key 'learning_rate'"),
    (['--mode=sample'], "mode='sample': choose one of train, eval, reconstruct"),
    (["--decoder_arch=[64, 2]"], 'decoder_arch=[64, 2]: expected dict'),
    (['--mode=reconstruct'], "mode='reconstruct' needs --image=FILE"),
    (['--mode=reconstruct', '--image=/no/such.png'], '--image=/no/such.png: not a readable image'),
    (['--lr=-1'], 'lr=-1.0: must be > 0'),
    (['--epochs=0'], 'epochs=0: must be > 0'),
    (['--global_batch=0'], 'global_batch=0: must be > 0'),
    (['--ema_decay=2'], 'ema_decay=2.0: must be in [0, 1)'),
    (['--val_path=3'], 'val_path=3: expected str'),
    (['--ddp_timeout=0'], 'ddp_timeout=0: must be > 0'),
])
def test_bad_input_is_a_one_line_error(toy, tmp_path, change, message, restore_globals, one_thread):
    with pytest.raises(SystemExit) as e:
        dt.main([TINY_CONFIG, f'--out_dir={tmp_path}', *toy_args(toy), *change])
    assert message in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('content', [b'', b'\x89PNG\r\n\x1a\n not an image'])
def test_reconstruct_of_an_empty_or_corrupt_file_is_one_line(toy, tmp_path, content, restore_globals, one_thread):
    bad = tmp_path / 'bad.png'
    bad.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        dt.main([TINY_CONFIG, f'--out_dir={tmp_path}', *toy_args(toy), '--mode=reconstruct', f'--image={bad}'])
    assert f'--image={bad}: not a readable image' in str(e.value) and '\n' not in str(e.value)


EVAL_SCRIPT = '''
import sys, numpy as np, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import decoder_train as dt, fid, runtime
from test_decoder_train import Identity
runtime.setup_ddp('cpu')
seen = []
def fake_evaluate(batches, reference, model=None, pr=True, progress=True):
    seen.extend(b.clone() for b in batches)
    return {{'FID': 0.0}}
fid.evaluate = fake_evaluate
metrics, n = dt.evaluate(Identity(), {folder!r}, 32, 0, {{'ref': 1}}, 'inception', batch_size=2)
if dist.get_rank() == 0:
    want = np.concatenate(list(fid.FolderImages({folder!r}, crop=32, workers=0).batches(8)))
    got = torch.cat(seen).numpy()
    assert n == 5 and metrics['PSNR'] == 100.0 and len(got) == 5, (n, metrics, len(got))
    assert sorted(map(bytes, got)) == sorted(map(bytes, want)), 'gathered crops differ'
    print('gathered', flush=True)
runtime.cleanup_ddp()
'''


def test_evaluation_on_two_ranks_skips_an_unreadable_file(val_folder, tmp_path):
    """Five readable crops and one corrupt file: rank 1 runs out of readable images a batch before rank 0; the
    padded gathers still hand rank 0's FID exactly the five crops, and PSNR counts five images."""
    (val_folder / 'x' / 'bad.png').write_bytes(b'not an image')
    path = tmp_path / 'eval.py'
    path.write_text(EVAL_SCRIPT.format(repo=str(REPO), folder=str(val_folder)))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(path)]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO / 'tests'))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and 'gathered' in r.stdout, r.stderr[-3000:]
    assert 'bad.png is unreadable' in r.stderr


def test_evaluation_with_nothing_readable_is_one_line(tmp_path):
    folder = tmp_path / 'val' / 'x'
    folder.mkdir(parents=True)
    (folder / 'bad.png').write_bytes(b'not an image')
    with pytest.raises(SystemExit, match='no readable images'):
        dt.evaluate(Identity(), str(tmp_path / 'val'), 32)


def test_training_ends_with_a_diffusers_export_of_the_ema_decoder(toy, tmp_path):
    """With an encoder diffusers can build (heads = width / 64), the run writes out_dir/diffusers; from_pretrained of
    that folder reconstructs exactly as the last checkpoint's EMA decoder on the same encoder does."""
    wide = dict(encoder_weights=f'{tmp_path}/dinov2_64.pt',
                encoder_overrides=dict(TINY_ENCODER, width=64, heads=1, pos_grid=37))
    write_toy(toy, **wide)
    run(*toy_args(toy, **wide, epochs=1), out_dir=tmp_path / 'run')
    assert 'wrote' in (tmp_path / 'run' / 'log.txt').read_text().splitlines()[-1]
    exported = rae.RAE.from_pretrained(str(tmp_path / 'run' / 'diffusers'), stats=False)
    ckpt = torch.load(tmp_path / 'run' / 'checkpoints' / '0000008.pt', weights_only=True)
    dec = rae.Decoder(64, 64, 2, 1, 128, grid=4, patch=8)
    dec.load_state_dict(ckpt['ema'])
    enc = rae.Encoder.from_pretrained('dinov2-b', wide['encoder_weights'], 56, **wide['encoder_overrides'])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(x), rae.RAE(enc, dec).eval()(x), rtol=0, atol=1e-6)
