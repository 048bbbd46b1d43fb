# SPDX-License-Identifier: Apache-2.0
"""Cost of one variational MCMC teaching iteration, and the overhead of the
Langevin revision through pyro_ebm's kernels against the same loop by hand.

Digits size (the networks of ``pyro-ebm reproduce teaching-digits``: energy MLP
64-256-256-1, VAE 16-256-64), batch 100, K = 20 ULA steps. The iteration is
split into its four parts, each timed through the public pieces of
:class:`~pyro_ebm.infer.MCMCTeaching`: VAE sampling (``decoder_mean``), Langevin
revision (``sampler.revise``), EBM step (``ebm_step``) and VAE step
(``vae_step``). The revision is then compared, interleaved, with

- **by hand, same potential**: a plain loop ``x ← x − γ∇U(x) + √(2γ)ξ`` with
  ``torch.autograd.grad`` on the same Pyro energy model (target ≤ 1.2×: the
  cost of the kernel and of ``AmortizedLangevin``);
- **by hand, raw network**: the same loop on the energy network called
  directly, without Pyro (the cost of running the energy as a Pyro model).

``--gpu`` adds, when CUDA is available, iterations per second of the whole
teaching step with 900 chains of 28×28 synthetic images and a conv energy.

    python benchmarks/teaching.py [--repeats 5] [--iterations 20] [--gpu]
"""

import argparse
import math
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_ebm import mcmc
from pyro_ebm.experiments import teaching_digits as digits
from pyro_ebm.infer import MCMCTeaching


def digits_teaching():
    energy, vae = digits.build(0)
    teaching = MCMCTeaching(energy, vae.model, vae.guide, digits.ebm_optim(), digits.vae_optim(),
                            kernel=mcmc.ULA(digits.STEP_SIZE), num_langevin_steps=digits.LANGEVIN_STEPS)
    return teaching, energy


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def phase_times(teaching, x, iterations):
    """Seconds per iteration of each of the four parts, over ``iterations``."""
    totals = dict.fromkeys(("VAE sampling", "Langevin revision", "EBM step", "VAE step"), 0.0)
    like = torch.zeros_like(x)
    teaching.step(x)  # warm: traces, optimizer state
    for _ in range(iterations):
        t0 = time.perf_counter()
        x0 = teaching.decoder_mean(like)
        sync(x.device)
        t1 = time.perf_counter()
        x_rev = teaching.sampler.revise(x0)
        sync(x.device)
        t2 = time.perf_counter()
        teaching.ebm_step(x, x_rev)
        sync(x.device)
        t3 = time.perf_counter()
        teaching.vae_step(x_rev)
        sync(x.device)
        t4 = time.perf_counter()
        for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            totals[key] += dt
    return {k: v / iterations for k, v in totals.items()}


def hand_revision(potential, x0, step_size, num_steps):
    x = x0.detach()
    scale = math.sqrt(2 * step_size)
    for _ in range(num_steps):
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(potential(x).sum(), x)
        x = x - step_size * g + scale * torch.randn_like(x)
    return x.detach()


def revision_ratios(teaching, energy, x0, repeats, iterations):
    sampler = teaching.sampler
    potential = sampler.potential()
    step, k = digits.STEP_SIZE, digits.LANGEVIN_STEPS
    runs = {
        "pyro_ebm kernels": lambda: sampler.revise(x0),
        "by hand, same potential": lambda: hand_revision(potential, x0, step, k),
        "by hand, raw network": lambda: hand_revision(energy.energy, x0, step, k),
    }
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):  # interleaved, so that load on a shared machine hits all alike
        for name, fn in runs.items():
            start = time.perf_counter()
            for _ in range(iterations):
                fn()
            times[name].append((time.perf_counter() - start) / iterations)
    return {name: statistics.median(v) for name, v in times.items()}


# -- GPU: 900 chains of 28x28 images, conv energy ----------------------------------


class ConvEnergy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, 2, 1), nn.SiLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(64, 128, 3, 2, 1), nn.SiLU(), nn.Flatten(), nn.Linear(128 * 4 * 4, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1) + 0.5 * (x - 0.5).pow(2).flatten(1).sum(-1)


class ConvVAE(nn.Module):
    def __init__(self, latent=32):
        super().__init__()
        self.latent = latent
        self.decoder = nn.Sequential(nn.Linear(latent, 64 * 7 * 7), nn.SiLU(), nn.Unflatten(1, (64, 7, 7)),
                                     nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.SiLU(),
                                     nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Sigmoid())
        self.encoder = nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.SiLU(),
                                     nn.Conv2d(32, 64, 4, 2, 1), nn.SiLU(), nn.Flatten(),
                                     nn.Linear(64 * 7 * 7, 2 * latent))

    def model(self, x):
        pyro.module("vae", self)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), self.latent), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.1).to_event(3), obs=x)

    def guide(self, x):
        pyro.module("vae", self)
        with pyro.plate("data", len(x)):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))


def gpu_section(iterations, device="cuda", chains=900):
    """Teaching iterations per second with ``chains`` synthetic 28×28 images and a
    conv energy (runs on any device; ``--gpu`` uses CUDA)."""
    device = torch.device(device)
    pyro.clear_param_store()
    torch.manual_seed(0)
    net = ConvEnergy().to(device)

    def ebm(x):
        pyro.module("energy", net)
        with pyro.plate("data", len(x)):
            pyro.factor("energy", -net(x))

    vae = ConvVAE().to(device)
    teaching = MCMCTeaching(ebm, vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-4}),
                            pyro.optim.Adam({"lr": 1e-3}), kernel=mcmc.ULA(1e-3), num_langevin_steps=20,
                            energy_penalty=0.01)
    # synthetic "images": smooth random blobs in [0, 1]
    x = torch.sigmoid(4 * nn.functional.interpolate(torch.randn(chains, 1, 7, 7, device=device), size=28,
                                                    mode="bilinear", align_corners=False))
    parts = phase_times(teaching, x, iterations)
    total = sum(parts.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{name}, {chains} chains of 1x28x28, conv energy, K = 20:")
    print(f"  {1 / total:.1f} teaching iterations / s")
    for name, t in parts.items():
        print(f"  {name:20s} {1000 * t:8.1f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    teaching, energy = digits_teaching()
    x = torch.rand(digits.BATCH, 64)
    parts = phase_times(teaching, x, args.iterations)
    total = sum(parts.values())
    print(f"torch {torch.__version__}, 1 thread; digits size, batch {digits.BATCH}, "
          f"K = {digits.LANGEVIN_STEPS}")
    print(f"\none teaching iteration: {1000 * total:.1f} ms")
    for name, t in parts.items():
        print(f"  {name:20s} {1000 * t:8.1f} ms  {100 * t / total:5.1f}%")
    x0 = teaching.decoder_mean(torch.zeros_like(x))
    times = revision_ratios(teaching, energy, x0, args.repeats, args.iterations)
    base = times["by hand, same potential"]
    print(f"\nLangevin revision (K = {digits.LANGEVIN_STEPS}), median of {args.repeats}:")
    for name, t in times.items():
        print(f"  {name:26s} {1000 * t:8.2f} ms  {t / base:5.2f}x")
    ratio = times["pyro_ebm kernels"] / base
    print(f"kernels / hand loop on the same potential: {ratio:.2f}x (target <= 1.2x)")
    if args.gpu:
        if torch.cuda.is_available():
            gpu_section(args.iterations)
        else:
            print("\n--gpu: skipped (no CUDA device)")


if __name__ == "__main__":
    main()
