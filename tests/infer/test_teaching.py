# SPDX-License-Identifier: Apache-2.0
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_ebm import mcmc
from pyro_ebm.infer import DivergenceError, MCMCTeaching

D, Z = 3, 2


def quadratic_ebm(x):
    """E(x) = ½‖x − μ‖², μ a parameter."""
    mu = pyro.param("mu", torch.zeros(D, dtype=x.dtype))
    with pyro.plate("data", len(x)):
        pyro.factor("energy", -0.5 * (x - mu).pow(2).sum(-1))


def linear_vae_model(x, out_dim=D):
    w = pyro.param("w", torch.full((Z, out_dim), 0.5, dtype=x.dtype))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), Z), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ w + 2.0, 0.5).to_event(1), obs=x)


def delta_guide(x, out_dim=D):
    """A deterministic encoder, so that the ELBO of a batch is a plain function."""
    a = pyro.param("a", torch.full((D, Z), 0.1, dtype=x.dtype))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Delta(x @ a).to_event(1))


def make_teaching(**kwargs):
    args = dict(energy_model=quadratic_ebm, vae_model=linear_vae_model, vae_guide=delta_guide,
                optim=pyro.optim.SGD({"lr": 0.1}), vae_optim=pyro.optim.Adam({"lr": 0.05}),
                kernel=mcmc.ULA(0.05), num_langevin_steps=5)
    args.update(kwargs)
    return MCMCTeaching(**args)


def params(*names):
    store = pyro.get_param_store()
    return {n: store[n].detach().clone() for n in names}


def test_vae_step_is_pyro_svi_with_trace_elbo():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = torch.randn(16, D, dtype=torch.float64)
    teaching = make_teaching()
    assert isinstance(teaching.elbo, Trace_ELBO)
    teaching.step(x)  # creates every parameter
    before = params("w", "a", "mu")
    teaching.step(x)
    stats = teaching.last_losses
    x_rev = teaching.last_revised

    # the reported ELBO is Trace_ELBO's on the revised batch at the pre-step VAE parameters
    store = pyro.get_param_store()
    for name in ("w", "a"):
        store[name] = before[name]
    elbo = -Trace_ELBO().loss(linear_vae_model, delta_guide, x_rev)
    assert stats["vae_elbo"] == pytest.approx(elbo, rel=1e-12)


def test_vae_update_equals_svi_step_exactly():
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    x = torch.randn(16, D, dtype=torch.float64)
    # plain SGD has no state, so one teaching step and one SVI step must agree exactly
    teaching = make_teaching(vae_optim=pyro.optim.SGD({"lr": 0.01}))
    teaching.step(x)
    before = params("w", "a", "mu")
    teaching.step(x)
    after = params("w", "a", "mu")
    x_rev = teaching.last_revised
    store = pyro.get_param_store()
    for name in ("w", "a"):
        store[name] = before[name]
    SVI(linear_vae_model, delta_guide, pyro.optim.SGD({"lr": 0.01}), Trace_ELBO()).step(x_rev)
    for name in ("w", "a"):
        torch.testing.assert_close(store[name].detach(), after[name], rtol=0, atol=1e-12)


def test_ebm_step_is_the_contrastive_gradient_on_ebm_params_only():
    pyro.clear_param_store()
    pyro.set_rng_seed(2)
    x = torch.randn(32, D, dtype=torch.float64) + 1.0
    ebm_optim = pyro.optim.SGD({"lr": 0.1})
    teaching = make_teaching(optim=ebm_optim)
    teaching.step(x)
    mu = params("mu")["mu"]
    teaching.step(x)
    stats = teaching.last_losses
    x_rev = teaching.last_revised
    # L = mean E(x) − mean E(x̃); dL/dμ = mean(x̃) − mean(x)
    expected = mu - 0.1 * (x_rev.mean(0) - x.mean(0))
    torch.testing.assert_close(params("mu")["mu"], expected, rtol=0, atol=1e-12)
    energy = lambda v: 0.5 * (v - mu).pow(2).sum(-1)  # noqa: E731
    assert stats["ebm_loss"] == pytest.approx(float(energy(x).mean() - energy(x_rev).mean()), rel=1e-10)
    assert stats["energy_data"] == pytest.approx(float(energy(x).mean()), rel=1e-10)
    assert stats["energy_revised"] == pytest.approx(float(energy(x_rev).mean()), rel=1e-10)
    assert stats["energy_init"] == pytest.approx(float(energy(teaching.last_init).mean()), rel=1e-10)
    # the EBM optimizer only ever saw the EBM's parameter
    store = pyro.get_param_store()
    assert {store.param_name(p) for p in ebm_optim.optim_objs} == {"mu"}


