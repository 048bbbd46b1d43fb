# SPDX-License-Identifier: Apache-2.0
"""Overhead of pyro_ebm's DSM training step against the same step by hand.

One DSM step on a GaussianRBM through ``pyro.infer.SVI(grbm.marginal, ...,
loss=DSM(σ))`` versus the same free energy, loss and Adam update written in
plain PyTorch, at toy size (2 visible, 4 hidden) and digits size (64, 16),
batch 100. Both run in this process, interleaved, and the table shows the ratio
of median step times. Targets: ≤ 3× at toy size, ≤ 1.5× at digits size.

    python benchmarks/overhead.py [--repeats 7] [--steps 200]
"""

import argparse
import statistics
import time

import pyro
import torch
import torch.nn.functional as F

from pyro_ebm.infer import DSM
from pyro_ebm.models import GaussianRBM

SIGMA = 0.05


def pyro_ebm_step(visible, hidden, v):
    pyro.clear_param_store()
    grbm = GaussianRBM(visible, hidden)
    svi = pyro.infer.SVI(grbm.marginal, lambda v: None, pyro.optim.Adam({"lr": 1e-3}), loss=DSM(SIGMA))
    return lambda: svi.step(v)


def by_hand_step(visible, hidden, v):
    W = (0.01 * torch.randn(visible, hidden)).requires_grad_()
    b = torch.zeros(visible, requires_grad=True)
    c = torch.zeros(hidden, requires_grad=True)
    log_std = torch.zeros(visible, requires_grad=True)
    opt = torch.optim.Adam([W, b, c, log_std], lr=1e-3)

    def step():
        eps = torch.randn_like(v)
        x = (v + SIGMA * eps).requires_grad_()
        free = 0.5 * (((x - b) / log_std.exp()) ** 2).sum(-1) - F.softplus(c + x @ W).sum(-1)
        (grad,) = torch.autograd.grad(free.sum(), x, create_graph=True)
        loss = 0.5 * ((-grad + eps / SIGMA) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def time_steps(step, steps):
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, batch 100, median of {args.repeats}")
    print(f"{'size':14s} {'pyro_ebm (us)':>14s} {'by hand (us)':>13s} {'ratio':>6s} {'target':>7s}")
    for label, visible, hidden, target in (("toy 2x4", 2, 4, 3.0), ("digits 64x16", 64, 16, 1.5)):
        v = torch.rand(100, visible)
        ours, hand = pyro_ebm_step(visible, hidden, v), by_hand_step(visible, hidden, v)
        t_ours, t_hand = [], []
        for _ in range(args.repeats):
            t_ours.append(time_steps(ours, args.steps))
            t_hand.append(time_steps(hand, args.steps))
        a, b = statistics.median(t_ours), statistics.median(t_hand)
        print(f"{label:14s} {a * 1e6:14.0f} {b * 1e6:13.0f} {a / b:6.2f} {'<= ' + str(target):>7s}")


if __name__ == "__main__":
    main()
