"""
Files in and out, shared by every script: downloads into the cache (hub files already on disk are used where they
lie), weight files (safetensors read and written, torch), checkpoint dicts and the published layouts, images (the
ADM centre crop, 8-bit quantisation, PNG grids) and .npz files of uint8 images.
"""
import contextlib
import hashlib
import json
import math
import os
import re
import struct
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import requests
import torch
from PIL import Image
from tqdm.auto import tqdm

# -----------------------------------------------------------------------------------------------------------
# Downloads: one cache (RAE_CACHE, default ~/.cache/rae), a .part file renamed only when complete and verified.
# A hub file that `hf download` already put on disk (RAE_LOCAL_DIR, the Hugging Face cache) is read where it lies.
RETRY_STATUS = (429, 500, 502, 503, 504)  # transient server answers: retried with back-off; other errors are final
HUB_FILE = re.compile(r'/([^/]+/[^/]+)/resolve/([^/]+)/(.+)')  # /<org>/<name>/resolve/<revision>/<path>


def hub_endpoints():
    """HF_ENDPOINT (a mirror, the hub convention) and the hub itself: the only hosts that are sent HF_TOKEN."""
    return os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/'), 'https://huggingface.co'


def hf_url(repo_id, path):
    """URL of a file on the Hugging Face hub, at HF_ENDPOINT."""
    return f'{hub_endpoints()[0]}/{repo_id}/resolve/main/{path}'


def hub_file(url):
    """(repo, revision, path) of a file URL on the hub, else None."""
    for endpoint in hub_endpoints():
        if url.startswith(endpoint + '/'):
            m = HUB_FILE.fullmatch(urlparse(url[len(endpoint):]).path)
            return tuple(unquote(g) for g in m.groups()) if m else None
    return None


def hub_copies(repo, revision, path):
    """Where a hub file may already lie: <folder>/<path> for each RAE_LOCAL_DIR folder (`hf download --local-dir`)
    that names no repo or this one, then the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub) at the commit that
    refs/<revision> names."""
    env = os.environ.get
    local = []
    for entry in env('RAE_LOCAL_DIR', '').split(os.pathsep):  # `folder`, or `org/name=folder` for one repo only
        name, _, folder = entry.rpartition('=')
        if folder and name in ('', repo):
            local.append(Path(folder).expanduser() / path)
    home = env('HF_HOME') or Path(env('XDG_CACHE_HOME') or Path.home() / '.cache') / 'huggingface'
    repo_dir = Path(env('HF_HUB_CACHE') or Path(home) / 'hub').expanduser() / f'models--{repo.replace("/", "--")}'
    ref = repo_dir / 'refs' / revision
    commit = ref.read_text().strip() if ref.is_file() else revision  # a commit hash names its snapshot itself
    return local + [repo_dir / 'snapshots' / commit / path]


def hub_token(url):
    """The Authorization header for a hub request when HF_TOKEN is set (gated or private repositories). requests
    drops it when a redirect leaves the host (the hub sends file bodies from a CDN), so only the hub sees it."""
    token = os.environ.get('HF_TOKEN', '').strip()
    on_hub = any(url.startswith(e + '/') for e in hub_endpoints())
    return {'Authorization': f'Bearer {token}'} if token and on_hub else {}


def cache_dir():
    return Path(os.environ.get('RAE_CACHE', Path.home() / '.cache' / 'rae'))


def download(url, sha256=None, size=None, filename=None, retries=5, md5=None):
    """Fetch url once into the cache at the URL's path without the host (a mirror shares it) or filename; -> the
    path. A hub file in RAE_LOCAL_DIR or the Hugging Face cache is used there, not copied; HF_HUB_OFFLINE=1 makes
    no request at all. sha256 / md5: the published hex digest or its first digits (torchvision names files after 8)."""
    path = cache_dir() / (filename or urlparse(url).path.lstrip('/'))
    hub = hub_file(url)
    places = [*(hub_copies(*hub) if hub else ()), path]
    for place in places:
        if cached(place, size, ours=place == path):
            return str(place)  # cache hit: no request at all
    if os.environ.get('HF_HUB_OFFLINE', '').upper() in ('1', 'ON', 'YES', 'TRUE'):  # the hub's spellings of true
        name = f'{hub[2]} of {hub[0]}' if hub else url
        raise RuntimeError(f'HF_HUB_OFFLINE is set and {name} is in none of {", ".join(map(str, places))}')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path.with_name(path.name + '.lock')) as lock:  # processes that want one file take turns
            if not cached(path, size):  # another process may have fetched it while we waited
                fetch(url, path, lock, sha256, md5, size, retries)
    except OSError as e:  # read-only or full cache (requests' errors are RuntimeErrors by now)
        raise RuntimeError(f'cannot write {path} ({e.strerror or e}): set RAE_CACHE to a writable folder with space '
                           f'(now {cache_dir()})') from None
    return str(path)


