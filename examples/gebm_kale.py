# SPDX-License-Identifier: Apache-2.0
"""Train a generalized energy-based model (GEBM) by KALE on a 1-D curve in 2-D,
sample it by latent ULA and underdamped Langevin, print ArviZ's summary of the
latent chains and write the figures.

    python examples/gebm_kale.py                      # about two minutes on a CPU
    python examples/gebm_kale.py --iterations 5 --chains 16 --steps 20 --samples 300   # seconds
"""

import argparse
import math
from pathlib import Path

import pyro
import torch

from pyro_ebm import mcmc, metrics
from pyro_ebm.infer import KALE
from pyro_ebm.models import GEBM
from pyro_ebm.models.nets import MLP


def curve(n, seed):
    """A sine arc whose mass sits on two dense stretches, with a little noise."""
    g = torch.Generator().manual_seed(seed)
    t = (0.8 * (torch.randint(0, 2, (n,), generator=g) * 2 - 1) + 0.3 * torch.randn(n, generator=g))
    t = t.clamp(-1.6, 1.6)
    return torch.stack([t, 0.6 * torch.sin(math.pi * t)], -1) + 0.01 * torch.randn(n, 2, generator=g)


def main(args):
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, test = curve(20000, args.seed), curve(args.samples, args.seed + 1)

    # G: 1-D latent -> 2-D curve; E: 2-D -> energy. gebm(n) is the Pyro model of the latents.
    gebm = GEBM(MLP(1, 2, (64, 64)), MLP(2, 1, (64, 64)), latent_dim=1)
    kale = KALE(gebm,
                optim=pyro.optim.Adam({"lr": 1e-3, "betas": (0.5, 0.9)}),
                generator_optim=pyro.optim.Adam({"lr": 1e-3, "betas": (0.5, 0.9)}),
                critic_steps=5, warmup_critic_steps=min(100, 10 * args.iterations), penalty=1e-3)
    for it in range(args.iterations):
        batch = data[torch.randint(0, len(data), (256,))]
        kale.step(batch)
        losses = kale.last_losses
        if it % max(1, args.iterations // 10) == 0 or it == args.iterations - 1:
            print(f"iteration {it:5d}  kale {losses['kale']:.4f}  critic {losses['critic_loss']:.4f}  "
                  f"generator {losses['generator_loss']:.4f}")

    log_z, stderr = gebm.log_partition_estimate(50 * args.samples)
    print(f"log Z = {log_z:.4f} ± {stderr:.4f}")

    # Latent chains on nu(z) ∝ N(z; 0, I) exp(-E(G(z))), one draw per model run.
    bw = (0.05, 0.1, 0.2)
    base = gebm.sample_base(len(test))
    print(f"MMD² to held-out data: base {float(metrics.mmd(base, test, bandwidths=bw)):.5f}")
    kernels = {"ula": mcmc.ULA(0.01), "underdamped": mcmc.UnderdampedLangevin(0.1, friction=1.0)}
    for name, kernel in kernels.items():
        samples = mcmc.sample(gebm, kernel, num_chains=args.chains, num_samples=args.steps,
                              warmup_steps=args.steps, model_args=(1,), progress=False)
        print(f"\n{name}: {samples}")
        print(samples.summary())
        samples.plot_trace(out / f"gebm_trace_{name}.png")
        x = gebm.sample(len(test), kernel, num_steps=2 * args.steps)
        print(f"MMD² to held-out data: GEBM by {name} {float(metrics.mmd(x, test, bandwidths=bw)):.5f}")
        _scatter(test, base, x, name, out / f"gebm_samples_{name}.png")
    print(f"\nfigures in {out}")


def _scatter(test, base, x, name, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(9, 3), sharex=True, sharey=True)
    for ax, (title, pts) in zip(axes, [("data", test), ("base G(z)", base), (f"GEBM ({name})", x)],
                                strict=True):
        ax.scatter(pts[:, 0], pts[:, 1], s=0.5)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2000, help="KALE generator iterations")
    parser.add_argument("--chains", type=int, default=64, help="latent chains per sampler")
    parser.add_argument("--steps", type=int, default=500, help="warmup steps and draws per chain")
    parser.add_argument("--samples", type=int, default=2000, help="samples for the MMD to held-out data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/gebm_kale", help="folder for the figures")
    main(parser.parse_args())
