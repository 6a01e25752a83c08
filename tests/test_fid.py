"""Tests for fid.py: the TF1 resize, the hand-written Inception against torch-fidelity's golden outputs, and the
metrics against the ADM evaluator's golden values, closed forms and constructed cases. CPU, no network."""
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fid  # noqa: E402
from files import center_crop_arr  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[2] / 'shared' / 'reference' / 'golden'


def golden(name):
    if not (GOLDEN / name).exists():
        pytest.skip(f'golden file {name} not available')
    return torch.load(GOLDEN / name)


def rel(a, b):
    """Max-abs deviation relative to the reference's max-abs value."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max()).item()


def random_inception(seed=0):
    """Inception with O(1) activations (the golden files' recipe, drawn from torch's RNG)."""
    g = torch.Generator().manual_seed(seed)
    m = fid.InceptionV3()
    sd = {}
    for k, v in m.state_dict().items():
        u = torch.rand(v.shape, generator=g, dtype=torch.float64)
        if k.endswith('num_batches_tracked'):
            continue
        if k.endswith('conv.weight'):
            w = (2 * u - 1) * (6 / v[0].numel()) ** 0.5
        elif k.endswith('bn.weight'):
            w = 1 + 0.2 * (2 * u - 1)
        elif k.endswith('running_var'):
            w = 0.5 + u
        elif k == 'fc.weight':
            w = 0.02 * (2 * u - 1)
        else:
            w = 0.2 * (2 * u - 1)
        sd[k] = w.float()
    return m.load_weights(sd)


@pytest.fixture(scope='module')
def model():
    return random_inception()


@pytest.fixture(scope='module')
def golden_model():
    """The golden files' random Inception, rebuilt from the recipe in fid_inception_tfcompat.pt."""
    d = golden('fid_inception_tfcompat.pt')
    shapes = {k: v.shape for k, v in fid.InceptionV3().state_dict().items()}
    sd = {}
    for i, k in enumerate(d['weight_keys']):
        u = np.random.RandomState(zlib.crc32(k.encode('ascii'))).random_sample(tuple(shapes[k]))
        if k.endswith('conv.weight'):
            w = (2 * u - 1) * np.sqrt(6 / np.prod(shapes[k][1:]))
        elif k == 'fc.weight':
            w = 0.02 * (2 * u - 1)
        elif k == 'fc.bias':
            w = 0.1 * (2 * u - 1)
        elif k.endswith('bn.weight'):
            w = 1 + 0.2 * (2 * u - 1)
        elif k.endswith('running_var'):
            w = 0.5 + u
        else:  # bn.bias, running_mean
            w = 0.2 * (2 * u - 1)
        w = torch.from_numpy(w.astype(np.float32))
        # the checksums fail if a shape of ours is wrong: the draws would not line up
        assert abs(w.double().sum().item() - d['weight_sum_f64'][i].item()) < 1e-12 * w.numel(), k
        assert abs((w.double() ** 2).sum().item() / d['weight_sumsq_f64'][i].item() - 1) < 1e-13, k
        assert torch.equal(w.flatten()[:8], d['weight_first8'][i]), k
        sd[k] = w
    return fid.InceptionV3().load_weights(sd)  # 472 keys: our loader fills the BatchNorm step counters


# -----------------------------------------------------------------------------------------------------------
# TF1 resize

def numpy_tf1_resize(img, size):
    """The TF1 legacy bilinear rule written directly, pixel row by row, in float32."""
    img = img.astype(np.float32)
    h, w = img.shape
    out = np.zeros((size, size), np.float32)
    sy, sx = np.float32(h) / np.float32(size), np.float32(w) / np.float32(size)
    for i in range(size):
        fy = np.float32(i) * sy
        y0 = int(np.floor(fy))
        y1, wy = min(int(np.ceil(fy)), h - 1), np.float32(fy - np.floor(fy))
        fx = np.arange(size, dtype=np.float32) * sx
        x0 = np.floor(fx).astype(int)
        x1, wx = np.minimum(np.ceil(fx).astype(int), w - 1), (fx - np.floor(fx)).astype(np.float32)
        top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * wx
        bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * wx
        out[i] = top + (bottom - top) * wy
    return out