def cached(path, size=None, ours=True):
    """Whether path holds a good copy; a bad one (truncated, an HTML page) in our cache is moved aside to <name>.bad,
    one in the user's folders (RAE_LOCAL_DIR, the Hugging Face cache) is left as it is and passed over."""
    if not path.is_file() or (size is not None and path.stat().st_size != size):
        return False
    try:
        check_format(path)
        return True
    except ValueError as e:
        if ours:
            os.replace(path, path.with_name(path.name + '.bad'))
        print(f'{e}: ' + (f'moved aside to {path.name}.bad, fetching it again' if ours else 'passed over'),
              file=sys.stderr)
        return False


@contextlib.contextmanager
def file_lock(lock, stale=120):
    """Hold lock (a file made with O_EXCL) for the block; a lock untouched for `stale` s belongs to a dead process."""
    while True:
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):  # its owner may let go meanwhile
                if time.time() - lock.stat().st_mtime > stale:
                    lock.unlink()
            time.sleep(0.2)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def fetch(url, path, lock, sha256, md5, size, retries):
    """download()'s transfer: a Range request resumes the .part, 429/5xx and dropped connections are retried with
    back-off, and it is renamed into the cache only once its size and digest (or its format) are right."""
    part = path.with_name(path.name + '.part')
    hint = f'no network? download {url} by hand and place it at {path} (or set RAE_CACHE)'
    touched = time.time()
    for attempt in range(retries):
        if attempt:
            time.sleep(min(2 ** (attempt - 1), 10) * 0.1)
        have = part.stat().st_size if part.exists() else 0
        headers = {**hub_token(url), **({'Range': f'bytes={have}-'} if have else {})}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=30) as r:
                if r.status_code == 416:  # the partial file is already complete
                    break
                if r.status_code in RETRY_STATUS and attempt < retries - 1:
                    continue
                if r.status_code in (401, 403) and hub_file(url):
                    raise RuntimeError(f'download of {url} failed: HTTP {r.status_code}; a gated or private '
                                       'repository? set HF_TOKEN to a token that may read it')
                if r.status_code not in (200, 206):
                    raise RuntimeError(f'download of {url} failed: HTTP {r.status_code}; {hint}')
                if r.status_code == 206 and not r.headers.get('Content-Range', '').startswith(f'bytes {have}-'):
                    part.unlink()  # a range that does not start where the partial file ends: start over
                    continue
                if r.status_code == 200:
                    have = 0  # the server ignored the Range header: start over
                length = r.headers.get('Content-Length')
                total = have + int(length) if length is not None else size
                with open(part, 'ab' if have else 'wb') as f, \
                        tqdm(total=total, initial=have, unit='B', unit_scale=True, desc=path.name) as bar:
                    for chunk in r.iter_content(1 << 16):
                        f.write(chunk)
                        bar.update(len(chunk))
                        if time.time() - touched > 5:  # keep the lock fresh: waiters see a live owner
                            os.utime(lock)
                            touched = time.time()
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            if attempt == retries - 1:
                raise RuntimeError(f'download of {url} failed ({type(e).__name__}); {hint}') from None
    else:
        raise RuntimeError(f'download of {url} failed after {retries} tries; {hint}')
    try:
        if size is not None and part.stat().st_size != size:
            raise ValueError(f'expected {size} bytes, got {part.stat().st_size}')
        for algorithm, expected in (('sha256', sha256), ('md5', md5)):
            if expected is not None:
                h = hashlib.new(algorithm)
                with open(part, 'rb') as f:
                    for block in iter(lambda: f.read(1 << 20), b''):
                        h.update(block)
                if not h.hexdigest().startswith(expected):
                    raise ValueError(f'{algorithm} {h.hexdigest()} != expected {expected}')
        if sha256 is None and md5 is None:  # without a digest, the format at least (a body cut short, an HTML page)
            check_format(part, path.suffix)
    except ValueError as e:
        part.unlink()
        raise RuntimeError(f'download of {url}: {e}; nothing was cached') from None
    os.replace(part, path)


