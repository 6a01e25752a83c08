"""The hand-written ViT encoders against transformers models with random weights, and DINO v1 in its own layout.

Every reference model gets random values in ALL its tensors (layerscale, norms, registers, CLS, position
embeddings), is written to disk the way users get it (a save_pretrained folder, a hub-named file, a torch file),
read back with rae.Encoder.from_pretrained and compared token by token with the transformers forward pass, run
the way the official RAE wrappers run it: bicubic resize of [0,1] images, mean/std, ViT, final LayerNorm with
its affine removed, prefix tokens dropped.
"""
import json
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import rae

transformers = pytest.importorskip('transformers')
safetensors_torch = pytest.importorskip('safetensors.torch')
try:  # transformers' own init takes seconds for a base model; random_model overwrites every parameter anyway
    from transformers.initialization import no_init_weights
except ImportError:
    from contextlib import nullcontext as no_init_weights

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
TOL = 1e-4
ERRORS = (ValueError, RuntimeError)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    # The suite shares 2 cores with other work: one thread avoids oversubscribing them.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------
# Reference side

def randomise_(model, seed):
    """Seeded random values in every parameter, so no tensor keeps an init (0, 1, sincos) that could hide a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith('lambda1'):  # layerscale
                p.copy_(0.1 + 0.9 * torch.rand(p.shape, generator=g))
            elif name.endswith('bias'):
                p.copy_(0.1 * r)
            elif 'norm' in name:  # LayerNorm weights: norm1, layer_norm1, layernorm_before, post_layernorm, ...
                p.copy_(1 + 0.2 * r)
            elif p.ndim >= 2 and 'token' not in name and 'position' not in name:
                p.copy_(r / p[0].numel() ** 0.5)  # unit-variance outputs keep 12 layers well-conditioned
            else:  # CLS / register / mask tokens, position embeddings
                p.copy_(r)


def random_model(cls, cfg, seed, **kwargs):
    with no_init_weights():
        model = cls(cfg, **kwargs)
    randomise_(model, seed)
    return model.eval()


def prepare(images, size, mean, std):
    """The official RAE pre-processing: bicubic resize of the [0,1] images when needed, then mean/std."""
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode='bicubic', align_corners=False)
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def drop_affine_(norm):
    """RAE uses the final LayerNorm without affine; the saved files still hold the random affine."""
    with torch.no_grad():
        norm.weight.fill_(1)
        norm.bias.zero_()


def make_ref(name, encoder_weights, run, n_prefix, mean_std, **extra):
    """run(x_normalised) -> transformers output with hidden_states; reference(images, size) -> tokens."""
    def reference(images, size):
        with torch.no_grad():
            return run(prepare(images, size, *mean_std)).last_hidden_state[:, n_prefix:]

    def hidden_states(x):
        with torch.no_grad():
            return run(x).hidden_states

    return SimpleNamespace(name=name, reference=reference, hidden_states=hidden_states, n_prefix=n_prefix,
                           mean_std=mean_std, encoder=rae.Encoder.from_pretrained(name, weights=str(encoder_weights)),
                           **extra)


@pytest.fixture(scope='module')
def dinov2(tmp_path_factory):
    """facebook/dinov2-with-registers-base shapes: 768/12/12, patch 14, 518 -> 37x37 pos-emb, 4 registers."""
    cfg = transformers.Dinov2WithRegistersConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                 mlp_ratio=4, patch_size=14, image_size=518, num_register_tokens=4,
                                                 layer_norm_eps=1e-6, hidden_act='gelu', layerscale_value=1.0)
    model = random_model(transformers.Dinov2WithRegistersModel, cfg, seed=0)
    folder = tmp_path_factory.mktemp('dinov2') / 'hf'
    model.save_pretrained(folder)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # transformers-5.24 in-memory names
    drop_affine_(model.layernorm)
    # transformers interpolates the 37x37 position embedding to the input grid itself (16x16 at 224).
    run = lambda x: model(pixel_values=x, output_hidden_states=True)
    return make_ref('dinov2-b', folder, run, 5, IMAGENET, folder=folder, state=state,
                    input_size=224, tokens=256)


@pytest.fixture(scope='module')
def siglip2(tmp_path_factory):
    """google/siglip2-base-patch16-256 as the v1 SiglipModel RAE loads (text tower kept small)."""
    cfg = transformers.SiglipConfig(
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=256, patch_size=16, hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6),
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=1, bos_token_id=2,
                         eos_token_id=3))
    model = random_model(transformers.SiglipModel, cfg, seed=1)
    folder = tmp_path_factory.mktemp('siglip2') / 'hf'
    model.save_pretrained(folder)  # full model: vision_model.*, text_model.*, logit_scale/bias, pooling head
    vision_state = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    drop_affine_(model.vision_model.post_layernorm)  # last_hidden_state is post-layernormed
    run = lambda x: model.vision_model(pixel_values=x, output_hidden_states=True)
    return make_ref('siglip2-b', folder, run, 0, HALF, folder=folder, vision_state=vision_state,
                    input_size=256, tokens=256)


@pytest.fixture(scope='module')
def mae(tmp_path_factory):
    """facebook/vit-mae-base shapes: 768/12/12/3072, patch 16, 224 -> 14x14 pos-emb (decoder kept small)."""
    cfg = transformers.ViTMAEConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=3072, patch_size=16, image_size=224, layer_norm_eps=1e-12,
                                    hidden_act='gelu', mask_ratio=0.0, decoder_hidden_size=32,
                                    decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                    decoder_intermediate_size=64)
    model = random_model(transformers.ViTMAEForPreTraining, cfg, seed=2)
    folder = tmp_path_factory.mktemp('mae') / 'hf'
    model.save_pretrained(folder)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    drop_affine_(model.vit.layernorm)

    def run(x):
        # mask_ratio 0 and noise = arange keep every token in its place (argsort of the noise is the identity).
        n = (x.shape[-2] // 16) * (x.shape[-1] // 16)
        return model.vit(pixel_values=x, noise=torch.arange(n).expand(x.shape[0], -1), interpolate_pos_encoding=True,
                         output_hidden_states=True)

    return make_ref('mae-b', folder, run, 1, IMAGENET, folder=folder, state=state,
                    input_size=256, tokens=256)


def dino_v1_checkpoint(seed, width=384, depth=12, patch=8, grid=28):
    """A random DINO v1 ViT-S/8 backbone file in the dino_deitsmall8_pretrain (timm-style) layout."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    sd = {'cls_token': r(1, 1, width), 'pos_embed': r(1, 1 + grid * grid, width),
          'patch_embed.proj.weight': r(width, 3, patch, patch) / (3 * patch * patch) ** 0.5,
          'patch_embed.proj.bias': 0.1 * r(width)}
    for i in range(depth):
        b = f'blocks.{i}.'
        sd.update({b + 'norm1.weight': 1 + 0.2 * r(width), b + 'norm1.bias': 0.1 * r(width),
                   b + 'attn.qkv.weight': r(3 * width, width) / width ** 0.5, b + 'attn.qkv.bias': 0.1 * r(3 * width),
                   b + 'attn.proj.weight': r(width, width) / width ** 0.5, b + 'attn.proj.bias': 0.1 * r(width),
                   b + 'norm2.weight': 1 + 0.2 * r(width), b + 'norm2.bias': 0.1 * r(width),
                   b + 'mlp.fc1.weight': r(4 * width, width) / width ** 0.5, b + 'mlp.fc1.bias': 0.1 * r(4 * width),
                   b + 'mlp.fc2.weight': r(width, 4 * width) / (4 * width) ** 0.5, b + 'mlp.fc2.bias': 0.1 * r(width)})
    sd.update({'norm.weight': 1 + 0.2 * r(width), 'norm.bias': 0.1 * r(width)})
    return sd


