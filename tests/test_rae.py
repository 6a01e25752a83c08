"""The RAE foundation: downloads, the safetensors reader, the decoder and the RAE, against independent references."""
import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import files
import rae

GOLDEN = Path(__file__).resolve().parents[2] / 'shared' / 'reference' / 'golden'


def golden(name):
    if not (GOLDEN / name).exists():
        pytest.skip(f'golden file {name} not available (../shared absent)')
    return torch.load(GOLDEN / name)


# ----------------------------------------------------------------------------------------------------------
# A real HTTP server on 127.0.0.1 that honours Range requests and can cut a connection mid-file

class FileServer:
    def __init__(self, files):
        self.files, self.requests, self.cut_once, self.plan = files, [], set(), {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get('Range')))
                if server.plan.get(self.path):  # a scripted answer: (status, headers, body); no length = close
                    status, headers, body = server.plan[self.path].pop(0)
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                    self.close_connection = True
                    return
                data = server.files.get(self.path.split('?')[0])
                if data is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                start = 0
                if self.headers.get('Range'):
                    start = int(self.headers['Range'].split('=')[1].split('-')[0])
                    self.send_response(206)
                    self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
                else:
                    self.send_response(200)
                self.send_header('Content-Length', str(len(data) - start))
                self.end_headers()
                if self.path in server.cut_once:  # send half, then drop the connection
                    server.cut_once.discard(self.path)
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv('RAE_CACHE', str(tmp_path / 'cache'))
    s = FileServer({})
    yield s
    s.close()


