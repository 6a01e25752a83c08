"""Training plumbing: config overrides, image folder, EMA, checkpoints and exact resume, DDP, LR schedules."""
import errno
import json
import math
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from PIL import Image

import runtime
import training
from training import (ImageFolder, configure, latest_checkpoint, list_checkpoints, load_checkpoint, lr_linear_decay,
                      lr_warmup_cosine, make_ema, make_loader, save_checkpoint, unwrap, update_ema)

# ----------------------------------------------------------------------------------------------------------
# Config

DEFAULTS = dict(lr=2e-4, epochs=80, compile=True, name='run', ckpt=None, betas=(0.9, 0.95), _private=1, os=os)


def test_config_file_then_cli_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'a.py').write_text('import math\n# a config file\nepochs = 160\nlr = 1e-4\n_per_gpu = 32\n'
                                   'name = f"e{epochs}-{_per_gpu}"\n')
    (tmp_path / 'b.py').write_text('epochs = epochs * 2\n')
    c = configure(DEFAULTS, ['a.py', '--epochs=7', 'b.py', '--lr=1', '--ckpt=/x/y.pt', '--betas=(0.5, 0.9)'])
    assert c == dict(lr=1.0, epochs=14, compile=True, name='e160-32', ckpt='/x/y.pt', betas=(0.5, 0.9))
    assert type(c['lr']) is float  # int -> float for a float default
    assert 'config: epochs = 160 (a.py)' in capsys.readouterr().out


def test_config_values_and_types(monkeypatch, capsys):
    assert configure(DEFAULTS, ['--name=a=b=c'])['name'] == 'a=b=c'  # split at the first '=' only
    assert configure(DEFAULTS, ['--name=001'])['name'] == '001'  # a str default keeps the raw text
    assert configure(DEFAULTS, ['--ckpt=3'])['ckpt'] == 3  # None default: anything goes
    assert configure(DEFAULTS, ['--compile=False'])['compile'] is False
    for bad, msg in [('--compile=1', "compile = 1 is a int, but its default True is a bool"),
                     ('--epochs=True', 'epochs = True is a bool'), ('--epochs=1.5', 'epochs = 1.5 is a float'),
                     ('--lr=abc', "lr = 'abc' is a str"), ('--betas=[1, 2]', 'is a list'),
                     ('--nope=1', "unknown config key 'nope'"), ('--_private=2', "unknown config key '_private'"),
                     ('--lr', '--lr: expected --key=value'), ('missing.py', 'config file missing.py not found')]:
        with pytest.raises(SystemExit, match=bad.split('=')[0] if 'unknown' in msg else None) as e:
            configure(DEFAULTS, [bad])
        assert msg in str(e.value) and '\n' not in str(e.value)
    monkeypatch.setenv('RANK', '1')  # other ranks print nothing
    capsys.readouterr()
    configure(DEFAULTS, ['--epochs=3'])
    assert capsys.readouterr().out == ''


def test_config_file_unknown_key_and_type(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'typo.py').write_text('epochs = 10\nepohcs = 20\n')
    with pytest.raises(SystemExit) as e:
        configure(DEFAULTS, ['typo.py'])
    assert str(e.value) == "typo.py: unknown config key 'epohcs' (not a default of this script)"
    (tmp_path / 'type.py').write_text('compile = 0\n')
    with pytest.raises(SystemExit, match=r"type.py: compile = 0 is a int, but its default True is a bool"):
        configure(DEFAULTS, ['type.py'])


# ----------------------------------------------------------------------------------------------------------
# Image folder

def write_folder(root, sizes=((40, 30), (30, 50)), classes=('b_dog', 'a_cat', 'c_eel'), fmt='PNG'):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for k, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f'{k}.{fmt.lower()}', fmt)
    return root


