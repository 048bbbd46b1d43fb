# SPDX-License-Identifier: Apache-2.0
"""Bad input to every trainer ends in a clear error that names the argument, the
step, the site, the shapes or the dtypes at fault, never in a raw torch or Pyro
error; every batch is checked, not only the first of each shape."""

import re

import pyro
import pytest
import torch
from pyro.infer import SVI
from resume_cases import VAE, D, Encoder, Energy, H  # the set-ups' modules (float32), shared

from pyro_ebm.guides import AmortizedBernoulli, AmortizedNormal
from pyro_ebm.infer import DSM, KALE, BiDVL, BiSM, ContrastiveDivergence, MCMCTeaching, VaGES
from pyro_ebm.mcmc import ULA
from pyro_ebm.models import GEBM, GaussianDecoder, GaussianRBM
from pyro_ebm.models.nets import MLP


def adam():
    return pyro.optim.Adam({"lr": 1e-3})


def make(name, hidden=H):
    """(trainer, its step function, the module whose parameters can be set to NaN)."""
    grbm = GaussianRBM(D, H)
    if name == "BiSM":
        guide = AmortizedBernoulli(D, hidden, site="h")
        t = BiSM(grbm, guide, adam(), objective=DSM(0.1), inner_steps=1, unroll_steps=0)
        return t, t.step, dict(guide=guide.encoder, energy=grbm)
    if name == "VaGES":
        guide = AmortizedBernoulli(D, hidden, site="h")
        t = VaGES(grbm, guide, adam(), objective="dsm", num_particles=2, inner_steps=1)
        return t, t.step, dict(guide=guide.encoder, energy=grbm)
    if name == "CD":
        t = ContrastiveDivergence(grbm, adam(), k=1)
        return t, t.step, dict(energy=grbm)
    if name == "SVI+DSM":
        t = SVI(grbm.marginal, lambda v: None, adam(), loss=DSM(0.1))
        return t, t.step, dict(energy=grbm)
    if name == "KALE":
        gebm = GEBM(MLP(D, D, (8,)), MLP(D, 1, (8,)), latent_dim=D)
        t = KALE(gebm, adam(), adam(), critic_steps=1, warmup_critic_steps=1)
        return t, t.step, dict(energy=gebm.energy)
    if name == "MCMCTeaching":
        energy, vae = Energy(), VAE()
        t = MCMCTeaching(energy, vae.model, vae.guide, adam(), adam(), kernel=ULA(0.01), num_langevin_steps=2)
        return t, t.step, dict(energy=energy)
    if name == "BiDVL":
        energy = Energy()
        decoder = GaussianDecoder(MLP(H, D, (8,)), latent_dim=H, output=None)
        encoder = AmortizedNormal(Encoder(hidden), site="h")
        t = BiDVL(energy, decoder, encoder, adam(), adam())
        return t, t.step, dict(guide=encoder.encoder, energy=energy)
    raise AssertionError(name)


TRAINERS = ["BiSM", "VaGES", "CD", "SVI+DSM", "KALE", "MCMCTeaching", "BiDVL"]
WITH_GUIDE = ["BiSM", "VaGES", "BiDVL"]


def data(n=8, dim=D, dtype=torch.float32):
    return torch.randn(n, dim, dtype=dtype)


def fill_nan(module):
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))


@pytest.mark.parametrize("name", TRAINERS)
def test_empty_batch(name):
    _, step, _ = make(name)
    with pytest.raises(ValueError, match=r"data.* is an empty batch \(shape \(0, 2\)\)"):
        step(torch.zeros(0, D))


@pytest.mark.parametrize("name", TRAINERS)
@pytest.mark.parametrize("kind", ["numpy", "list"])
def test_numpy_and_lists_are_refused_with_a_conversion_hint(name, kind):
    _, step, _ = make(name)
    v = data()
    bad = v.numpy() if kind == "numpy" else v.tolist()
    expected = "numpy.ndarray" if kind == "numpy" else "list"
    with pytest.raises(TypeError, match=rf"data.* must be a torch.Tensor, got {expected}; conv.*as_tensor"):
        step(bad)


@pytest.mark.parametrize("name", TRAINERS)
def test_float64_data_with_float32_modules_names_both_dtypes(name):
    _, step, _ = make(name)
    with pytest.raises(TypeError) as info:
        step(data(dtype=torch.float64))
    message = str(info.value)
    assert "torch.float64" in message and "torch.float32" in message, message
    assert re.search(r"\.double\(\) or data\.float\(\)", message), message


@pytest.mark.parametrize("name", TRAINERS)
def test_feature_dimension_mismatch_names_both_shapes(name):
    _, step, _ = make(name)
    with pytest.raises(ValueError) as info:
        step(data(dim=D + 1))
    message = str(info.value)
    assert "(8, 3)" in message, message
    # the expected dimension is named too (for a general network, by torch's shapes: 8x3 and 2x8)
    assert re.search(r"visible_dim=2|\(batch, 2\)|\(8, 2\)|event shape \(2,\)|8x3 and 2x8", message), message


