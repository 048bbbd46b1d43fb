# SPDX-License-Identifier: Apache-2.0
"""KALE and GEBM latent-sampling benchmarks.

1. Time split of one KALE generator iteration on CPU (5 critic updates with the
   gradient penalty, then one generator update): critic updates without the
   penalty, the penalty's extra cost, and the generator update.
2. Latent sampling throughput (chain-steps per second) of ULA on a GEBM with MLP
   generator (latent 8 -> 128 -> 128 -> 32) and MLP energy (32 -> 128 -> 128 -> 1)
   for 4096 chains: ``gebm.sample(n, mcmc.ULA(h), num_steps)`` (the Pyro model
   through the energy view and the sampling driver) versus the same Langevin loop
   written by hand on ``0.5 |z|^2 + E(G(z))``. Target ratio <= 1.2.
3. With ``--gpu`` and CUDA available: the same throughput at 65536 chains.

Both sides run in this process, interleaved; the table shows medians.

    python benchmarks/kale.py [--repeats 5] [--steps 50] [--threads 1] [--gpu]
"""

import argparse
import statistics
import time

import pyro
import torch

from pyro_ebm import mcmc
from pyro_ebm.infer import KALE
from pyro_ebm.models import GEBM
from pyro_ebm.models.nets import MLP

LATENT, DATA, HIDDEN = 8, 32, (128, 128)
STEP = 1e-3


def make_gebm(device):
    torch.manual_seed(0)
    return GEBM(MLP(LATENT, DATA, HIDDEN), MLP(DATA, 1, HIDDEN), latent_dim=LATENT).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# -- 1. KALE iteration split ---------------------------------------------------


def kale_split(repeats, batch=256):
    device = torch.device("cpu")
    gebm = make_gebm(device)
    data = gebm.sample_base(batch) + 0.1 * torch.randn(batch, DATA)

    def make(penalty):
        adam = pyro.optim.Adam({"lr": 1e-4, "betas": (0.5, 0.9)})
        kale = KALE(gebm, adam, pyro.optim.Adam({"lr": 1e-4, "betas": (0.5, 0.9)}),
                    warmup_critic_steps=1, penalty=penalty)
        kale.step(data)  # initializes c and the optimizers' state
        return kale

    with_penalty, without_penalty = make(1.0), make(0.0)
    parts = {"5 critic updates, no penalty": [], "gradient penalty (extra)": [], "generator update": [],
             "whole iteration (step)": []}
    for _ in range(repeats):
        t_pen = timed(lambda: [with_penalty.critic_step(data) for _ in range(5)], device)
        t_plain = timed(lambda: [without_penalty.critic_step(data) for _ in range(5)], device)
        t_all = timed(lambda: with_penalty.step(data), device)
        t_gen = t_all - t_pen  # the step is 5 critic updates and one generator update
        parts["5 critic updates, no penalty"].append(t_plain)
        parts["gradient penalty (extra)"].append(t_pen - t_plain)
        parts["generator update"].append(t_gen)
        parts["whole iteration (step)"].append(t_all)
    total = statistics.median(parts["whole iteration (step)"])
    print(f"\nOne KALE generator iteration on CPU (batch {batch}, generator {LATENT}-{HIDDEN}-{DATA}, "
          f"energy {DATA}-{HIDDEN}-1, {torch.get_num_threads()} thread(s)), median of {repeats}:")
    print(f"{'part':32s} {'ms':>8s} {'share':>7s}")
    for name, values in parts.items():
        ms = 1e3 * statistics.median(values)
        print(f"{name:32s} {ms:8.2f} {ms / (1e3 * total):7.1%}")


# -- 2. / 3. latent sampling throughput ---------------------------------------


def by_hand(gebm, z, steps):
    """The same ULA loop written directly on U(z) = 0.5 |z|^2 + E(G(z)), then
    x = G(z). (The kernel also evaluates U and its gradient once at the start,
    which it caches; the hand loop has no such call, so pyro_ebm does one
    evaluation more per run: 1 / steps of the ratio.)"""
    for _ in range(steps):
        with torch.enable_grad():
            zg = z.detach().requires_grad_(True)
            u = 0.5 * zg.pow(2).sum(-1) + gebm.energy(gebm.generator(zg)).squeeze(-1)
            (grad,) = torch.autograd.grad(u.sum(), zg)
        z = z - STEP * grad + (2 * STEP) ** 0.5 * torch.randn_like(z)
    with torch.no_grad():
        return gebm.generator(z)  # the samples x, as gebm.sample returns


def throughput(chains, steps, repeats, device):
    gebm = make_gebm(device)
    z0 = torch.randn(chains, LATENT, device=device)
    kernel = mcmc.ULA(STEP)
    runs = {
        "pyro_ebm: gebm.sample (ULA)": lambda: gebm.sample(chains, kernel, steps, initial=z0),
        "by hand: the same ULA loop": lambda: by_hand(gebm, z0, steps),
    }
    for fn in runs.values():  # warm up (structure trace, allocator)
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    print(f"\nLatent ULA throughput, {chains} chains x {steps} steps on {device} "
          f"({torch.get_num_threads()} CPU thread(s)), median of {repeats}:")
    print(f"{'run':32s} {'chain-steps/s':>14s} {'ratio':>7s}")
    hand = statistics.median(times["by hand: the same ULA loop"])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:32s} {chains * steps / med:14.3g} {med / hand:7.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50, help="sampler steps per timed run")
    parser.add_argument("--chains", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--gpu", action="store_true", help="also time 65536 chains on CUDA")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kale_split(args.repeats)
    throughput(args.chains, args.steps, args.repeats, torch.device("cpu"))
    if args.gpu:
        if torch.cuda.is_available():
            throughput(65536, args.steps, args.repeats, torch.device("cuda"))
        else:
            print("\n--gpu: CUDA is not available here; skipped")


if __name__ == "__main__":
    main()
