# SPDX-License-Identifier: Apache-2.0
import math
import re
from dataclasses import dataclass

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_ebm.energy import EnergyView, check_guide_sites, log_density, require_reparameterized
from pyro_ebm.models import GaussianRBM


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

    from pyro_ebm.energy.view import _METHOD_VIEWS, _VIEWS, energy_view
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


def test_check_data_tells_inf_from_overflow():
    from pyro_ebm.energy import check_data

    with pytest.raises(ValueError, match=re.escape("Inf at index (1, 0)")):
        check_data(torch.tensor([[0.0, 1.0], [float("-inf"), 2.0]]))
    # finite=False: type and shape only (for a guide that runs many times per step)
    nan = torch.tensor([[float("nan")]])
    assert check_data(nan, finite=False) is nan
    with pytest.raises(ValueError, match="empty batch"):
        check_data(torch.zeros(0, 2), finite=False)


# -- the structure cache: non-tensor arguments are keyed by value ------------------


@dataclass(frozen=True)
class Config:
    hidden: int


@dataclass
class MutableConfig:
    hidden: int


def configured_model(v, config):
    """A latent of config.hidden units: the structure depends on the config's value."""
    with pyro.plate("data", v.shape[0]):
        h = pyro.sample("h", dist.Normal(v.new_zeros(config.hidden), 1.0).to_event(1))
        pyro.factor("energy", -0.5 * (v**2).sum(-1) - h.sum(-1))


def test_two_configs_of_one_class_get_their_own_structures():
    """Keyed by type name alone, the second config reused the first's structure
    (latent shape (4, 2)); keyed by value, each has its own."""
    view = EnergyView(configured_model)
    v = torch.randn(4, 3)
    assert view.structure(v, Config(2)).latents["h"].shape == (4, 2)
    assert view.structure(v, Config(5)).latents["h"].shape == (4, 5)
    assert view.structure(v, Config(2)) is view.structure(v, Config(2))  # equal values share one
    h = torch.randn(4, 5)
    expected = dist.Normal(0.0, 1.0).log_prob(h).sum() - 0.5 * (v**2).sum() - h.sum()
    assert torch.allclose(view.log_density(v, Config(5), values={"h": h}), expected, atol=1e-5)


def test_plain_objects_are_keyed_by_identity_and_unhashable_ones_refused():
    class Plain:  # default (identity) hash
        def __init__(self, hidden):
            self.hidden = hidden

    view = EnergyView(configured_model)
    v = torch.randn(4, 3)
    a, b = Plain(2), Plain(6)
    assert view.structure(v, a).latents["h"].shape == (4, 2)
    assert view.structure(v, b).latents["h"].shape == (4, 6)
    # containers are keyed entry by entry: a tuple holding a tensor is keyed by its shape
    assert EnergyView(lambda v, extra: quadratic_model(v)).structure(v, (torch.zeros(2),)) is not None
    with pytest.raises(TypeError, match=r"argument 1 of type MutableConfig is not hashable.*frozen=True"):
        view.structure(v, MutableConfig(2))
    # 1 and True are equal but keyed apart
    flags = EnergyView(lambda v, k: quadratic_model(v))
    assert flags.structure(v, 1) is not flags.structure(v, True)


# -- guide sites against model sites: names, shapes, supports -----------------------


def _sites(model, v):
    return EnergyView(model).structure(v).latents


def bernoulli_model(v):
    with pyro.plate("data", v.shape[0]):
        h = pyro.sample("h", dist.Bernoulli(0.5 * v.new_ones(3)).to_event(1))
        pyro.factor("energy", -(v.sum(-1, keepdim=True) * h).sum(-1))


def positive_model(v):
    with pyro.plate("data", v.shape[0]):
        h = pyro.sample("h", dist.Gamma(v.new_ones(3), 1.0).to_event(1))
        pyro.factor("energy", -(v.sum(-1, keepdim=True) * h).sum(-1))


def normal_guide(v):
    with pyro.plate("data", v.shape[0]):
        pyro.sample("h", dist.Normal(v.new_zeros(3), 1.0).to_event(1))


def relaxed_guide(v):
    from pyro_ebm.guides import ConcreteBernoulli

    with pyro.plate("data", v.shape[0]):
        pyro.sample("h", ConcreteBernoulli(v.new_zeros(3), 0.1).to_event(1))


def bernoulli_guide(v):
    with pyro.plate("data", v.shape[0]):
        pyro.sample("h", dist.Bernoulli(0.3 * v.new_ones(3)).to_event(1))


def lognormal_guide(v):
    with pyro.plate("data", v.shape[0]):
        pyro.sample("h", dist.LogNormal(v.new_zeros(3), 1.0).to_event(1))


def wide_guide(v):
    with pyro.plate("data", v.shape[0]):
        pyro.sample("h", dist.Normal(v.new_zeros(4), 1.0).to_event(1))