@pytest.mark.parametrize("name", TRAINERS)
def test_overflowing_data(name):
    _, step, _ = make(name)
    v = data()
    v[2, 0] = 1e30
    with pytest.raises(ValueError, match=r"data.* overflows torch.float32: its largest magnitude is 1e\+30"):
        step(v)


@pytest.mark.parametrize("name", TRAINERS)
def test_nan_in_a_later_batch_names_the_batch_and_the_index(name):
    """Not 'diverged': a NaN in the data of a later batch of the same shape is
    reported as data, with the step and the index."""
    _, step, _ = make(name)
    v = data()
    step(v)
    bad = data()
    bad[5, 1] = float("nan")
    step_name = "" if name == "SVI+DSM" else r" \(step 2\)"  # SVI has no step count
    with pytest.raises(ValueError, match=rf"^data{step_name} contains 1 non-finite.*NaN at index \(5, 1\)"):
        step(bad)


@pytest.mark.parametrize("name", WITH_GUIDE)
def test_guide_latent_of_the_wrong_shape(name):
    _, step, _ = make(name, hidden=H + 1)
    with pytest.raises(ValueError, match=r"guide site 'h' has shape \(8, 4\), but the model's latent "
                                         r"site 'h' has shape \(8, 3\)"):
        step(data())


@pytest.mark.parametrize("name", WITH_GUIDE)
def test_nan_from_the_guide_names_the_site_and_the_step(name):
    _, step, parts = make(name)
    v = data()
    step(v)
    fill_nan(parts["guide"])
    with pytest.raises(ValueError, match=rf"{name} diverged at step 2: .*guide site 'h': the (loc|logits) "
                                         r"of its \w+ is NaN at index \(0, 0\)"):
        step(v)


@pytest.mark.parametrize("name", WITH_GUIDE)
def test_nan_guide_at_the_first_step(name):
    _, step, parts = make(name)
    fill_nan(parts["guide"])
    with pytest.raises(ValueError, match=rf"{name} \(step 1\): .*guide site 'h': the (loc|logits) of its "
                                         r"\w+ is NaN at index \(0, 0\)"):
        step(data())


ENERGY_SITE = {"BiSM": "model factor 'energy'", "VaGES": "model factor 'energy'",
               "CD": "model factor 'free_energy'", "KALE": "GEBM factor 'energy'",
               "MCMCTeaching": "energy model factor 'energy'", "BiDVL": "energy model factor 'energy'"}


@pytest.mark.parametrize("name", sorted(ENERGY_SITE))
def test_nan_from_the_energy_names_the_factor_and_the_step(name):
    """Finite data, an energy that returns NaN: the error names the factor and the step."""
    trainer, step, parts = make(name)
    v = data()
    step(v)
    fill_nan(parts["energy"])
    with pytest.raises((ValueError, RuntimeError)) as info:
        step(v)
    message = str(info.value)
    assert ENERGY_SITE[name] in message, message
    assert "step 2" in message, message


@pytest.mark.parametrize("name", TRAINERS)
def test_steps_train_under_the_callers_no_grad(name):
    """A step is a training step whatever the caller's grad mode (e.g. inside an
    evaluation loop's torch.no_grad): it turns gradients on where it needs them."""
    _, step, parts = make(name)
    v = data()
    step(v)  # creates every parameter
    before = [p.detach().clone() for p in parts["energy"].parameters()]
    with torch.no_grad():
        step(v)
    after = list(parts["energy"].parameters())
    assert any(not torch.equal(a.detach(), b) for a, b in zip(after, before, strict=True))


def test_two_guides_of_one_pyro_name_and_other_shapes_get_an_error_that_says_so():
    """Two ``AmortizedBernoulli`` guides register ``encoder.weight`` under the same
    Pyro name; when the second has other shapes, its trainer's first step says
    which parameter, both shapes, and how to keep the models apart."""
    pyro.clear_param_store()
    v = torch.rand(8, D)
    first = BiSM(GaussianRBM(D, H), AmortizedBernoulli(D, H, site="h"), adam(), objective=DSM(0.1),
                 inner_steps=1, unroll_steps=0)
    first.step(v)
    second = BiSM(GaussianRBM(D, H + 1, name="other"), AmortizedBernoulli(D, H + 1, site="h"), adam(),
                  objective=DSM(0.1), inner_steps=1, unroll_steps=0)
    with pytest.raises(ValueError, match=re.escape(f"'encoder.weight' of shape ({H}, {D}), but the module's "
                                                   f"parameter has shape ({H + 1}, {D})")) as err:
        second.step(v)
    assert "pyro.clear_param_store()" in str(err.value)
    pyro.clear_param_store()
    second.step(v)  # after clearing, the second trainer trains
    assert second.num_steps == 1
