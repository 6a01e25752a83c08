"""LightningDiT and DiT^DH: sizes, released key layout, init, RoPE, label dropout, checkpoints, golden vectors.

The golden files hold the authors' models run at tiny sizes (../shared/reference/golden, see its README); our models
load the authors' state dicts and must reproduce their velocities and every intermediate to 1e-5.
"""
import math

import pytest
import torch

import files
import rae

TINY_DDT = dict(input_size=4, patch_size=1, in_channels=16, hidden_size=(32, 64), depth=(2, 1), num_heads=(2, 4),
                num_classes=10)
TINY_LDIT = dict(input_size=4, patch_size=1, in_channels=16, hidden_size=32, depth=2, num_heads=2, num_classes=10)
OFFICIAL_FLAGS = ('use_qknorm', 'use_swiglu', 'use_rope', 'use_rmsnorm', 'wo_shift', 'use_pos_embed', 'learn_sigma')


def randomize(model, seed=0):
    """Every trainable tensor random (as the golden files do), so that no output is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                scale = 1 / math.sqrt(p[0].numel()) if p.dim() >= 2 else 0.1
                offset = 1.0 if name.endswith(('norm1.weight', 'norm2.weight', 'norm_final.weight')) else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * scale + offset)
    return model


def tiny_inputs(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, 4, 4, generator=g), torch.rand(n, generator=g), torch.tensor([3, 7, 10, 1, 2, 3][:n])


def official_kwargs(constructor):
    kw = {k: v for k, v in constructor.items() if k not in OFFICIAL_FLAGS}
    assert all(constructor.get(f, True) for f in OFFICIAL_FLAGS if f not in ('use_qknorm', 'wo_shift', 'learn_sigma'))
    return kw


# -----------------------------------------------------------------------------------------------------------
# Sizes and the released layout

def analytic_params(family, width, depth, heads, C=768, N=256, K=1000, head=(2048, 2)):
    """Parameter count written out from the architecture (independent of the module code)."""
    def block(D):
        h = int(2 * 4 * D / 3)
        return 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (2 * h * D + 2 * h) + (h * D + D) + (6 * D * D + 6 * D)

    def final(D):
        return D + (D * C + C) + (2 * D * D + 2 * D)
    cond = 256 + (512 * width + width) + (width * width + width) + (K + 1) * width + N * width  # W, t-MLP, y, APE
    if family == 'LightningDiT':
        return (C * width + width) + cond + depth * block(width) + final(width)
    H2, d2 = head
    return (C * width + width) + (C * H2 + H2) + (width * H2 + H2) + cond + depth * block(width) + d2 * block(H2) \
        + final(H2)


@pytest.mark.parametrize('name', [f'{f}-{s}' for f in ('DiTDH', 'LightningDiT') for s in ('S', 'B', 'L', 'XL')])
def test_parameter_counts_of_all_presets(name):
    with torch.device('meta'):
        model = rae.build_dit(name)
    n = sum(p.numel() for p in model.parameters())
    family, size = name.split('-')
    assert n == analytic_params(family, *rae.DIT_SIZES[size])
    published = {'DiTDH-S': 196.5e6, 'DiTDH-B': 294.3e6, 'DiTDH-L': 621.7e6, 'DiTDH-XL': 838.7e6,
                 'LightningDiT-XL': 677.25e6}  # facts file §4 (counted from the authors' classes), paper: 839M
    if name in published:
        assert abs(n - published[name]) < 0.1e6


@pytest.mark.parametrize('name, key', [('DiTDH-XL', 'official/DiTwDDTHead-XL'), ('DiTDH-S', 'official/DiTwDDTHead-S'),
                                       ('LightningDiT-XL', 'official/LightningDiT-XL')])
def test_state_dict_keys_and_shapes_are_the_released_ones(reference_dir, name, key):
    import json
    models = json.loads((reference_dir / 'state_dict_keys.json').read_text())['models']
    released = next(v for k, v in models.items() if k.startswith(key + ' '))
    with torch.device('meta'):
        ours = {k: list(v.shape) for k, v in rae.build_dit(name).state_dict().items()}
    assert ours == {k: shape for k, shape in released}


@pytest.mark.parametrize('cls, kw', [(rae.DiTDH, TINY_DDT), (rae.LightningDiT, TINY_LDIT)])
def test_output_is_exactly_zero_at_init(cls, kw):
    torch.manual_seed(0)
    model = cls(**kw)
    x, t, y = tiny_inputs()
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    # adaLN-Zero: every block's modulation is zero; the rest is not
    for b in model.blocks:
        assert not b.adaLN_modulation[-1].weight.any() and not b.adaLN_modulation[-1].bias.any()
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.25)


def test_the_two_models_initialise_differently_as_released():
    torch.manual_seed(0)
    ddt, ldit = rae.DiTDH(**TINY_DDT), rae.LightningDiT(**TINY_LDIT)
    # LightningDiT: global xavier pass, all Linear biases zero. DiT^DH: PyTorch default init, biases non-zero.
    assert not ldit.blocks[0].attn.qkv.bias.any() and not ldit.t_embedder.mlp[0].bias.any()
    assert ddt.blocks[0].attn.qkv.bias.abs().min() > 0 and ddt.t_embedder.mlp[0].bias.abs().min() > 0
    bound = math.sqrt(6 / (32 + 96))  # xavier-uniform bound of qkv (32 -> 96)
    assert ldit.blocks[0].attn.qkv.weight.abs().max() <= bound
    assert ddt.blocks[0].attn.qkv.weight.abs().max() <= 1 / math.sqrt(32)  # kaiming-uniform(a=sqrt 5) bound
    assert ddt.x_embedder.proj.weight.abs().max() <= math.sqrt(6 / (16 + 64)) and not ddt.x_embedder.proj.bias.any()
    # the frozen tables are parameters without gradient (the released checkpoints hold them)
    assert not ddt.pos_embed.requires_grad and not ddt.t_embedder.W.requires_grad
    assert 'enc_feat_rope.freqs_cos' in ddt.state_dict() and 't_embedder.W' in ddt.state_dict()


def test_rmsnorm_matches_its_formula_and_runs_in_fp32():
    norm = rae.RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 8))
    x = torch.randn(4, 8) * 3
    ref = (x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), ref, atol=1e-6, rtol=1e-6)
    xb = x.bfloat16()
    expected = (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(norm(xb), expected * norm.weight)


# -----------------------------------------------------------------------------------------------------------
# RoPE

def test_rope_preserves_norms_and_scores_depend_only_on_relative_position():
    grid, hd = 4, 16
    rope = rae.RoPE2D(hd, grid)
    torch.manual_seed(0)
    x = torch.randn(2, 3, grid * grid, hd)
    torch.testing.assert_close(rope(x).norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    # one query vector and one key vector, placed at every token: <R_i q, R_j k> must depend only on (dr, dc)
    q, k = torch.randn(hd), torch.randn(hd)
    scores = rope(q.expand(1, 1, grid * grid, hd))[0, 0] @ rope(k.expand(1, 1, grid * grid, hd))[0, 0].T  # (N, N)
    rows, cols = torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid
    by_offset = {}
    for i in range(grid * grid):
        for j in range(grid * grid):
            by_offset.setdefault((int(rows[i] - rows[j]), int(cols[i] - cols[j])), []).append(scores[i, j])
    for vals in by_offset.values():
        assert max(vals) - min(vals) < 1e-5
    assert len({round(float(v[0]), 4) for v in by_offset.values()}) > 20  # and positions do matter


def test_rope_is_a_rotation_by_row_then_column_angles():
    """Closed form: channel pair k of the first half turns by row * f_k, of the second half by col * f_k."""
    grid, hd = 4, 16
    rope = rae.RoPE2D(hd, grid)
    d = hd // 2
    f = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,) frequencies per axis
    x = torch.randn(grid * grid, hd, dtype=torch.float64)
    z = torch.complex(x[:, 0::2], x[:, 1::2])  # (N, hd/2) channel pairs as complex numbers
    n = torch.arange(grid * grid)
    angles = torch.cat([(n // grid)[:, None] * f, (n % grid)[:, None] * f], dim=1)  # rows, then columns
    turned = z * torch.polar(torch.ones_like(angles), angles)
    expected = torch.stack([turned.real, turned.imag], dim=-1).flatten(1)
    torch.testing.assert_close(rope(x.float()[None, None])[0, 0].double(), expected, atol=1e-5, rtol=1e-5)


def test_sincos_position_embedding_columns_then_rows():
    model = rae.LightningDiT(**TINY_LDIT)
    pe = model.pos_embed[0].double()  # (16, 32)
    omega = 1 / 10000 ** (torch.arange(8, dtype=torch.float64) / 8)
    n = torch.arange(16)
    col, row = (n % 4)[:, None] * omega, (n // 4)[:, None] * omega
    expected = torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=1)
    torch.testing.assert_close(pe, expected, atol=1e-6, rtol=0)


# -----------------------------------------------------------------------------------------------------------
# Labels: dropout and the unconditional path

def test_label_dropout_rate_and_rng_order():
    emb = rae.LabelEmbedder(10, 4, dropout_prob=0.1).train()
    null = emb.embedding_table.weight[10]
    y = torch.arange(200_000) % 10
    torch.manual_seed(1)
    out = emb(y)
    dropped = (out == null).all(dim=1)
    assert abs(dropped.float().mean().item() - 0.1) < 0.003
    torch.manual_seed(1)
    assert torch.equal(dropped, torch.rand(len(y)) < 0.1)  # one rand(B) on the default generator, as released
    assert not (emb.eval()(y) == null).all(dim=1).any()  # no dropout at evaluation


def test_unconditional_path_is_the_null_label():
    torch.manual_seed(0)
    model = randomize(rae.DiTDH(**dict(TINY_DDT, class_dropout_prob=1.0)))
    x, t, y = tiny_inputs()
    null = torch.full_like(y, 10)
    with torch.no_grad():
        v_null = model.eval()(x, t, null)
        v_dropped = model.train()(x, t, y)  # p = 1: every label replaced by the null class in training
        v_uncond = rae.guided_velocity(model.eval(), null)(x, t)
    assert torch.equal(v_dropped, v_null) and torch.equal(v_uncond, v_null)
    assert not torch.allclose(model(x, t, y), v_null)  # the label does matter otherwise


# -----------------------------------------------------------------------------------------------------------
# Activation checkpointing (model.grad_checkpoint, rae.run_block)

def grads_and_saved(model, inputs, checkpoint):
    """(gradient of every trainable tensor, elements autograd saved for backward) of a loss on model(*inputs)."""
    model.grad_checkpoint = checkpoint
    model.zero_grad(set_to_none=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    out.square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, sum(saved)


@pytest.mark.parametrize('cls, kw', [(rae.DiTDH, TINY_DDT), (rae.LightningDiT, TINY_LDIT)])
def test_grad_checkpoint_gives_the_same_gradients_from_fewer_saved_tensors(cls, kw):
    """Each block recomputed in backward: the same gradients, to 1e-6 absolute (fp32 on a CPU: bitwise, the
    recomputation runs the same kernels on the same inputs), from a fraction of the saved tensors; eval: no effect."""
    torch.manual_seed(0)
    model = randomize(cls(**dict(kw, class_dropout_prob=0.0))).train()  # no label draws: both passes see the same
    inputs = tiny_inputs()
    plain, saved_plain = grads_and_saved(model, inputs, False)
    ckpt, saved_ckpt = grads_and_saved(model, inputs, True)
    assert ckpt.keys() == plain.keys() and len(plain) == sum(p.requires_grad for p in model.parameters())
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=0, atol=1e-6, msg=k)
    assert saved_ckpt < saved_plain / 2  # the blocks keep their inputs only
    assert grads_and_saved(model.eval(), inputs, True)[1] == saved_plain  # outside training: a plain forward


# -----------------------------------------------------------------------------------------------------------
# Checkpoints

def sizes(kw):
    """build_dit's size keywords of a constructor dict: the latent geometry is read off the file."""
    return {k: v for k, v in kw.items() if k not in ('input_size', 'patch_size', 'in_channels')}


