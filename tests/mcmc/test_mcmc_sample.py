# SPDX-License-Identifier: Apache-2.0
"""The driver ``mcmc.sample`` on Pyro models and plain potentials.

Moment checks allow 5 Monte Carlo standard errors, sd / sqrt(ESS) with the bulk
ESS from ArviZ (combined in quadrature when two samplers are compared).
"""

import gc
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


def mean_and_se(draws):
    """Mean of a (chain, draw) array and its MC standard error from the bulk ESS."""
    draws = draws.detach().double()
    n_eff = float(az.ess(draws.cpu().numpy()))
    return float(draws.mean()), float(draws.std()) / math.sqrt(n_eff)


def assert_mc(draws, expected, what, k=5.0):
    value, se = mean_and_se(draws)
    assert abs(value - expected) < k * se, f"{what}: {value:.4f} vs {expected:.4f} (s.e. {se:.4f})"


# -- a GEBM-like latent model: z ~ N(0, I), x = G(z), factor -E(x) ----------------

A = torch.tensor([[1.0, 0.5], [-0.3, 0.8], [0.2, -1.0]], dtype=DT)
CENTER = torch.tensor([1.0, 0.5, -0.5], dtype=DT)


def generator(z):
    return z @ A.T + 0.3 * torch.tanh(2.0 * z[..., :1])


def energy(x):
    return (x - CENTER).pow(2).sum(-1) + 0.1 * x[..., 0] ** 4


def gebm_like():
    z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=DT), 1.0).to_event(1))
    x = pyro.deterministic("x", generator(z), event_dim=1)
    pyro.factor("energy", -energy(x))


def test_gebm_latent_posterior_agrees_with_pyro_nuts():
    """mcmc.sample with 1000 MALA chains and Pyro's NUTS (one chain) give the same
    posterior moments of z, within the two samplers' combined MC error."""
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    ours = mcmc.sample(gebm_like, mcmc.MALA(0.1), num_chains=1000, num_samples=100,
                       warmup_steps=200, progress=False)
    z = ours.get_samples()["z"]
    assert z.shape == (1000, 100, 2) and z.dtype == DT
    nuts = pyro.infer.MCMC(pyro.infer.NUTS(gebm_like), num_samples=200, warmup_steps=100,
                           disable_progbar=True)
    nuts.run()
    z_nuts = nuts.get_samples(group_by_chain=True)["z"]
    for i in range(2):
        for stat in (lambda t: t, lambda t: t * t):
            m1, se1 = mean_and_se(stat(z[..., i]))
            m2, se2 = mean_and_se(stat(z_nuts[..., i]))
            assert abs(m1 - m2) < 5 * math.hypot(se1, se2), (i, m1, m2, se1, se2)
    assert ours.num_divergences == 0


# -- a data model with a closed-form posterior -------------------------------------

def regression(features, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=DT), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal((w * features).sum(-1), 0.5), obs=y)


def test_model_args_and_data_plate_exact_posterior():
    """Bayesian linear regression: the chains' mean and variances of w match the
    Gaussian posterior N(S X^T y / σ², S), S = (I + X^T X / σ²)^-1."""
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(20, 2, dtype=DT, generator=gen)
    y = features @ torch.tensor([1.0, -2.0], dtype=DT) + 0.5 * torch.randn(20, dtype=DT, generator=gen)
    cov = torch.linalg.inv(torch.eye(2, dtype=DT) + features.T @ features / 0.25)
    mean = cov @ features.T @ y / 0.25
    torch.manual_seed(1)
    samples = mcmc.sample(regression, mcmc.HMC(0.1, num_steps=3), 500, 60, warmup_steps=100,
                          model_args=(features, y), progress=False)
    w = samples.get_samples()["w"]
    for i in range(2):
        assert_mc(w[..., i], float(mean[i]), f"mean w[{i}]")
        assert_mc((w[..., i] - mean[i]) ** 2, float(cov[i, i]), f"var w[{i}]")
    flat = samples.get_samples(group_by_chain=False)["w"]
    assert flat.shape == (500 * 60, 2)


# -- constrained supports ------------------------------------------------------------

