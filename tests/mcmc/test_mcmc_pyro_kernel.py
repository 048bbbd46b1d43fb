# SPDX-License-Identifier: Apache-2.0
"""PyroKernel inside pyro.infer.MCMC, its summary and arviz.from_pyro."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_ebm import mcmc

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

DT = torch.float64


def model(y):
    loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0, dtype=DT), 2.0))
    scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=DT), 0.5))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(loc, scale), obs=y)


DATA = torch.tensor([0.3, 1.2, 2.1, 0.8, 1.6, 0.4, 1.9, 1.1], dtype=DT)


def run(kernel, num_samples=400, warmup_steps=200, **kwargs):
    pyro.set_rng_seed(0)
    driver = pyro.infer.MCMC(mcmc.PyroKernel(model, kernel), num_samples=num_samples,
                             warmup_steps=warmup_steps, disable_progbar=True, **kwargs)
    driver.run(DATA)
    return driver


def test_pyro_mcmc_runs_kernel_and_matches_batched_driver():
    """One MALA chain inside Pyro's driver: constrained draws of the right shape,
    and posterior means agreeing with 500 chains of mcmc.sample within MC error."""
    driver = run(mcmc.MALA(0.1))
    draws = driver.get_samples(group_by_chain=True)
    assert draws["loc"].shape == (1, 400) and draws["scale"].shape == (1, 400)
    assert (draws["scale"] > 0).all()
    reference = mcmc.sample(model, mcmc.MALA(0.1), 500, 60, warmup_steps=150, model_args=(DATA,),
                            progress=False).get_samples()
    for site in ("loc", "scale"):
        a, b = draws[site], reference[site]
        se_a = float(a.std()) / math.sqrt(float(az.ess(a.numpy())))
        se_b = float(b.std()) / math.sqrt(float(az.ess(b.numpy())))
        assert abs(float(a.mean()) - float(b.mean())) < 5 * math.hypot(se_a, se_b), site
    diag = driver.diagnostics()
    assert diag["divergences"] == {"chain 0": []}
    rate = diag["acceptance rate"]["chain 0"]
    assert 0.35 < rate < 0.8  # adapted toward 0.57


def test_summary_prints_and_arviz_from_pyro_accepts_it(capsys):
    driver = run(mcmc.HMC(0.1, num_steps=3), num_samples=50, warmup_steps=50)
    driver.summary()
    out = capsys.readouterr().out
    assert "loc" in out and "scale" in out and "Number of divergences: 0" in out
    idata = az.from_pyro(driver)
    assert idata.posterior["loc"].shape == (1, 50)
    assert idata.log_likelihood["y"].shape == (1, 50, len(DATA))
    assert idata.sample_stats["diverging"].shape == (1, 50)
    assert not bool(idata.sample_stats["diverging"].any())


def test_divergences_are_indexed_by_draw():
    """A log density that is NaN beyond loc = 3 makes divergent steps; their draw
    indices are reported per chain and counted by arviz.from_pyro."""
    def flaky(y):
        loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0, dtype=DT), 1.0))
        pyro.factor("cut", torch.where(loc < 3.0, torch.zeros_like(loc), torch.full_like(loc, float("nan"))))

    pyro.set_rng_seed(1)
    driver = pyro.infer.MCMC(mcmc.PyroKernel(flaky, mcmc.ULA(2.0)), num_samples=100, warmup_steps=0,
                             disable_progbar=True, initial_params={"loc": torch.tensor(0.0, dtype=DT)})
    driver.run(DATA)
    divergences = driver.diagnostics()["divergences"]["chain 0"]
    assert len(divergences) > 0 and all(0 <= i < 100 for i in divergences)
    assert (driver.get_samples()["loc"] < 3.0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = az.from_pyro(driver, log_likelihood=False)
    assert int(idata.sample_stats["diverging"].sum()) == len(divergences)


def test_initial_params_are_used():
    pyro.set_rng_seed(2)
    driver = pyro.infer.MCMC(mcmc.PyroKernel(model, mcmc.ULA(1e-10)), num_samples=3, warmup_steps=0,
                             disable_progbar=True,
                             initial_params={"loc": torch.tensor(5.0, dtype=DT),
                                             "scale": torch.tensor(math.log(2.0), dtype=DT)})
    driver.run(DATA)
    draws = driver.get_samples()
    torch.testing.assert_close(draws["loc"], torch.full((3,), 5.0, dtype=DT), atol=1e-3, rtol=0)
    torch.testing.assert_close(draws["scale"], torch.full((3,), 2.0, dtype=DT), atol=1e-3, rtol=0)


def test_bad_arguments():
    with pytest.raises(TypeError, match="kernel"):
        mcmc.PyroKernel(model, "MALA")
    with pytest.raises(TypeError, match="model"):
        mcmc.PyroKernel(None, mcmc.MALA(0.1))
