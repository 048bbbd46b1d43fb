# SPDX-License-Identifier: Apache-2.0
"""Time per training iteration of BiDVL against variational MCMC teaching with
K = 15 Langevin steps, on the same networks.

Both use the networks of ``pyro-ebm reproduce bidvl-digits``
(``pyro_ebm.experiments.bidvl_digits.build``: energy MLP 64-w-w-1, Gaussian
decoder 16-w-64, amortized Gaussian encoder 64-w-32, at hidden width w = 128 as
in the experiment and w = 1024) on batches of scikit-learn digits. BiDVL takes
one lower-level step (decoder/encoder) and one upper-level step (energy) per
iteration and runs no MCMC; teaching runs K ULA steps on the energy, one energy
step and one VAE step (SVI, Trace_ELBO).
Both run in this process, interleaved, after a warm-up; the table shows the
median time per iteration and the ratio teaching / BiDVL.

    python benchmarks/bidvl.py [--repeats 5] [--steps 50] [--batch 100] [--threads 1] [--widths 128 1024]
    pyro-ebm bench bidvl
"""

import argparse
import statistics
import time

import torch

from pyro_ebm import datasets
from pyro_ebm.experiments.bidvl_digits import LANGEVIN_STEPS, make_bidvl, make_teaching


def time_steps(obj, stream, steps):
    start = time.perf_counter()
    for _ in range(steps):
        obj.step(next(stream))
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--langevin-steps", type=int, default=LANGEVIN_STEPS)
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 1024])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, "
          f"median of {args.repeats} x {args.steps} iterations")
    print(f"{'hidden width':>12s} {'BiDVL (ms)':>11s} {f'teaching K={args.langevin_steps} (ms)':>20s} "
          f"{'ratio':>6s}")
    for width in args.widths:
        b, t = compare(width, args)
        print(f"{width:12d} {b * 1e3:11.1f} {t * 1e3:20.1f} {t / b:6.2f}")


def compare(width, args):
    """Median seconds per iteration of BiDVL and of teaching at this hidden width."""
    x = datasets.digits("train")
    makers = {"BiDVL": lambda: make_bidvl(0, width),
              "MCMC teaching": lambda: make_teaching(0, width, num_langevin_steps=args.langevin_steps)}
    times = {name: [] for name in makers}
    for _ in range(args.repeats):
        for name, make in makers.items():
            # both share parameter names and build() clears the param store, so each
            # repeat builds afresh; three warm-up steps absorb validation and first calls
            obj = make()
            stream = datasets.batches(x, args.batch, seed=0, drop_last=True)
            for _ in range(3):
                obj.step(next(stream))
            times[name].append(time_steps(obj, stream, args.steps))
    return statistics.median(times["BiDVL"]), statistics.median(times["MCMC teaching"])


if __name__ == "__main__":
    main()
