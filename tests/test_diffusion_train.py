"""diffusion_train.py end to end on a toy set: DDP == 1 process, accumulation == a doubled batch, SIGKILL + resume ==
an uninterrupted run (bit-exact), latent cache == encoding on the fly, statistics == numpy, config errors, and a tiny
run whose loss falls and whose checkpoint samples what its own preview grid shows."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import diffusion_train as dt
import rae
import runtime
import sample
from training import ImageFolder, configure

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / 'configs' / 'tiny.py')
OVERRIDES = dict(width=32, depth=2, heads=2, patch=4, pos_grid=8, input_size=32)  # as configs/tiny.py


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """4 classes x 8 toy images (32-47 px), a tiny random DINOv2 in the hub layout (.safetensors when the package is
    there: the hand-written reader then loads it) and a random decoder."""
    d = tmp_path_factory.mktemp('toy')
    enc = str(d / 'encoder.pt')
    dt.make_toy(str(d / 'images'), enc, str(d / 'decoder.pt'), 32, 'dinov2-b', OVERRIDES, num_classes=4, per_class=8)
    try:
        from safetensors.torch import save_file
        save_file(torch.load(enc), str(d / 'encoder.safetensors'))
        enc = str(d / 'encoder.safetensors')
    except ImportError:
        pass
    return dict(data_path=str(d / 'images'), encoder_weights=enc, decoder=str(d / 'decoder.pt'))


def args(toy, out, **kw):
    """configs/tiny.py on the toy set: 32 images, batch 16 -> 2 steps an epoch; fp32, whatever 'auto' would choose
    on this CPU (the numbers the tests compare)."""
    kw = {**toy, **dict(out_dir=str(out), toy=False, num_classes=4, sample_classes=(0, 1, 2, 3), log_every=1,
                        sample_every=0, ckpt_every=1000, precision='fp32'), **kw}
    return [TINY] + [f'--{k}={v!r}' for k, v in kw.items()]


@pytest.fixture(autouse=True)
def one_thread():
    """Runs in this process use one thread, like the subprocesses (OMP_NUM_THREADS=1): fast on a busy machine, and
    the same kernels, so the same bits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(argv):
    dt.main(argv)


def losses(out):
    """{step: loss} from out/log.txt; a step logged twice (a run resumed before its last log) keeps the later line."""
    text = (Path(out) / 'log.txt').read_text()
    return {int(s): float(v) for s, v in re.findall(r'^step (\d+)/\d+ .*?\| loss ([0-9.]+)', text, re.M)}


def final_state(out):
    path = sorted((Path(out) / 'checkpoints').glob('*.pt'))[-1]
    return torch.load(path, weights_only=True)


def assert_close_states(a, b, atol):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


# ----------------------------------------------------------------------------------------------------------
# Config through the script