@pytest.mark.parametrize('cls, kw', [(rae.DiTDH, TINY_DDT), (rae.LightningDiT, TINY_LDIT)])
@pytest.mark.parametrize('wrap', ['bare', 'ema', 'model', 'run'])
def test_save_load_round_trip(tmp_path, cls, kw, wrap):
    torch.manual_seed(0)
    model = randomize(cls(**kw)).eval()
    sd = model.state_dict()
    name = cls.__name__
    run = dict(model=name, hidden_size=kw['hidden_size'], depth=kw['depth'], num_heads=kw['num_heads'],
               num_classes=10, global_batch=8)  # what a diffusion_train.py checkpoint stores
    ckpt = {'bare': sd, 'ema': {'ema': {'module.' + k: v for k, v in sd.items()}, 'step': 3},
            'model': {'model': {'_orig_mod.' + k: v for k, v in sd.items()}},
            'run': {'ema': sd, 'model': {}, 'config': run}}[wrap]
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    # our checkpoints are built from their config; any other file from the name it is given
    loaded = rae.load_dit(tmp_path / 'ckpt.pt') if wrap == 'run' else \
        rae.load_dit(tmp_path / 'ckpt.pt', name, **sizes(kw))
    assert type(loaded) is cls and not loaded.training
    assert (loaded.input_size, loaded.in_channels, loaded.num_classes) == (4, 16, 10)
    if cls is rae.DiTDH:
        assert loaded.depth == (2, 1) and loaded.enc_feat_rope.freqs_cos.shape == (16, 16)
        assert [b.attn.heads for b in loaded.blocks] == [2, 2, 4]
    x, t, y = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_checkpoint_errors_name_the_keys(tmp_path):
    torch.manual_seed(0)
    sd = rae.DiTDH(**TINY_DDT).state_dict()
    model = rae.DiTDH(**TINY_DDT)
    with pytest.raises(ValueError, match='missing.*blocks.2.mlp.w3.bias'):
        files.copy_weights(model, {k: v for k, v in sd.items() if k != 'blocks.2.mlp.w3.bias'}, 'sd')
    with pytest.raises(ValueError, match='unexpected.*extra.weight'):
        files.copy_weights(model, dict(sd, **{'extra.weight': torch.zeros(1)}), 'sd')
    bigger = rae.DiTDH(**dict(TINY_DDT, hidden_size=(48, 64), num_heads=(3, 4)))
    with pytest.raises(ValueError, match=r'different model.*shape') as e:
        files.copy_weights(bigger, sd, 'sd')
    assert '\n' not in str(e.value)
    torch.save({'optimizer': {}}, tmp_path / 'opt.pt')
    with pytest.raises(ValueError, match='not a LightningDiT / DiT\\^DH state dict'):
        rae.load_dit(tmp_path / 'opt.pt', 'DiTDH-S')
    torch.save(sd, tmp_path / 'bare.pt')
    with pytest.raises(ValueError, match='name its preset'):
        rae.load_dit(tmp_path / 'bare.pt')
    torch.save({'ema': {}, 'config': {'encoder': 'dinov2-b', 'decoder_size': 'XL'}}, tmp_path / 'decoder.pt')
    with pytest.raises(ValueError, match='not a DiT checkpoint'):
        rae.load_dit(tmp_path / 'decoder.pt')
    with pytest.raises(ValueError, match='do not fit this model'):
        rae.load_dit(tmp_path / 'bare.pt', 'DiTDH-S')  # a preset of other sizes: the weights say so
    with pytest.raises(ValueError, match='no released DiT'):
        rae.released_dit(384)
    with pytest.raises(ValueError, match='unknown model'):
        rae.build_dit('DiTDH-XXL')


