# SPDX-License-Identifier: Apache-2.0
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_

from pyro_ebm import datasets, mcmc
from pyro_ebm.guides import AmortizedNormal
from pyro_ebm.infer import BiDVL
from pyro_ebm.models import GaussianDecoder
from pyro_ebm.models.nets import MLP

D64 = torch.float64
D, Z = 3, 2


# -- tiny Pyro callables with closed-form pieces ------------------------------


def quadratic_ebm(v):
    """E(v) = ½ a ‖v − μ‖², a and μ parameters."""
    a = pyro.param("a", torch.tensor(1.0, dtype=v.dtype))
    mu = pyro.param("mu", torch.zeros(v.shape[-1], dtype=v.dtype))
    with pyro.plate("data", len(v)):
        pyro.factor("energy", -0.5 * a * (v - mu).pow(2).sum(-1))


def linear_decoder(v):
    w = pyro.param("w", torch.full((Z, v.shape[-1]), 0.5, dtype=v.dtype))
    with pyro.plate("data", len(v)):
        h = pyro.sample("h", dist.Normal(v.new_zeros(len(v), Z), 1.0).to_event(1))
        pyro.sample("v", dist.Normal(h @ w + 2.0, 0.5).to_event(1), obs=v)


def delta_encoder(v):
    """Deterministic, so the ELBO of a batch is a plain function of the parameters."""
    b = pyro.param("b", torch.full((v.shape[-1], Z), 0.1, dtype=v.dtype))
    with pyro.plate("data", len(v)):
        pyro.sample("h", dist.Delta(v @ b).to_event(1))


def make(energy=quadratic_ebm, decoder=linear_decoder, encoder=delta_encoder, **kwargs):
    args = dict(optim=pyro.optim.SGD({"lr": 0.1}), vae_optim=pyro.optim.SGD({"lr": 0.01}))
    args.update(kwargs)
    return BiDVL(energy, decoder, encoder, **args)


def store(*names):
    s = pyro.get_param_store()
    return {n: s[n].detach().clone() for n in names}


# -- the two levels ---------------------------------------------------------------


