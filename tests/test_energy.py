# SPDX-License-Identifier: Apache-2.0
import math
import re

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_ebm.energy import EnergyView, check_guide_sites, log_density, require_reparameterized


def gaussian_latent_model(v, a=0.7):
    """E(v, h) = ½‖v − a h‖², h ~ N(0, I): log p̃ = log N(h) − E."""
    with pyro.plate("data", v.shape[0]):
        h = pyro.sample("h", dist.Normal(torch.zeros_like(v), 1.0).to_event(1))
        pyro.factor("energy", -0.5 * ((v - a * h) ** 2).sum(-1))


def quadratic_model(v):
    with pyro.plate("data", v.shape[0]):
        pyro.factor("energy", -0.5 * (v**2).sum(-1))


def test_log_density_matches_hand_computation():
    v, h = torch.randn(5, 3), torch.randn(5, 3)
    view = EnergyView(gaussian_latent_model)
    expected = dist.Normal(0.0, 1.0).log_prob(h).sum(-1) - 0.5 * ((v - 0.7 * h) ** 2).sum(-1)
    per_item = view.log_density(v, values={"h": h}, per_item=True)
    assert per_item.shape == (5,)
    assert torch.allclose(per_item, expected, atol=1e-5)
    assert torch.allclose(view.log_density(v, values={"h": h}), expected.sum(), atol=1e-5)


def test_chain_batched_log_density():
    v, h = torch.randn(4, 2), torch.randn(3, 4, 2)
    view = EnergyView(gaussian_latent_model)
    out = view.log_density(v, values={"h": h}, num_chains=3, per_item=True)
    assert out.shape == (3, 4)
    for c in range(3):
        assert torch.allclose(out[c], view.log_density(v, values={"h": h[c]}, per_item=True), atol=1e-5)


def test_score_sign_quadratic_energy():
    # E(v) = ½‖v‖² so the score is −v (never the energy gradient +v).
    v = torch.randn(6, 3)
    s = EnergyView(quadratic_model).score(v)
    assert torch.allclose(s, -v)


def test_score_with_latents_matches_closed_form():
    v, h = torch.randn(5, 3), torch.randn(5, 3)
    s = EnergyView(gaussian_latent_model).score(v, values={"h": h})
    assert torch.allclose(s, -(v - 0.7 * h), atol=1e-6)


def test_structure_traced_once(monkeypatch):
    calls = []
    view = EnergyView(gaussian_latent_model)
    original = view._trace_structure
    monkeypatch.setattr(view, "_trace_structure", lambda *a: calls.append(1) or original(*a))
    v = torch.randn(4, 2)
    for _ in range(3):
        view.log_density(v, values={"h": torch.randn(4, 2)})
    assert len(calls) == 1
    st = view.structure(v)
    assert set(st.latents) == {"h"} and st.factors == ("energy",) and st.data_dim == -1


def test_latent_potential_constrained_site():
    # z ~ LogNormal(0, 1); factor −z. In u = log z: U(u) = −[log LN(e^u) − e^u + u].
    def model(n):
        z = pyro.sample("z", dist.LogNormal(0.0, 1.0))
        with pyro.plate("s", n):
            pyro.factor("e", -z * torch.ones(n) / n)

    pot = EnergyView(model).latent_potential(3)
    u = torch.linspace(-2, 2, 7).unsqueeze(-1)
    z = u.exp().squeeze(-1)
    expected = -(dist.LogNormal(0.0, 1.0).log_prob(z) - z + u.squeeze(-1))
    assert torch.allclose(pot(u), expected, atol=1e-5)
    assert torch.allclose(pot.unpack(u)["z"], z)
    assert torch.allclose(pot.pack(pot.unpack(u)), u, atol=1e-6)


def test_latent_potential_batched_over_data_plate():
    v = torch.randn(4, 2)
    pot = EnergyView(gaussian_latent_model).latent_potential(v)
    assert pot.dim == 8
    z = pot.sample_prior(5)
    assert z.shape == (5, 8)
    h = z.reshape(5, 4, 2)
    expected = -(dist.Normal(0.0, 1.0).log_prob(h).sum((-1, -2)) - 0.5 * ((v - 0.7 * h) ** 2).sum((-1, -2)))
    assert torch.allclose(pot(z), expected, atol=1e-4)


