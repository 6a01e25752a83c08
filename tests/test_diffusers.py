"""diffusers' AutoencoderRAE as an independent oracle: its folders load into rae.RAE and RAE.save_pretrained folders
load into it, with the same tokens, decoded images and reconstructions; the hand-written safetensors writer against
the safetensors package. Tests that need diffusers skip without it (requirements-dev.txt pins it).

Tolerance: tokens, images and reconstructions agree to <= 1e-5, not exactly, because the two compute the same
functions in another order (transformers' separate q/k/v products and its attention against our fused qkv and SDPA
call): fp32 rounding then differs by about 5e-7. Tensors that only move (weights, statistics) must be equal."""
import json
import math
import re
import struct
import warnings

import pytest
import torch

import diffusers_format
import files
import rae

TOL = dict(rtol=1e-5, atol=1e-5)
LN_WEIGHTS = ('norm1.weight', 'norm2.weight', 'layernorm_before.weight', 'layernorm_after.weight',
              'decoder_norm.weight', 'layer_norm1.weight', 'layer_norm2.weight')


def diffusers_rae(encoder_type, width, depth, patch, input_size, decoder=(64, 2, 4, 128), mean=True, seed=0):
    """A random-weight AutoencoderRAE in eval mode: every parameter perturbed (LayerScale, CLS, registers, LayerNorm
    affines included) and random [C, g, g] statistics, so that no mapping mistake can hide behind an init value."""
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(seed)
    g = input_size // patch
    stats = dict(latents_std=torch.rand(width, g, g) + 0.5)
    if mean:
        stats['latents_mean'] = torch.randn(width, g, g) * 0.3
    W, L, heads, mlp = decoder
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        m = diffusers.AutoencoderRAE(encoder_type=encoder_type, encoder_hidden_size=width, encoder_patch_size=patch,
                                     encoder_num_hidden_layers=depth, encoder_input_size=input_size,
                                     decoder_hidden_size=W, decoder_num_hidden_layers=L,
                                     decoder_num_attention_heads=heads, decoder_intermediate_size=mlp, patch_size=16,
                                     **stats)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + float(name.endswith(LN_WEIGHTS)))
    return m.eval()


def diffusers_load(folder):
    diffusers = pytest.importorskip('diffusers')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return diffusers.AutoencoderRAE.from_pretrained(folder).eval()


def diffusers_tokens(m, x):
    """The encoder's tokens [B, N, C] as diffusers computes them, before its latent normalisation."""
    extra = (m.config.encoder_patch_size,) if m.config.encoder_type == 'mae' else ()
    return m._encoder_forward_fn(m.encoder, m._resize_and_normalize(x), *extra)


def assert_same_outputs(ours, m, x):
    """Tokens, latents, decoded images and reconstructions of our RAE and a diffusers AutoencoderRAE."""
    s, mu = m._latents_std, m._latents_mean
    with torch.no_grad():
        torch.testing.assert_close(ours.encoder(x), diffusers_tokens(m, x), **TOL)
        z = ours.encode(x)
        # The statistics convention: ours divides by s, diffusers by s + 1e-5 (rae.RAE.from_diffusers)
        torch.testing.assert_close(z * s / (s + 1e-5), m.encode(x).latent, **TOL)
        tokens = ours.encoder(x).transpose(1, 2).reshape(z.shape)
        torch.testing.assert_close(z, (tokens - mu) / s, rtol=0, atol=0)  # the authors' convention, exactly
        # decoded images: diffusers gets the latent whose denormalised tokens are ours
        torch.testing.assert_close(ours.decode(z), m.decode(z * s / (s + 1e-5)).sample, **TOL)
        torch.testing.assert_close(ours(x), m(x).sample, **TOL)  # reconstructions: the conventions cancel


