"""Rectified flow: the shift, training times, the loss, the Euler/Heun samplers and guidance.

The samplers are checked against the closed form: for Gaussian data x ~ N(mu, Sigma) the velocity of
x_t = (1 - t) x + t eps is known exactly, and so is the ODE's flow map; the golden transport file pins the
authors' training plan and their Euler trajectories (plain, CFG 1.5 on their interval, AutoGuidance 1.42).
"""
import math

import pytest
import torch
from scipy.stats import norm

import files
import rae
from test_dit import TINY_DDT, official_kwargs, randomize, tiny_inputs

ALPHA_256 = math.sqrt(48)


def test_shift_values():
    assert rae.shift_alpha((768, 16, 16)) == ALPHA_256 and rae.shift_alpha((768, 32, 32)) == math.sqrt(192)
    t = torch.tensor([0.0, 1.0, 0.5, 0.001, 0.999], dtype=torch.float64)
    s = rae.time_shift(t, ALPHA_256)
    assert s[0] == 0 and s[1] == 1
    assert s[2].item() == pytest.approx(0.8739, abs=1e-4) and s[3].item() == pytest.approx(0.00689, abs=1e-5)
    assert s[4].item() == pytest.approx(0.99986, abs=1e-5)
    grid = torch.linspace(0, 1, 101)
    assert (rae.time_shift(grid, ALPHA_256).diff() > 0).all()  # monotone
    assert torch.equal(rae.time_shift(grid, 1.0), grid)  # alpha = 1 is no shift


def test_sampling_grid_is_the_released_one():
    grid = rae.sample_grid(50, ALPHA_256)
    assert grid.shape == (50,) and grid.dtype == torch.float32 and grid[0] == 1.0
    assert grid[-1].item() == pytest.approx(0.0068873, abs=1e-7) and (grid.diff() < 0).all()
    assert torch.equal(grid, rae.time_shift(1 - torch.linspace(0, 0.999, 50), ALPHA_256))


def test_training_time_distributions():
    torch.manual_seed(0)
    u = rae.sample_t(200_000, 'uniform')
    assert 0 <= u.min() and u.max() <= 0.999 and u.mean().item() == pytest.approx(0.4995, abs=0.003)
    t = rae.sample_t(200_000, 'logit-normal').double()
    assert 0 < t.min() and t.max() <= 0.999
    # CDF of logit-normal(0, 1) truncated to [0, 0.999]: Phi(logit t) / Phi(logit 0.999)
    for q in (0.05, 0.2, 0.5, 0.8, 0.95, 0.99):
        exact = norm.cdf(math.log(q / (1 - q))) / norm.cdf(math.log(0.999 / 0.001))
        assert (t <= q).double().mean().item() == pytest.approx(exact, abs=0.004)
    with pytest.raises(ValueError, match='unknown time distribution'):
        rae.sample_t(3, 'cosine')


# -----------------------------------------------------------------------------------------------------------
# Closed form: Gaussian data

class Gaussian:
    """x ~ N(mu, Sigma): x_t ~ N((1-t) mu, S_t), S_t = (1-t)^2 Sigma + t^2 I, and the exact velocity
    v(z, t) = E[eps - x | x_t = z] = -mu + (t I - (1-t) Sigma) S_t^{-1} (z - (1-t) mu)."""

    def __init__(self, d=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        self.Sigma = Q @ torch.diag(torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)) @ Q.T
        self.I = torch.eye(d, dtype=torch.float64)
        self.calls = 0

    def S(self, t):
        return (1 - t) ** 2 * self.Sigma + t ** 2 * self.I

    def velocity(self, z, t):
        self.calls += 1
        t = float(t[0])
        assert 0 < t <= 1  # the model is never asked about t = 0 (grid ends at shift(0.001))
        M = (t * self.I - (1 - t) * self.Sigma) @ torch.linalg.inv(self.S(t))
        return -self.mu + (z - (1 - t) * self.mu) @ M.T


def white_noise(n, d, seed=0):
    """n samples with EXACTLY zero mean and identity covariance: the sampler's (affine) output then has the mean and
    covariance of its own discretisation exactly, with no Monte-Carlo error left in the comparison."""
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    e, V = torch.linalg.eigh(torch.cov(z.T, correction=0))
    return z @ V @ torch.diag(e.rsqrt()) @ V.T