def test_energy_penalty_gradient():
    pyro.set_rng_seed(5)
    x = torch.randn(32, D, dtype=torch.float64) + 1.0
    alpha = 0.3
    teaching = make_teaching(energy_penalty=alpha)
    teaching.step(x)
    mu = params("mu")["mu"].requires_grad_(True)
    teaching.step(x)
    x_rev = teaching.last_revised
    e = lambda v: 0.5 * (v - mu).pow(2).sum(-1)  # noqa: E731
    objective = e(x).mean() - e(x_rev).mean() + alpha * (e(x).pow(2).mean() + e(x_rev).pow(2).mean())
    (grad,) = torch.autograd.grad(objective, mu)
    torch.testing.assert_close(params("mu")["mu"], mu.detach() - 0.1 * grad, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="energy_penalty"):
        make_teaching(energy_penalty=-1.0)


def test_decoder_mean_and_revision_lower_energy_on_fixed_ebm():
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.SiLU(), torch.nn.Linear(32, 1))

    def ebm(x):
        pyro.module("ebm", net)
        with pyro.plate("data", len(x)):
            pyro.factor("energy", -(net(x).squeeze(-1) + 0.5 * x.pow(2).sum(-1)))

    teaching = make_teaching(energy_model=ebm, kernel=mcmc.ULA(0.05), num_langevin_steps=20)
    x = torch.randn(400, D)
    ebm_before = [p.detach().clone() for p in net.parameters()]
    stats = teaching.evaluate_losses(x)  # no update
    assert all(torch.equal(a, b) for a, b in zip(ebm_before, net.parameters(), strict=True))
    # x0 are the decoder means z @ w + 2 at prior draws z
    x0 = teaching.last_init
    assert x0.shape == x.shape
    w = pyro.param("w").detach()
    assert torch.allclose(x0.mean(0), torch.full((D,), 2.0), atol=5 * w.norm(dim=0).max() / 20)
    e0 = teaching.sampler.energy(x0).detach()
    e1 = teaching.sampler.energy(teaching.last_revised).detach()
    se = float((e0 - e1).std()) / math.sqrt(len(x))
    assert stats["energy_init"] - stats["energy_revised"] > 10 * se
    assert stats["energy_init"] == pytest.approx(float(e0.mean()), rel=1e-6)


def test_sample_is_vae_then_langevin():
    pyro.clear_param_store()
    pyro.set_rng_seed(4)
    teaching = make_teaching(noise=False, num_langevin_steps=4, event_shape=(D,))
    x, path = teaching.sample(50, return_trajectory=True)
    assert path.shape == (50, 5, D)
    mu = pyro.param("mu").detach()
    # gradient descent on ½‖x − μ‖² from the decoder means
    torch.testing.assert_close(x, mu + 0.95**4 * (path[:, 0] - mu))


def test_data_shape_differing_from_decoder_output_is_rejected():
    pyro.clear_param_store()
    model = lambda x: linear_vae_model(x, out_dim=5)  # noqa: E731
    teaching = make_teaching(vae_model=model, vae_guide=lambda x: delta_guide(x, out_dim=5))
    match = r"decoder output of shape \(8, 5\), but the data batch has shape \(8, 3\)"
    with pytest.raises(ValueError, match=match):
        teaching.step(torch.randn(8, D))