def assert_loaded_everything(folder, m):
    """diffusers leaves missing keys random (it only logs them): every tensor it holds must be the file's."""
    written = files.load_safetensors(folder / diffusers_format.WEIGHTS)
    loaded = m.state_dict()
    assert set(loaded) <= set(written), f'not in our file: {sorted(set(loaded) - set(written))[:3]}'
    assert set(written) - set(loaded) <= {'decoder.decoder_pos_embed'}  # stored for us, diffusers recomputes it
    for k, v in loaded.items():
        assert torch.equal(v, written[k]), k


# ----------------------------------------------------------------------------------------------------------
# The safetensors writer

def test_safetensors_writer_and_reader_against_the_package(tmp_path):
    st = pytest.importorskip('safetensors')
    st_torch = pytest.importorskip('safetensors.torch')
    tensors = {'f32': torch.randn(3, 4), 'bf16': torch.randn(5).bfloat16(), 'f16': torch.randn(2, 2).half(),
               'f64': torch.randn(3).double(), 'i64': torch.arange(7), 'i32': torch.arange(3, dtype=torch.int32),
               'u8': torch.randint(0, 255, (4,), dtype=torch.uint8), 'bool': torch.tensor([True, False, True]),
               'empty': torch.zeros(0, 3), 'scalar': torch.tensor(2.5), 'strided': torch.randn(4, 6).t()[1:]}
    path = tmp_path / 'ours.safetensors'
    files.save_safetensors(tensors, path, metadata={'format': 'pt', 'n': 3})
    theirs = st_torch.load_file(path)
    assert theirs.keys() == tensors.keys()
    for k, v in tensors.items():
        assert theirs[k].dtype == v.dtype and theirs[k].shape == v.shape and torch.equal(theirs[k], v), k
    with st.safe_open(path, 'pt') as f:
        assert f.metadata() == {'format': 'pt', 'n': '3'}
    data = path.read_bytes()
    (n,) = struct.unpack('<Q', data[:8])
    header = json.loads(data[8:8 + n])
    assert n % 8 == 0 and list(header)[:-1] == sorted(tensors)  # padded: every tensor starts 8-byte aligned
    # our reader reads the package's file, and the package's bytes equal ours tensor for tensor
    st_torch.save_file(tensors | {'strided': tensors['strided'].contiguous()}, tmp_path / 'theirs.safetensors')
    ours = files.load_safetensors(tmp_path / 'theirs.safetensors')
    for k, v in tensors.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k


# ----------------------------------------------------------------------------------------------------------
# diffusers -> ours

XL = (1152, 2, 16, 4096)  # the ViT-XL decoder's width, heads and MLP; 2 of its 28 blocks (the full depth: --runslow)


@pytest.mark.parametrize('encoder_type,width,depth,patch,input_size,decoder,name', [
    ('dinov2', 768, 12, 14, 224, XL, 'dinov2-b'),  # DINOv2-B (the released encoder) + the ViT-XL decoder's layout
    pytest.param('dinov2', 768, 12, 14, 224, (1152, 28, 16, 4096), 'dinov2-b', marks=pytest.mark.slow),  # 2 GB
    ('dinov2', 128, 2, 14, 224, (64, 2, 4, 128), 'dinov2'),  # no preset: the family's, at the file's sizes
    ('mae', 768, 2, 16, 256, (64, 2, 4, 128), 'mae'),  # width 768: MAE's MLP is 3072 wide whatever the width
], ids=['dinov2-b+XL2', 'dinov2-b+XL', 'dinov2-tiny', 'mae-small'])
def test_a_diffusers_folder_loads_into_ours_with_the_same_outputs(tmp_path, encoder_type, width, depth, patch,
                                                                   input_size, decoder, name):
    m = diffusers_rae(encoder_type, width, depth, patch, input_size, decoder)
    m.save_pretrained(tmp_path / 'd')
    ours = rae.RAE.from_pretrained(str(tmp_path / 'd'))
    assert ours.encoder.name == name and len(ours.decoder.blocks) == decoder[1]
    assert torch.equal(ours.latent_std, m._latents_std) and torch.equal(ours.latent_mean, m._latents_mean)
    assert torch.equal(ours.pixel_mean, m.encoder_mean) and torch.equal(ours.pixel_std, m.encoder_std)
    assert_same_outputs(ours, m, torch.rand(2, 3, 256, 256))
    # and back: ours written out loads in diffusers with every tensor the original's (the unused mask token: 0)
    ours.save_pretrained(tmp_path / 'back')
    again = diffusers_load(tmp_path / 'back')
    assert_loaded_everything(tmp_path / 'back', again)
    original = m.state_dict()
    for k, v in again.state_dict().items():
        assert torch.equal(v, torch.zeros_like(v) if k.endswith('mask_token') else original[k]), k