@pytest.mark.parametrize('n', [256, 512])
def test_tf1_resize_matches_numpy_rule(n):
    img = np.random.RandomState(n).randint(0, 256, (n, n)).astype(np.uint8)
    ours = fid.tf1_resize(torch.from_numpy(img)[None, None].float())[0, 0].numpy()
    assert np.array_equal(ours, numpy_tf1_resize(img, 299))
    # PyTorch's half-pixel bilinear is a different image: this is why the resize is written out
    torch_resize = F.interpolate(torch.from_numpy(img)[None, None].float(), size=(299, 299), mode='bilinear',
                                 align_corners=False)[0, 0].numpy()
    assert np.abs(torch_resize - ours).max() > 10


def test_tf1_resize_hand_checked():
    # 2 -> 3: src = 0, 2/3, 4/3 -> taps (0), (0,1 at 2/3), (1, clamped); values checked by hand
    x = torch.tensor([[0., 3.], [6., 9.]])[None, None]
    out = fid.tf1_resize(x, size=3)[0, 0]
    assert torch.allclose(out, torch.tensor([[0., 2., 3.], [4., 6., 7.], [6., 8., 9.]]), atol=1e-5)
    y = torch.rand(1, 3, 299, 299) * 255
    assert torch.equal(fid.tf1_resize(y), y)  # 299 in: the identity


# -----------------------------------------------------------------------------------------------------------
# The network against torch-fidelity's TF-compatible Inception (golden, random weights)

def test_inception_golden_tfcompat(golden_model):
    d = golden('fid_inception_tfcompat.pt')
    for r in (256, 512, 64):
        images = d[f'images_{r}']
        assert torch.equal(fid.tf1_resize(images.float()), d[f'resized_{r}'])  # bit-exact
        with torch.no_grad():
            pool3, spatial = golden_model(images)
            logits = golden_model.logits(pool3)
        assert rel(pool3, d[f'pool3_{r}']) < 1e-4
        assert rel(logits, d[f'logits_unbiased_{r}']) < 1e-4
        assert rel(spatial, d[f'spatial_2023_{r}']) < 1e-4
        assert rel(logits + golden_model.fc.bias, d[f'logits_{r}']) < 1e-4


def test_inception_golden_structured(golden_model):
    d = golden('fid_inception_structured.pt')
    with torch.no_grad():
        pool3, spatial = golden_model(d['images'])
        assert rel(pool3, d['pool3']) < 1e-4
        assert rel(golden_model.logits(pool3), d['logits_unbiased']) < 1e-4
        assert rel(spatial, d['spatial_2023']) < 1e-4
        m64 = fid.InceptionV3().load_weights(golden_model.state_dict()).double()
        pool3, spatial = m64(d['images'])
        assert pool3.dtype == torch.float64
        assert rel(pool3, d['pool3_f64']) < 1e-6
        assert rel(m64.logits(pool3), d['logits_unbiased_f64']) < 1e-6
        assert rel(spatial, d['spatial_2023_f64']) < 1e-6


