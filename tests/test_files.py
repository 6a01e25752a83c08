"""Hub files already on disk: the Hugging Face cache and RAE_LOCAL_DIR are read before any request; HF_HUB_OFFLINE,
HF_TOKEN and HF_ENDPOINT. Fake cache trees written here (and, where huggingface_hub is installed, the trees its own
downloader writes), served over HTTP on 127.0.0.1."""
import hashlib
import http.server
import io
import os
import threading
from pathlib import Path

import pytest
import torch

import files

REPO, FILE = 'org/tiny', 'decoders/w.pt'
COMMIT = 'a' * 40


class HubServer:
    """{path: bytes} on 127.0.0.1 with the hub's HEAD headers (commit, ETag); {path: url} redirects; every request
    is recorded as (method, path, headers)."""

    def __init__(self):
        self.files, self.redirects, self.status, self.requests = {}, {}, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, body):
                path = self.path.split('?')[0]
                server.requests.append((self.command, path, dict(self.headers)))
                data = server.files.get(path)
                if path in server.redirects:
                    self.send_response(302)
                    self.send_header('Location', server.redirects[path])
                elif path in server.status or data is None:
                    self.send_response(server.status.get(path, 404))
                    self.send_header('Content-Length', '0')
                else:
                    self.send_response(200)
                    self.send_header('Content-Length', str(len(data)))
                    self.send_header('ETag', f'"{hashlib.sha256(data).hexdigest()}"')
                    self.send_header('X-Repo-Commit', COMMIT)
                self.end_headers()
                if body and data is not None and self.command == 'GET' and path not in server.redirects:
                    self.wfile.write(data)

            def do_GET(self):
                self.answer(True)

            def do_HEAD(self):
                self.answer(False)

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub at HF_ENDPOINT serving REPO/FILE, with every cache and switch pointed into tmp_path or unset."""
    monkeypatch.delenv('XDG_CACHE_HOME', raising=False)  # the rest is unset by conftest's no_user_hub_files
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    monkeypatch.setenv('RAE_CACHE', str(tmp_path / 'rae'))
    s = HubServer()
    s.files[f'/{REPO}/resolve/main/{FILE}'] = torch_bytes(0)
    monkeypatch.setenv('HF_ENDPOINT', s.url)
    yield s
    s.close()


def torch_bytes(seed):
    buf = io.BytesIO()
    torch.save({'w': torch.randn(1000, generator=torch.Generator().manual_seed(seed))}, buf)
    return buf.getvalue()


def hub_cache_tree(root, data, repo=REPO, commit=COMMIT, ref='main'):
    """The hub cache's layout: blobs/<etag>, snapshots/<commit>/<path> a symlink to it, refs/<ref> naming commit."""
    repo_dir = root / f'models--{repo.replace("/", "--")}'
    blob = repo_dir / 'blobs' / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    snap = repo_dir / 'snapshots' / commit / FILE
    snap.parent.mkdir(parents=True, exist_ok=True)
    snap.symlink_to(os.path.relpath(blob, snap.parent))
    if ref:
        (repo_dir / 'refs').mkdir(exist_ok=True)
        (repo_dir / 'refs' / ref).write_text(commit)
    return snap


def test_hub_urls_parse_back_to_repo_revision_and_path(hub, monkeypatch):
    assert files.hf_url(REPO, FILE) == f'{hub.url}/{REPO}/resolve/main/{FILE}'
    assert files.hub_file(files.hf_url(REPO, FILE)) == (REPO, 'main', FILE)
    assert files.hub_file(f'https://huggingface.co/{REPO}/resolve/refs%2Fpr%2F1/{FILE}?download=true') == \
        (REPO, 'refs/pr/1', FILE)
    assert files.hub_file(f'{hub.url}/api/models/{REPO}') is None  # the hub, but not a file
    assert files.hub_file(f'https://example.com/{REPO}/resolve/main/{FILE}') is None
    monkeypatch.setenv('HF_ENDPOINT', 'https://mirror.example/hf/')  # a mirror under a path
    assert files.hub_file(files.hf_url(REPO, FILE)) == (REPO, 'main', FILE)


def test_a_file_in_the_hub_cache_is_used_without_a_request(hub, tmp_path, monkeypatch):
    data = torch_bytes(1)
    snap = hub_cache_tree(tmp_path / 'hf' / 'hub', data)  # HF_HOME/hub
    assert files.download(files.hf_url(REPO, FILE)) == str(snap)  # the snapshot name keeps the suffix
    assert Path(snap).read_bytes() == data and hub.requests == []
    other = hub_cache_tree(tmp_path / 'elsewhere', torch_bytes(2))
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'elsewhere'))  # HF_HUB_CACHE wins over HF_HOME
    assert files.download(files.hf_url(REPO, FILE)) == str(other)
    monkeypatch.delenv('HF_HUB_CACHE')
    monkeypatch.delenv('HF_HOME')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))  # neither: ~/.cache/huggingface/hub
    home = hub_cache_tree(tmp_path / 'home' / '.cache' / 'huggingface' / 'hub', data)
    assert files.download(files.hf_url(REPO, FILE)) == str(home) and hub.requests == []


def test_the_hub_cache_is_read_at_the_commit_its_ref_names(hub, tmp_path):
    root = tmp_path / 'hf' / 'hub'
    hub_cache_tree(root, torch_bytes(1), commit='b' * 40, ref=None)  # an older snapshot, not what main names
    (root / f'models--{REPO.replace("/", "--")}' / 'refs').mkdir()
    (root / f'models--{REPO.replace("/", "--")}' / 'refs' / 'main').write_text(COMMIT)
    url = files.hf_url(REPO, FILE)
    path = files.download(url)  # main's snapshot lacks the file: downloaded into RAE_CACHE as before
    assert Path(path) == tmp_path / 'rae' / REPO / 'resolve/main' / FILE and len(hub.requests) == 1
    pinned = url.replace('/main/', f'/{"b" * 40}/')  # a commit in the URL names its snapshot directly
    hub.requests.clear()
    assert Path(files.download(pinned)).read_bytes() == torch_bytes(1) and hub.requests == []