@pytest.mark.parametrize('alpha', [1.0, ALPHA_256])
@pytest.mark.parametrize('method, steps, cov_tol', [('euler', 500, 0.02), ('heun', 200, 1e-3), ('heun', 50, 0.01)])
def test_samplers_reproduce_gaussian_data(alpha, method, steps, cov_tol):
    data, z = Gaussian(), white_noise(1000, 3)
    x = rae.sample_ode(data.velocity, z, steps, alpha, method=method)
    assert data.calls == (steps - 1) * (2 if method == 'heun' else 1)
    mean, cov = x.mean(0), torch.cov(x.T, correction=0)
    t_end = rae.time_shift(0.001, alpha)  # where the released grid stops
    # The mean moves along dm/dt = -mu, which Euler and Heun integrate exactly: it pins the time convention and
    # the end of the grid ((1 - 0) mu would be off by 0.002 without shift, 0.014 with).
    torch.testing.assert_close(mean, (1 - t_end) * data.mu, atol=1e-6, rtol=0)
    torch.testing.assert_close(cov, data.S(t_end), atol=cov_tol, rtol=0)
    # ... and so the samples follow the data distribution up to the last sliver of noise
    torch.testing.assert_close(mean, data.mu, atol=0.015, rtol=0)
    torch.testing.assert_close(cov, data.Sigma, atol=cov_tol + 0.02, rtol=0)


@pytest.mark.parametrize('method, order', [('euler', 1), ('heun', 2)])
def test_samplers_converge_at_their_order_to_the_exact_flow_map(method, order):
    """Per sample, the exact flow from t = 1 is z -> (1 - t) mu + S_t^(1/2) z; errors shrink as 1/n^order."""
    data, z = Gaussian(), white_noise(500, 3)
    t_end = rae.time_shift(0.001, ALPHA_256)
    e, V = torch.linalg.eigh(data.S(t_end))
    exact = (1 - t_end) * data.mu + z @ (V @ torch.diag(e.sqrt()) @ V.T)
    err = [(rae.sample_ode(data.velocity, z, n, ALPHA_256, method=method) - exact).abs().max().item()
           for n in (51, 101)]
    assert 2 ** order * 0.9 < err[0] / err[1] < 2 ** order * 1.1


# -----------------------------------------------------------------------------------------------------------
# Guidance

def tiny_pair():
    torch.manual_seed(0)
    model = randomize(rae.DiTDH(**TINY_DDT), seed=1).eval()
    guide = randomize(rae.DiTDH(**dict(TINY_DDT, hidden_size=(16, 64), depth=(1, 1))), seed=2).eval()
    return model, guide


@torch.no_grad()
def test_cfg_and_autoguidance_with_w_1_are_the_plain_model():
    model, guide = tiny_pair()
    x, t, y = tiny_inputs()
    v = model(x, t, y)
    assert torch.equal(rae.guided_velocity(model, y, cfg_scale=1.0)(x, t), v)
    assert torch.equal(rae.guided_velocity(model, y, guide=guide, guide_scale=1.0)(x, t), v)


@torch.no_grad()
def test_guidance_formulas_per_sample_on_the_interval():
    model, guide = tiny_pair()
    x, t, y = tiny_inputs(n=4)
    t = torch.tensor([0.95, 0.6, 0.3, 0.1])
    inside = torch.tensor([False, True, True, False]).view(-1, 1, 1, 1)  # interval [0.2, 0.6], inclusive
    null = torch.full_like(y, 10)
    v_c, v_u, v_g = model(x, t, y), model(x, t, null), guide(x, t, y)
    w = 2.5
    cfg = rae.guided_velocity(model, y, cfg_scale=w, cfg_interval=(0.2, 0.6))(x, t)
    torch.testing.assert_close(cfg, torch.where(inside, v_u + w * (v_c - v_u), v_c), atol=1e-5, rtol=1e-5)
    ag = rae.guided_velocity(model, y, guide=guide, guide_scale=w, cfg_interval=(0.2, 0.6))(x, t)
    assert torch.equal(ag, torch.where(inside, v_g + w * (v_c - v_g), v_c))
    assert not torch.allclose(cfg[1], v_c[1]) and not torch.allclose(ag[2], v_c[2])
    with pytest.raises(ValueError, match='either CFG or AutoGuidance'):
        rae.guided_velocity(model, y, cfg_scale=2.0, guide=guide, guide_scale=2.0)


@torch.no_grad()
def test_guidance_costs_forwards_only_inside_its_interval():
    """CFG on [0, 0.7] at alpha = sqrt(48): the doubled batch only at grid points t <= 0.7, the plain one elsewhere,
    and the same samples as guiding everywhere with where() would give."""
    model, _ = tiny_pair()
    x, _, y = tiny_inputs(n=2)
    batches = []
    counting = lambda x_t, t, y_: batches.append(len(x_t)) or model(x_t, t, y_)  # noqa: E731
    counting.num_classes = model.num_classes
    alpha = rae.shift_alpha((768, 16, 16))
    out = rae.sample_ode(rae.guided_velocity(counting, y, cfg_scale=1.5, cfg_interval=(0.0, 0.7)), x, 50, alpha)
    inside = int((rae.sample_grid(50, alpha)[:-1] <= 0.7).sum())  # the 49 update points
    assert inside == 12 and batches == [2] * (49 - inside) + [4] * inside
    null = torch.full_like(y, model.num_classes)

    def everywhere(x_t, t):  # the formula of the interval test above, applied at every step
        v_c, v_u = model(x_t, t, y), model(x_t, t, null)
        return torch.where(t.view(-1, 1, 1, 1) <= 0.7, v_u + 1.5 * (v_c - v_u), v_c)
    torch.testing.assert_close(out, rae.sample_ode(everywhere, x, 50, alpha), atol=1e-5, rtol=1e-5)