def published_inception_layout():
    """{key: shape} of pt_inception-2015-12-05-6726825d.pth as the spec lists it: 94 BasicConv2d x 6 + fc."""
    convs = [('Conv2d_1a_3x3', 3, 32, 3, 3), ('Conv2d_2a_3x3', 32, 32, 3, 3), ('Conv2d_2b_3x3', 32, 64, 3, 3),
             ('Conv2d_3b_1x1', 64, 80, 1, 1), ('Conv2d_4a_3x3', 80, 192, 3, 3)]
    for m, c, pool in (('Mixed_5b', 192, 32), ('Mixed_5c', 256, 64), ('Mixed_5d', 288, 64)):
        convs += [(f'{m}.branch1x1', c, 64, 1, 1), (f'{m}.branch5x5_1', c, 48, 1, 1),
                  (f'{m}.branch5x5_2', 48, 64, 5, 5),
                  (f'{m}.branch3x3dbl_1', c, 64, 1, 1), (f'{m}.branch3x3dbl_2', 64, 96, 3, 3),
                  (f'{m}.branch3x3dbl_3', 96, 96, 3, 3), (f'{m}.branch_pool', c, pool, 1, 1)]
    convs += [('Mixed_6a.branch3x3', 288, 384, 3, 3), ('Mixed_6a.branch3x3dbl_1', 288, 64, 1, 1),
              ('Mixed_6a.branch3x3dbl_2', 64, 96, 3, 3), ('Mixed_6a.branch3x3dbl_3', 96, 96, 3, 3)]
    for m, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
        convs += [(f'{m}.branch1x1', 768, 192, 1, 1), (f'{m}.branch7x7_1', 768, c7, 1, 1),
                  (f'{m}.branch7x7_2', c7, c7, 1, 7), (f'{m}.branch7x7_3', c7, 192, 7, 1),
                  (f'{m}.branch7x7dbl_1', 768, c7, 1, 1), (f'{m}.branch7x7dbl_2', c7, c7, 7, 1),
                  (f'{m}.branch7x7dbl_3', c7, c7, 1, 7), (f'{m}.branch7x7dbl_4', c7, c7, 7, 1),
                  (f'{m}.branch7x7dbl_5', c7, 192, 1, 7), (f'{m}.branch_pool', 768, 192, 1, 1)]
    convs += [('Mixed_7a.branch3x3_1', 768, 192, 1, 1), ('Mixed_7a.branch3x3_2', 192, 320, 3, 3),
              ('Mixed_7a.branch7x7x3_1', 768, 192, 1, 1), ('Mixed_7a.branch7x7x3_2', 192, 192, 1, 7),
              ('Mixed_7a.branch7x7x3_3', 192, 192, 7, 1), ('Mixed_7a.branch7x7x3_4', 192, 192, 3, 3)]
    for m, c in (('Mixed_7b', 1280), ('Mixed_7c', 2048)):
        convs += [(f'{m}.branch1x1', c, 320, 1, 1), (f'{m}.branch3x3_1', c, 384, 1, 1),
                  (f'{m}.branch3x3_2a', 384, 384, 1, 3), (f'{m}.branch3x3_2b', 384, 384, 3, 1),
                  (f'{m}.branch3x3dbl_1', c, 448, 1, 1), (f'{m}.branch3x3dbl_2', 448, 384, 3, 3),
                  (f'{m}.branch3x3dbl_3a', 384, 384, 1, 3), (f'{m}.branch3x3dbl_3b', 384, 384, 3, 1),
                  (f'{m}.branch_pool', c, 192, 1, 1)]
    layout = {}
    for p, cin, cout, kh, kw in convs:
        layout[f'{p}.conv.weight'] = (cout, cin, kh, kw)
        for s in ('weight', 'bias', 'running_mean', 'running_var'):
            layout[f'{p}.bn.{s}'] = (cout,)
        layout[f'{p}.bn.num_batches_tracked'] = ()
    layout['fc.weight'], layout['fc.bias'] = (1008, 2048), (1008,)
    return layout


def test_published_state_dict_loads_strictly(tmp_path):
    layout = published_inception_layout()
    assert len(layout) == 566
    ours = fid.InceptionV3().state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == layout
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.rand(s, generator=g) if s else torch.tensor(0)) for k, s in layout.items()}
    fid.InceptionV3().load_state_dict(sd, strict=True)
    torch.save(sd, tmp_path / 'pt_inception.pth')
    m = fid.InceptionV3.from_pretrained(tmp_path / 'pt_inception.pth')  # the file route, no network
    assert torch.equal(m.Mixed_7c.branch_pool.conv.weight, sd['Mixed_7c.branch_pool.conv.weight'])
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    if (GOLDEN / 'fid_inception_tfcompat.pt').exists():  # torch-fidelity's order = pytorch-fid's minus counters
        keys = [k for k in ours if not k.endswith('num_batches_tracked')]
        assert keys == golden('fid_inception_tfcompat.pt')['weight_keys']
    bad = dict(sd, **{'fc.weight': torch.zeros(1000, 2048)})
    with pytest.raises(ValueError, match='fc.weight has shape'):
        fid.InceptionV3().load_weights(bad)


def test_sfid_feature_order_is_hwc():
    c, h, w = torch.meshgrid(torch.arange(192), torch.arange(17), torch.arange(17), indexing='ij')
    fmap = (c * 10000 + h * 100 + w).float()[None].repeat(2, 1, 1, 1)
    f = fid.sfid_features(fmap)
    assert f.shape == (2, 2023)
    for (hh, ww, cc) in [(0, 0, 0), (0, 0, 6), (0, 1, 0), (3, 5, 2), (16, 16, 6)]:
        assert f[1, (hh * 17 + ww) * 7 + cc] == cc * 10000 + hh * 100 + ww


# -----------------------------------------------------------------------------------------------------------
# Fréchet distance

