# SPDX-License-Identifier: Apache-2.0
"""Cost of BiSM and VaGES relative to plain DSM on a GaussianRBM, and of BiSM
relative to a hand-written plain-torch BiDSM.

Times one training iteration (batch 100) of

- DSM: ``infer.ScoreMatching(grbm.marginal, optim, objective=DSM(sigma))`` (the
  fast plain path, the denominator of the ratios), and through
  ``pyro.infer.SVI(grbm.marginal, ..., loss=DSM(sigma))`` for reference;
- BiDSM (K 5, N 5) eager and with ``compile=True``, BiDSM (K 5, N 0):
  ``BiSM(grbm, AmortizedBernoulli, objective=DSM(sigma))``;
- VaGES-DSM (L 2, K 5), eager and with ``compile=True``;
- the same BiDSM (K 5, N 5) written by hand in plain torch (:class:`HandBiDSM`:
  the GRBM's log density and the linear Concrete-Bernoulli guide as functions of
  explicit tensors, one fused torch Adam per level, the N unrolled Adam steps
  written out with ``create_graph=True``), and, when the package ``higher`` can
  be imported, with its unrolled steps by ``higher.innerloop_ctx``
  (:class:`HigherBiDSM`; ``higher`` is unmaintained, so it is not a dependency:
  put it on ``PYTHONPATH`` from a separate directory to get that row);

at toy size (2 visible, 4 hidden) and digits size (64, 16), and reports each
method's time divided by DSM's and BiDSM's divided by the hand-written one's
(methods are timed in interleaved rounds and the median round counts, so a busy
machine affects all of them alike; compiled rows are compiled in the warm-up,
which is not timed). It then measures the memory the unrolled hypergradient
holds against N: the bytes of every tensor autograd saves for the backward pass
of one BiDSM upper loss (``torch.autograd.graph.saved_tensors_hooks``, storages
counted once).

    python benchmarks/bism.py --threads 1                 # full run (compiling takes minutes)
    python benchmarks/bism.py --rounds 2 --iters 3 --sizes toy --no-compile   # smoke run
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import pyro
import torch
import torch.nn.functional as F

from pyro_ebm import datasets
from pyro_ebm.guides import AmortizedBernoulli
from pyro_ebm.infer import DSM, BiSM, ScoreMatching, VaGES
from pyro_ebm.models import GaussianRBM

SIZES = {"toy": (2, 4, 0.05, 1e-3), "digits": (64, 16, 0.3, 2e-4)}  # visible, hidden, sigma, lr
BETAS = (0.9, 0.95)
TEMPERATURE = 0.1
BASE = "DSM (ScoreMatching)"
HAND = "hand-written BiDSM (K5, N5)"


def _data(size, n):
    if size == "toy":
        return datasets.toy("checkerboard", n, seed=0)
    return datasets.digits("train")[:n]


def _no_guide(v):
    pass


class HandBiDSM:
    """BiDSM (K inner, N unrolled steps, lower="kl") on a GaussianRBM with a linear
    Concrete-Bernoulli guide, written in plain torch: what pyro_ebm's BiSM computes
    for ``BiSM(grbm, AmortizedBernoulli(...), optim, objective=DSM(sigma))``."""

    def __init__(self, visible, hidden, sigma, lr, inner_steps=5, unroll_steps=5):
        grbm, guide = GaussianRBM(visible, hidden), torch.nn.Linear(visible, hidden)
        self.theta = [grbm.W.detach().clone(), grbm.b.detach().clone(), grbm.c.detach().clone(),
                      grbm.log_std.detach().clone()]
        self.phi = [guide.weight.detach().clone(), guide.bias.detach().clone()]
        for p in self.theta + self.phi:
            p.requires_grad_(True)
        self.theta_optim = torch.optim.Adam(self.theta, lr=lr, betas=BETAS, fused=True)
        self.phi_optim = torch.optim.Adam(self.phi, lr=lr, betas=BETAS, fused=True)
        self.sigma, self.lr, self.K, self.N = sigma, lr, inner_steps, unroll_steps

    @staticmethod
    def log_p(theta, v, h):
        """Σ log p̃(v, h) = -Σ E(v, h) (h's uniform base measure is a constant)."""
        W, b, c, log_std = theta
        quadratic = 0.5 * ((v - b) / log_std.exp()).pow(2).sum(-1)
        return (-quadratic + (h * c).sum(-1) + (h * (v @ W)).sum(-1)).sum()

    @staticmethod
    def sample(phi, v):
        logits = F.linear(v, *phi)
        info = torch.finfo(logits.dtype)
        u = torch.rand_like(logits).clamp(info.tiny, 1 - info.eps)
        return torch.sigmoid((logits + u.log() - (-u).log1p()) / TEMPERATURE)

    @staticmethod
    def log_q(phi, v, h):
        logits = F.linear(v, *phi)
        return (h * logits - F.softplus(logits)).sum()

    def lower(self, theta, phi, v):
        x = v + self.sigma * torch.randn_like(v)
        h = self.sample(phi, x)
        return (self.log_q(phi, x, h) - self.log_p(theta, x, h)) / v.shape[0]

    def upper(self, theta, phi, v):
        eps = torch.randn_like(v)
        x = (v + self.sigma * eps).requires_grad_(True)
        h = self.sample(phi, x.detach())
        (s,) = torch.autograd.grad(self.log_p(theta, x, h) - self.log_q(phi, x, h), x, create_graph=True)
        return 0.5 * (s + eps / self.sigma).pow(2).sum(-1).mean()

    def inner(self, v):
        for _ in range(self.K):
            grads = torch.autograd.grad(self.lower(self.theta, self.phi, v), self.phi)
            for p, g in zip(self.phi, grads, strict=True):
                p.grad = g
            self.phi_optim.step()

    def unrolled(self, v):
        (beta1, beta2), eps = BETAS, 1e-8
        state = [self.phi_optim.state[p] for p in self.phi]
        m, u = [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state]
        t, phi = float(state[0]["step"]), list(self.phi)
        for _ in range(self.N):
            grads = torch.autograd.grad(self.lower(self.theta, phi, v), phi, create_graph=True)
            t += 1
            m = [beta1 * mi + (1 - beta1) * g for mi, g in zip(m, grads, strict=True)]
            u = [beta2 * ui + (1 - beta2) * g * g for ui, g in zip(u, grads, strict=True)]
            step, root = self.lr / (1 - beta1**t), math.sqrt(1 - beta2**t)
            # + tiny: sqrt's derivative at 0 (pyro_ebm's guarded sqrt costs a select)
            phi = [p - step * mi / ((ui + 1e-30).sqrt() / root + eps)
                   for p, mi, ui in zip(phi, m, u, strict=True)]
        return phi

    def step(self, v):
        self.inner(v)
        loss = self.upper(self.theta, self.unrolled(v), v)
        grads = torch.autograd.grad(loss, self.theta)
        for p, g in zip(self.theta, grads, strict=True):
            p.grad = g
        self.theta_optim.step()
        return loss.detach()


class HigherBiDSM(HandBiDSM):
    """:class:`HandBiDSM` with the unrolled steps taken by ``higher`` (a differentiable
    copy of the guide's torch Adam, the guide an ``nn.Linear``)."""

    def __init__(self, *args, **kwargs):
        import higher

        super().__init__(*args, **kwargs)
        self.higher = higher
        self.guide = torch.nn.Linear(*reversed(self.phi[0].shape))
        with torch.no_grad():
            self.guide.weight.copy_(self.phi[0])
            self.guide.bias.copy_(self.phi[1])
        self.phi = [self.guide.weight, self.guide.bias]
        self.phi_optim = torch.optim.Adam(self.phi, lr=self.lr, betas=BETAS)

    def step(self, v):
        self.inner(v)
        ctx = self.higher.innerloop_ctx(self.guide, self.phi_optim, copy_initial_weights=False)
        with ctx as (fguide, opt):
            for _ in range(self.N):
                opt.step(self.lower(self.theta, [fguide.weight, fguide.bias], v))
            loss = self.upper(self.theta, [fguide.weight, fguide.bias], v)
            grads = torch.autograd.grad(loss, self.theta)
        for p, g in zip(self.theta, grads, strict=True):
            p.grad = g
        self.theta_optim.step()
        return loss.detach()


def _trainers(size, compile=True):
    visible, hidden, sigma, lr = SIZES[size]

    def optim():
        return pyro.optim.Adam({"lr": lr, "betas": BETAS})

    def models():
        grbm = GaussianRBM(visible, hidden, name=f"{size}_{len(trainers)}")
        return grbm, AmortizedBernoulli(visible, hidden, site="h", temperature=TEMPERATURE)

    pyro.clear_param_store()  # the guides of another size registered the same names
    trainers = {}
    grbm, _ = models()
    trainers[BASE] = ScoreMatching(grbm.marginal, optim(), objective=DSM(sigma)).step
    grbm, _ = models()
    trainers["DSM (SVI)"] = pyro.infer.SVI(grbm.marginal, _no_guide, optim(), loss=DSM(sigma)).step
    for name, unroll, compiled in (("BiDSM (K5, N5)", 5, False), ("BiDSM (K5, N5) compiled", 5, True),
                                   ("BiDSM (K5, N0)", 0, False)):
        if compiled and not compile:
            continue
        grbm, guide = models()
        trainers[name] = BiSM(grbm, guide, optim(), objective=DSM(sigma), inner_steps=5, unroll_steps=unroll,
                              compile=compiled).step
    for name, compiled in (("VaGES-DSM (L2, K5)", False), ("VaGES-DSM (L2, K5) compiled", True)):
        if compiled and not compile:
            continue
        grbm, guide = models()
        trainers[name] = VaGES(grbm, guide, optim(), objective="dsm", noise_scale=sigma, num_particles=2,
                               inner_steps=5, compile=compiled).step
    trainers[HAND] = HandBiDSM(visible, hidden, sigma, lr).step
    try:
        trainers["higher BiDSM (K5, N5)"] = HigherBiDSM(visible, hidden, sigma, lr).step
    except ImportError:
        pass
    return trainers


def time_ratios(size, rounds, iters, batch=100, compile=True):
    data = _data(size, 10 * batch)
    batches = data.split(batch)
    trainers = _trainers(size, compile)
    for step in trainers.values():  # warm up: structure traces, optimizer state, compiling
        step(batches[0])
        step(batches[1])
    times = {name: [] for name in trainers}
    for r in range(rounds):
        for name, step in trainers.items():
            start = time.perf_counter()
            for i in range(iters):
                step(batches[(r * iters + i) % len(batches)])
            times[name].append((time.perf_counter() - start) / iters)
    per_iter = {name: statistics.median(t) for name, t in times.items()}
    return {name: (t * 1e3, t / per_iter[BASE], t / per_iter[HAND]) for name, t in per_iter.items()}


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
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pyro.clear_param_store()
    torch.manual_seed(0)
    print(f"Time per iteration (batch 100, CPU, {args.threads} thread(s), median of {args.rounds} rounds "
          f"of {args.iters} iterations)\n")
    print(f"| size | {'method':<29} | ms / iteration | × DSM | × hand-written BiDSM |")
    print(f"|------|{'-' * 31}|---------------:|------:|---------------------:|")
    for size in args.sizes:
        for name, (ms, ratio, hand) in time_ratios(size, args.rounds, args.iters,
                                                  compile=not args.no_compile).items():
            print(f"| {size} | {name:<29} | {ms:14.2f} | {ratio:5.2f} | {hand:20.2f} |")
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