def test_flow_loss_is_the_mse_to_eps_minus_x():
    """With a fixed seed, flow_loss draws eps first, then t; the loss is the per-sample MSE to eps - x."""
    x, y = torch.randn(4, 16, 4, 4), torch.tensor([0, 1, 2, 3])
    seen = {}

    def model(x_t, t, y_):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t) + 0.5

    torch.manual_seed(7)
    loss = rae.flow_loss(model, x, y, ALPHA_256, time_dist='uniform')
    torch.manual_seed(7)
    eps = torch.randn_like(x)
    t = rae.time_shift(torch.rand(4) * 0.999, ALPHA_256)
    assert torch.equal(seen['t'], t)
    tt = t.view(-1, 1, 1, 1)
    assert torch.equal(seen['x_t'], (1 - tt) * x + tt * eps)
    torch.testing.assert_close(loss, ((0.5 - (eps - x)) ** 2).mean(dim=(1, 2, 3)))


# -----------------------------------------------------------------------------------------------------------
# Golden: the authors' Transport and Sampler on the tiny DiT^DH (+ a tiny guide)

@pytest.fixture(scope='module')
def transport(golden_dir):
    g = torch.load(golden_dir / 'transport_ddt_tiny.pt')
    models = {}
    for role in ('model', 'guide'):
        models[role] = rae.DiTDH(**official_kwargs(g['constructor'][role]))
        files.copy_weights(models[role], g['state_dict'][role], role)
        models[role].eval()
    return g, models


def test_golden_training_plan(transport):
    g, models = transport
    i, o = g['inputs'], g['outputs']
    alpha = g['constructor']['transport']['time_dist_shift']
    assert alpha == ALPHA_256
    for dist in ('uniform', 'logit-normal'):
        seen = {}

        def model(x_t, t, y):
            seen.update(x_t=x_t, t=t)
            return models['model'](x_t, t, y)

        torch.manual_seed(int(i[f'{dist}/seed']))
        with torch.no_grad():
            loss = rae.flow_loss(model, i['x_data'], i['y_train'], alpha, time_dist=dist)
        assert torch.equal(seen['t'], o[f'{dist}/t_shifted'])  # same draws, same order, same shift: bitwise
        assert torch.equal(seen['x_t'], o[f'{dist}/xt'])
        assert torch.equal(o[f'{dist}/ut'], o[f'{dist}/noise'] - i['x_data'])  # target v = eps - x
        torch.testing.assert_close(loss, o[f'{dist}/loss_per_sample'], atol=1e-5, rtol=1e-5)
    t = i['t_given'].view(-1, 1, 1, 1)  # the plan itself, at given times
    assert torch.equal((1 - t) * i['x_data'] + t * i['noise_given'], o['plan_xt_given'])


@pytest.mark.parametrize('case, kwargs', [('none', {}), ('cfg', dict(cfg_scale=1.5, cfg_interval=(0.0, 0.7))),
                                          ('ag', dict(guide_scale=1.42))])
def test_golden_euler_trajectories(transport, case, kwargs):
    g, models = transport
    i, o = g['inputs'], g['outputs']
    assert torch.equal(rae.sample_grid(50, ALPHA_256), o['time_grid'])
    if case == 'ag':
        kwargs = dict(kwargs, guide=models['guide'])
        torch.testing.assert_close(models['guide'](i['guide_probe_x'], i['guide_probe_t'], i['y_sample']),
                                   o['guide_probe_v'], atol=1e-5, rtol=1e-5)
    velocity = rae.guided_velocity(models['model'], i['y_sample'], **kwargs)
    traj = rae.sample_ode(velocity, i['z0'], 50, ALPHA_256, trajectory=True)
    ref = o[f'traj_{case}'][:, :len(i['z0'])]  # the authors doubled the batch; the first half is the sample
    assert traj.shape == ref.shape == (50, 2, 16, 4, 4)
    torch.testing.assert_close(traj, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(traj[-1], o[f'sample_{case}'], atol=1e-5, rtol=1e-5)