def random_spd(d, rng):
    a = rng.randn(d, 2 * d)
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def fd_symmetric_eig(mu1, s1, mu2, s2):
    """Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)): an independent, symmetric route."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(r @ s2 @ r)
    return (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum()


def test_frechet_distance_against_eigen_route():
    rng = np.random.RandomState(0)
    for d in (2, 17, 64):
        mu1, mu2, s1, s2 = rng.randn(d), rng.randn(d), random_spd(d, rng), random_spd(d, rng)
        fd = fid.frechet_distance(mu1, s1, mu2, s2)
        assert abs(fd - fd_symmetric_eig(mu1, s1, mu2, s2)) <= 1e-6 * abs(fd)
        assert abs(fd - fid.frechet_distance(mu2, s2, mu1, s1)) <= 1e-9 * abs(fd)  # symmetric
        assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9                # zero for identical stats
    # 1-d closed form: (m1 - m2)^2 + (sd1 - sd2)^2
    assert abs(fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) - (4 + 1)) < 1e-12


def test_frechet_distance_rejects_large_imaginary_part():
    with pytest.raises(ValueError, match='imaginary'):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, 1.0]), np.zeros(2), np.diag([-1.0, 1.0]))


def feature_stats(x, chunk=300):
    s = fid.FeatureStats()
    for i in range(0, len(x), chunk):
        s.update(torch.from_numpy(x[i:i + chunk]))
    return s.mu_sigma()


def u_s(s, shape):
    return np.random.RandomState(s).random_sample(shape)


@pytest.fixture(scope='module')
def full_rank_stats():
    """ADM's full-rank 2048-d case (N > d, condition ~33): features regenerated, statistics streamed."""
    e = golden('fid_metrics_adm_extra.pt')
    a = 1.5 * u_s(7, (4096, 2048))
    b = u_s(8, (5000, 2048))
    b[:, 1:] = b[:, 1:] + 0.3 * b[:, :-1]
    b = b * (0.9 + 0.2 * u_s(9, (2048,))) + 0.05
    assert a.sum() == e['full_sum_a'].item() and b.sum() == e['full_sum_b'].item()
    return e, feature_stats(a), feature_stats(b)


def test_fid_golden_full_rank_statistics(full_rank_stats):
    e, (mu_a, sig_a), (mu_b, sig_b) = full_rank_stats
    assert np.allclose(mu_a, e['full_mu_a'].numpy(), rtol=0, atol=1e-13)
    assert np.allclose(mu_b, e['full_mu_b'].numpy(), rtol=0, atol=1e-13)
    assert np.allclose(sig_a[:8, :8], e['full_sig_a_tl'].numpy(), rtol=0, atol=1e-14)
    assert np.allclose(sig_b[:8, :8], e['full_sig_b_tl'].numpy(), rtol=0, atol=1e-14)
    assert abs(np.trace(sig_a) / e['full_tr_a'].item() - 1) < 1e-13
    assert abs(np.trace(sig_b) / e['full_tr_b'].item() - 1) < 1e-13


@pytest.mark.slow  # one 2048-d sqrtm: 15-50 s on two shared cores
def test_fid_golden_full_rank(full_rank_stats):
    e, (mu_a, sig_a), (mu_b, sig_b) = full_rank_stats
    fd = fid.frechet_distance(mu_a, sig_a, mu_b, sig_b)
    assert abs(fd / e['full_fd_ab'].item() - 1) < 1e-10


@pytest.mark.slow
def test_fid_golden_rank_deficient():
    d = golden('fid_metrics_adm.pt')
    a = 2 * u_s(1, (1000, 2048))
    b = 2 * u_s(2, (1200, 2048)) * (0.8 + 0.4 * u_s(3, (2048,))) + 0.1
    b[:, 1:] = b[:, 1:] + 0.5 * b[:, :-1]
    assert a.sum() == d['fid_feats_a_sum'].item() and b.sum() == d['fid_feats_b_sum'].item()
    (mu_a, sig_a), (mu_b, sig_b) = feature_stats(a), feature_stats(b)
    assert np.allclose(mu_b, d['fid_mu_b'].numpy(), rtol=0, atol=1e-13)
    assert abs(np.trace(sig_b) / d['fid_trace_sigma_b'].item() - 1) < 1e-13
    assert abs(fid.frechet_distance(mu_a, sig_a, mu_b, sig_b) / d['fd_ab'].item() - 1) < 1e-6


