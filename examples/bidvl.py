# SPDX-License-Identifier: Apache-2.0
"""BiDVL on scikit-learn digits: an MLP energy learned with a VAE-like decoder /
encoder pair as its variational joint, no MCMC.

After training it prints the test reconstruction error, the AUROC of the
out-of-distribution score -E for test digits against uniform noise and against
digits flipped upside down, and optionally saves generated digits (decoder
draws, and the same draws refined by a few Langevin steps on E).

    python examples/bidvl.py --iterations 1500
    python examples/bidvl.py --iterations 5 --hidden 16 --latent 2   # smoke test
"""

import argparse

import pyro
import torch

from pyro_ebm import datasets, mcmc
from pyro_ebm.guides import AmortizedNormal
from pyro_ebm.infer import BiDVL
from pyro_ebm.models import GaussianDecoder, MLPEnergy
from pyro_ebm.models.nets import MLP, GaussianEncoder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--decoder-scale", type=float, default=0.1)
    parser.add_argument("--energy-lr", type=float, default=1e-4)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-weight", type=float, default=1.0)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--langevin-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="save generated digits to this PNG file")
    args = parser.parse_args(argv)

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    x_train, x_test = datasets.digits("train"), datasets.digits("test")
    dim = x_train.shape[1]

    ebm = MLPEnergy(dim, (args.hidden, args.hidden))            # p(v) ∝ exp(-E(v)), E an MLP
    decoder = GaussianDecoder(MLP(args.latent, dim, (args.hidden,)), args.latent, scale=args.decoder_scale)
    encoder = AmortizedNormal(GaussianEncoder(dim, args.latent, (args.hidden,)), site="h")
    bidvl = BiDVL(ebm, decoder, encoder,
                  optim=pyro.optim.Adam({"lr": args.energy_lr, "betas": (0.5, 0.999)}),
                  vae_optim=pyro.optim.Adam({"lr": args.vae_lr}),
                  inner_steps=args.inner_steps, vae_weight=args.vae_weight)

    batches = datasets.batches(x_train, args.batch, seed=args.seed)
    for step, v in zip(range(args.iterations), batches, strict=False):
        bidvl.step(v)
        losses = bidvl.last_losses
        if step % max(1, args.iterations // 10) == 0 or step == args.iterations - 1:
            print(f"step {step:5d}  upper {losses['upper']:8.3f}  lower {losses['lower']:9.2f}  "
                  f"-ELBO {losses['neg_elbo']:9.2f}  latent {losses['latent']:6.2f}")

    noise = torch.rand_like(x_test)
    flipped = x_test.reshape(-1, 8, 8).flip(1).reshape(-1, dim)
    results = {
        "reconstruction error": float(bidvl.reconstruction_error(x_test).mean()),
        "AUROC -E vs uniform noise": bidvl.ood_auroc(x_test, noise),
        "AUROC -E vs flipped digits": bidvl.ood_auroc(x_test, flipped),
    }
    for name, value in results.items():
        print(f"{name}: {value:.3f}")

    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        draws = bidvl.generate(16)
        refined = bidvl.generate(16, langevin_steps=args.langevin_steps, kernel=mcmc.ULA(1e-3))
        fig, axes = plt.subplots(2, 1, figsize=(8, 2.4))
        rows = (("decoder draws", draws), ("+ Langevin on E", refined))
        for ax, (title, x) in zip(axes, rows, strict=True):
            grid = x.clamp(0, 1).reshape(16, 8, 8).permute(1, 0, 2).reshape(8, 128)
            ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(args.out, dpi=80)
        print(f"saved {args.out}")
    return results


if __name__ == "__main__":
    main()