def dino_v1_as_vit(sd, heads=6):
    """The same weights in transformers.ViTModel, mapped by hand. RAE's discriminator backbone uses the tanh
    GELU (official code; checked against the golden dino_disc_tiny activations to 3e-6, exact GELU is 1.5e-3 off)."""
    width, depth = sd['cls_token'].shape[-1], 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
    patch, grid = sd['patch_embed.proj.weight'].shape[-1], round((sd['pos_embed'].shape[1] - 1) ** 0.5)
    cfg = transformers.ViTConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                                 intermediate_size=sd['blocks.0.mlp.fc1.weight'].shape[0], patch_size=patch,
                                 image_size=grid * patch, layer_norm_eps=1e-6, hidden_act='gelu_pytorch_tanh',
                                 qkv_bias=True)
    with no_init_weights():  # every tensor comes from sd below
        model = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    mapped = {'embeddings.cls_token': sd['cls_token'], 'embeddings.position_embeddings': sd['pos_embed'],
              'embeddings.patch_embeddings.projection.weight': sd['patch_embed.proj.weight'],
              'embeddings.patch_embeddings.projection.bias': sd['patch_embed.proj.bias'],
              'layernorm.weight': torch.ones(width), 'layernorm.bias': torch.zeros(width)}  # affine dropped
    for i in range(depth):
        b, t = f'blocks.{i}.', f'layers.{i}.'
        for part in ('weight', 'bias'):
            for n, chunk in zip('qkv', sd[b + 'attn.qkv.' + part].chunk(3)):  # fused qkv rows are [q; k; v]
                mapped[t + f'attention.{n}_proj.{part}'] = chunk
            for ours, theirs in [('attn.proj', 'attention.o_proj'), ('norm1', 'layernorm_before'),
                                 ('norm2', 'layernorm_after'), ('mlp.fc1', 'mlp.fc1'), ('mlp.fc2', 'mlp.fc2')]:
                mapped[t + theirs + '.' + part] = sd[b + ours + '.' + part]
    model.load_state_dict(mapped, strict=True)
    return model