def test_fid_golden_sqrtm_eps_fallback(monkeypatch):
    e = golden('fid_metrics_adm_extra.pt')
    (mu_a, sig_a), (mu_b, sig_b) = feature_stats(e['eps_feats_a'].numpy()), feature_stats(e['eps_feats_b'].numpy())
    # Whether sqrtm of this exactly singular product comes out non-finite depends on the LAPACK build: on the
    # evaluator's machine it did (36 non-finite entries) and the 1e-6 I fallback fired; elsewhere it may not.
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
        first_finite = np.isfinite(scipy.linalg.sqrtm(sig_a @ sig_b)).all()
    fd = fid.frechet_distance(mu_a, sig_a, mu_b, sig_b)
    expected = e['eps_fd_exact_eigvals'] if first_finite else e['eps_fd_ab']
    # a finite sqrtm of a singular product is as accurate as the LAPACK build makes it (2.7e-9 relative seen with
    # scipy 1.17.1's OpenBLAS); the eps retry is well conditioned and matches the evaluator to 1e-9
    assert abs(fd - expected.item()) < (1e-8 * expected.item() if first_finite else 1e-9)
    # replay the evaluator's outcome: the first sqrtm non-finite -> eps added to both covariances, one retry
    calls, real = [], fid._sqrtm

    def first_fails(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real(m)
    monkeypatch.setattr(fid, '_sqrtm', first_fails)
    with pytest.warns(UserWarning, match='singular product'):
        fd = fid.frechet_distance(mu_a, sig_a, mu_b, sig_b)
    assert len(calls) == 2 and np.allclose(calls[1], (sig_a + 1e-6 * np.eye(6)) @ (sig_b + 1e-6 * np.eye(6)))
    assert abs(fd - e['eps_fd_ab'].item()) < 1e-9


# -----------------------------------------------------------------------------------------------------------
# Inception Score

def test_inception_score_golden():
    d = golden('fid_metrics_adm.pt')
    logits = 4 * (2 * u_s(4, (10000, 1008)) - 1) + 3 * u_s(5, (1008,))
    logits[np.arange(10000), (7 * np.arange(10000)) % 1008] += 6 + 4 * u_s(6, (10000,))
    logits = logits.astype(np.float32)
    assert np.array_equal(logits[:2], d['is_logits_rows01'].numpy())
    assert abs(fid.inception_score(logits) / d['is_softmax_f32'].item() - 1) < 1e-6
    per_split = [fid.inception_score(logits[i:i + 5000]) for i in (0, 5000)]
    assert np.allclose(per_split, d['is_split_scores_f32'].numpy(), rtol=1e-6, atol=0)


def test_inception_score_closed_forms():
    row = torch.randn(1008)
    assert abs(fid.inception_score(row.repeat(100, 1)) - 1) < 1e-6  # p(y|x) = p(y): KL 0
    k = 10
    onehot = 50 * F.one_hot(torch.arange(1000) % k, 1008).float()  # K classes, equally likely, confident
    assert abs(fid.inception_score(onehot) / k - 1) < 1e-5
    # consecutive splits of 5000, no shuffle, mean over splits: a 1-class split and a 4-class split
    labels = torch.cat([torch.zeros(5000, dtype=torch.long), torch.arange(5000) % 4])
    assert abs(fid.inception_score(50 * F.one_hot(labels, 1008).float()) - (1 + 4) / 2) < 1e-4


# -----------------------------------------------------------------------------------------------------------
# Precision / recall

def test_precision_recall_golden_robust_set():
    e = golden('fid_metrics_adm_extra.pt')
    ref, samples = e['pr_ref_feats'], e['pr_sample_feats']
    expected = (e['pr_precision'].item(), e['pr_recall'].item())
    assert fid.precision_recall(ref, samples) == expected                       # exact
    assert fid.precision_recall(ref, samples, block=20) == expected             # ADM's blocking, smaller
    assert fid.precision_recall(16 * ref, 16 * samples) == expected             # every block takes fp32
    assert fid.precision_recall(ref, samples, k=2) == (e['pr_k2_precision'].item(), e['pr_k2_recall'].item())
    assert fid.precision_recall(ref, samples, k=4) == (e['pr_k4_precision'].item(), e['pr_k4_recall'].item())
    assert (fid.manifold_radii(ref) - e['pr_radii_ref_f16_ideal'][:, 0]).abs().max() <= 0.5
    assert (fid.manifold_radii(samples) - e['pr_radii_sample_f16_ideal'][:, 0]).abs().max() <= 0.5
    assert (fid.manifold_radii(16 * ref) / 256 - e['pr_radii_ref_f32'][:, 0]).abs().max() <= 1e-3


def test_precision_recall_fp16_path_and_fallback_old_set():
    # The older set sits on decision boundaries (not a pass/fail P/R test, see golden/README); its radii still
    # tell which arithmetic ran: fp16 values on the plain set, fp32 ones once x12 overflows fp16.
    d = golden('fid_metrics_adm.pt')
    ref = d['pr_ref_feats']
    assert (fid.manifold_radii(ref) - d['pr_fp16_radii_ref'][:, 0]).abs().max() <= 0.5
    assert (fid.manifold_radii(ref).half().float() == fid.manifold_radii(ref)).all()  # fp16 values
    r12 = fid.manifold_radii(12 * ref)
    assert ((r12 - d['pr_fp32fallback_radii_ref'][:, 0]).abs() / r12).max() < 1e-4


def test_precision_recall_constructed():
    # reference: 20 points on a line, spacing 1 (k=3 radius^2: 4 inside, 9 at the ends); samples: 10 between
    # reference points 0..10 and 10 on a parallel line 40 away. Precision = 10/20. Recall: reference points
    # 0..12 are inside a near sample's ball (12: 2.5^2 = 6.25 <= 9 from the end sample at 9.5), 13..19 not.
    ref = torch.zeros(20, 16)
    ref[:, 0] = torch.arange(20)
    samples = torch.zeros(20, 16)
    samples[:10, 0] = torch.arange(10) + 0.5
    samples[10:, 0], samples[10:, 1] = torch.arange(10), 40
    assert fid.precision_recall(ref, samples) == (0.5, 0.65)
    assert fid.precision_recall(ref, samples, block=7) == (0.5, 0.65)
    assert fid.manifold_radii(ref)[[0, 1, 10, 19]].tolist() == [9, 4, 4, 9]
    assert fid.precision_recall(ref, ref) == (1.0, 1.0)


# -----------------------------------------------------------------------------------------------------------
# Streaming inputs, reference files, bad inputs

def save_pngs(folder, images):
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f'{i:03d}.png')