def constrained():
    pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=DT), 0.5))
    pyro.sample("h", dist.HalfNormal(torch.ones(3, dtype=DT)).to_event(1))
    pyro.sample("p", dist.Dirichlet(torch.tensor([2.0, 3.0, 4.0], dtype=DT)))


def test_constrained_supports_come_back_constrained():
    """LogNormal, HalfNormal and Dirichlet latents are sampled in the unconstrained
    space and returned in their supports with the right moments."""
    torch.manual_seed(2)
    samples = mcmc.sample(constrained, mcmc.MALA(0.3), 500, 80, warmup_steps=120, progress=False)
    d = samples.get_samples()
    assert d["scale"].shape == (500, 80) and (d["scale"] > 0).all()
    assert d["h"].shape == (500, 80, 3) and (d["h"] > 0).all()
    assert d["p"].shape == (500, 80, 3) and (d["p"] > 0).all()
    torch.testing.assert_close(d["p"].sum(-1), torch.ones(500, 80, dtype=DT))
    assert_mc(d["scale"], math.exp(0.125), "LogNormal mean")
    assert_mc(d["scale"].log() ** 2, 0.25, "LogNormal log-variance")
    for i in range(3):
        assert_mc(d["h"][..., i], math.sqrt(2 / math.pi), f"HalfNormal mean [{i}]")
        assert_mc(d["h"][..., i] ** 2, 1.0, f"HalfNormal second moment [{i}]")
    for i, alpha in enumerate((2.0, 3.0, 4.0)):
        assert_mc(d["p"][..., i], alpha / 9.0, f"Dirichlet mean [{i}]")


# -- convergence diagnostics -------------------------------------------------------------

def test_rhat_and_ess_on_gaussian_with_mala():
    """On a 2-D Gaussian MALA's chains have R-hat ≈ 1 and a bulk ESS above a tenth
    of the draws."""
    torch.manual_seed(3)
    prec = torch.linalg.inv(torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=DT))
    samples = mcmc.sample(potential_fn=lambda x: 0.5 * ((x @ prec) * x).sum(-1), kernel=mcmc.MALA(0.3),
                          num_chains=100, num_samples=1000, warmup_steps=300,
                          initial=torch.randn(100, 2, dtype=DT), progress=False)
    table = samples.summary(kind="diagnostics", round_to="none")
    assert list(table.index) == ["x[0]", "x[1]"]
    assert (table["r_hat"] < 1.01).all(), table
    assert (table["ess_bulk"] > 0.1 * 100 * 1000).all(), table
    assert (table["ess_tail"] > 0).all()


def test_rhat_flags_chains_stuck_in_separate_modes():
    """Chains started in two far-apart modes with a tiny step never meet: R-hat > 1.1."""
    torch.manual_seed(4)
    mu = torch.tensor([-4.0, 4.0], dtype=DT)

    def pot(x):
        return -torch.logsumexp(-0.5 * ((x - mu) / 0.5) ** 2, -1)

    init = torch.cat([torch.full((10, 1), -4.0, dtype=DT), torch.full((10, 1), 4.0, dtype=DT)])
    samples = mcmc.sample(potential_fn=pot, kernel=mcmc.MALA(1e-3, adapt_step_size=False), num_chains=20,
                          num_samples=200, initial=init, progress=False)
    table = samples.summary(kind="diagnostics", round_to="none")
    assert float(table["r_hat"].iloc[0]) > 1.1


# -- driver mechanics --------------------------------------------------------------------

