"""torch.compile of the training steps, compiled as the training scripts compile them: no graph breaks, and no new
graph after the first step (a step that recompiles waits for a compilation, a minute or more at full size), with and
without activation checkpointing, in fp32 and under bf16 autocast.

Graph breaks and recompilations are dynamo's, decided before the backend sees a graph: the default run uses the
'aot_eager' backend, which also traces the backward through AOTAutograd as inductor does, without inductor's
minutes of code generation on a CPU; the slow test runs inductor itself.
"""
import contextlib

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import decoder_train as dt
import rae
from test_decoder_train import TINY_DINO, TINY_ENCODER, random_lpips
from test_dit import TINY_DDT, TINY_LDIT, randomize
from training import make_ema, update_ema

PRECISIONS = {'fp32': contextlib.nullcontext, 'bf16': lambda: torch.autocast('cpu', dtype=torch.bfloat16)}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every case compiles from scratch and counts only its own graphs; one thread, as the rest of the suite."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(n)


def graphs():
    """(graphs compiled so far, graph breaks so far {reason: count})."""
    return counters['stats']['unique_graphs'], dict(counters['graph_break'])


def dit_steps(cls, kw, checkpoint, precision, backend, steps=3):
    """diffusion_train.py's step: the whole DiT compiled, flow_loss (fp32 loss) under the autocast context,
    backward, AdamW; graphs() after each step."""
    torch.manual_seed(0)
    model = randomize(cls(**dict(kw, class_dropout_prob=0.0))).train()  # labels are dropped outside the model
    model.grad_checkpoint = checkpoint
    net = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen = []
    for _ in range(steps):
        x, y = torch.randn(4, 16, 4, 4), torch.randint(0, 11, (4,))  # new draws every step, 11 = the null class
        with PRECISIONS[precision]():
            loss = rae.flow_loss(net, x, y, 2.0, eps=torch.randn_like(x), t=torch.rand(4))
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen.append(graphs())
    return seen


def decoder_steps(checkpoint, precision, backend, steps=3):
    """decoder_train.py's step once the GAN loss is on (generator_step, EMA, discriminator_step), with the RAE,
    LPIPS and the discriminator's backbone blocks compiled as its main() compiles them; graphs() after each step."""
    torch.manual_seed(0)
    enc = rae.Encoder(**dict(rae.ENCODERS['dinov2-b'], **TINY_ENCODER, input_size=56))
    enc.check_inputs = False  # as main(): no range check in the step
    dec = rae.Decoder(32, 64, 2, 1, 128, grid=4, patch=8)
    dec.grad_checkpoint = checkpoint
    autoencoder = rae.RAE(enc, dec, noise_tau=0.8).train()
    disc = dt.Discriminator(rae.Encoder(**dict(TINY_DINO, pos_grid=4, input_size=32)), key_depths=(1, 3))
    opt, opt_d = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (dec, disc))
    ema, lpips = make_ema(dec), random_lpips()
    autoencoder, lpips = torch.compile(autoencoder, backend=backend), torch.compile(lpips, backend=backend)
    for block in disc.dino.blocks:
        block.compile(backend=backend)
    seen, ctx = [], PRECISIONS[precision]()  # one context for every step, as main()
    with torch._functorch.config.patch(donated_buffer=False):  # as main(): lambda's grads retain the graph
        for _ in range(steps):
            images = torch.rand(2, 3, 32, 32)
            dt.generator_step(autoencoder, lpips, disc, opt, images, True, ctx)
            update_ema(ema, dec, 0.9)
            dt.discriminator_step(autoencoder, disc, opt_d, images, ctx)
            seen.append(graphs())
    return seen


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
@pytest.mark.parametrize('checkpoint', [False, True], ids=['plain', 'grad_checkpoint'])
@pytest.mark.parametrize('cls, kw', [(rae.DiTDH, TINY_DDT), (rae.LightningDiT, TINY_LDIT)],
                         ids=['DiTDH', 'LightningDiT'])
def test_dit_training_step_compiles_to_one_graph(cls, kw, checkpoint, precision):
    # forward and backward of the whole model in one graph, compiled once: the later steps only run it
    assert dit_steps(cls, kw, checkpoint, precision, 'aot_eager') == [(1, {})] * 3


@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
@pytest.mark.parametrize('checkpoint', [False, True], ids=['plain', 'grad_checkpoint'])
def test_decoder_training_step_compiles_once(checkpoint, precision):
    # five graphs in the first step, none after: the RAE in train mode (G step) and in eval mode without gradients
    # (the D step's fakes), LPIPS, and one graph for all backbone blocks of the discriminator per kind of input
    # (fakes that carry gradients in the G step, detached images in the D step)
    assert decoder_steps(checkpoint, precision, 'aot_eager') == [(5, {})] * 3


@pytest.mark.slow
def test_inductor_compiles_the_same_graphs():
    """The same with the backend the scripts use (minutes of code generation on 2 CPU cores, cold caches)."""
    for cls, kw in [(rae.DiTDH, TINY_DDT), (rae.LightningDiT, TINY_LDIT)]:
        torch._dynamo.reset()
        counters.clear()
        assert dit_steps(cls, kw, False, 'fp32', 'inductor', steps=2) == [(1, {})] * 2, cls.__name__
    torch._dynamo.reset()
    counters.clear()
    assert decoder_steps(True, 'fp32', 'inductor', steps=2) == [(5, {})] * 2