@pytest.fixture(scope='module')
def dino_s8(tmp_path_factory):
    sd = dino_v1_checkpoint(seed=3)
    path = tmp_path_factory.mktemp('dino') / 'dino_vit_small_patch8_224.pth'
    torch.save(sd, path)
    model = dino_v1_as_vit(sd)
    run = lambda x: model(pixel_values=x, output_hidden_states=True)
    return make_ref('dino-s8', path, run, 1, IMAGENET, path=path, state=sd, input_size=224, tokens=784)


def where_it_differs(ref, images):
    """On failure: max |diff| of the encoder's embedding and of each block output against transformers."""
    try:
        enc = ref.encoder
        x = prepare(images, enc.input_size, *ref.mean_std)
        hs = ref.hidden_states(x)
        with torch.no_grad():
            h = enc.embed(x)
            out = [f'embed {(h - hs[0]).abs().max():.2g}']
            for i, block in enumerate(enc.blocks):
                h = block(h)
                out.append(f'block{i} {(h - hs[i + 1]).abs().max():.2g}')
        return 'stages: ' + ', '.join(out)
    except Exception as e:  # a diagnosis only; never hide the real failure
        return f'(stage diagnosis failed: {type(e).__name__}: {e})'


def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and '\n' not in msg.strip(), f'error message is not one line: {msg!r}'
    return msg


def shape_text(shape):
    return ', '.join(str(s) for s in shape)  # matches (1, 2, 3), [1, 2, 3] and torch.Size([1, 2, 3])


def hub_names(reference_dir, hub_title, memory_title):
    """transformers-5.24 in-memory name -> hub (4.x) name, paired by position in the published key lists."""
    models = json.loads((reference_dir / 'state_dict_keys.json').read_text())['models']
    hub, = [v for k, v in models.items() if k.startswith(hub_title)]
    mem, = [v for k, v in models.items() if k.startswith(memory_title)]
    assert [s for _, s in hub] == [s for _, s in mem]
    return {m: h for (m, _), (h, _) in zip(mem, hub)}, mem


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f'{k} differs'


# ----------------------------------------------------------------------------------------------------------
# Tokens against the reference

@pytest.mark.parametrize('size', [224, 256])
@pytest.mark.parametrize('kind', ['dinov2', 'siglip2', 'mae', 'dino_s8'])
def test_tokens_match_reference(kind, size, request):
    ref = request.getfixturevalue(kind)
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        got = ref.encoder(images)
    want = ref.reference(images, ref.input_size)
    width = want.shape[-1]
    assert want.shape == (2, ref.tokens, width)
    assert want.std(dim=1).mean() > 0.1  # the reference is not degenerate (tokens differ from each other)
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= TOL, f'{ref.name} at {size}px: max |diff| {err:.3g}; ' + where_it_differs(ref, images)