def test_thinning_stats_and_continuation():
    torch.manual_seed(5)
    pot = lambda x: 0.5 * x.pow(2).sum(-1)  # noqa: E731
    samples = mcmc.sample(potential_fn=pot, kernel=mcmc.HMC(0.5, 2), num_chains=8, num_samples=5,
                          warmup_steps=7, thin=3, initial=torch.zeros(8, 3, dtype=DT), progress=False)
    assert samples.positions.shape == (8, 5, 3)
    assert samples.last_state.iteration == 7 + 5 * 3
    torch.testing.assert_close(samples.get_samples()["x"][:, -1], samples.last_state.position)
    assert set(samples.stats) == {"accept_prob", "step_size", "potential_energy", "diverging", "energy"}
    for value in samples.stats.values():
        assert value.shape == (8, 5)
    # the Hamiltonian at each kept draw: U + |p|^2 / 2 >= U
    assert (samples.stats["energy"] >= samples.stats["potential_energy"]).all()
    assert samples.warmup_divergences.shape == (8,)
    assert "8 chains x 5 draws" in repr(samples)
    state, info = mcmc.HMC(0.5, 2).step(samples.last_state)
    assert state.iteration == 23


def test_progress_bar_shows_acceptance_and_divergences(capsys):
    mcmc.sample(potential_fn=lambda x: 0.5 * x.pow(2).sum(-1), kernel=mcmc.MALA(0.5), num_chains=4,
                num_samples=20, warmup_steps=10, initial=torch.zeros(4, 1), progress=True)
    err = capsys.readouterr().err
    assert "accept=" in err and "divergences=0" in err and "sample" in err


def test_initial_dict_and_packed_tensor():
    torch.manual_seed(6)
    init = {"scale": torch.full((4,), 2.0, dtype=DT), "h": torch.ones(4, 3, dtype=DT),
            "p": torch.full((4, 3), 1 / 3, dtype=DT)}
    samples = mcmc.sample(constrained, mcmc.ULA(1e-8), 4, 1, initial=init, progress=False)
    torch.testing.assert_close(samples.get_samples()["scale"][:, 0], init["scale"], atol=1e-3, rtol=0)
    from pyro_ebm.energy import energy_view

    packed = energy_view(constrained).latent_potential().pack(init)
    again = mcmc.sample(constrained, mcmc.ULA(1e-8), 4, 1, initial=packed, progress=False)
    torch.testing.assert_close(again.get_samples()["h"][:, 0], init["h"], atol=1e-3, rtol=0)


def test_uniform_initialization():
    torch.manual_seed(7)
    samples = mcmc.sample(constrained, mcmc.ULA(1e-12), 200, 1, initial="uniform", progress=False)
    log_scale = samples.get_samples()["scale"].log()
    assert (log_scale.abs() < 2.0).all() and float(log_scale.std()) > 0.9  # uniform(-2, 2): sd 1.15
    with pytest.raises(ValueError, match="'uniform'"):
        mcmc.sample(constrained, mcmc.ULA(0.1), 2, 1, initial="prior-ish", progress=False)


# -- bad input -----------------------------------------------------------------------------

def discrete_model():
    pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("switch", dist.Bernoulli(0.5))


def test_discrete_latent_is_named():
    with pytest.raises(ValueError, match=r"'switch' \(Bernoulli\).*discrete"):
        mcmc.sample(discrete_model, mcmc.MALA(0.1), 4, 2, progress=False)