def test_a_local_dir_is_used_and_a_bad_copy_there_is_left_alone(hub, tmp_path, monkeypatch, capsys):
    first, second = tmp_path / 'empty', tmp_path / 'local'
    (second / FILE).parent.mkdir(parents=True)
    (second / FILE).write_bytes(torch_bytes(3))
    monkeypatch.setenv('RAE_LOCAL_DIR', os.pathsep.join([str(first), str(second)]))
    hub_cache_tree(tmp_path / 'hf' / 'hub', torch_bytes(4))  # the folder the user named comes first
    assert files.download(files.hf_url(REPO, FILE)) == str(second / FILE) and hub.requests == []
    (second / FILE).write_bytes(torch_bytes(3)[:500])  # cut short: passed over, not moved, not deleted
    assert Path(files.download(files.hf_url(REPO, FILE))).read_bytes() == torch_bytes(4)
    assert (second / FILE).stat().st_size == 500 and 'passed over' in capsys.readouterr().err
    assert hub.requests == []


def test_offline_makes_no_request_and_names_the_file_and_every_place(hub, tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('RAE_LOCAL_DIR', str(tmp_path / 'local'))
    with pytest.raises(RuntimeError) as e:
        files.download(files.hf_url(REPO, FILE))
    msg = str(e.value)
    assert 'HF_HUB_OFFLINE' in msg and FILE in msg and REPO in msg and '\n' not in msg
    for place in (tmp_path / 'local' / FILE, tmp_path / 'rae' / REPO / 'resolve/main' / FILE,
                  tmp_path / 'hf' / 'hub' / f'models--{REPO.replace("/", "--")}' / 'snapshots' / 'main' / FILE):
        assert str(place) in msg
    with pytest.raises(RuntimeError, match='HF_HUB_OFFLINE'):  # other hosts too: offline means no request
        files.download(hub.url + '/elsewhere/x.pt')
    assert hub.requests == [] and not (tmp_path / 'rae').exists()
    snap = hub_cache_tree(tmp_path / 'hf' / 'hub', torch_bytes(1))
    assert files.download(files.hf_url(REPO, FILE)) == str(snap)


def test_hf_token_goes_to_the_hub_only(hub, monkeypatch, capsys):
    secret = 'hf_not_a_real_token_123'
    monkeypatch.setenv('HF_TOKEN', secret)
    cdn = HubServer()  # another port: another host for requests, as the hub's file CDN is
    try:
        cdn.files['/blob/w.pt'] = torch_bytes(5)
        hub.redirects[f'/{REPO}/resolve/main/big.pt'] = cdn.url + '/blob/w.pt'
        assert Path(files.download(files.hf_url(REPO, FILE))).read_bytes() == torch_bytes(0)
        assert Path(files.download(files.hf_url(REPO, 'big.pt'))).read_bytes() == torch_bytes(5)
        assert all(h.get('Authorization') == f'Bearer {secret}' for _, _, h in hub.requests) and len(hub.requests) == 2
        cdn.files['/other.pt'] = torch_bytes(6)
        files.download(cdn.url + '/other.pt')  # not the hub: no token either
        assert len(cdn.requests) == 2 and not any('Authorization' in h for _, _, h in cdn.requests)
    finally:
        cdn.close()
    hub.status[f'/{REPO}/resolve/main/gated.pt'] = 401
    with pytest.raises(RuntimeError) as e:
        files.download(files.hf_url(REPO, 'gated.pt'))
    assert 'HF_TOKEN' in str(e.value) and secret not in str(e.value)
    assert secret not in ''.join(capsys.readouterr())


def test_trees_written_by_huggingface_hub_are_read_without_a_request(hub, tmp_path, monkeypatch):
    """The independent check of the layout: huggingface_hub's own downloader fills a cache and a local dir."""
    hf = pytest.importorskip('huggingface_hub')
    hf.hf_hub_download(REPO, FILE, cache_dir=tmp_path / 'hf' / 'hub', endpoint=hub.url)
    hf.hf_hub_download(REPO, FILE, local_dir=tmp_path / 'local', endpoint=hub.url)
    hub.requests.clear()
    path = files.download(files.hf_url(REPO, FILE))
    assert path == hf.try_to_load_from_cache(REPO, FILE, cache_dir=tmp_path / 'hf' / 'hub') and hub.requests == []
    monkeypatch.setenv('RAE_LOCAL_DIR', str(tmp_path / 'local'))
    assert files.download(files.hf_url(REPO, FILE)) == str(tmp_path / 'local' / FILE) and hub.requests == []


def test_a_local_dir_tied_to_a_repository_answers_only_for_it(tmp_path, monkeypatch):
    """`org/name=folder`: the folder answers that repository's files only; a bare folder answers every repository."""
    tied, bare = tmp_path / 'dinov2', tmp_path / 'any'
    monkeypatch.setenv('RAE_LOCAL_DIR', os.pathsep.join([f'facebook/dinov2-with-registers-base={tied}', str(bare)]))
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
    copies = files.hub_copies('facebook/dinov2-with-registers-base', 'main', 'model.safetensors')
    assert copies[:2] == [tied / 'model.safetensors', bare / 'model.safetensors']
    copies = files.hub_copies('google/siglip2-base-patch16-256', 'main', 'model.safetensors')
    assert copies[0] == bare / 'model.safetensors' and tied / 'model.safetensors' not in copies
