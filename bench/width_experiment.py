"""The width experiment of §4.1 (Fig. 3, Table 3, Theorem 1) at CPU scale: overfit ONE latent [n, h, w] with DiTs
narrower and wider than the token dimension n, and set the final losses next to Theorem 1's bound (n - d) / n.

    python bench/width_experiment.py                                   # n = 128, widths 32..192: ~3 min on 2 cores
    python bench/width_experiment.py --token_dim 96 --widths 32,64,96,128 --steps 1500

Why a bound: the output of a DiT of width d is B f(A x_t) + b, so every token's prediction lies in one d-dimensional
affine subspace of R^n. The target eps - x0 has covariance I (a single latent x0: every eigenvalue lambda_i = 1), and
no prediction can explain its n - d directions outside that subspace: mean loss >= (n - d) / n (Theorem 1).

Setup (App. G, scaled down): LightningDiT (depth 2 here, 12 in the paper), batch 32, AdamW betas (0.9, 0.95), constant
lr, no EMA, one class. t is uniform on [0, 0.999] without the shift (the t of Theorem 1's integral; the bound holds
at every t). The latent is a fixed standard normal draw: unit variance per channel, like a normalised RAE latent (the
bound holds for any x0). The final loss is rae.flow_loss averaged over --eval_batch fresh (eps, t) draws. The last row
is DiT^DH (§5): a backbone narrower than n with a head wider than n fits the latent like a wide DiT.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rae import DiTDH, LightningDiT, flow_loss  # noqa: E402


def overfit(model, x0, steps, batch, lr, eval_batch):
    """Train on copies of x0 only; return the loss over eval_batch fresh (eps, t) draws."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0)
    y = torch.zeros(batch, dtype=torch.long)
    x = x0.expand(batch, -1, -1, -1)
    for _ in range(steps):
        loss = flow_loss(model, x, y, alpha=1.0, time_dist='uniform').mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        n = torch.zeros(eval_batch, dtype=torch.long)
        return flow_loss(model, x0.expand(eval_batch, -1, -1, -1), n, alpha=1.0, time_dist='uniform').mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--token_dim', type=int, default=128, help='n: channels of the latent (768 for DINOv2-B)')
    ap.add_argument('--grid', type=int, default=4, help='the latent is [n, grid, grid]')
    ap.add_argument('--widths', default='32,64,96,128,160,192', help='DiT widths d (divisible by 4 * heads)')
    ap.add_argument('--depth', type=int, default=2)
    ap.add_argument('--heads', type=int, default=4)
    ap.add_argument('--dh', default='32,160', help='DiT^DH backbone,head widths ("" to skip)')
    ap.add_argument('--steps', type=int, default=1000)
    ap.add_argument('--batch', type=int, default=32)
    ap.add_argument('--lr', type=float, default=1e-3, help='the paper uses 2e-4 for 1200 steps at full scale')
    ap.add_argument('--eval_batch', type=int, default=4096)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--threads', type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n = a.token_dim
    x0 = torch.randn(1, n, a.grid, a.grid, generator=torch.Generator().manual_seed(a.seed))
    common = dict(input_size=a.grid, patch_size=1, in_channels=n, mlp_ratio=4.0, class_dropout_prob=0.0, num_classes=1)
    runs = [(f'DiT d={d}', d, lambda d=d: LightningDiT(hidden_size=d, depth=a.depth, num_heads=a.heads, **common))
            for d in map(int, a.widths.split(','))]
    if a.dh:
        b, h = map(int, a.dh.split(','))
        runs.append((f'DiT^DH {b}+head {h}', h, lambda: DiTDH(hidden_size=(b, h), depth=(a.depth, 1),
                                                                num_heads=(a.heads, a.heads), **common)))
    print(f'one latent [{n}, {a.grid}, {a.grid}], {a.steps} steps of batch {a.batch}, AdamW lr {a.lr}, depth {a.depth}')
    print(f'{"model":>20} {"params":>8} {"final loss":>11} {"bound (n-d)/n":>14} {"d >= n":>7} {"time":>6}')
    for name, d, build in runs:
        torch.manual_seed(a.seed)
        model = build()
        t0 = time.perf_counter()
        loss = overfit(model, x0, a.steps, a.batch, a.lr, a.eval_batch)
        bound = max(n - d, 0) / n
        params = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        print(f'{name:>20} {params:>7.2f}M {loss:>11.4f} {bound:>14.4f} {"yes" if d >= n else "no":>7} '
              f'{time.perf_counter() - t0:>5.0f}s', flush=True)


if __name__ == '__main__':
    main()
