# SPDX-License-Identifier: Apache-2.0
"""EnergyView.pure: the traced log density as a function of explicit parameters,
checked against the view itself under torch.func."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from test_traced import CASES, TOL, _assert_equal, _case

from pyro_ebm.energy import EnergyView, NotTraced, energy_view


@pytest.fixture(autouse=True)
def _tracing_on(monkeypatch):
    monkeypatch.delenv("PYRO_EBM_TRACE", raising=False)


@pytest.mark.parametrize("name", CASES)
def test_pure_equals_the_view_with_torch_func(name):
    """Value, a torch.func score in the data or latents, and torch.func gradients of a
    score-matching loss in the parameters equal the view's autograd values (float64)."""
    dtype = torch.float64
    model, args, values, per_item = _case(name, dtype)
    view = EnergyView(model, traced=True)
    pure = view.pure(*args, values=values, per_item=per_item)
    params = [p.detach() for p in pure.parameters()]
    tol = TOL[dtype]
    expected = view.log_density(*args, values=values, per_item=per_item)
    _assert_equal(pure(params, *args, values=values), expected, tol, "value")
    floats = [i for i, a in enumerate(args) if torch.is_tensor(a) and a.is_floating_point()]
    if floats:
        i = floats[0]

        def logp_at(x, ps):
            a = list(args)
            a[i] = x
            return pure(ps, *a, values=values).sum()
        where = args[i]
    elif values:
        key = next(iter(values))

        def logp_at(x, ps):
            return pure(ps, *args, values={**values, key: x}).sum()
        where = values[key]
    else:
        return
    x = where.detach().requires_grad_()
    if floats:
        a = list(args)
        a[floats[0]] = x
        ref_lp = view.log_density(*a, values=values, per_item=per_item).sum()
    else:
        ref_lp = view.log_density(*args, values={**values, key: x}, per_item=per_item).sum()
    (ref_score,) = torch.autograd.grad(ref_lp, x, create_graph=True)
    score = torch.func.grad(logp_at)(where.detach(), params)
    _assert_equal(score, ref_score, tol, "score")
    trainable = [j for j, p in enumerate(pure.parameters()) if p.requires_grad]
    if not trainable:
        return
    live = pure.parameters()
    ref = torch.autograd.grad(0.5 * ref_score.pow(2).sum(), [live[j] for j in trainable], allow_unused=True)

    def loss(sub):
        ps = list(params)
        for j, t in zip(trainable, sub, strict=True):
            ps[j] = t
        return 0.5 * torch.func.grad(logp_at)(where.detach(), ps).pow(2).sum()

    got = torch.func.grad(loss)([params[j] for j in trainable])
    for g, r in zip(got, ref, strict=True):
        _assert_equal(g, r, tol, "second derivative in the parameters")


def test_pure_reads_the_parameters_passed_in():
    """The function reads the parameters it is given, not the module's."""
    from pyro_ebm.models import GaussianRBM

    grbm = GaussianRBM(3, 2).double()
    v = torch.randn(4, 3, dtype=torch.float64)
    pure = energy_view(grbm.marginal).pure(v, per_item=True)
    params = [p.detach().clone() for p in pure.parameters()]
    before = pure(params, v)
    params = [p * 0 for p in params]  # W = 0, biases 0, log-std 0: log p̃ = -‖v‖²/2 + H log 2
    torch.testing.assert_close(pure(params, v), -0.5 * v.pow(2).sum(-1) + 2 * torch.log(torch.tensor(2.0,
                               dtype=torch.float64)))
    assert not torch.allclose(before, pure(params, v))


def test_pure_of_an_untraceable_model_raises_not_traced():
    def model(v):
        with pyro.plate("data", v.shape[0]):
            e = v.pow(2).sum(-1)
            if e.sum() > 0:  # control flow on a value
                pyro.factor("energy", -e)

    view = EnergyView(model, traced=True)
    with pytest.raises(NotTraced, match="reads a tensor's value"):
        view.pure(torch.randn(3, 2))
    with pytest.raises(NotTraced, match="traced=False"):
        EnergyView(model, traced=False).pure(torch.randn(3, 2))


def test_pure_of_a_one_draw_model_is_vmapped_over_chains():
    x = torch.randn(20, 3, dtype=torch.float64)
    y = torch.bernoulli(torch.full((20,), 0.5, dtype=torch.float64))

    def regression(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)

    view = EnergyView(regression, traced=True)
    w = torch.randn(5, 3, dtype=torch.float64)
    pure = view.pure(x, y, values={"w": w}, num_chains=5)
    assert pure.vmapped
    torch.testing.assert_close(pure(pure.parameters(), x, y, values={"w": w}),
                               view.log_density(x, y, values={"w": w}, num_chains=5))


def test_pure_checks_its_arguments():
    from pyro_ebm.models import GaussianRBM

    grbm = GaussianRBM(3, 2)
    v = torch.randn(4, 3)
    pure = energy_view(grbm).pure(v, values={"h": torch.ones(4, 2)})
    with pytest.raises(ValueError, match=r"latent site\(s\) \['h'\]"):
        pure(pure.parameters(), v)
    with pytest.raises(ValueError, match="1 tensor argument"):
        pure(pure.parameters(), v, v, values={"h": torch.ones(4, 2)})