def test_unreadable_reference_images_are_skipped_counted_and_named(model, tmp_path, capsys):
    rng = np.random.RandomState(4)
    raw = [rng.randint(0, 256, (36, 40, 3)).astype(np.uint8) for _ in range(5)]
    save_pngs(tmp_path / 'val', raw)
    bad = tmp_path / 'val' / '001.png'
    bad.write_bytes(bad.read_bytes()[:60])  # truncated by a copy
    out = fid.write_reference(tmp_path / 'val', tmp_path / 'ref.npz', 32, keep_images=5, model=model,
                              batch_size=2, workers=0, progress=False)
    err = capsys.readouterr().err
    assert '001.png is unreadable' in err and '1 unreadable images skipped' in err
    crops = np.stack([np.array(center_crop_arr(Image.fromarray(raw[i]), 32)) for i in (0, 2, 3, 4)])
    with torch.no_grad():
        p = model(torch.from_numpy(crops).permute(0, 3, 1, 2))[0]
    with np.load(out) as f:
        assert np.array_equal(f['arr_0'], crops)  # the four readable images, in folder order
        assert np.allclose(f['mu'], p.double().mean(0).numpy(), rtol=0, atol=1e-5 * p.abs().max().item())
    assert sorted(q.name for q in tmp_path.iterdir()) == ['ref.npz', 'val']  # no .part, no temporary images


def test_streaming_equals_in_memory(model, tmp_path):
    images = np.random.RandomState(0).randint(0, 256, (3, 40, 40, 3)).astype(np.uint8)
    np.savez(tmp_path / 's.npz', arr_0=images, arr_1=np.arange(3))
    src = fid.open_images(tmp_path / 's.npz')
    assert len(src) == 3
    captured = []
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        pool3, stats, stats_s = fid.extract_features(model, src.batches(2), len(src), progress=False)  # 2 + 1
    finally:
        hook.remove()
    spatial_stream = torch.cat([fid.sfid_features(c) for c in captured])
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):  # must have no effect inside
        p, s = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert p.dtype == torch.float32
    assert rel(pool3, p) < 1e-5 and rel(spatial_stream, s) < 1e-5
    for (mu, sigma), feats in ((stats.mu_sigma(), p), (stats_s.mu_sigma(), s)):
        f = feats.double().numpy()
        assert np.abs(mu - f.mean(0)).max() <= 1e-5 * np.abs(f).max()
        assert np.abs(sigma - np.cov(f, rowvar=False)).max() <= 1e-5 * np.abs(np.cov(f, rowvar=False)).max()
    save_pngs(tmp_path / 'folder', images)  # the same images as a folder of PNGs: the same batches
    folder = fid.open_images(tmp_path / 'folder', workers=0)
    assert len(folder) == 3
    for got, want in zip(folder.batches(2), src.batches(2), strict=True):
        assert got.dtype == np.uint8 and np.array_equal(got, want)
    compressed = tmp_path / 'c.npz'
    np.savez_compressed(compressed, arr_0=images)
    assert np.array_equal(np.concatenate(list(fid.open_images(compressed).batches(2))), images)