# -----------------------------------------------------------------------------------------------------------
# Golden vectors: the authors' classes at tiny sizes

def load_golden(golden_dir, name, cls):
    g = torch.load(golden_dir / name)
    model = cls(**official_kwargs(g['constructor']))
    files.copy_weights(model, g['state_dict'], name)
    return g, model.eval()


@pytest.mark.parametrize('name, cls', [('ddt_tiny.pt', rae.DiTDH), ('lightningdit_tiny.pt', rae.LightningDiT)])
def test_golden_forward_and_intermediates(golden_dir, name, cls):
    torch.manual_seed(0)
    fresh = cls(**official_kwargs(torch.load(golden_dir / name)['constructor']))
    g, model = load_golden(golden_dir, name, cls)
    for k, v in g['state_dict'].items():  # our formulas give the authors' frozen tables exactly
        if 'rope' in k or k == 'pos_embed':
            assert torch.equal(fresh.state_dict()[k], v), k
    seen = {}
    for mod_name in g['outputs']['intermediates']:
        mod = model.get_submodule(mod_name.split(':')[0])
        mod.register_forward_hook(lambda m, a, out, n=mod_name.split(':')[0]: seen.update({n: out, n + ':input': a[0]}))
    i = g['inputs']
    with torch.no_grad():
        v = model(i['x'], i['t'], i['y'])
    torch.testing.assert_close(v, g['outputs']['v'], atol=1e-5, rtol=1e-5)
    for k, ref in g['outputs']['intermediates'].items():
        torch.testing.assert_close(seen[k], ref, atol=1e-5, rtol=1e-5, msg=k)


