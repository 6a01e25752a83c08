"""
The diffusers AutoencoderRAE folder format, read and written: config.json (AutoencoderRAE's 20 arguments) and
diffusion_pytorch_model.safetensors, which holds the whole RAE (encoder, decoder and four buffers) in one file.

rae.RAE.from_pretrained / from_diffusers read it and RAE.save_pretrained writes it through this module; it builds on
rae.py (the tables below extend rae.PUBLISHED to diffusers' names), so rae.py imports it only when a method needs it.
"""
import json
import math
import os
import re
from pathlib import Path

import torch

import rae
from files import (download, hf_url, load_published, load_safetensors, load_stats, published_names,
                   published_state_dict, save_safetensors)

WEIGHTS = 'diffusion_pytorch_model.safetensors'
CONFIG = {  # AutoencoderRAE's arguments and defaults in diffusers 0.42.1: what a config.json leaves out
    'encoder_type': 'dinov2', 'encoder_hidden_size': 768, 'encoder_patch_size': 14, 'encoder_num_hidden_layers': 12,
    'decoder_hidden_size': 512, 'decoder_num_hidden_layers': 8, 'decoder_num_attention_heads': 16,
    'decoder_intermediate_size': 2048, 'patch_size': 16, 'encoder_input_size': 224, 'image_size': None,
    'num_channels': 3, 'encoder_norm_mean': None, 'encoder_norm_std': None, 'latents_mean': None, 'latents_std': None,
    'noise_tau': 0.0, 'reshape_to_2d': True, 'use_encoder_loss': False, 'scaling_factor': 1.0}
HUB_REPO = re.compile(r'[\w.-]+/[\w.-]+')
WEIGHT_SUFFIXES = ('.pt', '.pth', '.bin', '.ckpt', '.safetensors')

# Key names, in rae.PUBLISHED's form. The decoder: the released names under decoder., but for diffusers' own
# attention module.
DECODER = ('decoder.', {'embed': 'decoder_embed', 'cls_token': 'trainable_cls_token', 'pos_embed': 'decoder_pos_embed',
                        'norm': 'decoder_norm', 'pred': 'decoder_pred'},
           'decoder_layers.{i}.', {'norm1': 'layernorm_before', 'attn.proj': 'attention.to_out.0',
                                   'attn.qkv': ('attention.to_q', 'attention.to_k', 'attention.to_v'),
                                   'norm2': 'layernorm_after', 'fc1': 'intermediate.dense', 'fc2': 'output.dense'})
# The encoder under its transformers model's names in memory, renamed in transformers 5.18 (DINOv2), 5.9 (MAE) and
# 5.6 (SigLIP, one level flatter). Per encoder_type: (the renamed layout, which we write for the pinned transformers;
# the earlier one, the hub checkpoints' names). Both are read.
_T5_ATTN = {'attn.qkv': ('attention.q_proj', 'attention.k_proj', 'attention.v_proj'), 'attn.proj': 'attention.o_proj'}
_DINOV2, _MAE, _SIGLIP2 = (rae.PUBLISHED[t] for t in ('dinov2', 'mae', 'siglip2'))
ENCODERS = {
    'dinov2': (('encoder.', _DINOV2[1], 'encoder.layer.{i}.', {**_DINOV2[3], **_T5_ATTN}), ('encoder.', *_DINOV2[1:])),
    'mae': (('encoder.', _MAE[1], 'layers.{i}.', {'norm1': 'layernorm_before', 'norm2': 'layernorm_after',
                                                 'fc1': 'mlp.fc1', 'fc2': 'mlp.fc2', **_T5_ATTN}),
            ('encoder.', *_MAE[1:])),
    'siglip2': (('encoder.', *_SIGLIP2[1:]), ('encoder.vision_model.', *_SIGLIP2[1:])),
}


def family(encoder_type):
    """The name of the first rae.ENCODERS preset of an encoder_type: its patch, position grid and build are the
    family's (DINOv2-S/B/L share theirs)."""
    return next(n for n, e in rae.ENCODERS.items() if e['layout'] == encoder_type)


