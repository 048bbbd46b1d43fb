# SPDX-License-Identifier: Apache-2.0
"""Train a GaussianRBM on a 2-D toy by CD, DSM, SSM, BiSM or VaGES and report its
exact test log-likelihood (log Z by enumerating the hidden states).

    python examples/grbm_score_matching.py --method bidsm --steps 3000
    python examples/grbm_score_matching.py --method vages --steps 5     # seconds
"""

import argparse

import pyro
import torch

from pyro_ebm import datasets
from pyro_ebm.guides import AmortizedBernoulli
from pyro_ebm.infer import DSM, SSM, BiSM, ContrastiveDivergence, ScoreMatching, VaGES
from pyro_ebm.models import GaussianRBM


def make_trainer(method, grbm, args):
    optim = pyro.optim.Adam({"lr": args.lr, "betas": (0.9, 0.95)})
    guide = AmortizedBernoulli(2, args.hidden, site="h", temperature=0.1)
    if method == "cd":
        return ContrastiveDivergence(grbm, optim, k=1)
    if method == "dsm":  # a latent-free model (the free energy): plain score matching
        return ScoreMatching(grbm.marginal, optim, objective=DSM(args.noise_scale))
    if method == "ssm":  # the same loss works in Pyro's SVI(grbm.marginal, no_guide, optim, loss=SSM())
        return ScoreMatching(grbm.marginal, optim, objective=SSM())
    if method == "bidsm":  # the joint model with latent h, and a guide q(h | v)
        return BiSM(grbm, guide, optim, objective=DSM(args.noise_scale), inner_steps=5, unroll_steps=5)
    if method == "bissm":
        return BiSM(grbm, guide, optim, objective=SSM(), inner_steps=5, unroll_steps=5)
    return VaGES(grbm, guide, optim, objective="dsm", num_particles=2, inner_steps=5,
                 noise_scale=args.noise_scale)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=["cd", "dsm", "ssm", "bidsm", "bissm", "vages"], default="bidsm")
    parser.add_argument("--toy", default="checkerboard", choices=datasets.TOY_NAMES)
    parser.add_argument("--hidden", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--noise-scale", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # toy-sized tensors run fastest on one thread
    pyro.set_rng_seed(args.seed)
    train = datasets.toy(args.toy, 20000, seed=args.seed)
    test = datasets.toy(args.toy, 5000, seed=args.seed + 1)
    grbm = GaussianRBM(2, args.hidden)
    trainer = make_trainer(args.method, grbm, args)
    batches = datasets.batches(train, 100, seed=args.seed)
    with torch.no_grad():
        start = float(grbm.log_likelihood(test).mean())
    for step in range(args.steps):
        loss = trainer.step(next(batches))
        if step % max(1, args.steps // 5) == 0:
            print(f"step {step:5d}  loss {loss:.4f}")
    with torch.no_grad():
        final = float(grbm.log_likelihood(test).mean())
    print(f"{args.method}: exact test log-likelihood {start:.3f} -> {final:.3f}")
    return start, final


if __name__ == "__main__":
    main()