def test_golden_checkpoint_loads_by_name(golden_dir, tmp_path):
    for name, cls in [('ddt_tiny.pt', rae.DiTDH), ('lightningdit_tiny.pt', rae.LightningDiT)]:
        g = torch.load(golden_dir / name)
        torch.save({'ema': g['state_dict']}, tmp_path / name)
        c = official_kwargs(g['constructor'])
        model = rae.load_dit(tmp_path / name, cls.__name__, **sizes(c))
        assert type(model) is cls
        got = (model.input_size, model.in_channels, model.num_classes)
        assert got == (c['input_size'], c['in_channels'], c['num_classes'])
        with torch.no_grad():
            torch.testing.assert_close(model(g['inputs']['x'], g['inputs']['t'], g['inputs']['y']), g['outputs']['v'],
                                       atol=1e-5, rtol=1e-5)


def test_golden_ddt_cfg_on_the_interval(golden_dir):
    g, model = load_golden(golden_dir, 'ddt_tiny.pt', rae.DiTDH)
    i = g['inputs']
    x, t, y = i['x_cfg'][:3], i['t_cfg'][:3], i['y_cfg'][:3]
    assert torch.equal(i['y_cfg'][3:], torch.full_like(y, 10))
    with torch.no_grad():
        v = rae.guided_velocity(model, y, cfg_scale=1.5, cfg_interval=(0.0, 0.7))(x, t)
    torch.testing.assert_close(v, g['outputs']['cfg_out'][:3], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # sample 0 (t = 0.93) is outside the interval: the plain conditional velocity
        assert torch.equal(v[0], model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, 10 + 0 * y]))[0])


def test_golden_lightningdit_cfg_interval_is_inverted_in_the_release(golden_dir):
    """The authors' LightningDiT guides OUTSIDE the listed interval [0, 0.5); ours guides inside: [0.5, 1] here."""
    g, model = load_golden(golden_dir, 'lightningdit_tiny.pt', rae.LightningDiT)
    i = g['inputs']
    x, y = i['x_cfg'][:3], i['y_cfg'][:3]
    for t in (0.3, 0.8):
        with torch.no_grad():
            v = rae.guided_velocity(model, y, cfg_scale=1.5, cfg_interval=(0.5, 1.0))(x, torch.full((3,), t))
        torch.testing.assert_close(v, g['outputs'][f'cfg_out_t{t}'][:3], atol=1e-5, rtol=1e-5)
