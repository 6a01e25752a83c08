"""Shared test plumbing: the slow/gpu switches, the reference folder next to the repo, a local HTTP server."""
import http.server
import threading
from pathlib import Path

import pytest
import torch

# The reference material lives next to the repository (../shared/reference); tests skip cleanly without it.
REFERENCE = Path(__file__).resolve().parents[2] / 'shared' / 'reference'
GOLDEN = REFERENCE / 'golden'


def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', default=False, help='also run tests marked slow')


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason='slow: needs --runslow')
    skip_gpu = pytest.mark.skip(reason='gpu: no CUDA device')
    for item in items:
        if 'slow' in item.keywords and not config.getoption('--runslow'):
            item.add_marker(skip_slow)
        if 'gpu' in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def no_user_hub_files(tmp_path_factory, monkeypatch):
    """Tests never see the developer's own hub files or settings: an empty Hugging Face home, no local dirs, no
    offline switch, no token (tests that want them set them)."""
    monkeypatch.setenv('HF_HOME', str(tmp_path_factory.mktemp('hf_home')))
    for name in ('HF_HUB_CACHE', 'RAE_LOCAL_DIR', 'HF_HUB_OFFLINE', 'HF_TOKEN'):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope='session')
def reference_dir():
    """../shared/reference (key lists, facts, golden/), or a clean skip when it is absent."""
    if not REFERENCE.is_dir():
        pytest.skip('reference folder not available (../shared/reference absent)')
    return REFERENCE


@pytest.fixture(scope='session')
def golden_dir():
    if not GOLDEN.is_dir():
        pytest.skip('golden vectors not available (../shared/reference/golden absent)')
    return GOLDEN


class TinyServer:
    """Serves {path: bytes} on 127.0.0.1 with HTTP Range support; records (path, Range header) per request."""

    def __init__(self):
        self.files, self.requests = {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split('?')[0]
                server.requests.append((path, self.headers.get('Range')))
                data = server.files.get(path)
                if data is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                start = int(self.headers['Range'].split('=')[1].split('-')[0]) if self.headers.get('Range') else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
                self.send_header('Content-Length', str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'


@pytest.fixture
def tiny_http_server():
    server = TinyServer()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()
