"""README's "Train on your own images", command by command, on a tiny folder of unlabeled images: a decoder, the
latent statistics, the latent cache, an unconditional DiT, sample.py --ckpt (no --class, and AutoGuidance with an
earlier checkpoint of the same run), fid.py against statistics written from the same folder. Tiny random-weight
encoders and a random Inception stand in for the published weights (no network)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import fid

ROOT = Path(__file__).resolve().parents[1]


def python(*args, cwd):
    r = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_own_images_from_a_folder_to_a_fid(tmp_path):
    mine = tmp_path / 'mine'  # no class sub-folders: one class, an unconditional model
    mine.mkdir()
    rng = np.random.default_rng(0)
    for i in range(32):  # a bright square on a dark ground, at random places: something to learn
        img = np.full((40, 40, 3), 30, np.uint8)
        y, x = rng.integers(0, 24, size=2)
        img[y:y + 16, x:x + 16] = (220, 180, 60)
        Image.fromarray(img).save(mine / f'{i:02d}.png')
    toy = tmp_path / 'weights'
    enc = f'--encoder_weights={toy}/dinov2.pt'
    overrides = "--encoder_overrides={'width': 32, 'depth': 2, 'heads': 2, 'pos_grid': 4}"

    # 1. a decoder for the encoder's tokens (toy=True: random-weight encoder, discriminator and LPIPS files)
    python(ROOT / 'decoder_train.py', ROOT / 'configs' / 'decoder_tiny.py', f'--out_dir={tmp_path}/dec',
           f'--data_path={mine}', f'--val_path={mine}', enc, f'--disc_weights={toy}/dino_s8.pt',
           f"--lpips_weights=('{toy}/vgg16.pt', '{toy}/lpips.pt')", '--epochs=2', '--precision=fp32', cwd=tmp_path)
    decoder = f'--decoder={tmp_path}/dec/checkpoints/0000008.pt'  # 32 images / batch 8 x 2 epochs
    assert 'PSNR' in (tmp_path / 'dec' / 'log.txt').read_text()
    stage2 = [ROOT / 'diffusion_train.py', ROOT / 'configs' / 'tiny.py', f'--out_dir={tmp_path}/dit',
              f'--data_path={mine}', enc, "--encoder='dinov2-b'", overrides, decoder, '--toy=False',
              '--num_classes=1', '--sample_classes=(0,)', '--precision=fp32']
    # 2. the latent statistics of these images, 3. the latent cache
    python(*stage2, '--mode=stats', cwd=tmp_path)
    stats = torch.load(tmp_path / 'dit' / 'stat.pt')
    assert stats['var'].shape == (32, 4, 4) and (stats['var'] > 0).all()
    stats_arg = f'--stats={tmp_path}/dit/stat.pt'
    python(*stage2, stats_arg, '--mode=cache', f'--latent_cache={tmp_path}/cache', cwd=tmp_path)
    assert np.load(tmp_path / 'cache' / 'latents.npy', mmap_mode='r').shape == (32, 2, 32, 4, 4)
    # 4. the DiT, from the cache
    python(*stage2, stats_arg, f'--latent_cache={tmp_path}/cache', '--max_steps=120', '--ckpt_every=40',
           '--log_every=20', '--sample_every=0', cwd=tmp_path)
    records = [json.loads(line) for line in (tmp_path / 'dit' / 'metrics.jsonl').read_text().splitlines()]
    losses = [r['loss'] for r in records if 'loss' in r]
    assert len(losses) == 6 and losses[-1] < losses[0], losses  # it learns
    ckpt = tmp_path / 'dit' / 'checkpoints'
    # 5. samples: a grid without --class, an .npz for FID, AutoGuidance with the run's step-40 checkpoint as guide
    # (the checkpoint's run config brings its RAE: the decoder, the statistics, the encoder file)
    sample = [ROOT / 'sample.py', '--ckpt', ckpt / '0000120.pt', '--steps', '8', '--device', 'cpu',
              '--precision', 'fp32']
    r = python(*sample, '--n', '4', '--out', tmp_path / 'grid.png', cwd=tmp_path)
    assert 'class 0' in r.stdout and Image.open(tmp_path / 'grid.png').size == (4 * 32 + 5 * 2, 32 + 2 * 2)
    python(*sample, '--num-samples', '16', '--batch-size', '8', '--out', tmp_path / 'samples.npz', '--guide',
           ckpt / '0000040.pt', '--autoguidance', '1.5', cwd=tmp_path)
    with np.load(tmp_path / 'samples.npz') as f:
        assert f['arr_0'].shape == (16, 32, 32, 3) and f['arr_1'].tolist() == [0] * 16
    # 6. FID against statistics of the same folder (random Inception weights: the pipeline, not the number)
    torch.manual_seed(0)
    torch.save(fid.InceptionV3().state_dict(), tmp_path / 'inception.pt')
    weights = ['--weights', tmp_path / 'inception.pt', '--device', 'cpu', '--no-pr']
    python(ROOT / 'fid.py', '--write-ref', tmp_path / 'ref.npz', mine, '--image-size', '32', *weights, cwd=tmp_path)
    r = python(ROOT / 'fid.py', tmp_path / 'samples.npz', tmp_path / 'ref.npz', *weights, cwd=tmp_path)
    assert 'FID' in r.stdout
