# SPDX-License-Identifier: Apache-2.0
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

from pyro_ebm.energy import functional, trainable_parameters
from pyro_ebm.guides import AmortizedBernoulli, AmortizedNormal
from pyro_ebm.infer import DSM, MDSM, SSM, BiSM
from pyro_ebm.infer.trainer import make_optimizer
from pyro_ebm.infer.unroll import UnrolledAdam
from pyro_ebm.models import GaussianRBM

D64 = torch.float64


class GaussianLatentModel(PyroModule):
    """h ~ N(0, 1), p̃(v | h) = exp(-prec/2 (v - a h)^2): 1-D visible, 1-D latent.
    Marginal v ~ N(0, a^2 + 1/prec); posterior h | v Gaussian."""

    def __init__(self, a=0.8, log_prec=0.3):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=D64))
        self.log_prec = torch.nn.Parameter(torch.tensor(log_prec, dtype=D64))

    def forward(self, v):
        with pyro.plate("data", v.shape[0]):
            h = pyro.sample("h", dist.Normal(v.new_zeros(1), 1.0).to_event(1))
            pyro.factor("energy", -0.5 * self.log_prec.exp() * (v - self.a * h).pow(2).sum(-1))


class LinearGaussianEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(1, 2)

    def forward(self, v):
        loc, raw = self.net(v).chunk(2, -1)
        return loc, torch.nn.functional.softplus(raw) + 1e-3


def tiny_setup(seed=0):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    model = GaussianLatentModel()
    guide = AmortizedNormal(LinearGaussianEncoder().double(), site="h")
    v = torch.randn(16, 1, dtype=D64) * 1.3
    return model, guide, v


@pytest.mark.parametrize(
    "unroll_steps, objective, lower",
    [(0, DSM(0.5), "kl"), (1, SSM(), "fisher"), (3, DSM(0.5), "kl"), (3, MDSM(0.3, 1.0, 0.5), "fisher")],
)
def test_hypergradient_matches_finite_differences(unroll_steps, objective, lower):
    model, guide, v = tiny_setup()
    bism = BiSM(model, guide, pyro.optim.Adam({"lr": 0.05, "betas": (0.9, 0.95)}), objective=objective,
                inner_steps=2, unroll_steps=unroll_steps, lower=lower, num_particles=2)
    bism.step(v)  # moves both levels and fills the guide's Adam state
    bism.step(v)

    def J(seed=7):
        torch.manual_seed(seed)
        return bism.hypergradient(v)

    value, grads = J()
    assert set(grads) == {"a", "log_prec"}
    eps = 1e-6
    for name, p in (("a", model.a), ("log_prec", model.log_prec)):
        with torch.no_grad():
            p += eps
        plus = J()[0]
        with torch.no_grad():
            p -= 2 * eps
        minus = J()[0]
        with torch.no_grad():
            p += eps
        fd = (plus - minus) / (2 * eps)
        assert abs(float(grads[name]) - fd) <= 1e-4 * abs(fd), (name, float(grads[name]), fd)


