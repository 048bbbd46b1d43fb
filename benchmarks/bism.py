# SPDX-License-Identifier: Apache-2.0
"""Cost of BiSM and VaGES relative to plain DSM on a GaussianRBM, through pyro_ebm.

Times one training iteration (batch 100) of

- DSM: ``pyro.infer.SVI(grbm.marginal, ..., loss=DSM(sigma))``,
- BiDSM (K 5, N 5) and BiDSM (K 5, N 0): ``BiSM(grbm, AmortizedBernoulli, objective=DSM(sigma))``,
- VaGES-DSM (L 2, K 5),

at toy size (2 visible, 4 hidden) and digits size (64, 16), and reports each
method's time divided by DSM's (methods are timed in interleaved rounds and the
median round counts, so a busy machine affects all of them alike). It then
measures the memory the unrolled hypergradient holds against N: the bytes of
every tensor autograd saves for the backward pass of one BiDSM upper loss
(``torch.autograd.graph.saved_tensors_hooks``, storages counted once).

    python benchmarks/bism.py                 # full run
    python benchmarks/bism.py --rounds 2 --iters 3 --sizes toy   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch

from pyro_ebm import datasets
from pyro_ebm.guides import AmortizedBernoulli
from pyro_ebm.infer import DSM, BiSM, VaGES
from pyro_ebm.models import GaussianRBM

SIZES = {"toy": (2, 4, 0.05, 1e-3), "digits": (64, 16, 0.3, 2e-4)}  # visible, hidden, sigma, lr


def _data(size, n):
    if size == "toy":
        return datasets.toy("checkerboard", n, seed=0)
    return datasets.digits("train")[:n]


def _no_guide(v):
    pass


def _trainers(size):
    visible, hidden, sigma, lr = SIZES[size]
    betas = (0.9, 0.95)

    def optim():
        return pyro.optim.Adam({"lr": lr, "betas": betas})

    trainers = {}
    for name in ("DSM", "BiDSM (K5, N5)", "BiDSM (K5, N0)", "VaGES-DSM (L2, K5)"):
        grbm = GaussianRBM(visible, hidden, name=f"{size}_{len(trainers)}")
        guide = AmortizedBernoulli(visible, hidden, site="h", temperature=0.1)
        if name == "DSM":
            svi = pyro.infer.SVI(grbm.marginal, _no_guide, optim(), loss=DSM(sigma))
            trainers[name] = svi.step
        elif name.startswith("BiDSM"):
            unroll = 5 if "N5" in name else 0
            trainers[name] = BiSM(grbm, guide, optim(), objective=DSM(sigma), inner_steps=5,
                                  unroll_steps=unroll).step
        else:
            trainers[name] = VaGES(grbm, guide, optim(), objective="dsm", noise_scale=sigma, num_particles=2,
                                   inner_steps=5).step
    return trainers


def time_ratios(size, rounds, iters, batch=100):
    data = _data(size, 10 * batch)
    batches = data.split(batch)
    trainers = _trainers(size)
    for step in trainers.values():  # warm up: structure traces, optimizer state
        step(batches[0])
    times = {name: [] for name in trainers}
    for r in range(rounds):
        for name, step in trainers.items():
            start = time.perf_counter()
            for i in range(iters):
                step(batches[(r * iters + i) % len(batches)])
            times[name].append((time.perf_counter() - start) / iters)
    per_iter = {name: statistics.median(t) for name, t in times.items()}
    return {name: (t * 1e3, t / per_iter["DSM"]) for name, t in per_iter.items()}


def saved_bytes(size, unroll_steps, batch=100):
    """Bytes autograd saves for the backward pass of one BiDSM upper loss."""
    visible, hidden, sigma, lr = SIZES[size]
    pyro.clear_param_store()
    torch.manual_seed(0)
    grbm = GaussianRBM(visible, hidden, name=f"mem_{unroll_steps}")
    guide = AmortizedBernoulli(visible, hidden, site="h", temperature=0.1)
    bism = BiSM(grbm, guide, pyro.optim.Adam({"lr": lr}), objective=DSM(sigma), inner_steps=1,
                unroll_steps=unroll_steps)
    v = _data(size, batch)
    bism.step(v)  # fills the guide's Adam state
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
        bism._upper_loss(v, (), {})
    return sum(storages.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["toy", "digits"], choices=sorted(SIZES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: tiny tensors)")
    parser.add_argument("--unroll", type=int, nargs="+", default=[0, 1, 2, 5, 10, 20])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.clear_param_store()
    torch.manual_seed(0)
    print(f"Time per iteration (batch 100, CPU, {args.threads} thread(s), median of {args.rounds} rounds "
          f"of {args.iters} iterations)\n")
    print(f"| size | {'method':<20} | ms / iteration | × DSM |")
    print(f"|------|{'-' * 22}|---------------:|------:|")
    for size in args.sizes:
        for name, (ms, ratio) in time_ratios(size, args.rounds, args.iters).items():
            print(f"| {size} | {name:<20} | {ms:14.2f} | {ratio:5.2f} |")
    print("\nMemory autograd saves for one BiDSM upper loss against the unrolled steps N\n")
    print("| size | N | saved MB | MB per unrolled step |")
    print("|------|--:|---------:|---------------------:|")
    for size in args.sizes:
        base = None
        for n in args.unroll:
            mb = saved_bytes(size, n) / 2**20
            base = mb if base is None else base
            per = f"{(mb - base) / n:.3f}" if n else "-"
            print(f"| {size} | {n} | {mb:.3f} | {per} |")


if __name__ == "__main__":
    main()