def test_bad_initial_values():
    pot = lambda x: x.pow(2).sum(-1)  # noqa: E731
    x = torch.zeros(4, 2)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        mcmc.sample(potential_fn=pot, kernel=mcmc.MALA(0.1), num_chains=4, num_samples=2, initial=x,
                    progress=False)
    with pytest.raises(ValueError, match=r"num_chains=4"):
        mcmc.sample(potential_fn=pot, kernel=mcmc.MALA(0.1), num_chains=4, num_samples=2,
                    initial=torch.zeros(5, 2), progress=False)
    with pytest.raises(ValueError, match="potential_fn needs initial positions"):
        mcmc.sample(potential_fn=pot, kernel=mcmc.MALA(0.1), num_chains=4, num_samples=2, progress=False)
    good = {"scale": torch.ones(4, dtype=DT), "h": torch.ones(4, 3, dtype=DT),
            "p": torch.full((4, 3), 1 / 3, dtype=DT)}
    with pytest.raises(ValueError, match=r"site 'h'.*\(4, 3\), got \(4, 2\)"):
        mcmc.sample(constrained, mcmc.MALA(0.1), 4, 2, initial={**good, "h": torch.ones(4, 2, dtype=DT)},
                    progress=False)
    with pytest.raises(ValueError, match=r"site 'scale'.*outside its support"):
        mcmc.sample(constrained, mcmc.MALA(0.1), 4, 2, initial={**good, "scale": -torch.ones(4, dtype=DT)},
                    progress=False)
    bad_nan = {**good, "scale": torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=DT)}
    with pytest.raises(ValueError, match=r"site 'scale'.*NaN at index \(1,\)"):
        mcmc.sample(constrained, mcmc.MALA(0.1), 4, 2, initial=bad_nan, progress=False)
    with pytest.raises(ValueError, match=r"missing \['p'\], unknown \['q'\]"):
        mcmc.sample(constrained, mcmc.MALA(0.1), 4, 2,
                    initial={"scale": good["scale"], "h": good["h"], "q": good["p"]}, progress=False)
    with pytest.raises(ValueError, match=r"\(num_chains, dim\) = \(4, 6\)"):
        mcmc.sample(constrained, mcmc.MALA(0.1), 4, 2, initial=torch.zeros(4, 5, dtype=DT), progress=False)
    with pytest.raises(ValueError, match="num_chains"):
        mcmc.sample(constrained, mcmc.MALA(0.1), 0, 2, progress=False)
    with pytest.raises(ValueError, match="thin"):
        mcmc.sample(constrained, mcmc.MALA(0.1), 2, 2, thin=0, progress=False)
    with pytest.raises(TypeError, match="kernel"):
        mcmc.sample(constrained, object(), 2, 2, progress=False)


def test_model_or_potential_fn_exactly_one():
    """mcmc.sample takes a Pyro model (model=) or a potential (potential_fn=), never
    guessing: both, neither, a potential_fn without initial positions or with
    model arguments, and a potential given as the model are clear errors."""
    pot = lambda x: 0.5 * x.pow(2).sum(-1)  # noqa: E731
    x0 = torch.zeros(4, 2, dtype=DT)
    kernel = mcmc.MALA(0.1)
    with pytest.raises(ValueError, match="not both"):
        mcmc.sample(constrained, kernel, 4, 2, initial=x0, potential_fn=pot, progress=False)
    with pytest.raises(ValueError, match="needs a target: model=.*potential_fn="):
        mcmc.sample(kernel=kernel, num_chains=4, num_samples=2, initial=x0, progress=False)
    with pytest.raises(ValueError, match="potential_fn needs initial positions"):
        mcmc.sample(potential_fn=pot, kernel=kernel, num_chains=4, num_samples=2, progress=False)
    with pytest.raises(ValueError, match="model_args and model_kwargs"):
        mcmc.sample(potential_fn=pot, kernel=kernel, num_chains=4, num_samples=2, initial=x0,
                    model_args=(x0,), progress=False)
    with pytest.raises(TypeError, match="potential_fn must be callable"):
        mcmc.sample(potential_fn=x0, kernel=kernel, num_chains=4, num_samples=2, initial=x0, progress=False)
    with pytest.raises(TypeError, match="initial for a potential_fn must be a tensor"):
        mcmc.sample(potential_fn=pot, kernel=kernel, num_chains=4, num_samples=2, initial={"x": x0},
                    progress=False)
    # a one-argument callable with a tensor initial is no longer taken for a potential
    with pytest.raises(TypeError, match="If <lambda> is a potential U\\(x\\).*pass it as potential_fn="):
        mcmc.sample(pot, kernel, 4, 2, initial=x0, progress=False)
    from pyro_ebm.energy import energy_view

    latent = energy_view(constrained).latent_potential()
    with pytest.raises(TypeError, match="LatentPotential.*pass it as potential_fn="):
        mcmc.sample(latent, kernel, 4, 2, progress=False)
    with pytest.raises(TypeError, match="kernel must have init"):
        mcmc.sample(potential_fn=pot, num_chains=4, num_samples=2, initial=x0, progress=False)