def test_feature_stats_match_numpy():
    x = np.random.RandomState(1).randn(500, 7) * 3 + 100  # a large mean: centring must keep the covariance
    mu, sigma = feature_stats(x, chunk=64)
    assert np.abs(mu - x.mean(0)).max() < 1e-12
    assert np.abs(sigma - np.cov(x, rowvar=False)).max() < 1e-10


def test_named_reference_downloads_from_adm(monkeypatch, tmp_path):
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    urls = []
    monkeypatch.setattr(fid, 'download', lambda url: urls.append(url) or str(tmp_path / 'ref.npz'))
    ref = fid.load_reference('imagenet512')
    assert urls == ['https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/512/'
                    'VIRTUAL_imagenet512.npz']
    assert ref['sigma'].dtype == np.float64 and ref['images'] is None
    fid.load_reference('imagenet256')
    assert urls[1].endswith('/imagenet/256/VIRTUAL_imagenet256_labeled.npz')


def one_line_error(exc_info):
    msg = str(exc_info.value)
    assert '\n' not in msg and len(msg) < 300
    return msg


def test_bad_inputs_give_one_line_errors(tmp_path, model):
    cases = {'float.npz': (dict(arr_0=np.zeros((2, 8, 8, 3), np.float32)), 'dtype float32'),
             'nchw.npz': (dict(arr_0=np.zeros((2, 3, 8, 8), np.uint8)), 'NCHW'),
             'noarr.npz': (dict(images=np.zeros((2, 8, 8, 3), np.uint8)), "no 'arr_0'")}
    for name, (arrays, match) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=match) as e:
            fid.open_images(tmp_path / name)
        one_line_error(e)
    (tmp_path / 'text.npz').write_text('not a zip')
    with pytest.raises(ValueError, match='not an .npz') as e:
        fid.open_images(tmp_path / 'text.npz')
    one_line_error(e)
    with pytest.raises(FileNotFoundError):
        fid.open_images(tmp_path / 'missing.npz')
    np.savez(tmp_path / 'nomu.npz', sigma=np.eye(2048))
    with pytest.raises(ValueError, match='no precomputed mu') as e:
        fid.load_reference(str(tmp_path / 'nomu.npz'))
    one_line_error(e)
    np.savez(tmp_path / 'badshape.npz', mu=np.zeros(10), sigma=np.eye(10))
    with pytest.raises(ValueError, match='expected') as e:
        fid.load_reference(str(tmp_path / 'badshape.npz'))
    one_line_error(e)
    (tmp_path / 'mixed').mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path / 'mixed' / 'a.png')
    Image.new('RGB', (9, 8)).save(tmp_path / 'mixed' / 'b.png')
    with pytest.raises(ValueError, match='differs') as e:
        fid.open_images(tmp_path / 'mixed')
    one_line_error(e)
    with pytest.raises(ValueError, match=r'uint8 \(B, H, W, 3\)') as e:  # online batches: float or NCHW
        fid.extract_features(model, [torch.rand(2, 8, 8, 3)], progress=False)
    with pytest.raises(ValueError, match=r'uint8 \(B, H, W, 3\)') as e:
        fid.extract_features(model, [np.zeros((2, 3, 8, 8), np.uint8)], progress=False)
    # the command line turns them into one line on stderr and a non-zero exit, before any model is loaded
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(SystemExit) as e:
        fid.main([str(tmp_path / 'nchw.npz'), str(tmp_path / 'ref.npz')])
    assert str(e.value.code).startswith('error: ') and 'NCHW' in str(e.value.code)
    assert '\n' not in str(e.value.code)