def torch_bytes(n, seed=0):
    """A torch file of about n bytes, as the released weights are (a cache hit checks the format)."""
    buf = io.BytesIO()
    torch.save({'w': torch.randn(n // 4, generator=torch.Generator().manual_seed(seed))}, buf)
    return buf.getvalue()


def test_download_progress_cache_and_checksum(server, capsys):
    data = torch_bytes(3_000_000)
    server.files['/a/b/weights.bin'] = data
    sha = hashlib.sha256(data).hexdigest()
    path = rae.download(server.url + '/a/b/weights.bin', sha256=sha, size=len(data))
    assert Path(path).read_bytes() == data
    assert Path(path) == Path(os.environ['RAE_CACHE']) / 'a/b/weights.bin'
    assert 'weights.bin' in capsys.readouterr().err  # the tqdm bar names the file
    n = len(server.requests)
    assert rae.download(server.url + '/a/b/weights.bin', sha256=sha) == path
    assert len(server.requests) == n  # a cache hit makes no request


def test_download_resumes_after_a_cut_connection(server):
    data = os.urandom(2_000_000)
    server.files['/big.pt'] = data
    server.cut_once.add('/big.pt')
    path = rae.download(server.url + '/big.pt', sha256=hashlib.sha256(data).hexdigest())
    assert Path(path).read_bytes() == data
    ranges = [r for p, r in server.requests if p == '/big.pt']
    assert ranges[0] is None and ranges[1] is not None and int(ranges[1].split('=')[1][:-1]) > 0


def test_download_checksum_mismatch_raises_and_keeps_nothing(server):
    server.files['/x.pt'] = b'hello world'
    with pytest.raises(RuntimeError, match='sha256'):
        rae.download(server.url + '/x.pt', sha256='0' * 64)
    assert not list(Path(os.environ['RAE_CACHE']).rglob('x.pt*'))


def test_download_refuses_an_html_page_and_a_short_body(server):
    data = torch_bytes(200_000)
    cache = Path(os.environ['RAE_CACHE'])
    server.plan['/login.pt'] = [(200, {'Content-Type': 'text/html', 'Content-Length': '15'}, b'<html>no</html>')]
    with pytest.raises(RuntimeError, match='HTML page.*nothing was cached'):
        rae.download(server.url + '/login.pt')
    server.plan['/short.pt'] = [(200, {}, data[:len(data) // 2])]  # close-delimited, cut short: not a zip
    with pytest.raises(RuntimeError, match='truncated or not a .pt file'):
        rae.download(server.url + '/short.pt', retries=1)
    assert not [p for p in cache.rglob('*') if p.is_file()]  # nothing under any name, no .part left


def test_download_retries_transient_errors_but_not_a_404(server):
    data = torch_bytes(100_000)
    server.files['/flaky.pt'] = data
    server.plan['/flaky.pt'] = [(503, {'Content-Length': '0'}, b''), (502, {'Content-Length': '0'}, b'')]
    assert Path(rae.download(server.url + '/flaky.pt')).read_bytes() == data
    assert [p for p, _ in server.requests].count('/flaky.pt') == 3
    with pytest.raises(RuntimeError, match='HTTP 404'):
        rae.download(server.url + '/gone.pt')
    assert [p for p, _ in server.requests].count('/gone.pt') == 1


def test_download_restarts_after_a_misaimed_range(server):
    data = torch_bytes(400_000)
    server.files['/r.pt'] = data
    part = Path(os.environ['RAE_CACHE']) / 'r.pt.part'
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1000])
    wrong = f'bytes 0-{len(data) - 1}/{len(data)}'  # a 206 from offset 0 for a request from 1000
    server.plan['/r.pt'] = [(206, {'Content-Range': wrong, 'Content-Length': str(len(data))}, data)]
    assert Path(rae.download(server.url + '/r.pt')).read_bytes() == data


def test_a_bad_cached_file_is_moved_aside_and_fetched_again(server, capsys):
    data = torch_bytes(100_000)
    server.files['/m.pt'] = data
    path = Path(os.environ['RAE_CACHE']) / 'm.pt'
    path.parent.mkdir(parents=True)
    path.write_bytes(data[:5000])  # a copy cut short
    assert Path(rae.download(server.url + '/m.pt')).read_bytes() == data
    assert (path.parent / 'm.pt.bad').read_bytes() == data[:5000]  # kept, not deleted
    assert 'moved aside' in capsys.readouterr().err


def test_a_read_only_cache_is_one_line_naming_rae_cache(server, tmp_path, monkeypatch):
    if os.geteuid() == 0:  # root writes anywhere: a file where the folder should be fails for everyone
        (tmp_path / 'ro').write_text('')
        monkeypatch.setenv('RAE_CACHE', str(tmp_path / 'ro' / 'cache'))
    else:
        (tmp_path / 'ro').mkdir(mode=0o500)
        monkeypatch.setenv('RAE_CACHE', str(tmp_path / 'ro'))
    server.files['/w.pt'] = torch_bytes(1000)
    with pytest.raises(RuntimeError) as e:
        rae.download(server.url + '/w.pt')
    assert 'RAE_CACHE' in str(e.value) and '\n' not in str(e.value)


def test_two_processes_download_one_file_safely(server, tmp_path):
    data = torch_bytes(4_000_000)
    server.files['/shared.pt'] = data
    code = f'import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); import files; ' \
        f'print(files.download({server.url + "/shared.pt"!r}))'
    procs = [subprocess.Popen([sys.executable, '-c', code], env=dict(os.environ), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1 and Path(paths.pop()).read_bytes() == data
    assert not list(Path(os.environ['RAE_CACHE']).glob('shared.pt.*'))  # no .part, no .lock left


def test_download_offline_error_names_url_and_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv('RAE_CACHE', str(tmp_path))
    url = 'http://127.0.0.1:9/nowhere/model.pt'  # discard port: connection refused
    with pytest.raises(RuntimeError) as e:
        rae.download(url, retries=1)
    msg = str(e.value)
    assert url in msg and str(tmp_path / 'nowhere/model.pt') in msg and '\n' not in msg


def test_hf_endpoint_routes_hub_files_and_loads_an_encoder(server, monkeypatch, tmp_path):
    """Encoder.from_pretrained(name) with no weights downloads from HF_ENDPOINT (a tiny DINOv2 layout)."""
    cfg = dict(rae.ENCODERS['dinov2-b'], width=32, depth=2, heads=2, repo='tiny/dinov2')
    monkeypatch.setitem(rae.ENCODERS, 'tiny-dinov2', cfg)
    torch.manual_seed(0)
    ref = rae.Encoder(**cfg)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.1)
    hub = {'embeddings.cls_token': ref.cls_token, 'embeddings.mask_token': torch.zeros(1, 32),
           'embeddings.position_embeddings': ref.pos_embed, 'embeddings.register_tokens': ref.register_tokens,
           'embeddings.patch_embeddings.projection.weight': ref.patch_embed.weight,
           'embeddings.patch_embeddings.projection.bias': ref.patch_embed.bias,
           'layernorm.weight': torch.ones(32), 'layernorm.bias': torch.zeros(32)}
    for i, b in enumerate(ref.blocks):
        p = f'encoder.layer.{i}.'
        for s in ('weight', 'bias'):
            for n, t in zip(('query', 'key', 'value'), getattr(b.attn.qkv, s).chunk(3)):
                hub[p + f'attention.attention.{n}.{s}'] = t
            hub[p + f'attention.output.dense.{s}'] = getattr(b.attn.proj, s)
            for ours in ('norm1', 'norm2'):
                hub[p + f'{ours}.{s}'] = getattr(getattr(b, ours), s)
            hub[p + f'mlp.fc1.{s}'], hub[p + f'mlp.fc2.{s}'] = getattr(b.fc1, s), getattr(b.fc2, s)
        hub[p + 'layer_scale1.lambda1'], hub[p + 'layer_scale2.lambda1'] = b.ls1, b.ls2
    st = pytest.importorskip('safetensors.torch')
    blob = st.save({k: v.detach().contiguous() for k, v in hub.items()})
    server.files['/tiny/dinov2/resolve/main/model.safetensors'] = blob
    monkeypatch.setenv('HF_ENDPOINT', server.url)
    enc = rae.Encoder.from_pretrained('tiny-dinov2')
    assert any(p.startswith('/tiny/dinov2/resolve/main/') for p, _ in server.requests)
    x = torch.rand(2, 3, 256, 256)
    torch.testing.assert_close(enc(x), ref.eval()(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# The hand-written safetensors reader against the safetensors package

def test_safetensors_reader_matches_the_package(tmp_path):
    st = pytest.importorskip('safetensors.torch')
    tensors = {'f32': torch.randn(3, 4), 'bf16': torch.randn(5).bfloat16(), 'f16': torch.randn(2, 2).half(),
               'i64': torch.arange(7), 'u8': torch.randint(0, 255, (4,), dtype=torch.uint8), 'empty': torch.zeros(0, 3)}
    st.save_file(tensors, tmp_path / 'w.safetensors', metadata={'format': 'pt'})
    ours = files.load_safetensors(tmp_path / 'w.safetensors')
    assert ours.keys() == tensors.keys()
    for k, v in tensors.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v)
    data = (tmp_path / 'w.safetensors').read_bytes()
    (tmp_path / 'cut.safetensors').write_bytes(data[:-10])
    with pytest.raises(ValueError, match='truncated'):
        files.load_state_dict_file(tmp_path / 'cut.safetensors')
    torch.save(tensors, tmp_path / 'w.pt')
    (tmp_path / 'cut.pt').write_bytes((tmp_path / 'w.pt').read_bytes()[:100])
    with pytest.raises(ValueError, match='truncated'):
        files.load_state_dict_file(tmp_path / 'cut.pt')
    with pytest.raises(FileNotFoundError, match='missing.pt'):
        files.load_state_dict_file(tmp_path / 'missing.pt')


# ----------------------------------------------------------------------------------------------------------
# Decoder and RAE against the authors' code (golden vectors)

def golden_arch(c):
    """Decoder(**arch) of the authors' decoder config (HF ViTMAE names)."""
    return dict(token_dim=c['hidden_size'], width=c['decoder_hidden_size'], depth=c['decoder_num_hidden_layers'],
                heads=c['decoder_num_attention_heads'], mlp_hidden=c['decoder_intermediate_size'],
                grid=int(c['num_patches'] ** 0.5), patch=c['patch_size'])


def test_decoder_matches_reference():
    g = golden('decoder_tiny.pt')
    dec = rae.Decoder.from_state_dict(g['state_dict'], 'golden', **golden_arch(g['constructor'])).eval()
    i, o = g['inputs'], g['outputs']
    with torch.no_grad():
        torch.testing.assert_close(dec(i['tokens']), o['pixels_encoder_normalized'], rtol=1e-5, atol=1e-5)
        # the token-grid resize path: the reference's logits, unpatchified by the reference rule nhwpqc->nchpwq
        B, p, g_ = 2, dec.patch, dec.grid
        ref = torch.einsum('nhwpqc->nchpwq', o['logits_from_4x_tokens'].reshape(B, g_, g_, p, p, 3))
        torch.testing.assert_close(dec(i['tokens_4x']), ref.reshape(B, 3, g_ * p, g_ * p), rtol=1e-5, atol=1e-5)
        kw = dict(pixel_mean=i['encoder_mean'].tolist(), pixel_std=i['encoder_std'].tolist())
        full = rae.RAE(None, dec, i['stat_mean'], i['stat_var'], **kw)
        torch.testing.assert_close(full.decode(i['z']), o['x_rec'], rtol=1e-5, atol=1e-5)
        var_only = rae.RAE(None, dec, None, i['stat_var'], **kw)
        torch.testing.assert_close(var_only.decode(i['z']), o['x_rec_var_only'], rtol=1e-5, atol=1e-5)


def tiny_rae_from_golden(g):
    hf = g['constructor']['encoder_hf_config']
    cfg = dict(rae.ENCODERS['dinov2-b'], width=hf['hidden_size'], depth=hf['num_hidden_layers'],
               heads=hf['num_attention_heads'], patch=hf['patch_size'], pos_grid=hf['image_size'] // hf['patch_size'],
               input_size=g['constructor']['rae']['encoder_input_size'])
    enc = rae.Encoder(**cfg)
    rae.load_published(enc, g['state_dict']['encoder_hf_hub_names'], rae.PUBLISHED['dinov2'], 'golden')
    sd = {k.removeprefix('decoder.'): v for k, v in g['state_dict']['rae'].items() if k.startswith('decoder.')}
    dec = rae.Decoder.from_state_dict(sd, 'golden', **golden_arch(g['constructor']['decoder_config']))
    i = g['inputs']
    return rae.RAE(enc.eval(), dec, i['stat_mean'], i['stat_var'], noise_tau=g['constructor']['rae']['noise_tau'])


def test_rae_matches_reference():
    g = golden('rae_tiny.pt')
    model = tiny_rae_from_golden(g).eval()
    i, o = g['inputs'], g['outputs']
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(i['images']), o['encoder_tokens'], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode(i['images']), o['latent'], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(o['latent']), o['recon_from_latent'], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(i['images']), o['forward'], rtol=1e-5, atol=1e-5)
        model.train()  # noise augmentation: same draws in the same order (sigma first, then eps)
        torch.manual_seed(int(i['noise_seed']))
        torch.testing.assert_close(model.encode(i['images']), o['latent_train_mode_noisy'], rtol=1e-5, atol=1e-5)
    # one spelling per key: the transformers-5 in-memory names are refused, naming the published key
    enc5 = rae.Encoder(width=16, depth=2, heads=2, patch=4, pos_grid=6, input_size=16, registers=4, layerscale=True)
    with pytest.raises(ValueError, match='encoder.layer.0.attention.attention.query.weight is missing'):
        rae.load_published(enc5, g['state_dict']['encoder_hf_transformers5'], rae.PUBLISHED['dinov2'], 'golden')


# ----------------------------------------------------------------------------------------------------------
# Decoder / RAE properties

def released_layout(dec):
    """Our decoder's weights under the released key names (HF ViTMAE decoder layout)."""
    out = {'decoder_embed.weight': dec.embed.weight, 'decoder_embed.bias': dec.embed.bias,
           'trainable_cls_token': dec.cls_token, 'decoder_pos_embed': dec.pos_embed,
           'decoder_norm.weight': dec.norm.weight, 'decoder_norm.bias': dec.norm.bias,
           'decoder_pred.weight': dec.pred.weight, 'decoder_pred.bias': dec.pred.bias}
    for i, b in enumerate(dec.blocks):
        p = f'decoder_layers.{i}.'
        for s in ('weight', 'bias'):
            for n, t in zip(('query', 'key', 'value'), getattr(b.attn.qkv, s).chunk(3)):
                out[p + f'attention.attention.{n}.{s}'] = t
            for ours, theirs in [('attn.proj', 'attention.output.dense'), ('fc1', 'intermediate.dense'),
                                 ('fc2', 'output.dense'), ('norm1', 'layernorm_before'), ('norm2', 'layernorm_after')]:
                mod = b.attn.proj if ours == 'attn.proj' else getattr(b, ours)
                out[p + f'{theirs}.{s}'] = getattr(mod, s)
    return {k: v.detach().clone() for k, v in out.items()}


@pytest.mark.parametrize('patch,size', [(16, 256), (32, 512)])
def test_decoder_released_layout_and_upsampling(patch, size):
    torch.manual_seed(0)
    dec = rae.Decoder(token_dim=24, width=64, depth=2, heads=1, mlp_hidden=96, grid=16, patch=patch).eval()
    for p in dec.parameters():
        torch.nn.init.normal_(p, std=0.05)
    sd = released_layout(dec)
    assert len(sd) == 8 + 16 * 2
    arch = dict(token_dim=24, width=64, depth=2, heads=1, mlp_hidden=96, grid=16, patch=patch)
    loaded = rae.Decoder.from_state_dict(sd, 'released.pt', **arch).eval()
    tokens = torch.randn(2, 256, 24)
    with torch.no_grad():
        img = loaded(tokens)
        assert img.shape == (2, 3, size, size)
        torch.testing.assert_close(img, dec(tokens), rtol=0, atol=0)
        # unpatchify: token (r, c) fills the p x p block at rows r*p.., cols c*p.., channels last per pixel
        x = dec.embed(tokens)
        x = torch.cat([dec.cls_token.expand(2, -1, -1), x], 1) + dec.pos_embed
        for b in dec.blocks:
            x = b(x)
        pred = dec.pred(dec.norm(x))[:, 1:]
        r, c = 5, 11
        block = img[:, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
        torch.testing.assert_close(block, pred[:, r * 16 + c].reshape(2, patch, patch, 3).permute(0, 3, 1, 2))
    bad = dict(sd)
    bad['decoder_pred.bias'] = torch.zeros(7)
    with pytest.raises(ValueError, match='decoder_pred.bias|pred.bias'):
        rae.Decoder.from_state_dict(bad, 'bad.pt', **arch)


def test_sincos_matches_formula():
    emb = rae.sincos_2d(8, 3)  # width 8: 2 frequencies per axis
    w = 1 / 10000 ** (np.arange(2) / 2)
    r, c = 1, 2
    row = emb[r * 3 + c].double().numpy()
    expect = np.concatenate([np.sin(c * w), np.cos(c * w), np.sin(r * w), np.cos(r * w)])
    np.testing.assert_allclose(row, expect, rtol=1e-6)


@pytest.mark.parametrize('with_mean', [True, False])
def test_normalize_denormalize_identity(with_mean):
    C, h = 6, 4
    mean = torch.randn(C, h, h) if with_mean else None
    var = torch.rand(C, h, h) + 0.1
    model = rae.RAE(None, rae.Decoder(C, 64, 1, 1, 64, h, 2), mean, var)
    z = torch.randn(3, C, h, h)
    torch.testing.assert_close(model.denormalize(model.normalize(z)), z)
    expect = (z - (mean if with_mean else 0)) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(model.normalize(z), expect)


def test_noise_augmentation_only_in_train_mode_and_bounded_by_tau():
    enc = rae.Encoder(width=16, depth=1, heads=2, patch=4, pos_grid=4, input_size=16)
    model = rae.RAE(enc.eval(), rae.Decoder(16, 64, 1, 1, 64, 4, 4), noise_tau=0.8)
    x = torch.rand(64, 3, 16, 16)
    clean = model.eval().encode(x)
    assert torch.equal(model.encode(x), clean)  # eval: deterministic
    model.train()
    torch.manual_seed(3)
    noisy = model.encode(x)
    torch.manual_seed(3)
    sigma = 0.8 * torch.rand(64, 1, 1)  # the draws replayed: sigma per sample, then eps
    eps = torch.randn(64, 16, 16)
    torch.testing.assert_close(noisy, clean + (sigma * eps).transpose(1, 2).reshape(64, 16, 4, 4))
    est = (noisy - clean).flatten(1).std(dim=1)  # per-sample sigma estimate
    assert est.max() < 0.8 * 1.2 and est.min() >= 0 and est.mean() == pytest.approx(0.4, abs=0.1)