def test_config_errors_and_types(toy, tmp_path):
    with pytest.raises(SystemExit, match="unknown config key 'learning_rate'"):
        run(args(toy, tmp_path, learning_rate=1e-3))
    bad = tmp_path / 'bad.py'
    bad.write_text('lr = 1e-3\nwarmup_epochs = 5\n')  # a misspelt or foreign key in a file is an error too
    with pytest.raises(SystemExit, match="unknown config key 'warmup_epochs'"):
        run([TINY, str(bad)])
    with pytest.raises(SystemExit, match='global_batch.*is a float'):
        run(args(toy, tmp_path, global_batch=16.0))
    with pytest.raises(SystemExit, match='not divisible'):
        run(args(toy, tmp_path, global_batch=15, grad_accum=2))
    with pytest.raises(SystemExit, match="mode='eval'"):
        run(args(toy, tmp_path, mode='eval'))
    with pytest.raises(SystemExit, match='^error: weights file not found: .*nope.pt$'):
        run(args(toy, tmp_path, decoder=str(tmp_path / 'nope.pt')))
    run(args(toy, tmp_path / 'b16', max_steps=1))
    with pytest.raises(SystemExit, match='trained with global_batch=16, not 8'):  # its data position means other images
        run(args(toy, tmp_path / 'b16', max_steps=2, global_batch=8))
    with pytest.raises(SystemExit, match='num_classes=3, but the data has 4 classes'):
        run(args(toy, tmp_path, num_classes=3, sample_classes=(0,)))
    with pytest.raises(SystemExit, match='nothing to train: .* at step 1 of 1'):  # a finished run, started again
        run(args(toy, tmp_path / 'b16', max_steps=1))
    for bad, message in [(dict(max_steps='abc'), "max_steps='abc': expected int"), (dict(max_steps=-5), 'must be > 0'),
                         (dict(epochs=0), 'epochs=0: must be > 0'), (dict(global_batch=0), 'global_batch=0: must be'),
                         (dict(grad_accum=0), 'grad_accum=0: must be > 0'), (dict(lr=-1.0), 'lr=-1.0: must be > 0'),
                         (dict(ema_decay=2.0), r'ema_decay=2.0: must be in \[0, 1\)'),
                         (dict(model='DiTDH', hidden_size=64), r'hidden_size=64: .*\(backbone, head\) pairs')]:
        with pytest.raises(SystemExit, match=message) as e:  # one line, before any work
            run(args(toy, tmp_path / 'bad', **bad))
        assert '\n' not in str(e.value)
    c = configure(dt._DEFAULTS, [TINY, '--lr=1', '--max_steps=7', '--hidden_size=None'])
    assert c['lr'] == 1.0 and type(c['lr']) is float  # int -> float allowed
    assert c['max_steps'] == 7 and c['hidden_size'] is None and c['depth'] == (2, 1)  # None defaults take values
    defaults = configure(dt._DEFAULTS, [])
    assert defaults['model'] == 'DiTDH-XL' and not set(defaults) & set(vars(rae))  # true defaults, no imports


def test_precision_auto_asks_the_hardware_and_the_log_says_why(toy, tmp_path, monkeypatch):
    """'auto': bf16 autocast on CPUs with bf16 units (AMX, AVX512-BF16) and CUDA GPUs of compute capability >= 8,
    fp32 elsewhere; 'bf16' and 'fp32' force. The line after the log's header says what was chosen and why."""
    monkeypatch.setattr(runtime.platform, 'machine', lambda: 'x86_64')
    for probe in ('_is_amx_tile_supported', '_is_avx512_bf16_supported'):
        monkeypatch.setattr(torch.cpu, probe, lambda: False)
    assert runtime.choose_precision('auto', 'cpu') == (
        None, "fp32 (precision='auto': this CPU has no bf16 units (AVX512-BF16 or AMX): bf16 would be emulated)")
    assert runtime.choose_precision('bf16', 'cpu') == (torch.bfloat16, "bf16 autocast (precision='bf16')")
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: True)
    assert runtime.choose_precision('auto', 'cpu') == (
        torch.bfloat16, "bf16 autocast (precision='auto': this CPU has bf16 units (AVX512-BF16))")
    assert runtime.choose_precision('fp32', 'cpu') == (None, "fp32 (precision='fp32')")
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device: 'GPU')  # the GPU rule, without a GPU
    for capability, dtype in [((7, 0), None), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)]:
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device, c=capability: c)
        assert runtime.choose_precision('auto', 'cuda')[0] is dtype, capability
    assert runtime.choose_precision('auto', 'cuda')[1] == \
        "bf16 autocast (precision='auto': GPU (compute capability 9.0) has bf16 tensor cores)"
    run(args(toy, tmp_path, max_steps=1, precision='auto'))
    lines = (tmp_path / 'log.txt').read_text().splitlines()
    first = next(line for line in lines if not line.startswith('#') and ' = ' not in line)  # after the header
    assert first == "precision: bf16 autocast (precision='auto': this CPU has bf16 units (AVX512-BF16))"