def check_format(path, suffix=None):
    """ValueError unless the file parses as its format, by suffix: a torch file (zip, or the legacy pickle), .npz,
    .safetensors. Headers and the zip directory only: cheap enough for every cache hit. Other suffixes pass."""
    path, suffix = Path(path), (suffix or Path(path).suffix).lower()
    with open(path, 'rb') as f:
        head = f.read(64)
    if head.lstrip()[:1] == b'<':
        raise ValueError(f'{path} is an HTML page, not a {suffix} file (a proxy or login page?)')
    if suffix in ('.pt', '.pth', '.bin', '.ckpt', '.npz'):
        if zipfile.is_zipfile(path):  # the end-of-directory record: a truncated zip has none
            return
        if suffix != '.npz' and head[:1] == b'\x80':  # torch's legacy format starts with a pickle
            return
        raise ValueError(f'{path}: truncated or not a {suffix} file')
    if suffix == '.safetensors':
        safetensors_header(path)


# -----------------------------------------------------------------------------------------------------------
# Weight files and checkpoint dicts
_ST_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
              'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
              'BOOL': torch.bool}


def safetensors_header(path):
    """(data offset, {name: {dtype, shape, data_offsets}}) of a .safetensors file: an 8-byte little-endian length n,
    n bytes of JSON, the raw tensor bytes. ValueError if bad or truncated."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        try:
            (n,) = struct.unpack('<Q', f.read(8))
            header = json.loads(f.read(min(n, size)))
            header.pop('__metadata__', None)
            end = max([t['data_offsets'][1] for t in header.values()], default=0)
        except (struct.error, ValueError, LookupError, TypeError, AttributeError):
            raise ValueError(f'{path}: not a safetensors file (bad header)') from None
    if size < 8 + n + end:
        raise ValueError(f'{path}: truncated file ({size} bytes, its tensors need {8 + n + end})')
    return 8 + n, header


def load_safetensors(path):
    """A .safetensors file as {name: tensor}, without the safetensors package; read tensor by tensor, so a 2 GB file
    needs 2 GB of memory, not twice that."""
    start, header = safetensors_header(path)
    out = {}
    with open(path, 'rb') as f:
        for name, info in header.items():
            begin, end = info['data_offsets']
            buf, dtype = bytearray(end - begin), _ST_DTYPES[info['dtype']]
            f.seek(start + begin)
            f.readinto(buf)
            out[name] = (torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)).reshape(
                info['shape'])
    return out


def save_safetensors(tensors, path, metadata=None):
    """{name: tensor} -> a .safetensors file that load_safetensors and the safetensors package read: an 8-byte
    little-endian length n, n bytes of JSON (names sorted, {dtype, shape, data_offsets}, `__metadata__` of strings;
    space-padded to a multiple of 8 so that every tensor stays aligned), then the tensors' bytes back to back,
    C-contiguous and little-endian (the package refuses gaps and overlaps)."""
    tensors = {k: tensors[k].detach().cpu().contiguous() for k in sorted(tensors)}
    codes = {dtype: code for code, dtype in _ST_DTYPES.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {'dtype': codes[t.dtype], 'shape': list(t.shape), 'data_offsets': [offset, offset + n]}
        offset += n
    if metadata:
        header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(',', ':')).encode()
    blob += b' ' * (-len(blob) % 8)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(blob)) + blob)
        for t in tensors.values():
            data = t.reshape(-1).view(torch.uint8).view(-1, t.element_size())
            f.write((data if sys.byteorder == 'little' else data.flip(1)).numpy().data)


def load_state_dict_file(path):
    """A state dict (or checkpoint dict) from .safetensors, a torch file or a save_pretrained folder."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ('model.safetensors', 'pytorch_model.bin') if (path / n).exists()]
        if not found:
            raise FileNotFoundError(f'{path}: no model.safetensors or pytorch_model.bin in this directory')
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f'weights file not found: {path}')
    if path.suffix == '.safetensors':
        return load_safetensors(path)
    try:  # mmap (zip files only, not torch's legacy format): a checkpoint's other entries stay on disk
        return torch.load(path, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise ValueError(f'{path}: cannot be read as a torch file ({type(e).__name__}: {str(e)[:120]}); '
                         'truncated or not a checkpoint?') from None


def model_state_dict(ckpt, path):
    """The model weights in a bare state dict or a training checkpoint ({'ema': ...} preferred, else {'model': ...}
    or {'state_dict': ...}), without DDP / torch.compile name prefixes."""
    if not isinstance(ckpt, dict):
        raise ValueError(f'{path}: not a state dict or checkpoint dict (got {type(ckpt).__name__})')
    for key in ('ema', 'model', 'state_dict'):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    return {re.sub(r'^((module|_orig_mod)\.)+', '', k): v for k, v in ckpt.items()}  # DDP, torch.compile wrappers


def load_stats(path):
    """Latent statistics {'mean': [C,h,w] or None, 'var': [C,h,w]} as written by the authors' stat script."""
    stats = load_state_dict_file(path)
    if not isinstance(stats, dict) or 'var' not in stats:
        raise ValueError(f'{path}: not a latent statistics file (expected a dict with "mean" and "var")')
    return stats.get('mean'), stats['var']


def copy_weights(model, sd, path, names=None):
    """Copy {our name: tensor} into model after a count check and a shape check per tensor (nanoGPT's
    from_pretrained); names maps ours to the file's, so that an error names a key the user finds in the file."""
    names = names or {}
    ours = model.state_dict()
    missing = [names.get(k, k) for k in ours if k not in sd]
    unexpected = [k for k in sd if k not in ours]
    if missing or unexpected:
        raise ValueError(f'{path}: weights do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}')
    for k, v in sd.items():
        if v.shape != ours[k].shape:
            raise ValueError(f'{path}: weights for a different model: {names.get(k, k)} has shape '
                             f'{tuple(v.shape)}, expected {tuple(ours[k].shape)}')
    model.load_state_dict(sd)
    return model


def published_names(key, layout):
    """Our state-dict key -> its published name(s) in layout (rae.PUBLISHED), without the tower prefix."""
    _, outer, block, inner = layout
    i, module = (key.split('.')[1], key.split('.', 2)[2]) if key.startswith('blocks.') else (None, key)
    module, param = module.rsplit('.', 1) if module.endswith(('.weight', '.bias')) else (module, None)
    theirs = (inner if i else outer)[module]
    return [(block.format(i=i) if i else '') + t + (f'.{param}' if param else '')
            for t in (theirs if isinstance(theirs, tuple) else (theirs,))]


def load_published(model, sd, layout, path, optional=()):
    """Copy a state dict in a published layout (rae.PUBLISHED) into a ViT-like model (a .blocks list); names in
    `optional` that the file lacks keep the model's values, tensors the table does not name are not read."""
    prefix, block = layout[0], layout[2]
    if any(k.startswith(prefix) for k in sd):  # the tower inside a larger model's file
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if any(k.startswith(block.format(i=len(model.blocks))) for k in sd):
        raise ValueError(f'{path}: weights for a different model: more than {len(model.blocks)} blocks')
    ours, mapped, names = model.state_dict(), {}, {}
    for key in ours:
        theirs = published_names(key, layout)
        if any(t not in sd for t in theirs):
            if key in optional:
                continue
            raise ValueError(f'{path}: weights for a different model: {prefix}{theirs[0]} is missing')
        mapped[key], names[key] = torch.cat([sd[t] for t in theirs]), prefix + theirs[0]
    if mapped.get('pos_embed', ours['pos_embed']).ndim == 2:  # SigLIP2 stores an nn.Embedding table [N, C]
        mapped['pos_embed'] = mapped['pos_embed'][None]
    return copy_weights(model, {k: mapped.get(k, v) for k, v in ours.items()}, path, names)


def published_state_dict(model, layout):
    """The inverse of load_published: model's tensors under their published names (our fused qkv split in three)."""
    out = {}
    for key, v in model.state_dict().items():
        theirs = published_names(key, layout)
        if key == 'pos_embed' and theirs[0].endswith('.weight'):  # SigLIP2's nn.Embedding table [N, C]
            v = v[0]
        out.update({layout[0] + t: part.clone().contiguous() for t, part in zip(theirs, v.chunk(len(theirs)))})
    return out


# -----------------------------------------------------------------------------------------------------------
# Images
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.tif', '.tiff')  # what image folders are read for


def list_images(folder):
    """Image files under folder (recursively), sorted; a folder without any is a one-line error."""
    files = sorted(p for p in Path(folder).rglob('*') if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f'{folder}: no image files ({", ".join(sorted(IMAGE_EXTS))}) found')
    return files


def open_rgb(path):
    """An image file as 8-bit RGB; OSError / ValueError if unreadable. 16-bit and float modes are scaled to 8 bits,
    not clipped (PIL's convert clips a 16-bit value at 255: near-white)."""
    with Image.open(path) as im:
        im.load()
        if im.mode.startswith('I') or im.mode == 'F':  # I;16*, I (32-bit int), F (float)
            a = np.asarray(im, dtype=np.float64)
            top = 65535 if im.mode.startswith('I;16') or a.max() > 255 else 255
            if im.mode == 'F' and a.max() <= 1:
                top = 1
            im = Image.fromarray(np.clip(np.round(a * (255 / top)), 0, 255).astype(np.uint8))
        return im.convert('RGB')


def center_crop_arr(pil_image, image_size):
    """ADM's centre crop: halve with BOX while the short side >= 2x, BICUBIC resize the short side, crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def to_uint8(images):
    """Images [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3], rounded, floor(255 x + 0.5) (README: differences)."""
    return images.clamp(0, 1).mul(255).add(0.5).floor().to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(images, ncol, path, pad=2):
    """uint8 [B, H, W, 3] -> one PNG, ncol images per row, pad px of black around each (torchvision's layout)."""
    images = np.asarray(images.cpu() if torch.is_tensor(images) else images)
    B, H, W, _ = images.shape
    nrow = math.ceil(B / ncol)
    grid = np.zeros((pad + nrow * (H + pad), pad + ncol * (W + pad), 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = img
    Image.fromarray(grid).save(path)


# -----------------------------------------------------------------------------------------------------------
# .npz files of uint8 images (N, H, W, 3) under arr_0, the ADM evaluator's format, streamed both ways

def _read_npy_header(f, where):
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f'{where}: unsupported .npy format version {version}')
    return read(f)


class NpzImages:
    """uint8 images (N, H, W, 3) under arr_0 in an .npz, read in batches straight from the zip: np.load would read
    the whole array (50k at 256 px is 9.8 GB), so like ADM's evaluator we read batch-sized slices of the member."""

    def __init__(self, path):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f'{self.path}: no such file')
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = [n[:-4] for n in zf.namelist() if n.endswith('.npy')]
                if 'arr_0' not in names:
                    raise ValueError(f"{self.path}: no 'arr_0' array (it holds {names}); expected arr_0 = uint8 "
                                     'images of shape (N, H, W, 3)')
                with zf.open('arr_0.npy') as f:
                    shape, fortran, dtype = _read_npy_header(f, self.path)
        except zipfile.BadZipFile:
            raise ValueError(f'{self.path}: not an .npz file') from None
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
            hint = ' (looks like NCHW: transpose to NHWC)' if len(shape) == 4 and shape[1] == 3 else ''
            order = ', Fortran order' if fortran else ''
            raise ValueError(f'{self.path}: arr_0 has dtype {dtype}, shape {shape}{order}; expected C-ordered uint8 '
                             f'images (N, H, W, 3) in 0..255{hint}')
        self.shape = shape

    def __len__(self):
        return self.shape[0]

    def batches(self, batch_size):
        n, h, w, c = self.shape
        with zipfile.ZipFile(self.path) as zf, zf.open('arr_0.npy') as f:
            _read_npy_header(f, self.path)
            for i in range(0, n, batch_size):
                b = min(batch_size, n - i)
                buf = f.read(b * h * w * c)
                if len(buf) != b * h * w * c:
                    raise ValueError(f'{self.path}: arr_0 is truncated (image {i + len(buf) // (h * w * c)} '
                                     f'of {n} is incomplete)')
                yield np.frombuffer(bytearray(buf), np.uint8).reshape(b, h, w, c)  # writable, for torch


def write_images_npy(zf, shape, batches):
    """Stream uint8 batches into member arr_0.npy of an open ZipFile: shape (N, H, W, 3), one batch in memory."""
    with zf.open('arr_0.npy', 'w', force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {'descr': '|u1', 'fortran_order': False, 'shape': tuple(shape)})
        for b in batches:
            f.write(np.ascontiguousarray(b, dtype=np.uint8).tobytes())
