"""sample.py end to end: random tiny weights in the released file layout, served over HTTP on 127.0.0.1 (HF_ENDPOINT).

The PNG grid and the ADM npz written by the script are compared pixel by pixel with an independent in-process
reconstruction from the library pieces (per-sample noise, Euler on the shifted grid, guidance, decoder, rounding).
"""
import io
import math
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rae
from conftest import TinyServer
from test_dit import TINY_DDT, randomize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402

C, GRID, PATCH, WIDTH = 16, 4, 4, 32  # tiny latent [16, 4, 4]; decoder width 32, patch 4 -> 16x16 images
FP32 = ('--precision', 'fp32')  # the references below run in fp32, whatever --precision auto would choose here


def tiny_released_decoder(seed):
    """A random decoder state dict with the released (HF ViTMAE decoder) key names, 2 layers."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else 1 / math.sqrt(shape[-1]))
    sd = {'decoder_pos_embed': torch.cat([torch.zeros(1, WIDTH), rae.sincos_2d(WIDTH, GRID)])[None],
          'trainable_cls_token': r(1, 1, WIDTH, scale=0.1),
          'decoder_embed.weight': r(WIDTH, C), 'decoder_embed.bias': r(WIDTH, scale=0.1)}
    for i in range(2):
        p = f'decoder_layers.{i}.'
        for name, shape in [('attention.attention.query', (WIDTH, WIDTH)), ('attention.attention.key', (WIDTH, WIDTH)),
                            ('attention.attention.value', (WIDTH, WIDTH)), ('attention.output.dense', (WIDTH, WIDTH)),
                            ('intermediate.dense', (2 * WIDTH, WIDTH)), ('output.dense', (WIDTH, 2 * WIDTH))]:
            sd[p + name + '.weight'], sd[p + name + '.bias'] = r(*shape), r(shape[0], scale=0.1)
        for name in ('layernorm_before', 'layernorm_after'):
            sd[p + name + '.weight'], sd[p + name + '.bias'] = 1 + r(WIDTH, scale=0.1), r(WIDTH, scale=0.1)
    sd.update({'decoder_norm.weight': 1 + r(WIDTH, scale=0.1), 'decoder_norm.bias': r(WIDTH, scale=0.1),
               'decoder_pred.weight': r(PATCH * PATCH * 3, WIDTH, scale=0.05),
               'decoder_pred.bias': 0.5 + r(PATCH * PATCH * 3, scale=0.1)})
    return sd


TINY_DECODER_RUN = dict(encoder='dinov2-b', encoder_overrides=dict(width=C), decoder_size='XL', decoder_patch=PATCH,
                        decoder_arch=dict(width=WIDTH, depth=2, heads=1, mlp_hidden=2 * WIDTH), image_size=GRID * PATCH)


def as_run(model, kw):
    """A diffusion_train.py-style checkpoint: EMA weights and the run config that builds the model."""
    run = dict(model='DiTDH', hidden_size=kw['hidden_size'], depth=kw['depth'], num_heads=kw['num_heads'],
               num_classes=kw['num_classes'])
    return {'ema': model.state_dict(), 'config': run}


def to_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
    """An HTTP server holding the released paths (256 and 512 px) with tiny random weights; local copies in .local."""
    local = tmp_path_factory.mktemp('weights')
    torch.manual_seed(0)
    var = 0.5 + torch.rand(C, GRID, GRID, generator=torch.Generator().manual_seed(4))
    guide_kw = dict(TINY_DDT, hidden_size=(16, 64), depth=(1, 1))
    # tiny stand-ins at the released paths carry the config they were built with (our checkpoints' convention)
    files = {'model': as_run(randomize(rae.DiTDH(**TINY_DDT), seed=1), TINY_DDT),
             'guide': as_run(randomize(rae.DiTDH(**guide_kw), seed=2), guide_kw),
             'decoder': {'ema': tiny_released_decoder(3), 'config': TINY_DECODER_RUN},
             'stats': {'mean': None, 'var': var}}  # variance only, like the released DINOv2-B statistics
    for name, obj in files.items():
        torch.save(obj, local / f'{name}.pt')
    server = TinyServer()
    for res in (256, 512):
        paths = dict(rae.RELEASED_DITS[res], decoder=rae.RELEASED_DECODERS[('dinov2-b', res)],
                     stats=rae.RELEASED_STATS[('dinov2-b', res)])
        for name in files:
            server.files[f'/{rae.HF_REPO}/resolve/main/{paths[name]}'] = to_bytes(files[name])
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    server.local = local
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def env(hub, tmp_path, monkeypatch):
    monkeypatch.setenv('HF_ENDPOINT', hub.url)
    monkeypatch.setenv('RAE_CACHE', str(tmp_path / 'cache'))
    return dict(os.environ, HF_ENDPOINT=hub.url, RAE_CACHE=str(tmp_path / 'cache'), OMP_NUM_THREADS='1')


@torch.no_grad()
def reference_images(local, indices, labels, steps, seed=0, cfg=1.0, interval=(0.0, 1.0), ag=None, method='euler'):
    """The expected uint8 images, rebuilt from the library pieces."""
    decoder = rae.RAE.from_pretrained('dinov2-b', 256, decoder=str(local / 'decoder.pt'),
                                      stats=str(local / 'stats.pt'), load_encoder=False)
    model = rae.load_dit(local / 'model.pt')
    guide = rae.load_dit(local / 'guide.pt') if ag else None
    z = torch.stack([torch.randn(C, GRID, GRID, generator=torch.Generator().manual_seed(seed * 2 ** 32 + i))
                     for i in indices])
    v = rae.guided_velocity(model, torch.as_tensor(labels), cfg_scale=cfg, cfg_interval=interval, guide=guide,
                            guide_scale=ag or 1.0)
    x = rae.sample_ode(v, z, steps, math.sqrt(C * GRID * GRID / 4096), method=method)
    images = decoder.decode(x).clamp(0, 1)
    return torch.round(images * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def assert_images_match(got, expected):
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # thread counts may flip a rounding, nothing more


def test_png_grid_end_to_end(env, hub, tmp_path):
    out = tmp_path / 'grid.png'
    cmd = [sys.executable, str(ROOT / 'sample.py'), '--class', '3', '5', '--n', '2', '--steps', '4', '--device', 'cpu',
           '--autoguidance', '1.5', '--out', str(out), *FP32]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    grid = np.array(Image.open(out))
    H = W = GRID * PATCH
    assert grid.shape == (2 + 2 * (H + 2), 2 + 2 * (W + 2), 3)
    cells = np.stack([grid[2 + r * (H + 2):2 + r * (H + 2) + H, 2 + c * (W + 2):2 + c * (W + 2) + W]
                      for r in range(2) for c in range(2)])
    assert_images_match(cells, reference_images(hub.local, range(4), [3, 3, 5, 5], 4, ag=1.5))
    assert cells.std() > 10  # real images, not a constant
    cached = {p.name for p in (tmp_path / 'cache').rglob('*.pt')}
    assert cached == {'stage2_model.pt', 'model.pt', 'stat.pt'} and \
        len(list((tmp_path / 'cache').rglob('stage2_model.pt'))) == 2  # DiT^DH-XL and the DiT^DH-S guide


def test_npz_end_to_end(env, hub, tmp_path):
    out = tmp_path / 'fid.npz'
    cmd = [sys.executable, str(ROOT / 'sample.py'), '--num-samples', '30', '--batch-size', '8', '--steps', '4',
           '--cfg', '1.5', '--cfg-interval', '0', '0.7', '--device', 'cpu', '--seed', '3', '--out', str(out), *FP32]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    npz = np.load(out)
    assert sorted(npz.files) == ['arr_0', 'arr_1']
    images, labels = npz['arr_0'], npz['arr_1']
    assert images.dtype == np.uint8 and images.shape == (30, 16, 16, 3)
    assert np.bincount(labels, minlength=10).tolist() == [3] * 10  # exactly N / num_classes per class
    expected = torch.arange(10).repeat(3)[torch.randperm(30, generator=torch.Generator().manual_seed(3))]
    assert labels.tolist() == expected.tolist()
    pick = [0, 9, 29]
    assert_images_match(images[pick], reference_images(hub.local, pick, labels[pick], 4, seed=3, cfg=1.5,
                                                       interval=(0.0, 0.7)))
    assert not Path(str(out) + '.parts').exists()


def test_npz_resumes_after_an_interruption(env, tmp_path, monkeypatch):
    args = ['--num-samples', '20', '--batch-size', '6', '--steps', '3', '--device', 'cpu', *FP32]
    sample.main(args + ['--out', str(tmp_path / 'clean.npz')])
    calls, real = [], sample.sample_batch

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError('simulated crash')
        return real(*a, **k)
    monkeypatch.setattr(sample, 'sample_batch', failing)
    out = str(tmp_path / 'resumed.npz')
    with pytest.raises(SystemExit, match='simulated crash'):
        sample.main(args + ['--out', out])
    assert sorted(p.name for p in Path(out + '.parts').glob('*.npy')) == ['000000.npy', '000001.npy']
    calls.clear()
    sample.main(args + ['--out', out])
    assert len(calls) == 2  # only batches 2 and 3 were sampled again
    assert np.array_equal(np.load(out)['arr_0'], np.load(tmp_path / 'clean.npz')['arr_0'])
    assert np.array_equal(np.load(out)['arr_1'], np.load(tmp_path / 'clean.npz')['arr_1'])
    with pytest.raises(SystemExit, match='different run'):  # leftovers of another configuration are not mixed in
        Path(out + '.parts').mkdir()
        (Path(out + '.parts') / 'run.json').write_text('{"steps": 50}')
        sample.main(args + ['--out', out])


def test_unconditional_heun_with_autoguidance(env, hub, tmp_path):
    sample.main(['--unconditional', '--n', '3', '--steps', '3', '--sampler', 'heun', '--autoguidance', '1.3',
                 '--device', 'cpu', '--seed', '5', '--out', str(tmp_path / 'u.png'), *FP32])
    grid = np.array(Image.open(tmp_path / 'u.png'))
    assert grid.shape == (20, 2 + 3 * 18, 3)
    cells = np.stack([grid[2:18, 2 + c * 18:18 + c * 18] for c in range(3)])
    assert_images_match(cells, reference_images(hub.local, range(3), [10] * 3, 3, seed=5, ag=1.3, method='heun'))


def test_compiled_sampling_agrees_with_eager(env, hub):
    """--compile: the DiT and the guide become compiled modules (inductor, static shapes); the ODE solution through
    the compiled DiT (CFG: one graph, on the doubled batch) agrees with the eager module's to 1e-5 absolute (fp32;
    the latents are unit-scale, and inductor fuses and reorders float sums), and sample_batch through it gives the
    reference images to one 8-bit level."""
    compiled = torch._dynamo.eval_frame.OptimizedModule
    a = sample.parse_args(['--class', '3', '--autoguidance', '1.5', '--compile', *FP32])
    _, model, guide, _, _ = sample.load_models(a, torch.device('cpu'))  # compiled at the first call, not here
    assert isinstance(model, compiled) and isinstance(guide, compiled)
    a = sample.parse_args(['--class', '3', '5', '--n', '2', '--steps', '4', '--cfg', '1.5', '--compile', *FP32])
    models = sample.load_models(a, torch.device('cpu'))
    _, model, _, alpha, _ = models
    y = torch.tensor([3, 3, 5, 5])
    z = torch.randn(4, C, GRID, GRID, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = rae.sample_ode(rae.guided_velocity(model, y, cfg_scale=1.5), z, 4, alpha)
        eager = rae.sample_ode(rae.guided_velocity(model._orig_mod, y, cfg_scale=1.5), z, 4, alpha)
    torch.testing.assert_close(ours, eager, rtol=0, atol=1e-5)
    assert_images_match(sample.sample_batch(a, models, range(4), y),
                        reference_images(hub.local, range(4), [3, 3, 5, 5], 4, cfg=1.5))
    torch._dynamo.reset()


def test_512_uses_the_512_files(env, hub, tmp_path):
    hub.requests.clear()
    sample.main(['--class', '1', '--n', '1', '--steps', '2', '--device', 'cpu', '--resolution', '512',
                 '--autoguidance', '--out', str(tmp_path / 'x.png')])
    got = {p for p, _ in hub.requests}
    for path in [rae.RELEASED_DITS[512]['model'], rae.RELEASED_DITS[512]['guide'],
                 rae.RELEASED_DECODERS[('dinov2-b', 512)], rae.RELEASED_STATS[('dinov2-b', 512)]]:
        assert f'/{rae.HF_REPO}/resolve/main/{path}' in got
    assert Image.open(tmp_path / 'x.png').size == (20, 20)


@pytest.mark.parametrize('args, message', [
    (['--class', '10'], r'--class 10 is outside \[0, 9\]'),
    (['--class', '-1'], r'--class -1 is outside \[0, 999\]'),
    (['--class', '1', '1000'], r'--class 1000 is outside \[0, 999\]'),
    (['--resolution', '384'], 'released checkpoints exist for 256 and 512 px only'),
    (['--num-samples', '25', '--out', 'OUT/x.npz'], 'not a multiple of the 10 classes'),
    (['--out', '/nonexistent-dir/x.png'], 'cannot write'),
    (['--out', 'OUT/file.txt/x.png'], 'not a writable directory'),
    (['--num-samples', '20', '--out', 'OUT/x.png'], 'an .npz --out goes with --num-samples'),
    (['--cfg', '2', '--autoguidance'], 'either --cfg or --autoguidance'),
    (['--autoguidance', 'strong'], '--autoguidance expects a scale'),
    (['--unconditional', '--cfg', '3'], '--cfg needs class labels'),
    (['--guide', 'OUT/guide.pt'], '--guide is the AutoGuidance guide'),
    (['--num-samples', '20', '--class', '3', '--out', 'OUT/x.npz'], '--class does not go with --num-samples'),
    (['--ckpt', 'OUT/missing.pt'], 'not found'),
    (['--ckpt', 'OUT/wide.pt'], r'latents, but the RAE decodes .*another encoder or resolution'),
    (['--ckpt', 'OUT/bare.pt'], r'bare state dict .*name its preset'),
    (['--ckpt', 'OUT/decoder_ckpt.pt'], 'not a DiT checkpoint'),
    (['--cfg', 'nan'], 'finite scales'),
    (['--autoguidance', 'inf'], 'finite scales'),
    (['--cfg', '1.5', '--cfg-interval', '0.9', '0.1'], r'expected 0 <= T_MIN <= T_MAX <= 1'),
    (['--cfg', '1.5', '--cfg-interval', '0', '1.5'], r'expected 0 <= T_MIN <= T_MAX <= 1'),
    (['--ckpt', 'OUT/bare.pt', '--model', 'DiTDH-S'], r'do not fit this model'),
])
def test_bad_input_gives_one_line_errors(env, tmp_path, args, message):
    (tmp_path / 'file.txt').write_text('x')
    wide = dict(TINY_DDT, in_channels=8)
    torch.save(as_run(rae.DiTDH(**wide), wide), tmp_path / 'wide.pt')
    torch.save(rae.DiTDH(**TINY_DDT).state_dict(), tmp_path / 'bare.pt')
    torch.save({'ema': {}, 'config': TINY_DECODER_RUN}, tmp_path / 'decoder_ckpt.pt')  # a decoder_train.py one
    args = [a.replace('OUT', str(tmp_path)) for a in args] + ['--steps', '2', '--device', 'cpu']
    if '--out' not in args:
        args += ['--out', str(tmp_path / 'ok.png')]
    with pytest.raises(SystemExit) as e:
        sample.main(args)
    assert e.value.code.startswith('error: ') and '\n' not in e.value.code
    assert re.search(message, e.value.code), e.value.code


def test_error_from_the_command_line_is_one_line_on_stderr(env, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / 'sample.py'), '--class', '1000', '--device', 'cpu', '--steps', '2'],
                       env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == 'error: --class 1000 is outside [0, 999]'


def test_torchrun_ranks_share_the_work_and_give_the_single_process_result(env, tmp_path):
    args = ['--num-samples', '20', '--batch-size', '6', '--steps', '3', '--device', 'cpu', *FP32]
    sample.main(args + ['--out', str(tmp_path / 'one.npz')])
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(ROOT / 'sample.py'),
           *args, '--out', str(tmp_path / 'two.npz')]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = np.load(tmp_path / 'one.npz'), np.load(tmp_path / 'two.npz')
    assert np.array_equal(one['arr_1'], two['arr_1'])
    assert_images_match(two['arr_0'], one['arr_0'])