@pytest.mark.parametrize('encoder_type,width,patch,input_size', [('dinov2', 128, 14, 224), ('mae', 768, 16, 256)])
def test_the_older_transformers_names_load_the_same_model(tmp_path, encoder_type, width, patch, input_size):
    """Files saved with transformers < 5.18 (DINOv2) / < 5.9 (MAE) hold the encoder under its hub names, which
    transformers' own save_pretrained writes (an independent spelling): that file loads into ours as the renamed one
    does, and classic=True writes it."""
    m = diffusers_rae(encoder_type, width, 2, patch, input_size)
    m.save_pretrained(tmp_path / 'new')
    m.encoder.save_pretrained(tmp_path / 'hub')
    sd = {k: v for k, v in files.load_safetensors(tmp_path / 'new' / diffusers_format.WEIGHTS).items()
          if not k.startswith('encoder.')}
    sd |= {'encoder.' + k: v for k, v in files.load_safetensors(tmp_path / 'hub' / 'model.safetensors').items()}
    (tmp_path / 'old').mkdir()
    (tmp_path / 'old' / 'config.json').write_text((tmp_path / 'new' / 'config.json').read_text())
    files.save_safetensors(sd, tmp_path / 'old' / diffusers_format.WEIGHTS)
    new, old = (rae.RAE.from_pretrained(str(tmp_path / n)) for n in ('new', 'old'))
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(old(x), new(x), rtol=0, atol=0)
    new.save_pretrained(tmp_path / 'classic', classic=True)
    classic = files.load_safetensors(tmp_path / 'classic' / diffusers_format.WEIGHTS)
    for k, v in sd.items():
        if k != 'encoder.embeddings.mask_token':
            assert torch.equal(classic[k], v), k
    assert set(classic) == set(sd) | {'decoder.decoder_pos_embed'}


def test_a_stored_decoder_position_table_is_used_and_ours_otherwise(tmp_path):
    """At 32 x 32 tokens (the 512 px RAE) diffusers recomputes a table at half-step positions; ours keeps the
    authors' integer positions unless the file stores one (decoder.decoder_pos_embed, which diffusers ignores)."""
    m = diffusers_rae('dinov2', 128, 1, 14, 448, (64, 1, 4, 128))
    m.save_pretrained(tmp_path / 'd')
    ours = rae.RAE.from_pretrained(str(tmp_path / 'd'), resolution=512)
    table = torch.cat([torch.zeros(1, 64), rae.sincos_2d(64, 32)])[None]
    assert torch.equal(ours.decoder.pos_embed, table) and not torch.allclose(table, m.decoder.decoder_pos_embed)
    sd = files.load_safetensors(tmp_path / 'd' / diffusers_format.WEIGHTS)
    files.save_safetensors(sd | {'decoder.decoder_pos_embed': m.decoder.decoder_pos_embed},
                           tmp_path / 'd' / diffusers_format.WEIGHTS)
    ours = rae.RAE.from_pretrained(str(tmp_path / 'd'))
    assert_same_outputs(ours, m, torch.rand(1, 3, 512, 512))


