# SPDX-License-Identifier: Apache-2.0
"""Variational MCMC teaching on scikit-learn's 8×8 digits.

An MLP energy-based model learns by maximum likelihood from samples that a VAE
proposes and K Langevin steps on the energy revise; the VAE learns from the
revised samples by its ELBO, so it becomes the EBM's amortized sampler. With
``--conditional`` the label is an argument of all three Pyro callables.

    python examples/mcmc_teaching.py --iterations 1500 --out runs/teaching
    python examples/mcmc_teaching.py --conditional --iterations 1500

Writes ``samples.png`` (the VAE's proposals x0 and the revised samples x̃; with
``--conditional`` one row per class) and prints the Fréchet distance of both to
held-out digits on the digits classifier's features.
"""

import argparse
import itertools
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_ebm import datasets, mcmc
from pyro_ebm.features import digits_classifier, digits_features
from pyro_ebm.infer import MCMCTeaching
from pyro_ebm.metrics import frechet_distance
from pyro_ebm.progress import progress_bar

LATENT = 16


def make_models(hidden, num_classes):
    """The EBM as a Pyro model and the VAE as a model / guide pair; with
    ``num_classes`` all three take the labels ``y`` after the data."""
    extra = num_classes or 0
    energy_net = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                               nn.Linear(hidden, num_classes or 1))
    decoder = nn.Sequential(nn.Linear(LATENT + extra, hidden), nn.SiLU(), nn.Linear(hidden, 64), nn.Sigmoid())
    encoder = nn.Sequential(nn.Linear(64 + extra, hidden), nn.SiLU(), nn.Linear(hidden, 2 * LATENT))

    def with_label(a, y):
        return a if y is None else torch.cat([a, nn.functional.one_hot(y, num_classes).to(a.dtype)], -1)

    def ebm(x, y=None):
        pyro.module("energy", energy_net)
        out = energy_net(x)
        f = out.squeeze(-1) if y is None else out.gather(-1, y[:, None]).squeeze(-1)
        with pyro.plate("data", len(x)):
            # the reference term ½‖x − ½‖² keeps the energy bounded below
            pyro.factor("energy", -(f + 0.5 * (x - 0.5).pow(2).sum(-1)))

    def vae_model(x, y=None):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(with_label(z, y)), 0.1).to_event(1), obs=x)

    def vae_guide(x, y=None):
        pyro.module("encoder", encoder)
        with pyro.plate("data", len(x)):
            loc, raw = encoder(with_label(x, y)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))

    return ebm, vae_model, vae_guide


def save_grid(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 4))
    for ax, (title, x, ncol) in zip(axes, rows, strict=True):
        nrow = len(x) // ncol
        img = x[: nrow * ncol].clamp(0, 1).reshape(nrow, ncol, 8, 8).permute(0, 2, 1, 3)
        img = img.reshape(nrow * 8, ncol * 8)
        ax.imshow(img.numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(args):
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    x_train, y_train = datasets.digits("train", with_labels=True)
    x_test = datasets.digits("test")
    num_classes = 10 if args.conditional else None
    ebm, vae_model, vae_guide = make_models(args.hidden, num_classes)
    teaching = MCMCTeaching(
        ebm, vae_model, vae_guide,
        optim=pyro.optim.Adam({"lr": args.ebm_lr, "betas": (0.5, 0.999)}),
        vae_optim=pyro.optim.Adam({"lr": args.vae_lr}),
        kernel=mcmc.ULA(args.step_size), num_langevin_steps=args.langevin_steps,
        noise=not args.no_noise, energy_penalty=args.energy_penalty,
    )
    data = (x_train, y_train) if args.conditional else (x_train,)
    stream = datasets.batches(data, args.batch_size, seed=args.seed, drop_last=True)
    bar = progress_bar(itertools.islice(stream, args.iterations), total=args.iterations,
                       progress=False if args.quiet else None)
    for batch in bar:
        teaching.step(*batch[: len(data)])
        stats = teaching.last_losses
        if hasattr(bar, "set_postfix"):  # a tqdm bar, not the bare iterator
            bar.set_postfix(ebm_loss=f"{stats['ebm_loss']:.2f}", E_init=f"{stats['energy_init']:.1f}",
                            E_revised=f"{stats['energy_revised']:.1f}")

    n = 100
    if args.conditional:
        y = torch.arange(10).repeat_interleave(n // 10)
        x, path = teaching.sample(n, y, return_trajectory=True)
        with torch.no_grad():
            accuracy = (digits_classifier()(x.clamp(0, 1).float()).argmax(-1) == y).float().mean()
        print(f"digits classifier agrees with the asked label on {100 * accuracy:.1f}% of revised samples")
    else:
        x, path = teaching.sample(n, return_trajectory=True)
    x0 = path[:, 0]
    f_test = digits_features(x_test)
    for name, v in (("VAE proposals x0", x0), ("revised samples", x)):
        print(f"{name}: Fréchet distance {frechet_distance(digits_features(v.clamp(0, 1)), f_test):.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_grid([("VAE proposals x0", x0, 10), (f"after {args.langevin_steps} Langevin steps", x, 10)],
              out / "samples.png")
    print(f"wrote {out / 'samples.png'}")
    return stats


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--langevin-steps", type=int, default=20)
    parser.add_argument("--step-size", type=float, default=1e-3)
    parser.add_argument("--no-noise", action="store_true", help="gradient descent, as the reference code")
    parser.add_argument("--energy-penalty", type=float, default=0.01)
    parser.add_argument("--ebm-lr", type=float, default=1e-3)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--conditional", action="store_true", help="class-conditional EBM and VAE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/mcmc_teaching")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (by default shown only on a terminal)")
    main(parser.parse_args())
