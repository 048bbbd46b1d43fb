# SPDX-License-Identifier: Apache-2.0
"""Overhead of pyro_ebm's DSM training step against the same step by hand.

One DSM step on a GaussianRBM, at toy size (2 visible, 4 hidden) and digits size
(64, 16), batch 100, four ways: the same free energy, loss and update written in
plain PyTorch with one fused Adam (the reference); ``infer.ScoreMatching`` on the
traced path (the default) and on the Pyro path (``energy_view(...).traced =
False``); and ``pyro.infer.SVI(grbm.marginal, ..., loss=DSM(σ))``. All run in
this process, interleaved, and the table shows each median step time over the
reference's. Target (issue "one energy core"): ScoreMatching ≤ 1.1×.

    python benchmarks/overhead.py [--repeats 7] [--steps 200] [--threads 1]
"""

import argparse
import statistics
import time

import pyro
import torch
import torch.nn.functional as F

from pyro_ebm.energy import energy_view
from pyro_ebm.infer import DSM, ScoreMatching
from pyro_ebm.models import GaussianRBM

SIGMA = 0.05


def pyro_ebm_step(visible, hidden, v):
    pyro.clear_param_store()
    grbm = GaussianRBM(visible, hidden)
    svi = pyro.infer.SVI(grbm.marginal, lambda v: None, pyro.optim.Adam({"lr": 1e-3}), loss=DSM(SIGMA))
    return lambda: svi.step(v)


def score_matching_step(visible, hidden, v, traced, compile=False):
    pyro.clear_param_store()
    grbm = GaussianRBM(visible, hidden)
    energy_view(grbm.marginal).traced = traced
    trainer = ScoreMatching(grbm.marginal, pyro.optim.Adam({"lr": 1e-3}), objective=DSM(SIGMA),
                            compile=compile)
    return lambda: trainer.step(v)


def by_hand_step(visible, hidden, v):
    W = (0.01 * torch.randn(visible, hidden)).requires_grad_()
    b = torch.zeros(visible, requires_grad=True)
    c = torch.zeros(hidden, requires_grad=True)
    log_std = torch.zeros(visible, requires_grad=True)
    opt = torch.optim.Adam([W, b, c, log_std], lr=1e-3, fused=True)

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
    step()  # the second call of a signature traces; a compiled step compiles at its first
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: tiny tensors)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch 100, median of {args.repeats}; "
          "ratios over the hand-written step with one fused Adam")
    print(f"{'size':14s} {'by hand (us)':>13s} {'ScoreMatching':>14s} {'SM compiled':>12s} "
          f"{'SM, Pyro path':>14s} {'SVI+DSM':>8s}")
    for label, visible, hidden in (("toy 2x4", 2, 4), ("digits 64x16", 64, 16)):
        v = torch.rand(100, visible)
        steps = {"hand": by_hand_step(visible, hidden, v),
                 "traced": score_matching_step(visible, hidden, v, True),
                 "compiled": score_matching_step(visible, hidden, v, True, compile=True),
                 "pyro": score_matching_step(visible, hidden, v, False),
                 "svi": pyro_ebm_step(visible, hidden, v)}
        times = {k: [] for k in steps}
        for _ in range(args.repeats):
            for k, step in steps.items():
                times[k].append(time_steps(step, args.steps))
        med = {k: statistics.median(t) for k, t in times.items()}
        hand = med["hand"]
        print(f"{label:14s} {hand * 1e6:13.0f} {med['traced'] / hand:13.2f}x {med['compiled'] / hand:11.2f}x "
              f"{med['pyro'] / hand:13.2f}x {med['svi'] / hand:7.2f}x")


if __name__ == "__main__":
    main()
