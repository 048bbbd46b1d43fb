# SPDX-License-Identifier: Apache-2.0
"""Many chains on the latent posterior of an energy-based latent variable model.

The model: each data item v_i has a latent h_i ~ N(0, I_2), a nonlinear generator
g(h) = tanh(A h) + b, and the energy E(v, h) = ‖v − g(h)‖² / (2σ²) enters as a
``pyro.factor``. ``mcmc.sample`` runs all chains as one batch over the latent
sites, the ArviZ summary (R-hat, bulk / tail ESS) is printed and a trace plot is
written.

    python examples/latent_chains.py --num-chains 1024 --num-samples 300 --threads 1
    python examples/latent_chains.py --num-chains 8 --num-samples 20 --warmup-steps 20  # smoke

(On a CPU, batches of this size run fastest on one thread.)
"""

import argparse
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from pyro_ebm import mcmc

KERNELS = {
    "mala": lambda a: mcmc.MALA(a.step_size),
    "hmc": lambda a: mcmc.HMC(a.step_size, num_steps=5),
    "ula": lambda a: mcmc.ULA(a.step_size),
    "underdamped": lambda a: mcmc.UnderdampedLangevin(a.step_size, friction=1.0),
}


def make_model(weight, bias, noise):
    def model(v):
        with pyro.plate("data", len(v)):
            h = pyro.sample("h", dist.Normal(torch.zeros(2, dtype=v.dtype), 1.0).to_event(1))
            g = torch.tanh(h @ weight.T) + bias
            pyro.factor("energy", -(v - g).pow(2).sum(-1) / (2 * noise**2))

    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-data", type=int, default=3)
    parser.add_argument("--num-chains", type=int, default=1024)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--kernel", choices=sorted(KERNELS), default="hmc")
    parser.add_argument("--step-size", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path("latent_chains_trace.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (by default shown only on a terminal)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pyro.set_rng_seed(args.seed)
    weight = torch.tensor([[1.5, -0.5], [0.3, 1.2], [-1.0, 0.8]])
    bias = torch.tensor([0.1, -0.2, 0.0])
    model = make_model(weight, bias, noise=0.3)
    h_true = torch.randn(args.num_data, 2)
    v = torch.tanh(h_true @ weight.T) + bias + 0.3 * torch.randn(args.num_data, 3)

    samples = mcmc.sample(model, KERNELS[args.kernel](args), num_chains=args.num_chains,
                          num_samples=args.num_samples, warmup_steps=args.warmup_steps,
                          model_args=(v,), progress=False if args.no_progress else None)
    table = samples.summary(kind="diagnostics")
    print(table.to_string())
    print(f"acceptance {float(samples.stats['accept_prob'].mean()):.3f}, "
          f"divergences {samples.num_divergences}, "
          f"posterior mean of h:\n{samples.get_samples()['h'].mean((0, 1))}")
    path = samples.plot_trace(args.out)
    print(f"trace plot written to {path}")
    return samples, table


if __name__ == "__main__":
    main()