class UserGuide(torch.nn.Module):
    """A user-written guide: an nn.Module that registers itself with pyro.module and
    has no ``conditionals`` method, so it runs through Pyro (with fast weights when
    unrolled)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(1, 2).double()

    def forward(self, v):
        pyro.module("user_guide", self)
        loc, raw = self.net(v).chunk(2, -1)
        with pyro.plate("data", v.shape[0]):
            pyro.sample("h", dist.Normal(loc, torch.nn.functional.softplus(raw) + 1e-3).to_event(1))


def test_hypergradient_of_a_user_written_module_guide():
    model, _, v = tiny_setup()
    guide = UserGuide()
    bism = BiSM(model, guide, pyro.optim.Adam({"lr": 0.05}), objective=DSM(0.5), inner_steps=2,
                unroll_steps=2, num_particles=3)
    assert not bism.guide_view.direct
    before = {k: p.detach().clone() for k, p in guide.named_parameters()}
    bism.step(v)
    assert all((p.detach() - before[k]).abs().max() > 0 for k, p in guide.named_parameters())
    torch.manual_seed(5)
    _, grads = bism.hypergradient(v)
    eps = 1e-6
    with torch.no_grad():
        model.a += eps
    torch.manual_seed(5)
    plus = bism.hypergradient(v)[0]
    with torch.no_grad():
        model.a -= 2 * eps
    torch.manual_seed(5)
    minus = bism.hypergradient(v)[0]
    fd = (plus - minus) / (2 * eps)
    assert abs(float(grads["a"]) - fd) <= 1e-4 * abs(fd), (float(grads["a"]), fd)


def test_unrolled_hypergradient_differs_from_partial_derivative():
    """With N > 0 the path through φ_N(θ) contributes: dJ/dθ ≠ ∂J/∂θ."""
    model, guide, v = tiny_setup()
    optim = pyro.optim.Adam({"lr": 0.05})
    bism = BiSM(model, guide, optim, objective=DSM(0.5), inner_steps=2, unroll_steps=3)
    bism.step(v)
    torch.manual_seed(3)
    _, total = bism.hypergradient(v)
    bism.unroll_steps = 0
    torch.manual_seed(3)
    _, partial = bism.hypergradient(v)
    # not the same noise path for N = 0, so compare against the scale of the gradient
    diff = abs(float(total["a"] - partial["a"]))
    assert diff > 1e-3 * abs(float(partial["a"]))


def test_score_is_exact_marginal_score_for_exact_posterior_guide():
    """s(v; h) = ∇v log p̃(v, h) − ∇v log q(h|v) equals ∇v log p(v) for every h when q
    is the exact posterior (it pins the sign of the −∇v log q term)."""
    model, guide, v = tiny_setup()
    a, prec = model.a.item(), math.exp(model.log_prec.item())
    post_prec = 1 + a * a * prec
    with torch.no_grad():
        lin = guide.encoder.net
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[0, 0] = a * prec / post_prec  # posterior mean m v
        scale = 1 / math.sqrt(post_prec)
        lin.bias[1] = math.log(math.expm1(scale - 1e-3))  # softplus(raw) + 1e-3 = scale
    bism = BiSM(model, guide, pyro.optim.Adam({"lr": 0.01}), unroll_steps=0, num_particles=3)
    score = bism.score(v)
    exact = -v / (a * a + 1 / prec)
    torch.testing.assert_close(score, exact, rtol=1e-10, atol=1e-10)


def test_unrolled_adam_matches_torch_adam():
    """One UnrolledAdam step from a real optimizer's state equals torch's next Adam
    step, for the one optimizer a trainer's level builds from a pyro.optim Adam /
    AdamW (fused) and for a plain single-tensor torch Adam."""
    for args in ({"lr": 0.1, "betas": (0.8, 0.9)}, {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True}):
        for optim_cls in (pyro.optim.Adam, pyro.optim.AdamW, None):
            pyro.clear_param_store()
            torch.manual_seed(0)
            net = torch.nn.Linear(3, 2).double()
            x = torch.randn(5, 3, dtype=D64)
            params = trainable_parameters(net)
            if optim_cls is None:
                optimizer = torch.optim.Adam(list(params.values()), foreach=False, **args)
            else:
                optimizer = make_optimizer(optim_cls(dict(args)), list(params.values()), list(params))
                assert optimizer.defaults["fused"]

            def loss_of(fn, step, x=x):
                return (fn(x) - step).pow(2).sum() + fn(x).sin().sum()

            def real_step(step, optimizer=optimizer, net=net, params=params):
                grads = torch.autograd.grad(loss_of(net, step), list(params.values()))
                for p, g in zip(params.values(), grads, strict=True):
                    p.grad = g
                optimizer.step()

            for step in range(3):
                real_step(step)
            unrolled = UnrolledAdam(optimizer, params)
            new = unrolled.step(loss_of(functional(net, params), 3), dict(params))
            real_step(3)
            for name, p in params.items():
                torch.testing.assert_close(new[name], p.detach(), rtol=1e-12, atol=1e-12)


def grbm_setup(seed=0, hidden=4):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    grbm = GaussianRBM(2, hidden)
    guide = AmortizedBernoulli(2, hidden, site="h", temperature=0.1)
    return grbm, guide


def test_levels_own_their_parameters():
    grbm, guide = grbm_setup()
    v = torch.randn(32, 2)
    guide_before = {k: p.detach().clone() for k, p in guide.named_parameters()}
    model_before = {k: p.detach().clone() for k, p in grbm.named_parameters()}
    # no real lower steps: the unrolled steps must not write into the guide
    bism = BiSM(grbm, guide, pyro.optim.Adam({"lr": 1e-2}), objective=DSM(0.1), inner_steps=0, unroll_steps=2)
    bism.step(v)
    for k, p in guide.named_parameters():
        torch.testing.assert_close(p.detach(), guide_before[k], rtol=0, atol=0)
    assert any((p.detach() - model_before[k]).abs().max() > 0 for k, p in grbm.named_parameters())
    # a frozen model optimizer: only the lower level moves anything
    model_before = {k: p.detach().clone() for k, p in grbm.named_parameters()}
    bism = BiSM(grbm, guide, pyro.optim.Adam({"lr": 0.0}), objective=DSM(0.1), inner_steps=2, unroll_steps=1,
                guide_optim=pyro.optim.Adam({"lr": 1e-2}))
    bism.step(v)
    for k, p in grbm.named_parameters():
        torch.testing.assert_close(p.detach(), model_before[k], rtol=0, atol=0)
    assert any((p.detach() - guide_before[k]).abs().max() > 0 for k, p in guide.named_parameters())


def test_bidsm_trains_a_grbm():
    """BiDSM (K 5, N 2) raises the exact test log-likelihood of a GaussianRBM on data
    from another GaussianRBM."""
    pyro.clear_param_store()
    torch.manual_seed(1)
    teacher = GaussianRBM(2, 3, init_scale=1.5, name="teacher")
    with torch.no_grad():
        teacher.log_std.fill_(math.log(0.5))
    data = teacher.sample(1200, num_steps=50)
    train, test = data[:1000], data[1000:]
    grbm, guide = grbm_setup(seed=2)
    with torch.no_grad():
        before = float(grbm.log_likelihood(test).mean())
    bism = BiSM(grbm, guide, pyro.optim.Adam({"lr": 3e-2, "betas": (0.9, 0.95)}), objective=DSM(0.1),
                inner_steps=5, unroll_steps=2)
    for i in range(120):
        bism.step(train[(i % 10) * 100:(i % 10 + 1) * 100])
    with torch.no_grad():
        after = float(grbm.log_likelihood(test).mean())
    assert math.isfinite(bism.last_losses["lower"]) and set(bism.last_losses) == {"upper", "lower"}
    assert after > before + 0.3, (before, after)


def test_function_guide_with_pyro_params_works_without_unrolling():
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = GaussianLatentModel()
    v = torch.randn(16, 1, dtype=D64)

    def guide(v):
        w = pyro.param("w", torch.tensor(0.1, dtype=D64))
        s = pyro.param("s", torch.tensor(1.0, dtype=D64), constraint=dist.constraints.positive)
        with pyro.plate("data", v.shape[0]):
            pyro.sample("h", dist.Normal(w * v, s).to_event(1))

    bism = BiSM(model, guide, pyro.optim.Adam({"lr": 0.05}), objective=SSM(), inner_steps=3, unroll_steps=0)
    a_before = model.a.item()
    loss = bism.step(v)
    assert math.isfinite(loss) and pyro.param("w").item() != 0.1 and model.a.item() != a_before
    assert math.isfinite(bism.evaluate_loss(v))
    with pytest.raises(ValueError, match="nn.Module"):
        BiSM(model, guide, pyro.optim.Adam({"lr": 0.05}), unroll_steps=1)


def test_clear_errors():
    grbm, guide = grbm_setup()
    v = torch.randn(8, 2)
    optim = pyro.optim.Adam({"lr": 1e-2})

    def discrete_guide(v):
        with pyro.plate("data", v.shape[0]):
            pyro.sample("h", dist.Bernoulli(0.5 * torch.ones(v.shape[0], 4)).to_event(1))

    with pytest.raises(ValueError, match="'h'.*discrete"):
        BiSM(grbm, discrete_guide, optim, unroll_steps=0).step(v)

    def wrong_guide(v):
        with pyro.plate("data", v.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(v.shape[0], 4), 1.0).to_event(1))

    with pytest.raises(ValueError, match="missing the model's latent site"):
        BiSM(grbm, wrong_guide, optim, unroll_steps=0).step(v)
    with pytest.raises(ValueError, match="lower='fisher'.*'h'"):
        BiSM(grbm, guide, optim, lower="fisher").step(v)
    with pytest.raises(ValueError, match="Adam"):
        BiSM(grbm, guide, optim, guide_optim=pyro.optim.SGD({"lr": 0.1}), unroll_steps=2)
    with pytest.raises(ValueError, match="lower must be"):
        BiSM(grbm, guide, optim, lower="elbo")
    with pytest.raises(ValueError, match="unroll_steps"):
        BiSM(grbm, guide, optim, unroll_steps=-1)
    bad = v.clone()
    bad[3, 1] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        BiSM(grbm, guide, optim).step(bad)
    bism = BiSM(grbm, guide, optim, objective=DSM(0.1), inner_steps=1, unroll_steps=1)
    bism.step(v)
    with torch.no_grad():
        grbm.W.fill_(math.nan)
    with pytest.raises(ValueError, match="diverged at step 2"):
        bism.step(v)


class NormalEncoder(torch.nn.Module):
    def __init__(self, visible, hidden):
        super().__init__()
        self.net = torch.nn.Linear(visible, 2 * hidden)

    def forward(self, v):
        loc, raw = self.net(v).chunk(2, -1)
        return loc, torch.nn.functional.softplus(raw) + 1e-3


@pytest.mark.parametrize("algorithm", ["BiSM", "VaGES"])
def test_binary_latent_with_a_gaussian_guide_is_refused(algorithm):
    """A GaussianRBM's h ~ Bernoulli drawn by a Normal guide was accepted silently;
    the error names the site and both supports. The relaxed Bernoulli is fine."""
    from pyro_ebm.infer import VaGES

    grbm = GaussianRBM(2, 4)
    v = torch.randn(16, 2)
    optim = pyro.optim.Adam({"lr": 1e-3})
    def make(guide):
        if algorithm == "BiSM":
            return BiSM(grbm, guide, optim, objective=DSM(0.1), inner_steps=1, unroll_steps=0)
        return VaGES(grbm, guide, optim, inner_steps=1)

    expected = (r"latent site 'h' is discrete \(Bernoulli, support Boolean\(\)\), but the guide draws it "
                r"from a continuous Normal \(support Real\(\)\)")
    with pytest.raises(ValueError, match=expected):
        make(AmortizedNormal(NormalEncoder(2, 4), site="h")).step(v)
    assert math.isfinite(make(AmortizedBernoulli(2, 4, site="h")).step(v))