def test_grad_checkpoint_changes_no_number(toy, tmp_path):
    """grad_checkpoint=True recomputes every block in backward: the same losses and weights, bit for bit on a CPU."""
    run(args(toy, tmp_path / 'plain', max_steps=2))
    run(args(toy, tmp_path / 'ckpt', max_steps=2, grad_checkpoint=True))
    assert losses(tmp_path / 'ckpt') == losses(tmp_path / 'plain')
    a, b = final_state(tmp_path / 'plain'), final_state(tmp_path / 'ckpt')
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


# ----------------------------------------------------------------------------------------------------------
# Statistics and the cache

def test_merge_moments_is_exact():
    z = torch.randn(37, 3, 2, 2, dtype=torch.float64) * 5 + 100  # a large mean: no cancellation allowed
    acc = (0, 0.0, 0.0)
    for part in z.split([1, 7, 0, 20, 9]):
        acc = dt.merge_moments(acc, dt.moments(part) if len(part) else (0, 0.0, 0.0))
    n, mean, m2 = acc
    assert n == 37
    np.testing.assert_allclose(mean.numpy(), z.numpy().mean(0), rtol=1e-13)
    np.testing.assert_allclose((m2 / n).numpy(), z.numpy().var(0), rtol=1e-10)


def encode_all(toy):
    """Raw latents of every toy image and its mirror, encoded here, one image at a time, in float64 numpy."""
    model = rae.RAE.from_pretrained('dinov2-b', 32, toy['decoder'], stats=False, encoder_weights=toy['encoder_weights'],
                                    encoder_overrides=OVERRIDES)
    data = ImageFolder(toy['data_path'], 32)
    z = [model.encode(torch.stack([x, x.flip(-1)])) for x, _ in (data[i] for i in range(len(data)))]
    return torch.cat(z).double().numpy(), data


def test_statistics_equal_numpy(toy, tmp_path):
    run(args(toy, tmp_path / 'a', mode='stats'))
    run(args(toy, tmp_path / 'b', mode='stats', stats_mean=False, global_batch=4))
    z, _ = encode_all(toy)  # [64, 32, 8, 8]
    a = torch.load(tmp_path / 'a' / 'stat.pt')
    assert a['mean'].shape == a['var'].shape == (32, 8, 8) and a['var'].dtype == torch.float32
    np.testing.assert_allclose(a['mean'].numpy(), z.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a['var'].numpy(), z.var(0), rtol=1e-5)
    b = torch.load(tmp_path / 'b' / 'stat.pt')
    assert b['mean'] is None and torch.allclose(b['var'], a['var'], rtol=1e-6)  # other batch size, same answer
    mean, var = rae.load_stats(tmp_path / 'b' / 'stat.pt')  # the released loader reads the variance-only file
    assert mean is None and torch.equal(var, b['var'])


def test_cache_gives_the_losses_of_encoding_on_the_fly(toy, tmp_path):
    cache = tmp_path / 'cache'
    run(args(toy, tmp_path / 'c', mode='cache', latent_cache=str(cache), cache_dtype='float32'))
    latents, labels = np.load(cache / 'latents.npy'), np.load(cache / 'labels.npy')
    z, data = encode_all(toy)
    assert latents.shape == (32, 2, 32, 8, 8) and labels.tolist() == data.labels.tolist()
    np.testing.assert_allclose(latents.reshape(64, 32, 8, 8), z, rtol=1e-5, atol=1e-5)
    run(args(toy, tmp_path / 'fly', max_steps=5))  # 2.5 epochs: both flips drawn
    run(args(toy, tmp_path / 'cached', max_steps=5, latent_cache=str(cache)))
    fly, cached = losses(tmp_path / 'fly'), losses(tmp_path / 'cached')
    assert sorted(fly) == [1, 2, 3, 4, 5]
    assert cached == fly  # as logged (6 decimals); the weights agree bit for bit here, allow for other BLAS
    assert_close_states(final_state(tmp_path / 'fly')['model'], final_state(tmp_path / 'cached')['model'], 1e-6)


# ----------------------------------------------------------------------------------------------------------
# The batch split: accumulation and DDP give the numbers of one big batch