def is_diffusers(source):
    """Whether source names a diffusers AutoencoderRAE: a folder with a config.json (and no transformers weights),
    or, when no such path exists, a hub repository id 'org/name'."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source)
    if path.is_dir():
        return (path / 'config.json').is_file() and not (path / 'model.safetensors').exists()
    return not path.exists() and HUB_REPO.fullmatch(str(source)) is not None and path.suffix not in WEIGHT_SUFFIXES


def read(source):
    """(config, state dict in float32, weights path) of a diffusers AutoencoderRAE folder or hub repository (its two
    files downloaded once). The config has every argument, checked, and the values the model really uses: the
    file's buffers win over config.json, as in diffusers (latents_* as tensors or None)."""
    if Path(source).is_dir():
        config, weights = Path(source) / 'config.json', Path(source) / WEIGHTS
        if not weights.is_file():
            other = sorted(p.name for p in Path(source).glob('diffusion_pytorch_model*'))
            raise FileNotFoundError(f'{source}: no {WEIGHTS}' + (f' (found {", ".join(other)}: sharded, a variant '
                                    'or .bin files are not read; save it again unsharded)' if other else ''))
    else:
        config, weights = (Path(download(hf_url(source, name))) for name in ('config.json', WEIGHTS))
    cfg = {**CONFIG, **json.loads(config.read_text())}
    t, C, p = cfg['encoder_type'], cfg['encoder_hidden_size'], cfg['encoder_patch_size']
    g = cfg['encoder_input_size'] // p
    for bad, why in [(t not in ENCODERS, f'encoder_type {t!r} is none of {", ".join(ENCODERS)}'),
                     (cfg['encoder_input_size'] % p, 'encoder_input_size is not a multiple of encoder_patch_size'),
                     (cfg['image_size'] not in (None, g * cfg['patch_size']), 'image_size is not patch_size * grid'),
                     (C % 64, 'encoder_hidden_size is not a multiple of 64 (the encoder has width // 64 heads)'),
                     (cfg['num_channels'] != 3, 'num_channels is not 3'),
                     (not cfg['reshape_to_2d'], 'reshape_to_2d is false (latents as tokens; ours are 2D maps)'),
                     (cfg['scaling_factor'] != 1.0, 'scaling_factor is not 1.0 (ours has none)')]:
        if bad:
            raise ValueError(f'{config}: {why}')
    sd = {k: v.float() for k, v in load_safetensors(weights).items()}
    for name, field in [('encoder_mean', 'encoder_norm_mean'), ('encoder_std', 'encoder_norm_std'),
                        ('_latents_mean', 'latents_mean'), ('_latents_std', 'latents_std')]:
        value = sd.pop(name, None)
        if value is None and cfg[field] is not None:
            value = torch.tensor(cfg[field]).float()
        cfg[field] = value
    for field in ('latents_mean', 'latents_std'):  # [1] or broadcast over [C, g, g]; a 1-D [C] would hit the width
        v = cfg[field]
        if v is not None and v.numel() > 1 and (v.ndim != 3 or torch.broadcast_shapes(v.shape, (C, g, g)) != (C, g, g)):
            raise ValueError(f'{weights}: _{field} has shape {tuple(v.shape)}, expected [1] or [{C}, {g}, {g}]')
    if cfg['latents_std'] is not None and not (cfg['latents_std'] > 0).all():
        raise ValueError(f'{weights}: _latents_std has values <= 0')
    for field in ('encoder_norm_mean', 'encoder_norm_std'):  # what Encoder(mean=, std=) takes
        cfg[field] = None if cfg[field] is None else tuple(cfg[field].flatten().tolist())
    return cfg, sd, weights


