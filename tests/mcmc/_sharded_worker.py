# SPDX-License-Identifier: Apache-2.0
"""One rank of the chain-sharded sampling test (tests/mcmc/test_sharded.py), also
imported by the test for the one-process reference run.

As a script: ``python _sharded_worker.py RANK WORLD_SIZE PORT OUT`` joins a gloo
process group on 127.0.0.1:PORT, samples, and saves what it got to OUT.
"""

import sys

import pyro
import pyro.distributions as dist
import torch

DT = torch.float64
NUM_CHAINS = 8
SEED = 123


def model(v):
    """z ~ N(0, I_3) with a non-Gaussian factor, observed v ~ N(z_0 + tanh(z_1), 0.5)."""
    z = pyro.sample("z", dist.Normal(torch.zeros(3, dtype=DT), 1.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(torch.zeros((), dtype=DT), 0.5))
    pyro.factor("shape", -0.1 * z.pow(4).sum(-1))
    with pyro.plate("data", v.shape[0]):
        pyro.sample("v", dist.Normal(z[..., :1] + torch.tanh(z[..., 1:2]), s.unsqueeze(-1)).to_event(1),
                    obs=v)


def data():
    return torch.linspace(-1.0, 2.0, 6, dtype=DT).unsqueeze(-1)


def run():
    """The runs every rank (or the one reference process) makes, by name."""
    from pyro_ebm import mcmc

    torch.manual_seed(SEED)
    out = {}
    mala = mcmc.sample(model, mcmc.MALA(0.3), num_chains=NUM_CHAINS, num_samples=20, warmup_steps=30,
                       model_args=(data(),), progress=False)
    out["mala"] = mala
    # a kernel with a velocity drawn at init, from a packed initial tensor
    underdamped = mcmc.sample(model, mcmc.UnderdampedLangevin(0.1), num_chains=NUM_CHAINS, num_samples=10,
                              model_args=(data(),), initial="uniform", progress=False)
    out["underdamped"] = underdamped
    # go on from the first run's last state (rank 0: all chains; other ranks: their own)
    out["more"] = mcmc.sample(model, mcmc.MALA(0.3), num_chains=NUM_CHAINS, num_samples=5,
                              model_args=(data(),), initial=mala.last_state, progress=False)
    return out


def flat(samples_by_name):
    """Plain tensors of every run: draws by site, statistics and the last state."""
    result = {}
    for name, samples in samples_by_name.items():
        for site, value in samples.get_samples().items():
            result[f"{name}/{site}"] = value
        for key, value in samples.stats.items():
            result[f"{name}/stats/{key}"] = value
        result[f"{name}/warmup_divergences"] = samples.warmup_divergences
        for field in ("position", "potential_energy", "grad", "step_size", "momentum"):
            value = getattr(samples.last_state, field)
            if value is not None:
                result[f"{name}/last/{field}"] = value
    return result


def main(rank, world_size, port, out_path):
    import torch.distributed as dist

    from pyro_ebm import mcmc

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = flat(run())
        try:
            mcmc.sample(model, mcmc.MALA(0.3), num_chains=NUM_CHAINS - 1, num_samples=2,
                        model_args=(data(),), progress=False)
        except ValueError as err:
            result["error"] = str(err)
        torch.save(result, out_path)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