@pytest.mark.parametrize('kind,input_size,n_prefix,mean_std', [
    ('dinov2', 224, 5, IMAGENET), ('siglip2', 256, 0, HALF), ('mae', 256, 1, IMAGENET), ('dino_s8', 224, 1, IMAGENET)])
def test_encoder_attributes(kind, input_size, n_prefix, mean_std, request):
    enc = request.getfixturevalue(kind).encoder
    assert enc.input_size == input_size and enc.n_prefix == n_prefix
    assert torch.allclose(enc.mean.flatten(), torch.tensor(mean_std[0]))
    assert torch.allclose(enc.std.flatten(), torch.tensor(mean_std[1]))
    assert tuple(enc.mean.shape) == tuple(enc.std.shape) == (1, 3, 1, 1)


def test_dinov2_input_size_keyword(dinov2):
    # 112 -> an 8x8 grid: transformers interpolates the 37x37 position embedding (bicubic, antialiased) to it.
    enc = rae.Encoder.from_pretrained('dinov2-b', weights=str(dinov2.folder), input_size=112)
    assert enc.input_size == 112
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = enc(images)
    want = dinov2.reference(images, 112)
    assert got.shape == want.shape == (2, 64, 768)
    assert (got - want).abs().max() <= TOL
    enc.input_size = 98  # the attribute is read at every call: 7x7 grid
    with torch.no_grad():
        got = enc(images)
    want = dinov2.reference(images, 98)
    assert got.shape == want.shape == (2, 49, 768)
    assert (got - want).abs().max() <= TOL


def test_mae_input_size_keyword(mae):
    # At 224 the 14x14 position embedding is used as stored (no interpolation).
    enc = rae.Encoder.from_pretrained('mae-b', weights=str(mae.folder), input_size=224)
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = enc(images)
    want = mae.reference(images, 224)
    assert got.shape == want.shape == (1, 196, 768)
    assert (got - want).abs().max() <= TOL


# ----------------------------------------------------------------------------------------------------------
# Weight files: save_pretrained folders, hub (transformers 4.x) names, torch files; 5.24 in-memory names refused

def test_save_pretrained_writes_hub_names(dinov2, mae, reference_dir):
    # transformers 5.24 renames its modules in memory but save_pretrained writes the 4.x (hub) names back.
    to_hub, _ = hub_names(reference_dir, 'hub checkpoint facebook/dinov2', 'transformers 5.24.0 in-memory Dinov2')
    saved = safetensors_torch.load_file(dinov2.folder / 'model.safetensors')
    assert set(saved) == set(to_hub.values())
    to_hub, _ = hub_names(reference_dir, 'hub checkpoint facebook/vit-mae', 'transformers 5.24.0 in-memory ViTMAE')
    saved = safetensors_torch.load_file(mae.folder / 'model.safetensors')
    assert set(to_hub.values()) <= set(saved)


def test_dinov2_hub_names(dinov2, reference_dir, tmp_path):
    to_hub, listed = hub_names(reference_dir, 'hub checkpoint facebook/dinov2', 'transformers 5.24.0 in-memory Dinov2')
    assert [(k, list(v.shape)) for k, v in dinov2.state.items()] == [tuple(x) for x in listed]  # hub-like shapes
    hub = tmp_path / 'dinov2_hub.safetensors'
    safetensors_torch.save_file({to_hub[k]: v for k, v in dinov2.state.items()}, str(hub))
    assert_same_weights(rae.Encoder.from_pretrained('dinov2-b', weights=str(hub)), dinov2.encoder)


def test_dinov2_memory_names_are_refused(dinov2, tmp_path):
    # One spelling per key, the published one: a torch.save of a transformers-5.24 model's in-memory state dict
    # (attention.q_proj, ...) is refused in one line that names the published key it lacks.
    memory = tmp_path / 'dinov2_memory.bin'
    torch.save(dinov2.state, memory)
    with pytest.raises(ERRORS) as e:
        rae.Encoder.from_pretrained('dinov2-b', weights=str(memory))
    assert 'encoder.layer.0.attention.attention.query.weight' in one_line(e)