def test_no_mean_and_the_statistics_given_or_refused(tmp_path):
    m = diffusers_rae('dinov2', 128, 1, 14, 224, (64, 1, 4, 128), mean=False)
    m.save_pretrained(tmp_path / 'd')
    ours = rae.RAE.from_pretrained(str(tmp_path / 'd'))
    assert ours.latent_mean.shape == (1,) and not ours.latent_mean.any()
    assert_same_outputs(ours, m, torch.rand(1, 3, 256, 256))
    raw = rae.RAE.from_pretrained(str(tmp_path / 'd'), stats=False)  # decoder training: raw tokens
    assert raw.latent_std.eq(1).all() and not raw.latent_mean.any()
    torch.save({'mean': None, 'var': torch.full((128, 16, 16), 4.0)}, tmp_path / 'stat.pt')
    given = rae.RAE.from_pretrained(str(tmp_path / 'd'), stats=str(tmp_path / 'stat.pt'), load_encoder=False)
    assert given.encoder is None and torch.equal(given.latent_std, torch.sqrt(torch.full((128, 16, 16), 4 + 1e-5)))
    torch.testing.assert_close(given.decode(torch.zeros(1, 128, 16, 16)), ours.decode(torch.zeros(1, 128, 16, 16)))


# ----------------------------------------------------------------------------------------------------------
# ours -> diffusers

def our_rae(name, width=None, depth=2, decoder=(64, 2, 4, 128), grid=16, stats=True, seed=0, **overrides):
    """A random-weight rae.RAE: encoder preset `name` at another width / depth, a small decoder, [C, g, g] stats."""
    torch.manual_seed(seed)
    cfg = dict(rae.ENCODERS[name], name=name, depth=depth, **overrides)
    if width:
        cfg.update(width=width, heads=width // 64)
    enc = rae.Encoder(**cfg)
    W, L, heads, mlp = decoder
    dec = rae.Decoder(cfg['width'], W, L, heads, mlp, grid, 16)
    with torch.no_grad():
        for name_, p in [*enc.named_parameters(), *dec.named_parameters()]:
            p.copy_(torch.randn_like(p) * 0.05 + float(name_.endswith(('norm1.weight', 'norm2.weight'))))
    C = cfg['width']
    mean, var = (torch.randn(C, grid, grid), torch.rand(C, grid, grid) + 0.2) if stats else (None, None)
    return rae.RAE(enc, dec, mean, var, noise_tau=0.8).eval()


@pytest.mark.parametrize('name,width,stats', [('dinov2-b', 128, True), ('dinov2-b', 128, False),
                                              ('mae-b', 768, True)])
def test_save_pretrained_loads_in_diffusers_with_the_same_outputs(tmp_path, name, width, stats):
    ours = our_rae(name, width, stats=stats)
    ours.save_pretrained(tmp_path / 'd')
    m = diffusers_load(tmp_path / 'd')
    assert_loaded_everything(tmp_path / 'd', m)
    assert m.config.noise_tau == 0.8 and m.config.image_size == 256
    assert_same_outputs(ours, m, torch.rand(2, 3, 256, 256))
    back = rae.RAE.from_pretrained(str(tmp_path / 'd'))  # and our reader gives back the very same model
    assert back.noise_tau == 0.8 and torch.equal(back.latent_std, torch.atleast_1d(ours.latent_std))
    for (k, v), w in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(v, w), k


def test_siglip2_folders_are_written_and_read_under_both_spellings(tmp_path):
    """diffusers 0.42.1 cannot build its SigLIP2 encoder with transformers >= 5.6 (it sets
    model.vision_model.post_layernorm, a level that transformers removed): checked below, so that this test is
    revisited when it can. Until then the oracle is transformers' SiglipVisionModel, the module diffusers builds
    (width 768: SigLIP's MLP is 3072 whatever the width), loading the encoder part of our file strictly."""
    transformers = pytest.importorskip('transformers')
    diffusers = pytest.importorskip('diffusers')
    with pytest.raises(AttributeError, match='vision_model'), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        diffusers.AutoencoderRAE(encoder_type='siglip2', encoder_hidden_size=768, encoder_patch_size=16,
                                 encoder_num_hidden_layers=1, encoder_input_size=256)
    ours = our_rae('siglip2-b', depth=2)
    ours.save_pretrained(tmp_path / 'flat')
    ours.save_pretrained(tmp_path / 'nested', classic=True)
    flat = files.load_safetensors(tmp_path / 'flat' / diffusers_format.WEIGHTS)
    nested = files.load_safetensors(tmp_path / 'nested' / diffusers_format.WEIGHTS)
    config = json.loads((tmp_path / 'flat' / 'config.json').read_text())
    assert config['encoder_type'] == 'siglip2' and config['encoder_norm_mean'] == [0.5] * 3
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=768, patch_size=16, image_size=256, num_attention_heads=12, num_hidden_layers=2)).eval()
    encoder = {k.removeprefix('encoder.'): v for k, v in flat.items() if k.startswith('encoder.')}
    assert {k.removeprefix('encoder.vision_model.') for k in nested if k.startswith('encoder.')} == set(encoder)
    plain_ln = {'post_layernorm.weight': torch.ones(768), 'post_layernorm.bias': torch.zeros(768)}  # diffusers: None
    siglip.load_state_dict(encoder | plain_ln, strict=True)
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        tokens = siglip(pixel_values=(x - 0.5) / 0.5, interpolate_pos_encoding=True).last_hidden_state
        torch.testing.assert_close(ours.encoder(x), tokens, **TOL)
        for folder in ('flat', 'nested'):
            back = rae.RAE.from_pretrained(str(tmp_path / folder))
            assert back.encoder.name == 'siglip2' and back.pixel_mean.eq(0.5).all()
            torch.testing.assert_close(back(x), ours(x), rtol=0, atol=0)