def test_gradient_accumulation_equals_the_doubled_batch(toy, tmp_path):
    run(args(toy, tmp_path / 'one', max_steps=4))
    run(args(toy, tmp_path / 'two', max_steps=4, grad_accum=2))
    one, two = losses(tmp_path / 'one'), losses(tmp_path / 'two')
    assert all(two[s] == pytest.approx(one[s], rel=1e-6) for s in one)
    assert_close_states(final_state(tmp_path / 'one')['model'], final_state(tmp_path / 'two')['model'], 2e-6)
    assert_close_states(final_state(tmp_path / 'one')['ema'], final_state(tmp_path / 'two')['ema'], 2e-6)
    run(args(toy, tmp_path / 'switch', max_steps=2))  # stopped after step 2, resumed with accumulation
    run(args(toy, tmp_path / 'switch', max_steps=4, grad_accum=2))
    assert all(losses(tmp_path / 'switch')[s] == pytest.approx(one[s], rel=1e-6) for s in one)
    assert_close_states(final_state(tmp_path / 'one')['model'], final_state(tmp_path / 'switch')['model'], 2e-6)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def ddp_worker(rank, world, port, argv):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dt.main(argv)


def test_ddp_two_processes_equal_one(toy, tmp_path):
    mp.spawn(ddp_worker, args=(2, free_port(), args(toy, tmp_path / 'two', max_steps=4)), nprocs=2)
    run(args(toy, tmp_path / 'one', max_steps=4))
    one, two = losses(tmp_path / 'one'), losses(tmp_path / 'two')
    assert sorted(two) == [1, 2, 3, 4] and all(two[s] == pytest.approx(one[s], rel=1e-6) for s in one)
    a, b = final_state(tmp_path / 'one'), final_state(tmp_path / 'two')
    assert_close_states(a['model'], b['model'], 2e-6)
    assert len(b['rng']) == 2 and not any(k.startswith(('module.', '_orig_mod.')) for k in b['model'])


def test_ddp_statistics_and_cache_equal_one_process(toy, tmp_path):
    """The float64 moments merged across ranks and the cache rows each rank writes into the shared file."""
    two = args(toy, tmp_path / 'two', mode='stats', global_batch=4)  # 16 images a rank, 2 each a forward
    mp.spawn(ddp_worker, args=(2, free_port(), two), nprocs=2)
    run(args(toy, tmp_path / 'one', mode='stats', global_batch=4))
    a, b = torch.load(tmp_path / 'one' / 'stat.pt'), torch.load(tmp_path / 'two' / 'stat.pt')
    torch.testing.assert_close(b['mean'], a['mean'], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b['var'], a['var'], rtol=1e-6, atol=0)
    cache = args(toy, tmp_path / 'two', mode='cache', latent_cache=str(tmp_path / 'two_cache'), cache_dtype='float32')
    mp.spawn(ddp_worker, args=(2, free_port(), cache), nprocs=2)
    run(args(toy, tmp_path / 'one', mode='cache', latent_cache=str(tmp_path / 'one_cache'), cache_dtype='float32'))
    for name in ('latents.npy', 'labels.npy'):
        np.testing.assert_allclose(np.load(tmp_path / 'two_cache' / name), np.load(tmp_path / 'one_cache' / name),
                                   rtol=1e-6, atol=1e-6, err_msg=name)
    assert not (tmp_path / 'two_cache' / 'latents.npy.tmp').exists()


# ----------------------------------------------------------------------------------------------------------
# Online FID: the logged number is the FID of the documented EMA samples

