# SPDX-License-Identifier: Apache-2.0
"""The site helpers of the energy core, which trainers use instead of tracing
Pyro callables themselves."""
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_ebm.energy import collect_params, latent_sites, observed_site, param_tensors, trace_run


def vae_model(x):
    w = pyro.param("w", torch.ones(2))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
        pyro.deterministic("twice", 2 * z, event_dim=1)
        pyro.factor("prior_term", -0.1 * z.pow(2).sum(-1))
        pyro.sample("x", dist.Normal(w * z, 0.1).to_event(1), obs=x)


def test_latent_and_observed_sites_of_one_run():
    x = torch.randn(3, 2)
    trace = trace_run(vae_model, x)
    assert list(latent_sites(trace)) == ["z"]  # no subsample, deterministic, factor or observed site
    site = observed_site(trace, role="VAE model")
    assert site["name"] == "x" and torch.equal(site["value"], x)
    assert observed_site(trace, "x")["fn"].batch_shape == (3,)


def test_trace_run_conditions_on_values():
    x, z = torch.randn(3, 2), torch.randn(3, 2)
    trace = trace_run(vae_model, x, values={"z": z})
    assert torch.equal(trace.nodes["z"]["value"], z)
    # a conditioned latent is observed, and the site named in `conditioned` is left out
    assert observed_site(trace, conditioned={"z"})["name"] == "x"


def test_observed_site_errors_name_the_sites():
    def two_likelihoods(x):
        vae_model(x)
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    trace = trace_run(two_likelihoods, torch.randn(3, 2))
    expected = r"the decoder model must have exactly one observed site \(q\(v \| h\)\), found \['x', 'y'\]"
    with pytest.raises(ValueError, match=expected + "; name it with obs_site"):
        observed_site(trace, role="decoder model", what="q(v | h)")
    with pytest.raises(ValueError, match=r"has no observed site 'v'; observed: \['x', 'y'\]"):
        observed_site(trace, "v")


def test_param_sites_of_a_run():
    pyro.clear_param_store()
    x = torch.randn(3, 2)
    w = pyro.param("w", torch.ones(2)).unconstrained()
    assert param_tensors(trace_run(vae_model, x)) == {w}
    found = set()
    with collect_params(found):
        vae_model(x)
    assert found == {w}