def test_discrete_model_site_with_a_continuous_guide_is_refused():
    v = torch.randn(5, 2)
    with pytest.raises(ValueError) as info:
        check_guide_sites(_sites(bernoulli_model, v), _sites(normal_guide, v))
    message = str(info.value)
    assert "latent site 'h' is discrete (Bernoulli, support Boolean())" in message, message
    assert "continuous Normal (support Real())" in message, message
    # a relaxation inside the hull [0, 1] and a discrete guide are fine
    check_guide_sites(_sites(bernoulli_model, v), _sites(relaxed_guide, v))
    check_guide_sites(_sites(bernoulli_model, v), _sites(bernoulli_guide, v))


def test_guide_outside_a_continuous_support_and_wrong_shape_are_refused():
    v = torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"guide site 'h' draws from Normal with support Real\(\), which is "
                                         r"not within the support GreaterThanEq\(lower_bound=0.0\) of the "
                                         r"model's latent site 'h' \(Gamma\)"):
        check_guide_sites(_sites(positive_model, v), _sites(normal_guide, v))
    check_guide_sites(_sites(positive_model, v), _sites(lognormal_guide, v))
    v = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"guide site 'h' has shape \(5, 4\), but the model's latent site "
                                         r"'h' has shape \(5, 3\)"):
        check_guide_sites(_sites(gaussian_latent_model, v), _sites(wide_guide, v))
    # names only (no site information): the name check alone, as before
    check_guide_sites(["h"], ["h"])


# -- errors of the first run, NaN diagnosis, grad mode ---------------------------------


def test_first_run_shape_and_dtype_errors_name_the_data_and_the_site():
    linear = torch.nn.Linear(2, 1)

    def model(v):
        with pyro.plate("data", v.shape[0]):
            h = pyro.sample("h", dist.Normal(v.new_zeros(2), 1.0).to_event(1))
            pyro.factor("energy", -linear(v).squeeze(-1) - h.sum(-1))

    with pytest.raises(ValueError, match=r"the model failed on data of shape \(4, 3\) and dtype "
                                         r"torch.float32 after its site 'h', shape \(4, 2\).*4x3 and 2x1"):
        EnergyView(model).structure(torch.randn(4, 3))
    with pytest.raises(TypeError, match=r"data of shape \(4, 2\) and dtype torch.float64.*dtype"):
        EnergyView(model).structure(torch.randn(4, 2, dtype=torch.float64))
    # a model's own ValueError passes through as it is
    with pytest.raises(ValueError, match="GaussianRBM has visible_dim=2"):
        EnergyView(GaussianRBM(2, 3)).structure(torch.randn(4, 3))


def test_first_run_with_a_nan_parameter_names_the_site():
    def guide(v):
        with pyro.plate("data", v.shape[0]):
            pyro.sample("h", dist.Normal(v * float("nan"), 1.0).to_event(1))

    expected = "guide site 'h': the loc of its Normal is NaN at index (0, 0) (8 non-finite entries in all)"
    with pytest.raises(ValueError, match=re.escape(expected + " (on data of shape (4, 2)")):
        EnergyView(guide, role="guide").structure(torch.randn(4, 2))


def test_find_nonfinite_names_the_factor_and_the_index():
    from pyro_ebm.energy import find_nonfinite

    def model(v):
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", -torch.sqrt(v[:, 0]))  # NaN where v < 0

    v = torch.tensor([[1.0], [4.0], [-1.0]])
    assert find_nonfinite(model, (v,)) == "model factor 'energy': NaN at index (2,)"
    assert find_nonfinite(model, (v.abs(),)) is None
    inf = {"h": torch.full((3, 2), math.inf)}
    assert (find_nonfinite(gaussian_latent_model, (torch.randn(3, 2),), values=inf)
            == "model site 'h': its value is Inf at index (0, 0) (6 non-finite entries in all)")


def test_check_dtype_names_both_dtypes_and_the_fix():
    from pyro_ebm.energy import check_dtype

    grbm = GaussianRBM(2, 3)
    with pytest.raises(TypeError, match=re.escape("data has dtype torch.float64, but the model's parameters "
                                                  "(GaussianRBM) have dtype torch.float32")) as info:
        check_dtype(torch.zeros(1, 2, dtype=torch.float64), grbm.marginal)
    assert "model.double() or data.float()" in str(info.value)
    check_dtype(torch.zeros(1, 2), grbm.marginal)
    check_dtype(torch.zeros(1, 2, dtype=torch.float64), quadratic_model)  # a function: nothing to compare


def test_score_works_under_no_grad():
    v = torch.randn(4, 3)
    with torch.no_grad():
        s = EnergyView(quadratic_model).score(v)
    assert torch.allclose(s, -v)