def test_folder_labels_sorted(tmp_path):
    root = write_folder(tmp_path / 'data')
    (root / 'a_cat' / 'notes.txt').write_text('not an image')
    Image.new('L', (20, 20), 7).save(root / 'c_eel' / 'x.JPEG')  # upper-case extension, greyscale
    ds = ImageFolder(str(root), 16)
    assert ds.classes == ['a_cat', 'b_dog', 'c_eel'] and len(ds) == 7
    assert [ds[i][1] for i in range(len(ds))] == [0, 0, 1, 1, 2, 2, 2]
    x, y = ds[6]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 2
    assert torch.allclose(x, torch.full_like(x, 7 / 255))  # grey -> RGB, /255
    assert str(ds.files[6]).endswith('x.JPEG')


def test_center_crop_matches_resize_math(tmp_path):
    # A 520x260 image, red = 2 * (x // 4) and green = 3 * (y // 4): constant on 4x4 blocks, so ADM's two BOX
    # halvings (260 -> 130 -> 65 < 2 * 64) are exact and leave the ramps 2u, 3v on the 130x65 image. The BICUBIC
    # resize to 128x64 (scale 64/65) reproduces a ramp away from the borders, and the centre crop keeps columns
    # 32..95: output pixel (r, c) samples u = (c + 32 + 0.5) * 65/64 - 0.5 and v = (r + 0.5) * 65/64 - 0.5.
    W, H, S = 520, 260, 64
    red = np.minimum(2 * (np.arange(W) // 4), 255)  # clips only at u >= 128, far outside the crop's support
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0], img[..., 1] = red[None, :], (3 * (np.arange(H) // 4))[:, None]
    os.makedirs(tmp_path / 'data' / 'c')
    Image.fromarray(img).save(tmp_path / 'data' / 'c' / 'ramp.png')
    x = ImageFolder(str(tmp_path / 'data'), S)[0][0].double() * 255
    assert x.shape == (3, S, S)
    src = lambda offset: (np.arange(S) + offset + 0.5) * 65 / 64 - 0.5
    inner = slice(3, S - 3)  # PIL renormalises the kernel at the image border, where a ramp bends
    err_r = (x[0, :, inner] - torch.tensor(2 * src(32)[inner])).abs()
    err_g = (x[1, inner, :].T - torch.tensor(3 * src(0)[inner])).abs()
    assert err_r.max() <= 0.55 and err_g.max() <= 0.55  # uint8 rounding only
    # one column further (a different crop offset) is >= 1.5 levels off everywhere; blue stays 0
    assert (x[0, :, inner] - torch.tensor(2 * src(33)[inner])).abs().min() > 1.4
    assert (x[2] == 0).all()


def test_flip_and_random_crop_reproducible(tmp_path):
    root = write_folder(tmp_path / 'data', sizes=((36, 24),), classes=('a',))
    plain = ImageFolder(str(root), 24)[0][0]
    flips = []
    for epoch in range(24):
        a = ImageFolder(str(root), 24, flip=True, seed=5)[(0, epoch)][0]
        b = ImageFolder(str(root), 24, flip=True, seed=5)[(0, epoch)][0]
        assert torch.equal(a, b)  # same (seed, epoch, index) -> same flip, in any process
        assert torch.equal(a, plain) or torch.equal(a, plain.flip(-1))
        flips.append(not torch.equal(a, plain))
        want = np.random.default_rng([5, epoch, 0]).random() < 0.5  # the documented draw
        assert flips[-1] == want
    assert 4 < sum(flips) < 20
    other = [not torch.equal(ImageFolder(str(root), 24, flip=True, seed=6)[(0, e)][0], plain) for e in range(24)]
    assert other != flips

    # stage 1: short side 16 -> 24 (36x24 -> 36x24 unchanged here: 1.5 * 16 = 24), then a random 16x16 window
    ref = np.array(Image.open(root / 'a' / '0.png').convert('RGB').resize((36, 24), Image.BICUBIC))
    seen = set()
    for epoch in range(30):
        x = ImageFolder(str(root), 16, crop='random', seed=1)[(0, epoch)][0]
        arr = (x * 255).round().byte().permute(1, 2, 0).numpy()
        hits = [(t, l) for t in range(9) for l in range(21) if np.array_equal(ref[t:t + 16, l:l + 16], arr)]
        rng = np.random.default_rng([1, epoch, 0])
        assert hits == [(rng.integers(0, 9), rng.integers(0, 21))]
        seen.add(hits[0])
    assert len(seen) > 20


def test_random_crop_resize_rounds_down(tmp_path):
    # 50x30 -> short side 24: long side int(24 * 50 / 30) = 40 (torchvision's Resize(int) floors)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    ref = np.array(img.resize((40, 24), Image.BICUBIC))
    arr = training.random_crop_arr(img, 16, np.random.default_rng(3))
    r = np.random.default_rng(3)
    t, l = r.integers(0, 9), r.integers(0, 25)
    assert np.array_equal(arr, ref[t:t + 16, l:l + 16])


def test_corrupt_images_skipped_and_counted(tmp_path):
    root = write_folder(tmp_path / 'data', sizes=((20, 20),) * 3, classes=('a', 'b'))
    (root / 'a' / '1.png').write_bytes(b'not a png at all')
    good = (root / 'b' / '0.png').read_bytes()
    (root / 'b' / '0.png').write_bytes(good[:len(good) // 2])  # truncated
    ds = ImageFolder(str(root), 16)
    (x1, y1), (x3, y3) = ds[1], ds[3]  # each replaced by the next image, deterministically
    assert torch.equal(x1, ds[2][0]) and y1 == 0 and torch.equal(x3, ds[4][0]) and y3 == 1
    assert ds.skipped == 2
    loader, sampler = make_loader(ds, 2, workers=2)  # counted across worker processes
    sampler.set_epoch(0)
    labels = torch.cat([y for _, y in loader])
    assert len(labels) == 6 and ds.skipped == 4
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    root = tmp_path / 'data' / 'a'
    root.mkdir(parents=True)
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(root / 'grey16.png')  # I;16 at half scale
    Image.fromarray(np.full((16, 16), 0.25, np.float32)).save(root / 'float.tiff')  # F in [0, 1]
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(root / 'rgb.png')
    ds = ImageFolder(str(tmp_path / 'data'), 16)
    means = {os.path.basename(f): ds[i][0].mean().item() for i, f in enumerate(ds.files)}
    assert means['grey16.png'] == pytest.approx(128 / 255, abs=1e-6)  # not 255: PIL's convert would clip
    assert means['float.tiff'] == pytest.approx(64 / 255, abs=1e-6)
    assert means['rgb.png'] == pytest.approx(200 / 255, abs=1e-6)


def test_empty_class_folders_warn_and_keep_their_labels(tmp_path, capsys):
    root = write_folder(tmp_path / 'data', classes=('a', 'c'))
    (root / 'b').mkdir()
    ds = ImageFolder(str(root), 16)
    assert ds.classes == ['a', 'b', 'c'] and sorted(set(ds.labels.tolist())) == [0, 2]
    out = capsys.readouterr().out
    assert 'empty class folders' in out and out.rstrip().endswith(': b')  # named, in one line


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(SystemExit, match='no such image folder'):
        ImageFolder(str(tmp_path / 'nope'), 16)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SystemExit, match=r'no images .* in .*/<class>/ or') as e:
        ImageFolder(str(tmp_path / 'empty'), 16)
    assert '\n' not in str(e.value)


def test_a_folder_without_class_folders_is_one_class(tmp_path):
    (tmp_path / 'flat').mkdir()
    for i, v in enumerate((10, 200)):  # unlabeled images: an unconditional model
        Image.new('RGB', (8, 8), (v, v, v)).save(tmp_path / 'flat' / f'{i}.png')
    ds = ImageFolder(str(tmp_path / 'flat'), 8)
    assert ds.classes == ['.'] and ds.labels.tolist() == [0, 0]
    assert [round(ds[i][0].mean().item() * 255) for i in range(2)] == [10, 200] and ds[1][1] == 0


def test_sampler_resumes_mid_epoch(tmp_path):
    ds = ImageFolder(str(write_folder(tmp_path / 'data', sizes=((8, 8),) * 5)), 8)  # 15 images
    loader, sampler = make_loader(ds, 2, rank=1, world_size=2, seed=3, workers=0)
    sampler.set_epoch(4)
    full = [y.tolist() for _, y in loader]
    sampler.set_epoch(4, start_batch=2)
    assert [y.tolist() for _, y in loader] == full[2:] and len(full) == 3 == len(loader) + 2
    g = torch.Generator().manual_seed(3 + 4)  # DistributedSampler's permutation, rank 1 of 2, 14 of 15 kept
    idx = torch.randperm(15, generator=g).tolist()[:14][1::2]
    assert sum(full, []) == [int(ds.labels[i]) for i in idx[:6]]
    with pytest.raises(SystemExit, match='15 images make no full batch of 8 on each of 2 ranks'):
        make_loader(ds, 8, rank=0, world_size=2)


# ----------------------------------------------------------------------------------------------------------
# EMA

def test_ema_closed_form():
    model = nn.Linear(1, 1).double()
    model.register_buffer('count', torch.zeros(()))
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema, d = make_ema(model), 0.9
    values = [1.0, -2.0, 5.0, 0.5]
    for k, v in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(v)
            model.count.fill_(k + 1)
        update_ema(ema, model, d)
    n = len(values)
    want = d ** n * 3.0 + sum((1 - d) * d ** (n - 1 - j) * v for j, v in enumerate(values))
    assert abs(ema.weight.item() - want) < 1e-12 and ema.count.item() == 4
    assert torch.equal(ema.bias, model.bias)  # a constant parameter stays put
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch.compile's import
def test_ema_is_a_separate_plain_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    compiled = torch.compile(model)  # never run: only the wrapper object matters here
    ema = make_ema(compiled)
    assert type(ema) is nn.Sequential and unwrap(compiled) is model
    x = torch.randn(3, 4)
    before = ema(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(ema(x), before) and not torch.equal(model(x), before)  # EMA runs its own weights
    # the reference's bug: a bound forward patched onto the instance is shared by deepcopy -> refused
    patched = nn.Linear(2, 2)
    patched.forward = lambda x: x
    with pytest.raises(ValueError, match='model.forward is patched'):
        make_ema(patched)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and exact resume

@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch.compile's import
def test_checkpoint_keep_latest_prefixes(tmp_path):
    model = nn.Linear(2, 3)
    wrapped = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters())
    d = str(tmp_path / 'ckpt')
    for step in (5, 10, 100, 1000, 20):
        save_checkpoint(d, step=step, epoch=1, batch=2, config={'lr': 1.0}, keep=3, model=wrapped, optimizer=opt,
                        extra=7)
    open(os.path.join(d, '9999999.pt.tmp'), 'w').close()
    open(os.path.join(d, 'ep-last.pt'), 'w').close()
    assert [s for s, _ in list_checkpoints(d)] == [20, 100, 1000]  # the last 3 by step, not by write time
    assert latest_checkpoint(d) == os.path.join(d, '0001000.pt')
    assert latest_checkpoint(str(tmp_path / 'none')) is None
    c = torch.load(latest_checkpoint(d), weights_only=True)
    assert sorted(c['model']) == ['bias', 'weight'] and c['extra'] == 7 and c['config'] == {'lr': 1.0}
    assert (c['step'], c['epoch'], c['batch']) == (1000, 1, 2) and 'state' in c['optimizer']
    save_checkpoint(d, step=1001, epoch=1, batch=2, config={}, keep=None, model=model)
    assert sorted(os.listdir(d)) == ['0000020.pt', '0000100.pt', '0001000.pt', '0001001.pt', 'ep-last.pt']


def test_checkpoint_atomic(tmp_path, monkeypatch):
    d = str(tmp_path)
    model = nn.Linear(2, 2)
    save_checkpoint(d, step=1, epoch=0, batch=1, config={}, model=model)
    good = torch.load(os.path.join(d, '0000001.pt'), weights_only=True)['model']

    def crash(obj, f):
        f.write(b'PK\x03\x04 half a checkpoint')
        raise KeyboardInterrupt  # killed mid-write
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(d, step=2, epoch=0, batch=2, config={}, model=nn.Linear(2, 2))
    monkeypatch.undo()
    assert latest_checkpoint(d) == os.path.join(d, '0000001.pt')
    assert torch.equal(load_checkpoint(latest_checkpoint(d))['model']['weight'], good['weight'])
    save_checkpoint(d, step=3, epoch=0, batch=3, config={}, model=model)
    assert sorted(os.listdir(d)) == ['0000001.pt', '0000003.pt']  # the stale temp file is gone


@pytest.mark.parametrize('damage', ['truncated', 'empty', 'random'])
def test_resume_moves_an_unreadable_newest_checkpoint_aside(tmp_path, damage, capsys):
    d = str(tmp_path)
    model = nn.Linear(2, 2)
    save_checkpoint(d, step=1, epoch=0, batch=1, config={'global_batch': 4}, model=model)
    save_checkpoint(d, step=2, epoch=0, batch=2, config={'global_batch': 4}, model=nn.Linear(2, 2))
    newest = os.path.join(d, '0000002.pt')
    data = open(newest, 'rb').read()
    bad = {'truncated': data[:len(data) // 2], 'empty': b'', 'random': os.urandom(len(data))}[damage]
    open(newest, 'wb').write(bad)
    fresh = nn.Linear(2, 2)
    c = training.resume(d, {'global_batch': 4}, model=fresh)
    assert c['step'] == 1 and torch.equal(fresh.weight, model.weight)  # the readable one before it
    assert open(newest + '.bad', 'rb').read() == bad and not os.path.exists(newest)  # kept, renamed, not deleted
    assert 'unreadable' in capsys.readouterr().out
    assert training.resume(str(tmp_path / 'none'), {}) is None


def test_resume_into_another_model_names_the_differing_keys(tmp_path):
    save_checkpoint(str(tmp_path), step=1, epoch=0, batch=1, config={'global_batch': 4, 'width': 2, 'lr': 1.0},
                    model=nn.Linear(2, 2))
    with pytest.raises(SystemExit) as e:
        training.resume(str(tmp_path), {'global_batch': 4, 'width': 3, 'lr': 1.0}, model=nn.Linear(3, 3))
    msg = str(e.value)
    assert 'does not fit this run' in msg and 'differ: width' in msg and '\n' not in msg


@pytest.mark.parametrize('error', [OSError(errno.ENOSPC, 'No space left on device'),
                                   RuntimeError('[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0'
                                                '\nPytorchStreamWriter failed writing file data/0: file write failed')])
def test_a_full_disk_keeps_the_old_checkpoints_and_says_so(tmp_path, monkeypatch, error):
    d = str(tmp_path)
    save_checkpoint(d, step=1, epoch=0, batch=1, config={}, model=nn.Linear(2, 2))

    def full(obj, f):
        f.write(b'PK\x03\x04 part of it')
        raise error
    monkeypatch.setattr(torch, 'save', full)
    with pytest.raises(SystemExit, match=r'^no space left on device while writing .*0000002\.pt'):
        save_checkpoint(d, step=2, epoch=0, batch=2, config={}, model=nn.Linear(2, 2))
    assert sorted(os.listdir(d)) == ['0000001.pt']  # the .tmp is gone, the previous checkpoint stays


def test_rng_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.rand(5), np.random.rand(3), random.random(), np.random.randn()  # a cached gaussian in numpy's state
    save_checkpoint(str(tmp_path), step=1, epoch=0, batch=0, config={})
    want = torch.rand(4), np.random.rand(4), np.random.randn(), [random.random() for _ in range(4)]
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    load_checkpoint(latest_checkpoint(str(tmp_path)))
    got = torch.rand(4), np.random.rand(4), np.random.randn(), [random.random() for _ in range(4)]
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2:] == want[2:]


def train(root, ckpt_dir, steps, save_at=None, resume=False, workers=2):
    """A tiny stage-2 style run (dropout draws from the global RNG, flips from the data seed): losses per step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(3 * 8 * 8, 3))
    ema = make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader, sampler = make_loader(ImageFolder(root, 8, flip=True, seed=4), 2, seed=4, workers=workers)
    step = epoch = batch = 0
    if resume:
        torch.manual_seed(123)  # whatever happened before: the checkpoint's RNG must win
        c = load_checkpoint(latest_checkpoint(ckpt_dir), model=model, ema=ema, optimizer=opt)
        step, epoch, batch = c['step'], c['epoch'], c['batch']
    losses = {}
    for epoch in range(epoch, 100):
        sampler.set_epoch(epoch, start_batch=batch)
        for batch, (x, y) in enumerate(loader, start=batch + 1):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_ema(ema, model, 0.9)
            step += 1
            losses[step] = loss.item()
            if step == save_at:
                save_checkpoint(ckpt_dir, step=step, epoch=epoch, batch=batch, config={}, model=model, ema=ema,
                                optimizer=opt)
            if step == steps:
                return losses, model, ema
        batch = 0


def test_exact_resume(tmp_path):
    root = str(write_folder(tmp_path / 'data', sizes=((8, 8), (9, 8), (8, 10))))  # 9 images: 4 batches/epoch
    d = str(tmp_path / 'ckpt')
    full, model, ema = train(root, d, steps=13, save_at=6)
    assert len(set(full.values())) == 13
    for save_at in (6, 8):  # mid-epoch, and exactly at the end of an epoch
        train(root, d, steps=save_at, save_at=save_at, workers=0)
        resumed, model2, ema2 = train(root, d, steps=13, resume=True)
        assert min(resumed) == save_at + 1
        assert all(resumed[s] == full[s] for s in resumed)  # bit-exact
        assert all(torch.equal(a, b) for a, b in zip(model2.state_dict().values(), model.state_dict().values()))
        assert all(torch.equal(a, b) for a, b in zip(ema2.state_dict().values(), ema.state_dict().values()))


# ----------------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes == 1 process with the same global batch

def ddp_run(rank, world, port, root, out):
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR='127.0.0.1',
                          MASTER_PORT=str(port))
    torch.set_num_threads(1)
    r, local_rank, world_size, device, is_master = runtime.setup_ddp('cpu')
    assert (r, local_rank, world_size, device.type, is_master) == (rank, rank, world, 'cpu', rank == 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader, sampler = make_loader(ImageFolder(root, 8, flip=True, seed=2), 4 // world, rank, world, seed=2, workers=0)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.manual_seed(100 + rank)
    save_checkpoint(os.path.join(out, 'ckpt'), step=1, epoch=2, batch=0, config={}, model=ddp)
    after_save = torch.rand(3)
    torch.manual_seed(7)
    load_checkpoint(os.path.join(out, 'ckpt', '0000001.pt'))  # each rank gets its own stream back
    torch.save({'model': model.state_dict(), 'rng_ok': torch.equal(torch.rand(3), after_save)},
               os.path.join(out, f'rank{rank}.pt'))
    runtime.cleanup_ddp()


def test_ddp_two_processes_match_one(tmp_path):
    root = str(write_folder(tmp_path / 'data', sizes=((8, 8), (9, 8), (8, 10), (10, 10))))  # 12 images: 3 steps/epoch
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    os.makedirs(tmp_path / 'two'), os.makedirs(tmp_path / 'one')
    mp.spawn(ddp_run, args=(2, port, root, str(tmp_path / 'two')), nprocs=2)
    ddp_run(0, 1, None, root, str(tmp_path / 'one'))
    one = torch.load(tmp_path / 'one' / 'rank0.pt')
    two = [torch.load(tmp_path / 'two' / f'rank{r}.pt') for r in range(2)]
    for k, v in one['model'].items():
        assert torch.allclose(two[0]['model'][k], v, atol=1e-6) and torch.equal(two[0]['model'][k], two[1]['model'][k])
    assert one['rng_ok'] and two[0]['rng_ok'] and two[1]['rng_ok']
    c = torch.load(tmp_path / 'two' / 'ckpt' / '0000001.pt', weights_only=True)
    assert sorted(c['model']) == ['1.bias', '1.weight']  # saved through DDP, no 'module.' prefix
    assert len(c['rng']) == 2 and not torch.equal(c['rng'][0]['torch'], c['rng'][1]['torch'])
    assert torch.equal(c['rng'][1]['torch'], torch.manual_seed(101).get_state())


# ----------------------------------------------------------------------------------------------------------
# LR schedules and the run log

def test_lr_linear_decay():
    f = lambda s: lr_linear_decay(s, 2e-4, 2e-5, decay_start=10, decay_end=20)
    for step, want in [(0, 2e-4), (10, 2e-4), (11, 1.82e-4), (15, 1.1e-4), (20, 2e-5), (500, 2e-5)]:
        assert math.isclose(f(step), want, rel_tol=1e-12), step
    # the paper's recipe: 40 epochs constant then down to epoch 800, 1251 steps/epoch
    assert math.isclose(lr_linear_decay(420 * 1251, 2e-4, 2e-5, 40 * 1251, 800 * 1251), 1.1e-4, rel_tol=1e-12)


def test_lr_warmup_cosine():
    f = lambda s: lr_warmup_cosine(s, 2e-4, 2e-5, warmup=10, decay_end=30)
    for step, want in [(0, 2e-5), (4, 1e-4), (9, 2e-4), (10, 2e-4), (15, 2e-5 + 0.9e-4 * (1 + math.sqrt(0.5))),
                       (20, 1.1e-4), (25, 2e-5 + 0.9e-4 * (1 - math.sqrt(0.5))), (30, 2e-5), (99, 2e-5)]:
        assert math.isclose(f(step), want, rel_tol=1e-12), step


def test_log_header(tmp_path, monkeypatch):
    log = training.start_log(str(tmp_path / 'run'), {'lr': 0.1, 'name': 'x'}, 'cpu')
    log('step 1 loss 0.5')
    text = (tmp_path / 'run' / 'log.txt').read_text().splitlines()
    assert text[0].startswith('# git ') and text[1] == f'# torch {torch.__version__}, 1 x ' + text[1].split(' x ')[1]
    assert text[3:] == ["lr = 0.1", "name = 'x'", 'step 1 loss 0.5']
    (tmp_path / 'cfg.py').write_text('\n'.join(text[:5]))  # the header is itself a config file
    monkeypatch.chdir(tmp_path)
    assert configure({'lr': 1.0, 'name': 'y'}, ['cfg.py']) == {'lr': 0.1, 'name': 'x'}
    monkeypatch.setenv('RANK', '1')
    training.start_log(str(tmp_path / 'other'), {}, 'cpu')('hidden')
    assert not (tmp_path / 'other').exists()


HUNG_RANK = '''
import sys, time, torch.distributed as dist
sys.path.insert(0, {repo!r})
import runtime
rank, *_ = runtime.setup_ddp('cpu', timeout_minutes=0.05)
if rank == 1:
    time.sleep(120)  # alive, but never reaches the barrier
dist.barrier()
print('passed the barrier', flush=True)
'''


def test_a_hung_rank_ends_the_job_after_the_timeout(tmp_path):
    """setup_ddp's timeout reaches init_process_group: rank 0 gives up on the stuck rank 1 after 3 s with a timeout
    error and torchrun ends the job, long before rank 1 would wake."""
    import subprocess
    import sys
    import time
    path = tmp_path / 'hung.py'
    path.write_text(HUNG_RANK.format(repo=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    start = time.monotonic()
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(path)],
                       capture_output=True, text=True, timeout=100, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode != 0 and 'passed the barrier' not in r.stdout
    assert 'Timed out' in r.stderr and time.monotonic() - start < 90


def rank0_first_run(rank, port, local_ranks, out):
    """One rank of a 2-process job whose ranks have the given LOCAL_RANKs: (0, 1) one node, (0, 0) two nodes."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_ranks[rank]), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    import time
    runtime.setup_ddp('cpu')
    with runtime.rank0_first():
        start = time.monotonic()
        time.sleep(1.0)  # a download
        end = time.monotonic()
    with open(os.path.join(out, f'{rank}.txt'), 'w') as f:
        f.write(f'{start} {end}')
    runtime.cleanup_ddp()


@pytest.mark.parametrize('local_ranks, overlap', [((0, 1), False), ((0, 0), True)])
def test_rank0_first_runs_local_rank_0_of_every_node_first(tmp_path, local_ranks, overlap):
    """On one node rank 1 enters after rank 0 left; on two nodes (both local rank 0) both fill their own node's
    cache at once, and the barriers still pair up (no hang)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(rank0_first_run, args=(port, local_ranks, str(tmp_path)), nprocs=2)
    (s0, e0), (s1, e1) = [map(float, (tmp_path / f'{r}.txt').read_text().split()) for r in range(2)]
    assert (s1 < e0) == overlap


# ----------------------------------------------------------------------------------------------------------
# Metrics: metrics.jsonl, loss.png, wandb

def test_metrics_jsonl_resume_drops_later_records_and_plot_follows_the_loss(tmp_path):
    m = training.Metrics(str(tmp_path), {})
    for step in range(1, 7):
        m.log(step, loss=torch.tensor(1.0 / step), lr=1e-4, epoch=0)
    m.log(6, FID=12.5)
    with open(tmp_path / 'metrics.jsonl', 'a') as f:
        f.write('{"step": 7, "loss"')  # a line cut short by a crash
    m = training.Metrics(str(tmp_path), {}, step=4)  # resumed from the checkpoint of step 4
    lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(x)['step'] for x in lines] == [1, 2, 3, 4]
    assert json.loads(lines[1]) == {'step': 2, 'loss': 0.5, 'lr': 1e-4, 'epoch': 0}
    m.log(5, loss=0.2, lr=1e-4)
    m.plot()
    im = np.array(Image.open(tmp_path / 'loss.png'))
    red = (im[..., 0] > 150) & (im[..., 1] < 80) & (im[..., 2] < 80)
    rows, cols = np.nonzero(red[25:-40, 40:-40])  # inside the axes box, below the legend
    assert rows[cols.argmin()] < rows[cols.argmax()]  # a falling loss: high at the first step, low at the last


def test_metrics_off_rank_0_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv('RANK', '1')
    m = training.Metrics(str(tmp_path / 'run'), {})
    m.log(1, loss=1.0)
    m.plot()
    assert not (tmp_path / 'run').exists()


def test_wandb_is_imported_only_when_asked_and_a_restart_resumes_the_run(tmp_path, monkeypatch):
    import sys
    import types
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(('log', step, values))

    fake = types.ModuleType('wandb')
    fake.init = lambda **kw: calls.append(('init', kw)) or Run()
    fake.Image = lambda path: ('image', path)
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    training.Metrics(str(tmp_path / 'plain'), {}).log(1, loss=1.0)
    assert calls == []  # wandb_log=False: never touched
    config = {'lr': 1e-4}
    m = training.Metrics(str(tmp_path), config, wandb_log=True, wandb_project='p', wandb_run_name='r')
    m.log(3, loss=0.5)
    m.image('samples', 'grid.png', 3)
    training.Metrics(str(tmp_path), config, step=3, wandb_log=True, wandb_project='p', wandb_run_name='r')
    inits = [c[1] for c in calls if c[0] == 'init']
    assert len(inits) == 2 and inits[0]['id'] == inits[1]['id'] and inits[0]['resume'] == 'allow'
    assert inits[0]['project'] == 'p' and inits[0]['name'] == 'r' and inits[0]['config'] == config
    assert ('log', 3, {'step': 3, 'loss': 0.5}) in calls and ('log', 3, {'samples': ('image', 'grid.png')}) in calls


def test_step_flops_equal_the_analytic_count():
    """The counter on the model's own code against bench/bench_train.py's count from the layer sizes (a separate
    derivation): forward FLOPs = 2 x MACs exactly; a training step is just under 3 forwards (x_t needs no input
    gradient in the patch embeddings)."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))
    import bench_train
    for name in ('DiTDH-S', 'LightningDiT-S'):
        dit = bench_train.meta_dit(name)
        forward = training.step_flops(dit, forward_only=True)
        assert forward == 2 * bench_train.analytic_forward_macs(name)
        assert 2.9 < training.step_flops(dit) / forward < 3