def test_other_bad_inputs():
    pyro.clear_param_store()
    teaching = make_teaching()
    with pytest.raises(ValueError, match="call step"):
        teaching.sample(3)
    with pytest.raises(ValueError, match="NaN"):
        teaching.step(torch.full((4, D), float("nan")))
    with pytest.raises(ValueError, match=r"shape \(batch, \*event\)"):
        teaching.step(torch.randn(D))

    def two_observed(x):
        linear_vae_model(x)
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    with pytest.raises(ValueError, match=r"exactly one observed site.*\['x', 'y'\]"):
        make_teaching(vae_model=two_observed).step(torch.randn(4, D))
    named = make_teaching(vae_model=two_observed, obs_site="x")
    named.step(torch.randn(4, D))
    assert named.last_losses["vae_elbo"] < 0

    def labelled_ebm(x, y):
        quadratic_ebm(x)

    labelled = make_teaching(energy_model=labelled_ebm, vae_model=lambda x, y: linear_vae_model(x),
                             vae_guide=lambda x, y: delta_guide(x), num_chains=10)
    with pytest.raises(ValueError, match="num_chains=10 differs from the batch size 4"):
        labelled.step(torch.randn(4, D), torch.zeros(4, dtype=torch.long))


def test_divergence_stops_with_the_step_named():
    pyro.clear_param_store()

    def ebm(x):
        mu = pyro.param("mu", torch.zeros(D))
        with pyro.plate("data", len(x)):
            # infinite energy where the first coordinate is exactly 0 (the data below)
            pyro.factor("energy", -(0.5 * (x - mu).pow(2).sum(-1) - torch.log(x[:, 0].abs())))

    teaching = make_teaching(energy_model=ebm)
    x = torch.randn(8, D) + 2.0
    teaching.step(x)
    x[:, 0] = 0.0
    with pytest.raises(DivergenceError, match="MCMCTeaching diverged at step 2: the EBM loss is inf"):
        teaching.step(x)


def test_conditional_samples_follow_their_label():
    """Labels reach the energy and the VAE: on a fixed class-conditional energy
    centred at each class's mean digit, the revised samples of an untrained
    conditional VAE are classified as their label far above chance (10%)."""
    from pyro_ebm import datasets
    from pyro_ebm.features import digits_classifier

    x_train, y_train = datasets.digits("train", with_labels=True)
    means = torch.stack([x_train[y_train == c].mean(0) for c in range(10)])
    scale = 0.1

    def ebm(x, y):
        shift = pyro.param("shift", torch.zeros(()))  # a parameter for the EBM step below
        with pyro.plate("data", len(x)):
            pyro.factor("energy", -0.5 * (x - means[y]).pow(2).sum(-1) / scale**2 - shift)

    def vae_model(x, y):
        w = pyro.param("w", 0.1 * torch.randn(Z, 64))
        b = pyro.param("b", 0.1 * torch.randn(10, 64))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(torch.sigmoid(z @ w + b[y]), 0.1).to_event(1), obs=x)

    def vae_guide(x, y):
        a = pyro.param("a", torch.zeros(64, Z))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x @ a, 1.0).to_event(1))

    # 50 steps of size 2e-3 contract toward the class mean by (1 - 0.2)^50 ~ 1e-5
    teaching = make_teaching(energy_model=ebm, vae_model=vae_model, vae_guide=vae_guide,
                             kernel=mcmc.ULA(2e-3), num_langevin_steps=50, event_shape=(64,))
    y = torch.arange(10).repeat_interleave(20)
    x, path = teaching.sample(len(y), y, return_trajectory=True)
    with torch.no_grad():
        net = digits_classifier()
        acc_init = (net(path[:, 0]).argmax(-1) == y).float().mean().item()
        acc = (net(x.clamp(0, 1)).argmax(-1) == y).float().mean().item()
    assert acc > 0.8, acc  # chance is 0.1
    assert acc_init < 0.4, acc_init  # the untrained VAE alone does not know the labels

    # and a conditional teaching step runs with per-item labels
    teaching.step(x_train[:50], y_train[:50])
    stats = teaching.last_losses
    assert stats["energy_revised"] < stats["energy_init"]


def test_example_script_runs_with_tiny_sizes(tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[2] / "examples" / "mcmc_teaching.py"
    spec = importlib.util.spec_from_file_location("mcmc_teaching_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    import argparse

    args = argparse.Namespace(iterations=3, batch_size=20, hidden=16, langevin_steps=3, step_size=1e-3,
                              no_noise=False, energy_penalty=0.01, ebm_lr=1e-3, vae_lr=1e-3, conditional=True,
                              seed=0, out=str(tmp_path), quiet=True)
    stats = example.main(args)
    assert (tmp_path / "samples.png").stat().st_size > 1000
    assert all(math.isfinite(v) for v in stats.values())
