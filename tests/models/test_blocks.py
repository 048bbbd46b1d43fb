# SPDX-License-Identifier: Apache-2.0
"""The ready-made building blocks: MLP and conv energies, the Gaussian encoder,
the conditional decoder, the VAE and train_vae."""

import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyro_ebm import datasets
from pyro_ebm.guides import AmortizedNormal
from pyro_ebm.models import VAE, ConvEnergy, GaussianDecoder, MLPEnergy, train_vae
from pyro_ebm.models.nets import MLP, GaussianEncoder


def _log_joint(model, *args):
    return poutine.trace(model).get_trace(*args).log_prob_sum()


def test_mlp_energy_matches_the_hand_written_formula_bitwise():
    # the experiments' numbers rest on this: f(x) + 0.5 * ||x - 0.5||^2 and f(x) + ||x||^2 / 18
    torch.manual_seed(0)
    digits = MLPEnergy(64, (16, 16), base_loc=0.5, base_scale=1.0)
    x = torch.rand(7, 64)
    assert torch.equal(digits.energy(x), digits.net(x).squeeze(-1) + 0.5 * (x - 0.5).pow(2).sum(-1))
    toy = MLPEnergy(2, (16, 16), base_scale=3.0)
    x = 3 * torch.randn(7, 2)
    assert torch.equal(toy.energy(x), toy.net(x).squeeze(-1) + x.pow(2).sum(-1) / 18)
    plain = MLPEnergy(2, (16, 16))
    assert torch.equal(plain.energy(x), plain.net(x).squeeze(-1))


def test_mlp_energy_pyro_model_is_minus_energy_and_conditional_picks_the_label():
    torch.manual_seed(1)
    model = MLPEnergy(3, (8,), num_classes=4, base_scale=2.0)
    v, y = torch.randn(5, 3), torch.tensor([0, 3, 1, 1, 2])
    e = model.energy(v, y)
    expected = model.net(v)[torch.arange(5), y] + v.pow(2).sum(-1) / 8
    assert torch.allclose(e, expected)
    assert torch.allclose(_log_joint(model, v, y), -e.sum())
    assert model.energy(torch.randn(2, 5, 3), y).shape == (2, 5)       # leading chain dim
    with pytest.raises(ValueError, match="needs the labels"):
        model.energy(v)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        model.energy(torch.randn(5, 4), y)
    with pytest.raises(ValueError, match="base_scale"):
        MLPEnergy(3, base_scale=0.0)


def test_conv_energy_takes_flat_and_image_shapes_alike():
    torch.manual_seed(2)
    model = ConvEnergy(12, channels=(4, 8), hidden=16, base_scale=3.0)
    x = torch.randn(5, 1, 12, 12)
    e = model.energy(x)
    assert e.shape == (5,)
    assert torch.allclose(model.energy(x.reshape(5, 144)), e)
    assert torch.allclose(model.energy(x.reshape(1, 5, 144))[0], e)   # leading chain dim
    assert torch.allclose(_log_joint(model, x.reshape(5, 144)), -e.sum())
    # the energy depends on the spatial arrangement, not only on the pixel values
    assert not torch.allclose(model.energy(x.transpose(-1, -2)), e)
    with pytest.raises(ValueError, match=r"\(\.\.\., 1, 12, 12\) or flat rows \(\.\.\., 144\)"):
        model.energy(torch.randn(5, 64))
    with pytest.raises(ValueError, match="image_size"):
        ConvEnergy(image_size=(8,))


def test_conv_energy_score_reaches_the_data():
    model = ConvEnergy(8, channels=(4,), hidden=8)
    x = torch.randn(3, 64, requires_grad=True)
    (g,) = torch.autograd.grad(model.energy(x).sum(), x)
    assert g.shape == (3, 64) and bool((g != 0).any())