def test_help_documents_commands(capsys):
    with pytest.raises(SystemExit) as e:
        fid.main(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ('--write-ref', '--image-size', '--keep-images', 'imagenet256', 'imagenet512', '--no-pr'):
        assert word in out


def test_exact_fp32_restores_flags():
    m = torch.backends.cuda.matmul
    if not hasattr(m, 'fp32_precision'):
        pytest.skip('torch without the fp32_precision API')
    old = m.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        m.fp32_precision, torch.backends.cudnn.conv.fp32_precision = 'tf32', 'tf32'
        with fid.exact_fp32():
            assert m.fp32_precision == 'ieee' and torch.backends.cudnn.conv.fp32_precision == 'ieee'
        assert m.fp32_precision == 'tf32' and torch.backends.cudnn.conv.fp32_precision == 'tf32'
    finally:
        m.fp32_precision, torch.backends.cudnn.conv.fp32_precision = old


@pytest.mark.slow
def test_write_reference_and_evaluate_end_to_end(model, tmp_path, capsys, monkeypatch):
    rng = np.random.RandomState(3)
    sizes = [(40, 36), (50, 40), (36, 36), (80, 64), (44, 52), (36, 40)]
    raw = [rng.randint(0, 256, (h, w, 3)).astype(np.uint8) for h, w in sizes]
    save_pngs(tmp_path / 'val', raw)
    out = fid.write_reference(tmp_path / 'val', tmp_path / 'ref.npz', 32, keep_images=4, model=model,
                              batch_size=4, workers=0, progress=False)
    crops = np.stack([np.array(center_crop_arr(Image.fromarray(im), 32)) for im in raw])
    keep = np.sort(np.random.RandomState(0).permutation(6)[:4])
    with np.load(out) as f:
        assert np.array_equal(f['arr_0'], crops[keep])
        with torch.no_grad():
            p, s = model(torch.from_numpy(crops).permute(0, 3, 1, 2))
        assert np.allclose(f['mu'], p.double().mean(0).numpy(), rtol=0, atol=1e-5 * p.abs().max().item())
        cov = np.cov(s.double().numpy(), rowvar=False)
        assert np.allclose(f['sigma_s'], cov, rtol=0, atol=1e-5 * np.abs(cov).max())
    # evaluate 5 sample images against it: every metric equals its function applied to in-memory features
    samples = rng.randint(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    np.savez(tmp_path / 'samples.npz', arr_0=samples)
    m = fid.evaluate(str(tmp_path / 'samples.npz'), str(out), model=model, batch_size=2, progress=False)
    assert list(m) == ['IS', 'FID', 'sFID', 'Precision', 'Recall']
    with torch.no_grad():
        ps, ss = model(torch.from_numpy(samples).permute(0, 3, 1, 2))
        pr = model(torch.from_numpy(crops[keep]).permute(0, 3, 1, 2))[0]
    ref = fid.load_reference(str(out))
    fd = fid.frechet_distance(ps.double().mean(0).numpy(), np.cov(ps.double().numpy(), rowvar=False),
                              ref['mu'], ref['sigma'])
    assert abs(m['FID'] - fd) < 1e-3 * abs(fd)
    assert abs(m['IS'] - fid.inception_score(model.logits(ps))) < 1e-5
    assert (m['Precision'], m['Recall']) == fid.precision_recall(pr, ps)
    # the command line prints the evaluator's five lines in its order
    monkeypatch.setattr(fid.InceptionV3, 'from_pretrained', classmethod(lambda cls, weights=None: model))
    fid.main([str(tmp_path / 'samples.npz'), str(out), '--batch-size', '2', '--device', 'cpu'])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [l.split(':')[0] for l in lines[-5:]] == ['Inception Score', 'FID', 'sFID', 'Precision', 'Recall']


@pytest.mark.gpu
def test_gpu_matches_cpu_golden(golden_model):
    if not torch.cuda.is_available():
        pytest.skip('no CUDA device')
    d = golden('fid_inception_tfcompat.pt')
    m = fid.InceptionV3().load_weights(golden_model.state_dict()).cuda()
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = 'tf32'  # a training script's setting must not leak in
    try:
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
            pool3, spatial = m(d['images_256'].cuda())
    finally:
        torch.backends.cuda.matmul.fp32_precision = old
    assert rel(pool3.cpu(), d['pool3_256']) < 1e-4 and rel(spatial.cpu(), d['spatial_2023_256']) < 1e-4
    r = fid.tf1_resize(d['images_256'].cuda().float()).cpu()
    assert rel(r, d['resized_256']) < 1e-5