def test_online_fid_scores_the_ema_samples(toy, tmp_path, monkeypatch):
    import fid
    monkeypatch.setenv('RAE_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(dt, '_FID', {})
    torch.manual_seed(0)
    inception = fid.InceptionV3()  # random weights under the cache name of the pytorch-fid file: no download
    weights = tmp_path / 'cache' / urlparse(fid.INCEPTION_URL).path.lstrip('/')
    weights.parent.mkdir(parents=True)
    torch.save(inception.state_dict(), weights)
    ref = {'mu': np.random.default_rng(0).normal(size=2048), 'sigma': np.eye(2048) * 0.1}
    np.savez(tmp_path / 'ref.npz', **ref)
    out = tmp_path / 'run'
    run(args(toy, out, max_steps=2, fid_every=2, fid_samples=6, fid_reference=str(tmp_path / 'ref.npz')))
    logged = float(re.search(r'^step 2 \| FID ([0-9.]+) \(6 EMA samples', (out / 'log.txt').read_text(), re.M)[1])

    # the samples, as online_fid documents them: a generator seeded by (seed of (global_seed, step), rank), per batch
    # of 16 (the micro-batch) labels then noise, 25 unguided Euler steps, decoded, rounded to 8 bits
    ema = rae.load_dit(out / 'checkpoints' / '0000002.pt')
    decoder = rae.RAE.from_pretrained('dinov2-b', 32, toy['decoder'], stats=False, load_encoder=False)
    g = torch.Generator().manual_seed(dt.seed_of(dt.seed_of(0, 2), 0))
    y, noise = torch.randint(4, (6,), generator=g), torch.randn(6, 32, 8, 8, generator=g)
    with torch.no_grad():
        z = rae.sample_ode(rae.guided_velocity(ema, y), noise, 25, rae.shift_alpha((32, 8, 8)))
        images = (decoder.decode(z).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        pool3 = inception.eval()(images.permute(0, 3, 1, 2))[0].double().numpy()
    # closed form for a reference covariance c I: Tr sqrtm(S c I) = sqrt(c) * sum of sqrt(eigenvalues of S)
    mu, sigma = pool3.mean(0), np.cov(pool3, rowvar=False)
    lam = np.linalg.eigvalsh(sigma).clip(min=0)
    expected = ((mu - ref['mu']) ** 2).sum() + np.trace(sigma) + 0.1 * 2048 - 2 * np.sqrt(0.1) * np.sqrt(lam).sum()
    assert logged == pytest.approx(expected, abs=2e-3, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# SIGKILL mid-run, resume: the same losses and weights as a run that was never stopped, bit for bit

def test_kill_and_resume_is_bit_exact(toy, tmp_path):
    steps = 30
    run(args(toy, tmp_path / 'full', max_steps=steps, ckpt_every=5))
    out = tmp_path / 'killed'
    cmd = [sys.executable, str(ROOT / 'diffusion_train.py')] + args(toy, out, max_steps=steps, ckpt_every=5)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not list((out / 'checkpoints').glob('*.pt')) and p.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    assert p.returncode == -signal.SIGKILL
    saved = sorted(int(f.stem) for f in (out / 'checkpoints').glob('*.pt'))
    assert saved and saved[-1] < steps, saved  # it really died mid-run
    run(args(toy, out, max_steps=steps, ckpt_every=5))  # starts from the newest checkpoint by itself
    text = (out / 'log.txt').read_text()
    assert f'resumed from {out / "checkpoints" / f"{saved[-1]:07d}.pt"}: step {saved[-1]}' in text
    full, resumed = losses(tmp_path / 'full'), losses(out)
    assert sorted(resumed) == list(range(1, steps + 1)) and resumed == full
    # metrics.jsonl: the records after the resumed checkpoint were dropped, so the curve goes on without duplicates
    records = [[json.loads(line) for line in (d / 'metrics.jsonl').read_text().splitlines()]
               for d in (tmp_path / 'full', out)]
    assert [r['step'] for r in records[1]] == [r['step'] for r in records[0]] == list(range(1, steps + 1))
    assert [r['loss'] for r in records[1]] == [r['loss'] for r in records[0]]
    assert (out / 'loss.png').is_file()
    a, b = final_state(tmp_path / 'full'), final_state(out)
    for key in ('model', 'ema'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert all(torch.equal(x, y) for s in a['optimizer']['state'] for x, y in
               zip(a['optimizer']['state'][s].values(), b['optimizer']['state'][s].values()))


# ----------------------------------------------------------------------------------------------------------
# A tiny run end to end, then its checkpoint sampled outside the training script

def test_tiny_run_learns_and_its_checkpoint_samples(toy, tmp_path):
    out = tmp_path / 'run'
    run(args(toy, out, max_steps=150, log_every=25, sample_every=150, ckpt_every=150, lr_decay_start=1000,
             lr_decay_end=1000))
    log = losses(out)
    # x and eps are unit-scale: predicting v = 0 costs ~2, the best v independent of x_t ~1.6 (step 25); below
    # that the model has to know the images (32 of them, memorisable)
    assert log[25] > 1.4 and log[150] < 1.15 and list(log.values()) == sorted(log.values(), reverse=True), log
    ckpt = final_state(out)
    assert ckpt['step'] == 150 and ckpt['config']['max_steps'] == 150
    assert not all(torch.equal(ckpt['ema'][k], ckpt['model'][k]) for k in ckpt['model'])  # EMA is its own weights
    ema = rae.load_dit(out / 'checkpoints' / '0000150.pt')  # the 'ema' entry, sized from its shapes
    assert isinstance(ema, rae.DiTDH) and ema.x_embedder.proj.out_channels == 128 and ema.num_classes == 4
    decoder = rae.RAE.from_pretrained('dinov2-b', 32, toy['decoder'], stats=False, load_encoder=False)
    y = torch.arange(4)
    noise = torch.randn(4, 32, 8, 8, generator=torch.Generator().manual_seed(0))  # the preview grid's noise
    alpha = rae.shift_alpha((32, 8, 8))
    with torch.no_grad():
        z = rae.sample_ode(lambda x, t: ema(x, t, y), noise, num_steps=25, alpha=alpha)
        images = decoder.decode(z).clamp(0, 1)
    grid = np.asarray(Image.open(out / 'samples' / '0000150.png'))  # 4 a row, 2 px of padding around each
    ours = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert grid.shape == (2 + 34, 2 + 4 * 34, 3)
    for i in range(4):
        assert np.abs(grid[2:34, 2 + 34 * i:34 * (i + 1)].astype(int) - ours[i]).max() <= 1, i

    # sample.py --ckpt: the decoder, statistics (none) and shift come from the checkpoint's config; sample i has
    # the noise of generator seed i (--seed 0), the grid pads each 32 px image with 2 px
    sample.main(['--ckpt', str(out / 'checkpoints' / '0000150.pt'), '--class', '0', '1', '2', '3', '--n', '1',
                 '--steps', '25', '--out', str(tmp_path / 'grid.png'), '--device', 'cpu', '--precision', 'fp32'])
    noise = torch.stack([torch.randn(32, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    with torch.no_grad():
        z = rae.sample_ode(lambda x, t: ema(x, t, y), noise, num_steps=25, alpha=alpha)
        images = (decoder.decode(z).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.asarray(Image.open(tmp_path / 'grid.png'))
    assert grid.shape == (2 + 4 * 34, 2 + 34, 3)  # --n 1: one sample of each class per row
    for i in range(4):
        assert np.abs(grid[2 + 34 * i:34 * (i + 1), 2:34].astype(int) - images[i]).max() <= 1, i


@pytest.mark.slow
def test_compiled_run_matches_eager_and_saves_plain_state(toy, tmp_path):
    run(args(toy, tmp_path / 'eager', max_steps=3))
    run(args(toy, tmp_path / 'compiled', max_steps=3, compile=True))  # ~1-2 minutes of compilation on a CPU
    eager, compiled = losses(tmp_path / 'eager'), losses(tmp_path / 'compiled')
    assert all(compiled[s] == pytest.approx(eager[s], rel=1e-4) for s in eager)
    a, b = final_state(tmp_path / 'eager'), final_state(tmp_path / 'compiled')
    assert list(a['model']) == list(b['model']) == list(b['ema'])  # no '_orig_mod.' anywhere
    assert_close_states(a['ema'], b['ema'], 1e-4)  # the EMA of the compiled run averaged the trained weights