def test_upper_step_is_data_minus_sample_energy():
    """One upper step with SGD: θ ← θ − η ∂/∂θ [mean E(v) − mean E(v̂)] on the
    detached draws; for E = ½ a ‖v − μ‖² every partial is closed form."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    v = torch.randn(20, D, dtype=D64)
    eta = 0.1
    bidvl = make(inner_steps=0, optim=pyro.optim.SGD({"lr": eta}))
    bidvl.step(v)  # creates the parameters
    before = store("a", "mu", "w", "b")
    bidvl.step(v)
    out = bidvl.last_losses
    after = store("a", "mu", "w", "b")
    vh = bidvl.last_samples
    a, mu = before["a"], before["mu"]
    sq = lambda x: (x - mu).pow(2).sum(-1)  # noqa: E731
    assert out["upper"] == pytest.approx(float(0.5 * a * (sq(v).mean() - sq(vh).mean())), rel=1e-12)
    grad_a = 0.5 * (sq(v).mean() - sq(vh).mean())
    grad_mu = -a * ((v - mu).mean(0) - (vh - mu).mean(0))
    torch.testing.assert_close(after["a"], a - eta * grad_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(after["mu"], mu - eta * grad_mu, rtol=1e-12, atol=1e-12)
    # the upper level owns the energy only
    for n in ("w", "b"):
        torch.testing.assert_close(after[n], before[n], rtol=0, atol=0)
    # the sign: the data's energy goes down, the samples' goes up
    assert out["energy_data"] < float((0.5 * a * sq(v)).mean()) + 1e-12


def test_encoder_learns_from_the_elbo_only():
    """The latent term ‖μ_φ(v̂) − ĥ‖² has the encoder frozen: with SGD the encoder
    step is exactly −η λ ∇_φ(−ELBO / N), and with λ = 0 the encoder never moves
    while the decoder does. The energy stays put at the lower level."""
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    v = torch.randn(16, D, dtype=D64) + 2.0
    eta, lam = 0.01, 0.7
    bidvl = make(vae_weight=lam, optim=pyro.optim.SGD({"lr": 0.0}),
                 vae_optim=pyro.optim.SGD({"lr": eta}))
    bidvl.step(v)
    before = store("a", "mu", "w", "b")
    b = pyro.get_param_store()["b"]
    loss = Trace_ELBO().differentiable_loss(linear_decoder, delta_encoder, v) / len(v)
    (grad_b,) = torch.autograd.grad(loss, [b.unconstrained()])
    bidvl.step(v)
    after = store("a", "mu", "w", "b")
    torch.testing.assert_close(after["b"], before["b"] - eta * lam * grad_b, rtol=1e-10, atol=1e-12)
    assert (after["w"] - before["w"]).abs().max() > 1e-6
    for n in ("a", "mu"):
        torch.testing.assert_close(after[n], before[n], rtol=0, atol=0)

    bidvl = make(vae_weight=0.0, optim=pyro.optim.SGD({"lr": 0.0}),
                 vae_optim=pyro.optim.SGD({"lr": eta}))
    before = store("w", "b")
    for _ in range(3):
        bidvl.step(v)
        out = bidvl.last_losses
    after = store("w", "b")
    torch.testing.assert_close(after["b"], before["b"], rtol=0, atol=0)
    assert (after["w"] - before["w"]).abs().max() > 1e-6
    assert out["neg_elbo"] == 0.0


class Energy(PyroModule):
    def __init__(self, dim, hidden=(32,)):
        super().__init__()
        self.energy = MLP(dim, 1, hidden)
        to_pyro_module_(self.energy)

    def forward(self, v):
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", -self.energy(v).squeeze(-1))


class Encoder(torch.nn.Module):
    def __init__(self, dim, latent, hidden=(32,)):
        super().__init__()
        self.net = MLP(dim, 2 * latent, hidden)

    def forward(self, v):
        loc, raw = self.net(v).chunk(2, -1)
        return loc, torch.nn.functional.softplus(raw) + 1e-3


def digits_setup(seed, latent=4, energy_lr=1e-3, **kwargs):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    ebm = Energy(64)
    decoder = GaussianDecoder(MLP(latent, 64, (32,)), latent, scale=0.2)
    encoder = AmortizedNormal(Encoder(64, latent), site="h")
    bidvl = BiDVL(ebm, decoder, encoder, pyro.optim.Adam({"lr": energy_lr, "betas": (0.5, 0.999)}),
                  pyro.optim.Adam({"lr": 3e-3}), **kwargs)
    return bidvl


def test_lower_level_loss_decreases_on_a_fixed_energy():
    x = datasets.digits("train")[:512]
    bidvl = digits_setup(0, energy_lr=0.0)
    e0 = {k: p.detach().clone() for k, p in bidvl.energy_model.named_parameters()}
    torch.manual_seed(1)
    first = sum(bidvl.evaluate_losses(x[:256])["lower"] for _ in range(5)) / 5
    for v in datasets.batches(x, 64, epochs=6):
        bidvl.step(v)
    torch.manual_seed(1)
    last = sum(bidvl.evaluate_losses(x[:256])["lower"] for _ in range(5)) / 5
    # the ELBO term dominates: from about 120 per item to well under half of it
    assert last < 0.5 * first, (first, last)
    for k, p in bidvl.energy_model.named_parameters():
        torch.testing.assert_close(p.detach(), e0[k], rtol=0, atol=0)


def test_ood_auroc_against_uniform_noise_after_training():
    x = datasets.digits("train")
    x_test = datasets.digits("test")
    bidvl = digits_setup(2)
    torch.manual_seed(3)
    noise = torch.rand(len(x_test), 64)
    err0 = float(bidvl.reconstruction_error(x_test).mean())
    enc0 = {k: p.detach().clone() for k, p in bidvl.encoder_guide.named_parameters()}
    for v in datasets.batches(x, 100, epochs=6):
        bidvl.step(v)
        out = bidvl.last_losses
    assert all(math.isfinite(val) for val in out.values())
    # every level trains: the encoder (from the ELBO) as well as the decoder and the energy
    for k, p in bidvl.encoder_guide.named_parameters():
        assert (p.detach() - enc0[k]).abs().max() > 1e-4, k
    auc = bidvl.ood_auroc(x_test, noise)
    assert auc > 0.95, auc
    # encode-then-decode improves on the untrained pair
    err = bidvl.reconstruction_error(x_test)
    assert err.shape == (len(x_test),) and float(err.mean()) < 0.7 * err0
    r = bidvl.reconstruct(x_test)
    torch.testing.assert_close(err, (x_test - r).pow(2).sum(-1))
    g = bidvl.generate(50)
    assert g.shape == (50, 64) and not g.requires_grad


def test_generate_with_langevin_matches_ula_closed_form():
    """Decoder means x0 (a constant decoder) refined by K ULA steps on E = ½‖x − μ‖²:
    x_K ~ N(μ + (1−γ)^K (x0 − μ), 2γ (1 − (1−γ)^{2K}) / (1 − (1−γ)²))."""
    pyro.clear_param_store()
    pyro.set_rng_seed(4)
    v = torch.randn(8, D, dtype=D64)
    bidvl = make(optim=pyro.optim.SGD({"lr": 0.0}), vae_optim=pyro.optim.SGD({"lr": 0.0}),
                 decoder_sample="mean")
    bidvl.step(v)
    pyro.get_param_store()["w"].data.zero_()  # decoder mean = 2 for every h
    n, gamma, k = 4000, 0.1, 10
    x = bidvl.generate(n, langevin_steps=k, kernel=mcmc.ULA(gamma))
    x0 = torch.full((D,), 2.0, dtype=D64)
    mean = 0.9**k * x0  # μ = 0, a = 1
    var = 2 * gamma * (1 - 0.9 ** (2 * k)) / (1 - 0.81)
    assert x.shape == (n, D) and x.dtype == D64
    assert torch.allclose(x.mean(0), mean, atol=5 * math.sqrt(var / n))
    assert torch.allclose(x.var(0), torch.full((D,), var, dtype=D64), atol=5 * var * math.sqrt(2 / n))
    torch.testing.assert_close(bidvl.generate(5), x0.expand(5, D))


# -- the unrolled hypergradient ---------------------------------------------------


class SmoothEnergy(PyroModule):
    """E(v) = ½ e^s ‖v − μ‖² + c·tanh(v)ᵀ1, three kinds of parameter."""

    def __init__(self):
        super().__init__()
        self.s = torch.nn.Parameter(torch.tensor(0.2, dtype=D64))
        self.mu = torch.nn.Parameter(torch.tensor([0.3, -0.2], dtype=D64))
        self.c = torch.nn.Parameter(torch.tensor(0.4, dtype=D64))

    def forward(self, v):
        e = 0.5 * self.s.exp() * (v - self.mu).pow(2).sum(-1) + self.c * torch.tanh(v).sum(-1)
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", -e)


def unroll_setup(unroll_steps):
    pyro.clear_param_store()
    torch.manual_seed(0)
    ebm = SmoothEnergy()
    decoder = GaussianDecoder(MLP(1, 2, (4,), activation="tanh").double(), 1, scale=0.3, output=None)
    encoder = AmortizedNormal(Encoder(2, 1, hidden=(4,)).double(), site="h")
    bidvl = BiDVL(ebm, decoder, encoder, pyro.optim.Adam({"lr": 0.05}), pyro.optim.Adam({"lr": 0.05}),
                  inner_steps=2, vae_weight=0.5, unroll_steps=unroll_steps)
    v = torch.randn(12, 2, dtype=D64)
    return ebm, bidvl, v


@pytest.mark.parametrize("unroll_steps", [0, 2])
def test_hypergradient_matches_finite_differences(unroll_steps):
    ebm, bidvl, v = unroll_setup(unroll_steps)
    bidvl.step(v)  # fills the Adam state, so the unrolled steps are not sign-like
    bidvl.step(v)

    def J(seed=11):
        torch.manual_seed(seed)
        return bidvl.hypergradient(v)

    value, grads = J()
    assert set(grads) == {"s", "mu", "c"}
    eps = 1e-6
    for name, p in (("s", ebm.s), ("mu", ebm.mu), ("c", ebm.c)):
        flat = p.detach().view(-1)
        for i in range(flat.numel()):
            with torch.no_grad():
                p.view(-1)[i] += eps
            plus = J()[0]
            with torch.no_grad():
                p.view(-1)[i] -= 2 * eps
            minus = J()[0]
            with torch.no_grad():
                p.view(-1)[i] += eps
            fd = (plus - minus) / (2 * eps)
            got = float(grads[name].reshape(-1)[i])
            assert abs(got - fd) <= 1e-5 * max(abs(fd), 1e-3), (name, i, got, fd)
    if unroll_steps:
        # the path through ψ_N(θ) is not negligible: the partial derivative differs
        bidvl.unroll_steps = 0
        _, partial = J()
        bidvl.unroll_steps = unroll_steps
        diff = max(float((grads[k] - partial[k]).abs().max()) for k in grads)
        assert diff > 1e-3 * max(float(g.abs().max()) for g in partial.values())


def test_unrolled_steps_leave_the_vae_untouched():
    ebm, bidvl, v = unroll_setup(2)
    bidvl.inner_steps = 0
    before = {k: p.detach().clone() for k, p in bidvl.decoder_model.named_parameters()}
    before.update({k: p.detach().clone() for k, p in bidvl.encoder_guide.named_parameters()})
    s0 = ebm.s.detach().clone()
    bidvl.step(v)
    for module in (bidvl.decoder_model, bidvl.encoder_guide):
        for k, p in module.named_parameters():
            torch.testing.assert_close(p.detach(), before[k], rtol=0, atol=0)
    assert float((ebm.s.detach() - s0).abs()) > 0


# -- clear errors -----------------------------------------------------------------


def test_bad_data_gets_clear_errors():
    pyro.clear_param_store()
    v = torch.randn(8, D, dtype=D64)
    bidvl = make()
    bad = v.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"data \(step 1\) contains 1 non-finite .*NaN at index \(3, 1\)"):
        bidvl.step(bad)
    bidvl.step(v)
    bad[3, 1] = float("inf")  # also after the first (validated) call
    with pytest.raises(ValueError, match="Inf"):
        bidvl.step(bad)
    with pytest.raises(ValueError, match="no batch dimension"):
        bidvl.step(v[0])


def test_decoder_output_shape_mismatch():
    """The decoder makes 64-pixel images, the data has 32 entries per item."""
    pyro.clear_param_store()
    x = torch.rand(10, 32)
    bidvl = digits_setup(0)
    with pytest.raises(ValueError, match=r"site 'v' produces a batch of shape \(10, 64\).*\(10, 32\)"):
        bidvl.step(x)


def test_bad_models_and_arguments_get_clear_errors():
    pyro.clear_param_store()
    v = torch.randn(8, D, dtype=D64)

    def latent_ebm(v):
        with pyro.plate("data", len(v)):
            h = pyro.sample("z", dist.Normal(v.new_zeros(len(v)), 1.0))
            pyro.factor("energy", -(v.sum(-1) - h).pow(2))

    with pytest.raises(ValueError, match=r"latent site\(s\) \['z'\]"):
        make(energy=latent_ebm).step(v)

    def wrong_guide(v):
        with pyro.plate("data", len(v)):
            pyro.sample("g", dist.Normal(v.new_zeros(len(v), Z), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"missing the model's latent site\(s\) \['h'\]"):
        make(encoder=wrong_guide).step(v)

    def bernoulli_decoder(v):
        with pyro.plate("data", len(v)):
            h = pyro.sample("h", dist.Normal(v.new_zeros(len(v), Z), 1.0).to_event(1))
            w = pyro.param("w", torch.full((Z, v.shape[-1]), 0.5, dtype=v.dtype))
            pyro.sample("v", dist.Bernoulli(logits=h @ w).to_event(1), obs=v)

    with pytest.raises(ValueError, match="without rsample.*decoder_sample='mean'"):
        make(decoder=bernoulli_decoder).step(v)
    cases = ((dict(inner_steps=-1), "inner_steps"), (dict(vae_weight=-1.0), "vae_weight"),
             (dict(vae_weight=float("nan")), "vae_weight"), (dict(latent_loss="l1"), "latent_loss"),
             (dict(decoder_sample="mode"), "decoder_sample"), (dict(num_samples=0), "num_samples"),
             (dict(unroll_steps=2), "nn.Module"), (dict(optim=torch.optim.SGD), "pyro.optim"))
    for kwargs, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            make(**kwargs)
    bidvl = make()
    with pytest.raises(ValueError, match="call step"):
        bidvl.generate(4)
    bidvl.step(v)
    with pytest.raises(ValueError, match="needs a kernel"):
        bidvl.generate(4, langevin_steps=3)


def test_unroll_needs_adam():
    pyro.clear_param_store()
    ebm, bidvl, v = unroll_setup(0)
    with pytest.raises(ValueError, match="replay Adam"):
        BiDVL(ebm, bidvl.decoder_model, bidvl.encoder_guide, pyro.optim.Adam({"lr": 0.1}),
              pyro.optim.SGD({"lr": 0.1}), unroll_steps=1)


def test_divergence_names_the_step():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    v = torch.randn(8, D, dtype=D64)
    bidvl = make()
    bidvl.step(v)
    bidvl.step(v)
    pyro.get_param_store()["a"].data.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"BiDVL diverged at step 3: the lower-level \(step 1\) loss is nan"):
        bidvl.step(v)


def test_example_script_with_tiny_sizes(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "bidvl.py"
    spec = importlib.util.spec_from_file_location("bidvl_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "samples.png"
    results = example.main(["--iterations", "40", "--hidden", "32", "--latent", "4", "--batch", "64",
                            "--energy-lr", "1e-3", "--langevin-steps", "2", "--out", str(out)])
    assert out.stat().st_size > 1000
    assert results["AUROC -E vs uniform noise"] > 0.9
    assert 0 < results["reconstruction error"] < 20
