"""
How every script runs: one process per GPU under torchrun (gloo on CPU), rank 0 first where files are fetched,
errors in one line, TF32 on or off, bf16 autocast where the hardware computes bf16.
"""
import contextlib
import datetime
import os
import platform

import torch
import torch.distributed as dist


def print0(*args, **kwargs):
    if int(os.environ.get('RANK', 0)) == 0:
        print(*args, **kwargs)


def setup_ddp(device=None, timeout_minutes=10):
    """-> (rank, local_rank, world_size, device, is_master). device None: CUDA when available; 'cpu' forces CPU.
    Under torchrun (RANK in the environment) each rank gets cuda:LOCAL_RANK and joins the process group; a rank
    that waits longer than timeout_minutes for another (hung, not dead) ends the job with an error naming it."""
    if device not in (None, 'cpu', 'cuda'):
        raise SystemExit(f"device={device!r}: expected 'cuda' or 'cpu' (torchrun gives each rank cuda:LOCAL_RANK)")
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit("device='cuda' but torch sees no CUDA device (use --device=cpu)")
    cuda = torch.cuda.is_available() and device != 'cpu'
    if 'RANK' not in os.environ:
        return 0, 0, 1, torch.device(device or ('cuda' if cuda else 'cpu')), True
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    device = torch.device(f'cuda:{local_rank}' if cuda else 'cpu')
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if cuda else 'gloo', timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank, local_rank, world_size, device, rank == 0


def cleanup_ddp():
    if dist.is_initialized():
        dist.barrier()  # no rank tears down its connections while a peer is still in a collective (gloo aborts)
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def rank0_first():
    """Local rank 0 of every node runs the block first (its downloads fill the node's cache; nodes that share one
    cache take turns through the download's lock file), then the other ranks, whose downloads are cache hits."""
    first = int(os.environ.get('LOCAL_RANK', 0)) == 0
    if dist.is_initialized() and not first:
        dist.barrier()
    yield
    if dist.is_initialized() and first:
        dist.barrier()


@contextlib.contextmanager
def one_line_errors():
    """A missing or mismatched file, a bad argument or a download without network ends the script in one line."""
    try:
        yield
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f'error: {e}') from None


def set_tf32(enabled):
    """TF32 matmuls/convolutions on GPU on or off; returns the previous flags, which set_tf32 takes back to restore
    them exactly. torch >= 2.9 has a new API and refuses a mix with the legacy flags."""
    if hasattr(torch.backends.cuda.matmul, 'fp32_precision'):
        flags, name, value = [torch.backends.cuda.matmul, torch.backends.cudnn.conv], 'fp32_precision', \
            'tf32' if enabled else 'ieee'
    else:
        flags, name, value = [torch.backends.cuda.matmul, torch.backends.cudnn], 'allow_tf32', bool(enabled)
    old = [getattr(f, name) for f in flags]
    for f, v in zip(flags, enabled if isinstance(enabled, list) else [value] * len(flags)):
        setattr(f, name, v)
    return old


def cpu_bf16_units():
    """The bf16 matmul units of this CPU as torch detects them ('AMX', 'AVX512-BF16', or on Arm 'BF16', as oneDNN
    reports it), or None: bf16 is then emulated, which on some CPUs is many times slower than fp32."""
    for probe, name in [('_is_amx_tile_supported', 'AMX'), ('_is_avx512_bf16_supported', 'AVX512-BF16')]:
        if getattr(torch.cpu, probe, lambda: False)():  # private cpuinfo probes: an older torch may lack one
            return name
    if platform.machine().lower() in ('aarch64', 'arm64') and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return 'BF16'
    return None


def choose_precision(precision, device):
    """-> (torch.bfloat16 for bf16 autocast or None for fp32, why: one line for the log). 'bf16' and 'fp32' force;
    'auto' takes bf16 where the hardware computes it natively: CUDA GPUs of compute capability >= 8.0 (Ampere on;
    ROCm GPUs all), CPUs with bf16 units (cpu_bf16_units); fp32 elsewhere, where bf16 would be emulated."""
    if precision != 'auto':
        native, why = precision == 'bf16', f'precision={precision!r}'
    elif torch.device(device).type == 'cuda':
        major, minor = torch.cuda.get_device_capability(device)
        native = torch.version.hip is not None or major >= 8
        why = (f"precision='auto': {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has "
               f"{'' if native else 'no '}bf16 tensor cores")
    else:
        native = cpu_bf16_units()
        units = f'bf16 units ({native})' if native else 'no bf16 units (AVX512-BF16 or AMX): bf16 would be emulated'
        why = f"precision='auto': this CPU has {units}"
    return (torch.bfloat16, f'bf16 autocast ({why})') if native else (None, f'fp32 ({why})')