def load_rae(source, encoder=None, resolution=None, stats=None, load_encoder=True, cls=None):
    """rae.RAE.from_diffusers (cls: the RAE class to build): the config sizes both models (the encoder a preset, or
    its family's with other sizes), the file holds their weights and the statistics."""
    cfg, sd, path = read(source)
    t, C, p = cfg['encoder_type'], cfg['encoder_hidden_size'], cfg['encoder_patch_size']
    layout = next((lay for lay in ENCODERS[t] if lay[0] + published_names('blocks.0.attn.qkv.weight', lay)[0] in sd),
                  ENCODERS[t][0])  # the spelling the file uses; else the first, whose names the error then shows
    enc_kw = dict(width=C, depth=cfg['encoder_num_hidden_layers'], heads=C // 64, patch=p,
                  input_size=cfg['encoder_input_size'])
    pos = sd.get(layout[0] + layout[1]['pos_embed'])
    if pos is not None:  # [1, 1 + n^2, C] or SigLIP's [n^2, C]: isqrt gives n either way
        enc_kw['pos_grid'] = math.isqrt(pos.shape[-2])
    dec_kw = dict(token_dim=C, width=cfg['decoder_hidden_size'], depth=cfg['decoder_num_hidden_layers'],
                  heads=cfg['decoder_num_attention_heads'], mlp_hidden=cfg['decoder_intermediate_size'],
                  grid=cfg['encoder_input_size'] // p, patch=cfg['patch_size'])
    size = dec_kw['grid'] * dec_kw['patch']
    preset = next((n for n, e in rae.ENCODERS.items() if e['layout'] == t and all(e[k] == enc_kw[k] for k in
                                                                                ('width', 'depth', 'patch'))), None)
    if (encoder not in (None, preset) and (preset or rae.ENCODERS[encoder]['layout'] != t)
            or resolution not in (None, size)):
        raise ValueError(f'{path}: an RAE for {preset or t} at {size} px, not {encoder or preset} at '
                         f'{resolution or size} px')
    dec = load_published(rae.Decoder(**dec_kw), sd, DECODER, path, optional=('pos_embed',))
    pixel_mean = cfg['encoder_norm_mean'] or rae.IMAGENET_MEAN
    pixel_std = cfg['encoder_norm_std'] or rae.IMAGENET_STD
    enc = None
    if load_encoder:
        base = rae.ENCODERS[preset or family(t)]  # sizes from enc_kw anyway
        enc = rae.Encoder(**dict(base, name=preset or t, mean=pixel_mean, std=pixel_std, **enc_kw))
        load_published(enc, sd, layout, path)
    mean, var, std = cfg['latents_mean'], None, cfg['latents_std']
    if stats is not None:  # a statistics file instead, or False: none
        (mean, var), std = (load_stats(stats) if stats is not False else (None, None)), None
    model = (cls or rae.RAE)(enc, dec, mean, var, cfg['noise_tau'], pixel_mean, pixel_std)
    if std is not None:
        # The statistics convention: a diffusers file stores s = latents_std = sqrt(var + 1e-5), the authors' var
        # and eps, and diffusers' encode divides by s + 1e-5, a second eps. The authors' RAE and ours divide by
        # sqrt(var + 1e-5) = s, so s is our latent_std as it is (no round trip through var) and our encode is the
        # authors'; diffusers' own latent is ours * s / (s + 1e-5), 1e-5 / s relative (2e-5 at s = 0.5).
        # save_rae writes latent_std back as s.
        model.latent_std = std
    return model.eval()


def unused_tensors(encoder_type, prefix, width):
    """Tensors diffusers' encoders hold that RAE never uses, as zeros: diffusers does not fail on missing keys, it
    leaves them random and logs it, so a file we write carries them all."""
    if encoder_type == 'dinov2':
        return {prefix + 'embeddings.mask_token': torch.zeros(1, width)}
    if encoder_type != 'siglip2':
        return {}
    head = {'probe': (1, 1, width), 'attention.in_proj_weight': (3 * width, width),
            'attention.in_proj_bias': (3 * width,), 'attention.out_proj.weight': (width, width),
            'attention.out_proj.bias': (width,), 'layernorm.weight': (width,), 'layernorm.bias': (width,),
            'mlp.fc1.weight': (3072, width), 'mlp.fc1.bias': (3072,), 'mlp.fc2.weight': (width, 3072),
            'mlp.fc2.bias': (width,)}  # SigLIP's attention-pooling head; its MLP is 3072 wide at any width
    return {f'{prefix}head.{k}': torch.zeros(shape) for k, shape in head.items()}


def save_rae(model, folder, classic=False):
    """rae.RAE.save_pretrained: `model` as an AutoencoderRAE folder, the encoder under the newer names or, with
    classic=True, the earlier ones (ENCODERS). Refuses what diffusers would load without an error but run
    differently."""
    enc, dec = model.encoder, model.decoder
    if enc is None or enc.layout not in ENCODERS:
        raise ValueError('save_pretrained needs the DINOv2, SigLIP2 or MAE encoder: diffusers files carry it')
    C, t, g = enc.patch_embed.out_channels, enc.layout, enc.input_size // enc.patch
    base = rae.ENCODERS[family(t)]
    stored = base['pos_grid'] * base['patch'] // enc.patch  # diffusers builds the position table for that side
    for bad, why in [(enc.blocks[0].attn.heads != C // 64, f'{enc.blocks[0].attn.heads} encoder heads; diffusers '
                      f'builds width // 64 = {C // 64}'),
                     (enc.input_size % enc.patch, f'input size {enc.input_size} is not a multiple of the patch'),
                     (math.isqrt(enc.pos_embed.shape[1]) != stored, f'a {math.isqrt(enc.pos_embed.shape[1])}-wide '
                      f'position grid; diffusers stores {stored} for {t} at patch {enc.patch}'),
                     (dec.grid != g, f'a decoder grid of {dec.grid} for {g} x {g} encoder tokens')]:
        if bad:
            raise ValueError(f'{enc.name} + decoder cannot be written for diffusers: {why}')
    layout = ENCODERS[t][int(classic)]
    mean, std = (torch.atleast_1d(b.detach().float().cpu()) for b in (model.latent_mean, model.latent_std))
    config = dict(CONFIG, _class_name='AutoencoderRAE', _diffusers_version='0.42.1', encoder_type=t,
                  encoder_hidden_size=C, encoder_patch_size=enc.patch, encoder_num_hidden_layers=len(enc.blocks),
                  decoder_hidden_size=dec.embed.out_features, decoder_num_hidden_layers=len(dec.blocks),
                  decoder_num_attention_heads=dec.blocks[0].attn.heads,
                  decoder_intermediate_size=dec.blocks[0].fc1.out_features, patch_size=dec.patch,
                  encoder_input_size=enc.input_size, image_size=g * dec.patch,
                  encoder_norm_mean=model.pixel_mean.flatten().tolist(),
                  encoder_norm_std=model.pixel_std.flatten().tolist(), latents_mean=mean.tolist(),
                  latents_std=std.tolist(), noise_tau=float(model.noise_tau))
    tensors = {**published_state_dict(enc, layout), **published_state_dict(dec, DECODER),
               **unused_tensors(t, layout[0], C), 'encoder_mean': model.pixel_mean, 'encoder_std': model.pixel_std,
               '_latents_mean': mean, '_latents_std': std}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, folder / WEIGHTS, metadata={'format': 'pt'})
    (folder / 'config.json').write_text(json.dumps(config, indent=2, sort_keys=True))