def test_what_diffusers_would_run_differently_is_refused(tmp_path):
    ours = our_rae('dinov2-b', 128)
    ours.encoder.blocks[0].attn.heads = 4  # diffusers gives width // 64 = 2 heads
    with pytest.raises(ValueError, match='4 encoder heads'):
        ours.save_pretrained(tmp_path / 'd')
    with pytest.raises(ValueError, match='decoder grid of 8'):
        our_rae('dinov2-b', 128, grid=8).save_pretrained(tmp_path / 'd')
    with pytest.raises(ValueError, match='carry it'):
        rae.RAE(None, our_rae('dinov2-b', 128).decoder).save_pretrained(tmp_path / 'd')


def test_the_position_sides_diffusers_builds_are_those_of_our_presets():
    # diffusers 0.42.1 builds every encoder's transformers model at one image size (autoencoder_rae._build_encoder):
    # save_rae refuses an encoder whose stored position grid is not that size / patch
    for encoder_type, side in {'dinov2': 518, 'siglip2': 256, 'mae': 224}.items():
        for name, preset in rae.ENCODERS.items():  # diffusers_format.family(encoder_type) is one of these
            if preset['layout'] == encoder_type:
                assert preset['pos_grid'] * preset['patch'] == side, name


# ----------------------------------------------------------------------------------------------------------
# Names, hub repositories and one-line errors (no diffusers needed)

