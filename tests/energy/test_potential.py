# SPDX-License-Identifier: Apache-2.0
"""The potentials of the energy core: per-item data potentials and the named
latent sites of a latent potential."""
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_ebm.energy import DataPotential, LatentSite, energy_view

F64 = torch.float64


def quadratic(x, mu=1.5):
    """E(x) = ½‖x − μ‖² per item."""
    with pyro.plate("data", x.shape[0]):
        pyro.factor("energy", -0.5 * ((x - mu) ** 2).reshape(x.shape[0], -1).sum(-1))


def latent_model(v):
    """log p̃(v, h) = log N(h; 0, I) − ½‖v − 2h‖²."""
    with pyro.plate("data", v.shape[0]):
        h = pyro.sample("h", dist.Normal(torch.zeros_like(v), 1.0).to_event(1))
        pyro.factor("energy", -0.5 * ((v - 2 * h) ** 2).sum(-1))


def test_data_potential_is_the_per_item_energy():
    x = torch.randn(5, 3, dtype=F64)
    energy = energy_view(quadratic).data_potential()
    assert isinstance(energy, DataPotential)
    u = energy(x)
    assert u.shape == (5,)
    torch.testing.assert_close(u, 0.5 * ((x - 1.5) ** 2).sum(-1))
    # the gradient is the energy gradient, minus the score
    (g,) = torch.autograd.grad(energy(x.requires_grad_(True)).sum(), x)
    torch.testing.assert_close(g, x.detach() - 1.5)


def test_data_potential_reshapes_flattened_positions():
    x = torch.randn(4, 2, 3, dtype=F64)
    energy = energy_view(quadratic).data_potential(event_shape=(2, 3))
    torch.testing.assert_close(energy(x.reshape(4, 6)), 0.5 * ((x - 1.5) ** 2).sum((-1, -2)))


def test_data_potential_at_given_latents_and_joint():
    v, h = torch.randn(6, 2, dtype=F64), torch.randn(6, 2, dtype=F64)
    expected = -dist.Normal(0.0, 1.0).log_prob(h).sum(-1) + 0.5 * ((v - 2 * h) ** 2).sum(-1)
    view = energy_view(latent_model)
    torch.testing.assert_close(view.data_potential(values={"h": h})(v), expected)
    # values given at the call replace the fixed ones: a potential over (v, h) jointly
    joint = view.data_potential()
    torch.testing.assert_close(joint(v, values={"h": h}), expected)


def test_data_potential_names_latent_sites_without_values():
    energy = energy_view(latent_model).data_potential(purpose="Langevin revision")
    with pytest.raises(ValueError, match=r"Langevin revision needs the energy of the data alone, but the "
                                         r"model has latent site\(s\) \['h'\]"):
        energy(torch.randn(3, 2))


def test_data_potential_checks_the_model_once_per_shape(monkeypatch):
    view = energy_view(quadratic)
    calls = []
    original = view.check_model
    monkeypatch.setattr(view, "check_model", lambda *a, **k: calls.append(1) or original(*a, **k))
    energy = view.data_potential()
    for _ in range(3):
        energy(torch.randn(4, 2))
    energy(torch.randn(5, 2))
    view.data_potential()(torch.randn(4, 2))  # a second potential of the same view: checked already
    assert len(calls) == 2


def test_latent_potential_sites_are_named_tuples():
    def model():
        pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        pyro.sample("loc", dist.Normal(torch.zeros(2, 3), 1.0).to_event(2))

    potential = energy_view(model).latent_potential()
    scale, loc = potential.sites
    assert all(isinstance(s, LatentSite) for s in potential.sites)
    assert (scale.name, loc.name) == ("scale", "loc")
    assert scale.slice == slice(0, 1) and loc.slice == slice(1, 7)
    assert loc.unconstrained_shape == torch.Size([2, 3]) and loc.info.shape == torch.Size([2, 3])
    z = torch.randn(4, potential.dim)
    values = potential.unpack(z)
    torch.testing.assert_close(values["scale"], scale.transform(z[:, scale.slice]).reshape(4))
    torch.testing.assert_close(potential.pack(values), z)