def test_latent_potential_as_potential_fn_matches_the_model():
    """A LatentPotential given as potential_fn carries its own unpacking: its draws
    come back by site, equal to the model's run from the same start and seed; its
    initial may be a dict by site or 'uniform' (but not missing)."""
    from pyro_ebm.energy import energy_view

    init = {"scale": torch.full((4,), 2.0, dtype=DT), "h": torch.ones(4, 3, dtype=DT),
            "p": torch.full((4, 3), 1 / 3, dtype=DT)}
    torch.manual_seed(12)
    by_model = mcmc.sample(constrained, mcmc.MALA(0.1), 4, 5, warmup_steps=3, initial=init, progress=False)
    latent = energy_view(constrained).latent_potential()
    torch.manual_seed(12)
    by_potential = mcmc.sample(potential_fn=latent, kernel=mcmc.MALA(0.1), num_chains=4, num_samples=5,
                               warmup_steps=3, initial=init, progress=False)
    got, expected = by_potential.get_samples(), by_model.get_samples()
    assert set(got) == {"scale", "h", "p"}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    uniform = mcmc.sample(potential_fn=latent, kernel=mcmc.ULA(1e-12), num_chains=50, num_samples=1,
                          initial="uniform", progress=False)
    assert (uniform.get_samples()["scale"].log().abs() < 2).all()
    with pytest.raises(ValueError, match="potential_fn needs initial positions"):
        mcmc.sample(potential_fn=latent, kernel=mcmc.MALA(0.1), num_chains=4, num_samples=2, progress=False)


# -- going on from the last state ----------------------------------------------------------

def _temporary_model(center):
    """A model that only the caller's reference keeps alive (a closure)."""
    def model():
        pyro.sample("z", dist.Normal(center, 1.0).to_event(1))

    return model


class Recording:
    """A kernel that records every state it is stepped from and every info it reports."""

    def __init__(self, kernel):
        self.kernel, self.seen, self.infos = kernel, [], []

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def init(self, position, potential):
        return self.kernel.init(position, potential)

    def step(self, state):
        self.seen.append(state)
        state, info = self.kernel.step(state)
        self.infos.append(info)
        return state, info


def test_last_state_goes_on_after_the_model_is_dropped():
    """The potential in a kernel state keeps its model alive: kernel.step on
    samples.last_state works after the (temporary) model is garbage-collected."""
    torch.manual_seed(8)
    kernel = mcmc.MALA(0.3)
    samples = mcmc.sample(_temporary_model(torch.ones(2, dtype=DT)), kernel, 6, 5, warmup_steps=10,
                          progress=False)
    gc.collect()
    state = samples.last_state
    for _ in range(3):
        state, _ = kernel.step(state)
    assert state.iteration == 18 and torch.isfinite(state.potential_energy).all()
    assert samples.get_samples()["z"].shape == (6, 5, 2)


def test_sample_from_last_state_continues_chains():
    """initial=samples.last_state starts the new run at its positions with its adapted
    per-chain step sizes; warmup_steps=0 keeps them, warmup adapts from them."""
    torch.manual_seed(9)
    center = torch.tensor([1.0, -1.0], dtype=DT)
    samples = mcmc.sample(_temporary_model(center), mcmc.MALA(0.05), 6, 5, warmup_steps=30, progress=False)
    last = samples.last_state
    assert len(set(last.step_size.tolist())) == 6  # adapted chain by chain
    gc.collect()

    kernel = Recording(mcmc.MALA(0.05))
    more = mcmc.sample(_temporary_model(center), kernel, 6, 4, initial=last, progress=False)
    first = kernel.seen[0]
    torch.testing.assert_close(first.position, last.position, rtol=0, atol=0)
    torch.testing.assert_close(first.step_size, last.step_size, rtol=0, atol=0)
    torch.testing.assert_close(more.stats["step_size"], last.step_size[:, None].expand(6, 4), rtol=0, atol=0)
    assert more.last_state.iteration == last.iteration + 4

    kernel = Recording(mcmc.MALA(0.05, target_accept_prob=0.57))
    mcmc.sample(_temporary_model(center), kernel, 6, 1, warmup_steps=1, initial=last, progress=False)
    alpha = kernel.infos[0].accept_prob  # of the one warmup step
    # one dual-averaging step from prox center log(10 ε_last): t = 1, x_avg = x_1
    expected = 10 * last.step_size * torch.exp(-(0.57 - alpha) / (0.05 * 11))
    torch.testing.assert_close(kernel.seen[1].step_size, expected)