def test_small_and_large_dinov2_resolve_to_their_diffusers_repos(tmp_path, monkeypatch):
    """from_pretrained('dinov2-s') reads nyu-visionx/RAE-dinov2-wReg-small-ViTXL-n08 through files.download: here
    a folder that RAE_LOCAL_DIR ties to that repo, offline; the four RAE-collections names stay as they were."""
    assert rae.RELEASED_DIFFUSERS[('dinov2-s', 256)] == 'nyu-visionx/RAE-dinov2-wReg-small-ViTXL-n08'
    assert rae.RELEASED_DIFFUSERS[('dinov2-l', 256)] == 'nyu-visionx/RAE-dinov2-wReg-large-ViTXL-n08'
    ours = our_rae('dinov2-s', depth=12, decoder=(64, 1, 4, 128))
    ours.save_pretrained(tmp_path / 'small')
    monkeypatch.setenv('RAE_LOCAL_DIR', f'{rae.RELEASED_DIFFUSERS[("dinov2-s", 256)]}={tmp_path / "small"}')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('RAE_CACHE', str(tmp_path / 'cache'))
    loaded = rae.RAE.from_pretrained('dinov2-s')
    assert loaded.encoder.name == 'dinov2-s'
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=0)
    repo = rae.RELEASED_DIFFUSERS[('dinov2-s', 256)]
    assert rae.RAE.from_pretrained('dinov2-s', 256, decoder=repo, load_encoder=False).encoder is None
    with pytest.raises(ValueError, match='an RAE for dinov2-s at 256 px, not dinov2-b at 256 px'):
        rae.RAE.from_pretrained('dinov2-b', 256, decoder=repo)
    with pytest.raises(ValueError, match='not dinov2-s at 512 px'):
        rae.RAE.from_pretrained(repo, 512)
    with pytest.raises(RuntimeError, match='ViTXL_n08/model.pt of nyu-visionx/RAE-collections'):
        rae.RAE.from_pretrained('dinov2-b')  # offline: the error names the file it would fetch
    with pytest.raises(RuntimeError, match='config.json of nyu-visionx/RAE-dinov2-wReg-large-ViTXL-n08'):
        rae.RAE.from_pretrained('dinov2-l')


def one_line(excinfo):
    assert '\n' not in str(excinfo.value)
    return str(excinfo.value)


def test_bad_folders_are_one_line_errors(tmp_path):
    good = tmp_path / 'good'
    our_rae('dinov2-b', 128).save_pretrained(good)
    sd = files.load_safetensors(good / diffusers_format.WEIGHTS)
    config = json.loads((good / 'config.json').read_text())

    def folder(name, cfg=None, tensors=None):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'config.json').write_text(json.dumps(config | (cfg or {})))
        if tensors is not None:
            files.save_safetensors(tensors, tmp_path / name / diffusers_format.WEIGHTS)
        return str(tmp_path / name)

    cases = [(folder('scaled', {'scaling_factor': 0.5}, sd), ValueError, r'scaling_factor is not 1\.0'),
             (folder('tokens', {'reshape_to_2d': False}, sd), ValueError, 'reshape_to_2d'),
             (folder('type', {'encoder_type': 'clip'}, sd), ValueError, "encoder_type 'clip'"),
             (folder('deeper', {'decoder_num_hidden_layers': 1}, sd), ValueError, 'more than 1 blocks'),
             (folder('shallower', {'encoder_num_hidden_layers': 3}, sd), ValueError,
              r'encoder\.encoder\.layer\.2\.\S+ is missing'),
             (folder('wider', {'decoder_intermediate_size': 256}, sd), ValueError,
              r'decoder_layers\.0\.intermediate\.dense\.weight has shape \(128, 64\), expected \(256, 64\)'),
             (folder('stats', None, sd | {'_latents_std': torch.ones(128)}), ValueError, r'shape \(128,\)'),
             (folder('empty'), FileNotFoundError, 'no diffusion_pytorch_model.safetensors')]
    for source, error, message in cases:
        with pytest.raises(error) as e:
            rae.RAE.from_pretrained(source)
        assert re.search(message, one_line(e)), (source, one_line(e))
    is_diffusers = diffusers_format.is_diffusers
    assert is_diffusers(str(good)) and is_diffusers('org/name') and not is_diffusers('a/b.pt')
    assert math.isqrt(sd['encoder.embeddings.position_embeddings'].shape[1]) == 37  # 518 px at patch 14