def test_siglip2_vision_tower_with_and_without_prefix(siglip2, reference_dir, tmp_path):
    to_hub, listed = hub_names(reference_dir, 'hub checkpoint google/siglip2', 'transformers 5.24.0 in-memory Siglip')
    assert [(k, list(v.shape)) for k, v in siglip2.vision_state.items()] == [tuple(x) for x in listed]
    assert all(h == 'vision_model.' + m for m, h in to_hub.items())
    bare = tmp_path / 'siglip2_vision.safetensors'  # no prefix, pooling head included, no text tower
    safetensors_torch.save_file(siglip2.vision_state, str(bare))
    assert_same_weights(rae.Encoder.from_pretrained('siglip2-b', weights=str(bare)), siglip2.encoder)
    prefixed = tmp_path / 'siglip2_full.pt'  # the full model's hub names, text tower and logit scale included
    torch.save(safetensors_torch.load_file(siglip2.folder / 'model.safetensors'), prefixed)
    assert_same_weights(rae.Encoder.from_pretrained('siglip2-b', weights=str(prefixed)), siglip2.encoder)


def test_mae_hub_names(mae, reference_dir, tmp_path):
    to_hub, listed = hub_names(reference_dir, 'hub checkpoint facebook/vit-mae', 'transformers 5.24.0 in-memory ViTMAE')
    vit = {k: v for k, v in mae.state.items() if k.startswith('vit.')}
    assert [(k, list(v.shape)) for k, v in vit.items()] == [tuple(x) for x in listed]
    hub = tmp_path / 'mae_hub.pth'  # encoder part only, hub names
    torch.save({to_hub[k]: v for k, v in vit.items()}, hub)
    assert_same_weights(rae.Encoder.from_pretrained('mae-b', weights=str(hub)), mae.encoder)


def test_mae_memory_names_are_refused(mae, tmp_path):
    memory = tmp_path / 'mae_memory.safetensors'  # the whole 5.24 in-memory pre-training model, decoder included
    safetensors_torch.save_file(mae.state, str(memory))
    with pytest.raises(ERRORS) as e:
        rae.Encoder.from_pretrained('mae-b', weights=str(memory))
    assert 'vit.encoder.layer.0.' in one_line(e)


def test_dino_checkpoint_layout_is_the_published_one(dino_s8, reference_dir):
    models = json.loads((reference_dir / 'state_dict_keys.json').read_text())['models']
    listed, = [v for k, v in models.items() if k.startswith('DINO v1 ViT-S/8 backbone checkpoint')]
    assert [(k, list(v.shape)) for k, v in dino_s8.state.items()] == [tuple(x) for x in listed]


# ----------------------------------------------------------------------------------------------------------
# Bad input: one-line errors that name the culprit

def test_unknown_encoder_name(tmp_path):
    path = tmp_path / 'w.safetensors'
    safetensors_torch.save_file({'cls_token': torch.zeros(1, 1, 8)}, str(path))
    with pytest.raises(ERRORS) as e:
        rae.Encoder.from_pretrained('dinov9-b', weights=str(path))
    assert 'dinov9-b' in one_line(e)


@pytest.mark.parametrize('low,high', [(-0.2, 1.0), (0.0, 1.5)])
def test_images_outside_unit_range(dinov2, low, high):
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    images[0, 1, 3, 4], images[0, 2, 5, 6] = low, high
    with pytest.raises(ERRORS) as e:
        dinov2.encoder(images)
    assert re.search(r'\[\s*0(\.0*)?\s*,\s*1(\.0*)?\s*\]', one_line(e))  # says the range it wants


@pytest.mark.parametrize('shape', [(2, 1, 32, 32), (2, 4, 32, 32), (3, 32, 32), (1, 2, 3, 32, 32)])
def test_images_with_wrong_shape(dinov2, shape):
    with pytest.raises(ERRORS) as e:
        dinov2.encoder(torch.rand(shape))
    assert shape_text(shape) in one_line(e)  # says what it got