def test_guide_scored_by_log_density():
    def guide(v):
        with pyro.plate("data", v.shape[0]):
            pyro.sample("h", dist.Normal(v, 2.0).to_event(1))

    v, h = torch.randn(3, 2), torch.randn(3, 2)
    lq = log_density(guide, {"h": h}, (v,), keep_dims=(-1,), total_dims=1)
    assert torch.allclose(lq, dist.Normal(v, 2.0).log_prob(h).sum(-1))


# -- errors ---------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_data_is_named(bad):
    v = torch.randn(4, 2)
    v[2, 1] = bad
    with pytest.raises(ValueError, match=r"data contains .*index \(2, 1\)"):
        EnergyView(quadratic_model).score(v)


def test_data_without_batch_dim():
    with pytest.raises(ValueError, match="no batch dimension"):
        EnergyView(quadratic_model).score(torch.randn(3))


def test_model_that_ignores_data():
    def model(v):
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", torch.zeros(v.shape[0]))

    with pytest.raises(ValueError, match="does not depend on the data"):
        EnergyView(model).check_model(torch.randn(3, 2))


def test_model_without_factor():
    def model(v):
        with pyro.plate("data", v.shape[0]):
            pyro.sample("h", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no pyro.factor or observed"):
        EnergyView(model).check_model(torch.randn(3, 2), values={"h": torch.zeros(3)})


def test_model_without_data_plate():
    def model(v):
        pyro.factor("energy", -(v**2).sum())

    with pytest.raises(ValueError, match="no plate over the data"):
        EnergyView(model).check_model(torch.randn(3, 2))


def test_missing_latent_value_is_named():
    with pytest.raises(ValueError, match="latent site 'h'"):
        EnergyView(gaussian_latent_model).log_density(torch.randn(3, 2), values={})


def test_guide_site_mismatch_names_sites():
    with pytest.raises(ValueError, match=r"missing the model's latent site\(s\) \['h'\].*\['g'\]"):
        check_guide_sites({"h"}, {"g"})


def test_discrete_latent_rejected_for_gradients():
    def model(v):
        with pyro.plate("data", v.shape[0]):
            h = pyro.sample("h", dist.Bernoulli(0.5 * torch.ones(v.shape[0], 2)).to_event(1))
            pyro.factor("energy", -((v - h) ** 2).sum(-1))

    view = EnergyView(model)
    with pytest.raises(ValueError, match=r"'h' \(Bernoulli\) are discrete"):
        view.latent_potential(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"'h' \(Bernoulli, discrete\)"):
        require_reparameterized(view.structure(torch.randn(3, 2)).latents.values(), "BiSM")


def test_cached_view_does_not_keep_its_model_alive():
    import gc
    import weakref

    from pyro_ebm.infer.score_matching import _METHOD_VIEWS, _VIEWS, energy_view
    from pyro_ebm.models import GaussianRBM

    grbm = GaussianRBM(2, 3)
    view = energy_view(grbm.marginal)
    assert energy_view(grbm.marginal) is view  # a new bound-method object, the same view
    assert energy_view(grbm) is energy_view(grbm)
    assert view.log_density(torch.rand(4, 2)).shape == ()
    ref = weakref.ref(grbm)
    before = (len(_VIEWS), len(_METHOD_VIEWS))
    del grbm, view
    gc.collect()
    assert ref() is None
    assert len(_VIEWS) < before[0] and len(_METHOD_VIEWS) < before[1]


@pytest.mark.parametrize("bad, error, words", [
    (np.zeros((3, 2)), TypeError, "numpy.ndarray"),
    ([[0.0, 1.0]], TypeError, "got list"),
    (torch.zeros(3, 2, dtype=torch.long), TypeError, "torch.int64"),
    (torch.zeros(3), ValueError, "no batch dimension"),
    (torch.zeros(0, 2), ValueError, "empty batch"),
    (torch.tensor([[0.0, float("nan")]]), ValueError, "NaN at index (0, 1)"),
    (torch.tensor([[0.0, 1e30]]), ValueError, "overflows torch.float32"),
])
def test_check_data_names_the_fault(bad, error, words):
    from pyro_ebm.energy import check_data

    with pytest.raises(error, match=re.escape(words)):
        check_data(bad)


def test_check_data_keeps_large_float64():
    from pyro_ebm.energy import check_data

    v = torch.tensor([[1e30]], dtype=torch.float64)  # fine in double precision
    assert check_data(v) is v