def test_gaussian_encoder_with_amortized_normal():
    torch.manual_seed(3)
    encoder = GaussianEncoder(6, 3, (8,), min_scale=1e-2)
    v = torch.randn(5, 6)
    loc, scale = encoder(v)
    raw = encoder.net(v)[:, 3:]
    assert torch.equal(scale, torch.nn.functional.softplus(raw) + 1e-2) and bool((scale >= 1e-2).all())
    guide = AmortizedNormal(encoder, site="z")
    trace = poutine.trace(guide).get_trace(v)
    assert trace.nodes["z"]["value"].shape == (5, 3)
    assert torch.allclose(trace.nodes["z"]["fn"].base_dist.loc, loc)
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        encoder(torch.randn(5, 7))
    with pytest.raises(ValueError, match="min_scale"):
        GaussianEncoder(6, 3, min_scale=0)


def test_conditional_encoder_and_decoder_see_the_label():
    torch.manual_seed(4)
    encoder = GaussianEncoder(4, 2, (8,), num_classes=3)
    guide = AmortizedNormal(encoder, site="z", conditional=True)
    v = torch.randn(6, 4)
    y0, y1 = torch.zeros(6, dtype=torch.long), torch.full((6,), 2)
    q0 = guide.conditionals(v, y0)["z"].base_dist.loc
    q1 = guide.conditionals(v, y1)["z"].base_dist.loc
    assert not torch.allclose(q0, q1)
    decoder = GaussianDecoder(MLP(2 + 3, 4, (8,)), 2, output=None, latent_site="z", num_classes=3)
    h = torch.randn(6, 2)
    assert not torch.allclose(decoder.decode(h, y0), decoder.decode(h, y1))
    trace = poutine.trace(decoder).get_trace(v, y1)
    z = trace.nodes["z"]["value"]
    assert torch.allclose(trace.nodes["v"]["fn"].base_dist.loc, decoder.decode(z, y1))
    with pytest.raises(ValueError, match="needs the labels"):
        encoder(v)
    with pytest.raises(TypeError, match="integer tensor"):
        encoder(v, torch.zeros(6))


def _digits_vae(seed):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    decoder = GaussianDecoder(MLP(4, 64, (32,)), 4, scale=0.1)
    return VAE(decoder, AmortizedNormal(GaussianEncoder(64, 4, (32,)), site="h"))


def test_train_vae_raises_the_elbo_on_digits():
    x = datasets.digits("train")[:400]
    vae = _digits_vae(0)
    elbo = pyro.infer.Trace_ELBO(num_particles=8)
    torch.manual_seed(0)
    before = elbo.loss(vae.model, vae.guide, x)
    losses = train_vae(vae, datasets.batches(x, 100, seed=0), num_steps=150,
                       optim=pyro.optim.Adam({"lr": 3e-3}))
    torch.manual_seed(0)
    after = elbo.loss(vae.model, vae.guide, x)
    assert len(losses) == 150
    assert after < 0.5 * before           # the -ELBO falls by more than half from the start
    assert vae.sample(7).shape == (7, 64) and bool(((vae.sample(7) >= 0) & (vae.sample(7) <= 1)).all())


def test_train_vae_loop_hook_and_batch_count():
    vae = _digits_vae(1)
    x = datasets.digits("train")[:50]
    drawn = []

    def counting(stream):
        for b in stream:
            drawn.append(len(b))
            yield b

    seen = {}

    def loop(svi, step, batches):
        seen["optim"] = svi.optim
        return [step(i, b) for i, b in enumerate(batches)]

    losses = train_vae(vae, counting(datasets.batches(x, 10, seed=0)), num_steps=3, loop=loop)
    assert len(losses) == 3 and len(drawn) == 3      # no batch drawn beyond num_steps
    assert isinstance(seen["optim"], pyro.optim.PyroOptim)
    with pytest.raises(ValueError, match="num_steps"):
        train_vae(vae, [], num_steps=-1)
    with pytest.raises(TypeError, match="decode"):
        VAE(MLP(2, 2), vae.encoder)