def saved_shapes(path):
    """{key: shape} of a safetensors file, read from its header only."""
    with safetensors_torch.safe_open(str(path), framework='pt') as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_weights_of_a_different_size(dinov2, tmp_path):
    # A DINOv2-S file (width 384) given as dinov2-b: same keys, other shapes.
    cfg = transformers.Dinov2WithRegistersConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                                 patch_size=14, image_size=518, num_register_tokens=4)
    random_model(transformers.Dinov2WithRegistersModel, cfg, seed=4).save_pretrained(tmp_path / 'small')
    small = saved_shapes(tmp_path / 'small' / 'model.safetensors')
    base = saved_shapes(dinov2.folder / 'model.safetensors')
    with pytest.raises(ERRORS) as e:
        rae.Encoder.from_pretrained('dinov2-b', weights=str(tmp_path / 'small'))
    msg = one_line(e)
    named = [k for k in small if k in msg]
    assert named, f'no key of the file is named: {msg}'
    key = max(named, key=len)
    assert small[key] != base[key], f'{key} does not mismatch: {msg}'
    assert shape_text(small[key]) in msg and shape_text(base[key]) in msg, msg


def test_weights_of_another_model(dinov2, mae):
    # The MAE file given as dinov2-b: the message names a key (of the file or of the expected layout).
    with pytest.raises(ERRORS) as e:
        rae.Encoder.from_pretrained('dinov2-b', weights=str(mae.folder / 'model.safetensors'))
    msg = one_line(e)
    keys = set(mae.state) | set(saved_shapes(mae.folder / 'model.safetensors'))
    keys |= set(dinov2.state) | set(saved_shapes(dinov2.folder / 'model.safetensors'))
    assert any(k in msg for k in keys), msg


def test_truncated_safetensors(dino_s8, tmp_path):
    path = tmp_path / 'whole.safetensors'
    safetensors_torch.save_file(dino_s8.state, str(path))
    data = path.read_bytes()
    path = tmp_path / 'cut.safetensors'
    path.write_bytes(data[:len(data) * 6 // 10])  # header intact, tensor data short
    with pytest.raises(ERRORS) as e:
        rae.Encoder.from_pretrained('dino-s8', weights=str(path))
    assert 'cut.safetensors' in one_line(e)


def test_truncated_torch_file(dino_s8, tmp_path):
    data = dino_s8.path.read_bytes()
    path = tmp_path / 'cut.pth'
    path.write_bytes(data[:len(data) * 6 // 10])
    with pytest.raises(ERRORS) as e:
        rae.Encoder.from_pretrained('dino-s8', weights=str(path))
    assert 'cut.pth' in one_line(e)


def test_missing_weights_file(tmp_path):
    with pytest.raises(ERRORS + (FileNotFoundError,)) as e:
        rae.Encoder.from_pretrained('mae-b', weights=str(tmp_path / 'nowhere.safetensors'))
    assert 'nowhere.safetensors' in one_line(e)


def test_toy_writer_writes_the_published_layout(tmp_path):
    # training.write_toy_encoder (the offline stand-in of the published file) is read by transformers itself:
    # the same tokens as our encoder, so the inverse of the name table writes the real hub names.
    import training
    over = dict(width=32, depth=2, heads=2, pos_grid=4, input_size=56)
    enc = training.write_toy_encoder(tmp_path / 'toy.pt', 'dinov2-b', over, seed=3)
    sd = torch.load(tmp_path / 'toy.pt')
    cfg = transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 mlp_ratio=4, patch_size=14, image_size=56, num_register_tokens=4,
                                                 layer_norm_eps=1e-6, layerscale_value=1.0)
    folder = tmp_path / 'hf'  # as from the hub: config.json + model.safetensors, read by from_pretrained
    cfg.save_pretrained(folder)
    safetensors_torch.save_file(sd, str(folder / 'model.safetensors'))
    model, info = transformers.Dinov2WithRegistersModel.from_pretrained(folder, output_loading_info=True)
    assert not info['unexpected_keys'] and not info['mismatched_keys']
    assert set(info['missing_keys']) <= {'embeddings.mask_token', 'layernorm.weight', 'layernorm.bias'}
    model.eval()
    drop_affine_(model.layernorm)
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(pixel_values=prepare(images, 56, *IMAGENET)).last_hidden_state[:, 5:]
        assert (enc(images) - want).abs().max() <= TOL