def test_sample_from_last_state_of_a_potential_keeps_momentum():
    torch.manual_seed(10)
    pot = lambda x: 0.5 * x.pow(2).sum(-1)  # noqa: E731
    samples = mcmc.sample(potential_fn=pot, kernel=mcmc.UnderdampedLangevin(0.1), num_chains=4, num_samples=3,
                          initial=torch.zeros(4, 2, dtype=DT), progress=False)
    kernel = Recording(mcmc.UnderdampedLangevin(0.1))
    mcmc.sample(potential_fn=pot, kernel=kernel, num_chains=4, num_samples=1, initial=samples.last_state,
                progress=False)
    torch.testing.assert_close(kernel.seen[0].momentum, samples.last_state.momentum, rtol=0, atol=0)
    torch.testing.assert_close(kernel.seen[0].position, samples.last_state.position, rtol=0, atol=0)


# -- bad data -------------------------------------------------------------------------------

def logistic(features, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=DT), 1.0).to_event(1))
    with pyro.plate("data", len(features)):
        pyro.sample("y", dist.Bernoulli(logits=(features * w).sum(-1)), obs=y)


def counts(y):
    rate = pyro.sample("rate", dist.LogNormal(torch.tensor(0.0, dtype=DT), 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Poisson(rate), obs=y)


def test_empty_data_names_the_argument_and_shape():
    with pytest.raises(ValueError, match=r"model argument 'features' \(model_args\[0\]\) is an empty batch "
                                         r"\(shape \(0, 2\)\)"):
        mcmc.sample(logistic, mcmc.MALA(0.1), 4, 2, model_args=(torch.zeros(0, 2, dtype=DT),
                                                                 torch.zeros(0, dtype=DT)), progress=False)
    with pytest.raises(ValueError, match=r"model argument 'y' \(model_args\[0\]\) is an empty batch "
                                         r"\(shape \(0,\)\)"):
        mcmc.sample(counts, mcmc.MALA(0.1), 4, 2, model_args=(torch.zeros(0, dtype=torch.long),),
                    progress=False)


def test_integer_data():
    """Integer counts at a Poisson site work (the same posterior as float counts);
    integer labels at a Bernoulli site, which torch refuses, and integer features
    fed to a float network give a TypeError naming the argument and dtype."""
    y = torch.tensor([3, 1, 4, 1, 5])
    torch.manual_seed(11)
    as_int = mcmc.sample(counts, mcmc.MALA(0.1), 4, 3, warmup_steps=3, model_args=(y,), progress=False)
    torch.manual_seed(11)
    as_float = mcmc.sample(counts, mcmc.MALA(0.1), 4, 3, warmup_steps=3, model_args=(y.to(DT),),
                           progress=False)
    torch.testing.assert_close(as_int.positions, as_float.positions)

    features = torch.randn(5, 2, dtype=DT)
    with pytest.raises(TypeError, match=r"model argument 'y' \(model_args\[1\]\) has dtype torch.int64.*"
                                        r"y.float\(\)"):
        mcmc.sample(logistic, mcmc.MALA(0.1), 4, 2, model_args=(features, torch.tensor([0, 1, 1, 0, 1])),
                    progress=False)
    labels = torch.tensor([0.0, 1, 1, 0, 1], dtype=DT)
    mcmc.sample(logistic, mcmc.MALA(0.1), 4, 2, model_args=(features, labels), progress=False)

    net = torch.nn.Linear(3, 1).to(DT)

    def energy_model(v):
        z = pyro.sample("z", dist.Normal(torch.zeros(3, dtype=DT), 1.0).to_event(1))
        with pyro.plate("data", len(v)):
            pyro.factor("energy", -(net(v) + z).sum(-1))

    # the energy core's first run names the data's shape and dtype and the site reached
    with pytest.raises(TypeError, match=r"data of shape \(5, 3\) and dtype torch.int64"):
        mcmc.sample(energy_model, mcmc.MALA(0.1), 4, 2, model_args=(torch.ones(5, 3, dtype=torch.long),),
                    progress=False)


def test_overflowing_and_non_finite_data_are_named():
    huge = torch.full((5, 2), 1e30)
    with pytest.raises(ValueError, match=r"model argument 'features' \(model_args\[0\]\) overflows "
                                         r"torch.float32"):
        mcmc.sample(logistic, mcmc.MALA(0.1), 4, 2, model_args=(huge, torch.zeros(5)), progress=False)
    bad = torch.zeros(5, dtype=DT)
    bad[3] = float("nan")
    with pytest.raises(ValueError, match=r"model argument 'y' contains 1 non-finite value\(s\): "
                                         r"NaN at index \(3,\)"):
        mcmc.sample(logistic, mcmc.MALA(0.1), 4, 2, model_args=(torch.zeros(5, 2, dtype=DT),),
                    model_kwargs={"y": bad}, progress=False)


def test_nan_potential_says_what_is_known():
    """NaN from the model: at its first run (a pyro.factor's log_factor), where all
    chains start (with their latent values), and at every proposal of every chain."""
    def nan_factor():
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=DT), 1.0))
        pyro.factor("f", z * float("nan"))

    with pytest.raises(ValueError, match=r"model factor 'f': NaN"):  # named by the energy core
        mcmc.sample(nan_factor, mcmc.MALA(0.1), 4, 2, progress=False)

    def cut():
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=DT), 1.0).to_event(1))
        zero = torch.zeros_like(z[..., 0])
        pyro.factor("f", torch.where(z.abs().sum(-1) < 3, zero, zero + float("nan")))

    outside = {"z": torch.full((4, 2), 5.0, dtype=DT)}
    with pytest.raises(ValueError, match=r"potential is NaN at the initial positions of all 4 chains.*"
                                         r"chain 0 starts at z = \[5, 5\], as given by initial"):
        mcmc.sample(cut, mcmc.MALA(0.1), 4, 2, initial=outside, progress=False)

    def only_at_zero(x):
        u = 0.5 * x.pow(2).sum(-1)
        return torch.where((x == 0).all(-1), u, torch.full_like(u, float("nan")))

    with pytest.raises(ValueError, match=r"every one of the 4 chains had a non-finite potential.*"
                                         r"on each of 20 consecutive steps \(1 to 20, warmup and sampling\).*"
                                         r"the step size is 0.1"):
        mcmc.sample(potential_fn=only_at_zero, kernel=mcmc.ULA(0.1), num_chains=4, num_samples=15,
                    warmup_steps=5, initial=torch.zeros(4, 2, dtype=DT), progress=False)
    # one chain that can move is enough to go on
    start = torch.zeros(4, 2, dtype=DT)
    samples = mcmc.sample(potential_fn=lambda x: torch.where(x[:, :1].abs().sum(-1) < 10,
                                                             0.5 * x.pow(2).sum(-1),
                                                             torch.full_like(x[:, 0], float("nan"))),
                          kernel=mcmc.ULA(0.1), num_chains=4, num_samples=15, initial=start, progress=False)
    assert samples.num_divergences == 0


# -- progress ----------------------------------------------------------------------------------

def test_no_progress_bar_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    """progress=None (the default) draws nothing when stderr is not a terminal (as
    under pytest's capture); PYRO_EBM_PROGRESS=1 forces the bar on."""
    monkeypatch.delenv("PYRO_EBM_PROGRESS", raising=False)
    pot = lambda x: 0.5 * x.pow(2).sum(-1)  # noqa: E731
    mcmc.sample(potential_fn=pot, kernel=mcmc.MALA(0.5), num_chains=4, num_samples=20, warmup_steps=10,
                initial=torch.zeros(4, 1))
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("PYRO_EBM_PROGRESS", "1")
    mcmc.sample(potential_fn=pot, kernel=mcmc.MALA(0.5), num_chains=4, num_samples=20, warmup_steps=10,
                initial=torch.zeros(4, 1))
    assert "accept=" in capsys.readouterr().err
