# SPDX-License-Identifier: Apache-2.0
"""The traced path of the energy view (pyro_ebm/_traced.py): the same numbers as the
Pyro path on every model of the package, its tests, examples and experiments; the
fallback; re-tracing; parameters read live; chains of a model written for one draw."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_

from pyro_ebm import mcmc
from pyro_ebm.energy import EnergyView, GuideView, energy_view
from pyro_ebm.energy import traced as _traced
from pyro_ebm.guides import AmortizedNormal
from pyro_ebm.infer import DSM
from pyro_ebm.models import GEBM, ConvEnergy, DeepEBLVM, GaussianRBM, MLPEnergy
from pyro_ebm.models.nets import MLP, RealNVP

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def _tracing_on_by_default(monkeypatch):
    monkeypatch.delenv("PYRO_EBM_TRACE", raising=False)


# -- the models ------------------------------------------------------------------------------
# Each case builds (model, args, values, per_item) in a dtype; the toy models repeat
# those of tests/ and examples/ (named where they come from).


class ReadmeEBLVM(PyroModule):  # README.md
    def __init__(self, visible=2, hidden=3):
        super().__init__()
        self.W = torch.nn.Parameter(0.5 * torch.randn(visible, hidden))

    def forward(self, v):
        with pyro.plate("data", len(v)):
            h = pyro.sample("h", dist.Normal(v.new_zeros(len(v), self.W.shape[1]), 1.0).to_event(1))
            pyro.factor("energy", -(0.5 * (v ** 2).sum(-1) - (v * torch.tanh(h @ self.W.T)).sum(-1)))


class BiDVLEnergy(PyroModule):  # a hand-written PyroModule MLP energy (the pattern users write)
    def __init__(self, dim=3, hidden=8):
        super().__init__()
        self.energy = MLP(dim, 1, (hidden, hidden))
        to_pyro_module_(self.energy)

    def forward(self, v):
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", -self.energy(v).squeeze(-1))


class GaussianLatentModel(PyroModule):  # tests/infer/test_bism.py
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.8))
        self.log_prec = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, v):
        with pyro.plate("data", v.shape[0]):
            h = pyro.sample("h", dist.Normal(v.new_zeros(1), 1.0).to_event(1))
            pyro.factor("energy", -0.5 * self.log_prec.exp() * (v - self.a * h).pow(2).sum(-1))


class PlainModuleModel(torch.nn.Module):
    """A plain nn.Module (not a PyroModule) with an nn.Module child and a buffer."""

    def __init__(self, dim=3):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.register_buffer("center", torch.linspace(-1, 1, dim))

    def forward(self, v):
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", -self.net(v).squeeze(-1) - 0.5 * (v - self.center).pow(2).sum(-1))


class PyroModuleWithPlainChild(PyroModule):
    """A PyroModule whose network is a plain nn.Module child (not converted), and a
    PyroParam with a constraint."""

    def __init__(self, dim=3):
        super().__init__()
        self.net = torch.nn.Linear(dim, dim)
        self.scale = pyro.nn.PyroParam(torch.ones(dim), constraint=dist.constraints.positive)

    def forward(self, v):
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", -0.5 * (self.net(v) / self.scale).pow(2).sum(-1))


def gaussian_latent_model(v, a=0.7):  # tests/test_energy.py
    with pyro.plate("data", v.shape[0]):
        h = pyro.sample("h", dist.Normal(torch.zeros_like(v), 1.0).to_event(1))
        pyro.factor("energy", -0.5 * ((v - a * h) ** 2).sum(-1))


def param_model(v):  # tests/infer/test_score_matching.py, with a constrained param added
    mu = pyro.param("mu", torch.full((), 0.3, dtype=v.dtype))
    log_s = pyro.param("log_s", torch.full((), 0.2, dtype=v.dtype))
    tau = pyro.param("tau", torch.full((v.shape[1],), 1.5, dtype=v.dtype),
                     constraint=dist.constraints.positive)
    with pyro.plate("data", v.shape[0]):
        pyro.factor("energy", -0.5 * (tau * (v - mu) ** 2).sum(-1) * torch.exp(-2 * log_s))


def closure_cases(dtype):
    """Models that reach their networks or tensors through a closure."""
    net = torch.nn.Linear(3, 1).to(dtype)

    def module_model(v):  # tests/mcmc/test_amortized.py, examples/mcmc_teaching.py: pyro.module
        pyro.module("net", net)
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", -(net(v).squeeze(-1) + 0.5 * v.pow(2).sum(-1)))

    weight = torch.tensor([[1.5, -0.5], [0.3, 1.2], [-1.0, 0.8]], dtype=dtype)
    bias = torch.tensor([0.1, -0.2, 0.0], dtype=dtype)

    def latent_chains_model(v):  # examples/latent_chains.py
        with pyro.plate("data", len(v)):
            h = pyro.sample("h", dist.Normal(torch.zeros(2, dtype=v.dtype), 1.0).to_event(1))
            g = torch.tanh(h @ weight.T) + bias
            pyro.factor("energy", -(v - g).pow(2).sum(-1) / (2 * 0.3 ** 2))

    return module_model, latent_chains_model


def regression(features, y):  # tests/mcmc/test_mcmc_sample.py: observed sites, a global latent
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=features.dtype), 1.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal((w * features).sum(-1), 0.5), obs=y)


def constrained_model(dtype):
    def constrained():  # tests/mcmc/test_mcmc_sample.py: no data, constrained supports
        pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=dtype), 0.5))
        pyro.sample("h", dist.HalfNormal(torch.ones(3, dtype=dtype)).to_event(1))

    return constrained


def _case(name, dtype):
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    v = randn(6, 3)
    if name == "grbm":
        grbm = GaussianRBM(3, 4).to(dtype)
        return grbm, (v,), {"h": torch.bernoulli(torch.full((6, 4), 0.5, dtype=dtype), generator=g)}, True
    if name == "grbm.marginal":
        return GaussianRBM(3, 4).to(dtype).marginal, (v,), {}, True
    if name == "gebm":
        return GEBM(MLP(2, 2, (8,)), MLP(2, 1, (8,)), latent_dim=2).to(dtype), (5,), {"z": randn(5, 2)}, False
    if name == "gebm-realnvp":
        gebm = GEBM(RealNVP(2, 2, (8,)), MLP(2, 1, (8,)), latent_dim=2).to(dtype)
        return gebm, (4,), {"z": randn(4, 2)}, False
    if name == "deep-eblvm":
        return DeepEBLVM(3, 2, hidden=8).to(dtype), (v,), {"h": randn(6, 2)}, True
    if name == "readme-eblvm":
        return ReadmeEBLVM(3, 2).to(dtype), (v,), {"h": randn(6, 2)}, True
    if name == "bidvl-example-energy":
        return BiDVLEnergy().to(dtype), (v,), {}, True
    if name == "mlp-energy":
        return MLPEnergy(3, (8, 8)).to(dtype), (v,), {}, True
    if name == "mlp-energy-base":
        return MLPEnergy(2, (8, 8), base_scale=3.0).to(dtype), (randn(6, 2),), {}, True
    if name == "mlp-energy-conditional":
        model = MLPEnergy(64, (8, 8), num_classes=2, base_loc=0.5, base_scale=1.0).to(dtype)
        x = torch.rand(6, 64, generator=g, dtype=dtype)
        return model, (x, torch.tensor([0, 1, 1, 0, 1, 0])), {}, True
    if name == "conv-energy":
        return ConvEnergy(4, channels=(2, 3), hidden=5, base_scale=2.0).to(dtype), (randn(6, 16),), {}, True
    if name == "bism-test-model":
        return GaussianLatentModel().to(dtype), (randn(6, 1),), {"h": randn(6, 1)}, True
    if name == "plain-module":
        return PlainModuleModel().to(dtype), (v,), {}, True
    if name == "pyromodule-plain-child":
        return PyroModuleWithPlainChild().to(dtype), (v,), {}, True
    if name == "gaussian-latent":
        return gaussian_latent_model, (v,), {"h": randn(6, 3)}, True
    if name == "pyro.param":
        return param_model, (v,), {}, True
    if name == "pyro.module-closure":
        return closure_cases(dtype)[0], (v,), {}, True
    if name == "latent-chains-example":
        return closure_cases(dtype)[1], (v,), {"h": randn(6, 2)}, True
    if name == "regression":
        return regression, (randn(6, 2), randn(6)), {"w": randn(2)}, False
    if name == "constrained":
        return constrained_model(dtype), (), {"scale": randn(()).exp(), "h": randn(3).abs()}, False
    raise KeyError(name)


CASES = ["grbm", "grbm.marginal", "gebm", "gebm-realnvp", "deep-eblvm", "readme-eblvm",
         "bidvl-example-energy", "mlp-energy", "mlp-energy-base", "mlp-energy-conditional", "conv-energy",
         "bism-test-model",
         "plain-module", "pyromodule-plain-child", "gaussian-latent", "pyro.param", "pyro.module-closure",
         "latent-chains-example", "regression", "constrained"]


def _parameters(model):
    """The trainable tensors a model reads: its module's parameters and the
    (unconstrained) param-store parameters."""
    found = {}
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
    if isinstance(module, torch.nn.Module):
        found.update({id(p): p for p in module.parameters()})
    found.update({id(p): p for _, p in pyro.get_param_store().named_parameters()})
    return list(found.values())


def _assert_equal(a, b, tol, what):
    if a is None or b is None:
        assert (a is None or not a.any()) and (b is None or not b.any()), what
        return
    scale = max(1.0, float(b.detach().abs().max()))
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def _grads(out, wrt, create_graph=False):
    return torch.autograd.grad(out, wrt, allow_unused=True, create_graph=create_graph)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", CASES)
def test_traced_equals_pyro_path(name, dtype):
    """Values, gradients in data, latents and parameters, and the score-matching double
    backward (∇_θ of a function of ∇_v log p̃) equal the Pyro path's, on the traced path."""
    model, args, values, per_item = _case(name, dtype)
    tol = TOL[dtype]
    traced, plain = EnergyView(model, traced=True), EnergyView(model, traced=False)
    args = tuple(a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a
                 for a in args)
    values = {k: x.detach().requires_grad_() for k, x in values.items()}
    path = traced.path(*args, values=values, per_item=per_item)  # traces now
    assert path == "traced", path.reason
    a = traced.log_density(*args, values=values, per_item=per_item)
    b = plain.log_density(*args, values=values, per_item=per_item)
    assert plain.path(*args, values=values, per_item=per_item) == "pyro"
    _assert_equal(a, b, tol, "value")
    data = [x for x in args if torch.is_tensor(x) and x.requires_grad]
    params = _parameters(model)
    assert params or name in ("gaussian-latent", "latent-chains-example", "regression", "constrained")
    wrt = data + list(values.values()) + params
    weight = torch.linspace(0.5, 1.5, a.numel(), dtype=dtype).reshape(a.shape)
    names = ["data"] * len(data) + [f"latent {k}" for k in values] + ["parameter"] * len(params)
    for x, y, what in zip(_grads((a * weight).sum(), wrt, True), _grads((b * weight).sum(), wrt, True), names,
                          strict=True):
        _assert_equal(x, y, tol, f"gradient in {what}")
    # second derivatives: J = ½‖s‖² + sᵀu with s = ∇ log p̃ in the data (or the latents)
    inner = data[:1] or list(values.values())[:1]
    outer = params + list(values.values())
    if not inner or not outer:
        return
    second = []
    for out in (a, b):
        (s,) = _grads(out.sum(), inner, create_graph=True)
        u = torch.linspace(-1.0, 1.0, s.numel(), dtype=dtype).reshape(s.shape)
        second.append(_grads(0.5 * s.pow(2).sum() + (s * u).sum(), outer))
    for x, y in zip(*second, strict=True):
        _assert_equal(x, y, tol, "second derivative")


def test_chains_through_a_chain_plate_equal_pyro_path():
    """With num_chains the traced function of the chain-plate run gives the Pyro
    path's values and gradients (the layout BiSM's particles use)."""
    grbm = GaussianRBM(3, 4).double()
    v = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    h = torch.bernoulli(torch.full((7, 5, 4), 0.5, dtype=torch.float64))
    traced, plain = EnergyView(grbm, traced=True), EnergyView(grbm, traced=False)
    path = traced.path(v, values={"h": h}, num_chains=7, per_item=True)
    assert path == "traced" and path.chains == "plate"
    a = traced.log_density(v, values={"h": h}, num_chains=7, per_item=True)
    b = plain.log_density(v, values={"h": h}, num_chains=7, per_item=True)
    assert a.shape == (7, 5)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for x, y in zip(_grads(a.sum(), [v, grbm.W]), _grads(b.sum(), [v, grbm.W]), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


# -- the fallback ------------------------------------------------------------------------------


def test_control_flow_on_values_falls_back_to_the_pyro_path():
    def model(v):
        with pyro.plate("data", v.shape[0]):
            e = 0.5 * (v ** 2).sum(-1)
            if e.sum() > 1.0:  # control flow on a value: make_fx cannot record it
                e = 2 * e
            pyro.factor("energy", -e)

    view = EnergyView(model)
    small, large = torch.full((4, 2), 0.1), torch.full((4, 2), 3.0)
    path = view.path(small)
    assert path == "pyro" and "control flow on values" in path.reason
    # the Pyro path takes each branch on its own data
    torch.testing.assert_close(view.log_density(small, per_item=True), -0.5 * (small ** 2).sum(-1))
    torch.testing.assert_close(view.log_density(large, per_item=True), -(large ** 2).sum(-1))


def test_item_call_falls_back():
    def model(v):
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", -(v ** 2).sum(-1) * float(v.abs().max().item() > 0))

    view = EnergyView(model)
    v = torch.randn(3, 2)
    assert view.path(v) == "pyro"
    torch.testing.assert_close(view.score(v), -2 * v)


def test_no_grad_block_inside_the_model_falls_back():
    """An aten graph does not record torch.no_grad(): the guard sees the gradients differ."""
    def model(v):
        with torch.no_grad():
            scale = v.pow(2).mean()
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", -(v ** 2).sum(-1) * scale)

    view = EnergyView(model)
    v = torch.randn(5, 2)
    path = view.path(v)
    assert path == "pyro" and "gradient" in path.reason
    torch.testing.assert_close(view.score(v), -2 * v * v.pow(2).mean())


def test_in_place_update_of_a_buffer_falls_back():
    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, v):
            self.calls.add_(1)
            with pyro.plate("data", v.shape[0]):
                pyro.factor("energy", -(v ** 2).sum(-1))

    model = Counting()
    view = EnergyView(model)
    v = torch.randn(3, 2)
    path = view.path(v)
    assert path == "pyro" and "in place" in path.reason
    before = float(model.calls)
    view.log_density(v)
    assert float(model.calls) == before + 1  # the Pyro path runs the update on every call


def test_a_captured_tensor_with_a_gradient_falls_back():
    w = torch.ones(2, requires_grad=True)
    cached = w * 2  # computed outside the model: a graph would keep it as a stale constant

    def model(v):
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", -(v * cached).sum(-1))

    path = EnergyView(model).path(torch.randn(3, 2))
    assert path == "pyro" and "stale constant" in path.reason


def test_inference_mode_runs_a_graph_traced_outside_it():
    grbm = GaussianRBM(3, 2)
    view, v = EnergyView(grbm.marginal), torch.randn(4, 3)
    expected = EnergyView(grbm.marginal, traced=False).log_density(v)
    with torch.inference_mode():  # no gradients to guard a new trace with: the Pyro path
        torch.testing.assert_close(view.log_density(v), expected)
        torch.testing.assert_close(view.log_density(v), expected)
        path = view.path(v)
        assert path == "pyro" and "inference mode" in path.reason
    assert view.path(v) == "traced"
    with torch.inference_mode():
        assert view.path(v) == "traced"
        torch.testing.assert_close(view.log_density(v), expected)


def test_python_side_effects_run_once_at_tracing():
    calls = []

    def model(v):
        calls.append(1)
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", -(v ** 2).sum(-1))

    view = EnergyView(model)
    v = torch.randn(3, 2)
    view.log_density(v)
    view.log_density(v)  # traced here
    traced = len(calls)
    for _ in range(3):
        view.log_density(v)
    assert view.path(v) == "traced" and len(calls) == traced
    plain = EnergyView(model, traced=False)
    plain.log_density(v)
    n = len(calls)
    plain.log_density(v)
    assert len(calls) == n + 1


def test_randomness_inside_the_model_stays_random():
    def model(v):
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", -(v ** 2).sum(-1) + 0.1 * torch.randn(v.shape[0], dtype=v.dtype))

    traced, plain = EnergyView(model), EnergyView(model, traced=False)
    v = torch.randn(4, 2)
    traced.structure(v)  # the structure's own run draws too: done first for both views
    plain.structure(v)
    torch.manual_seed(3)
    assert traced.path(v, per_item=True) == "traced"  # traces on a forked random stream
    first = traced.log_density(v, per_item=True)
    second = traced.log_density(v, per_item=True)
    assert not torch.allclose(first, second)  # a new draw on every call
    torch.manual_seed(3)  # the same random stream as the Pyro path's
    torch.testing.assert_close(plain.log_density(v, per_item=True), first)
    torch.testing.assert_close(plain.log_density(v, per_item=True), second)


# -- signatures, parameters, switches ----------------------------------------------------------


def _count_traces(monkeypatch):
    calls = []
    original = _traced._trace
    monkeypatch.setattr(_traced, "_trace", lambda *a: calls.append(a[-2:]) or original(*a))
    return calls


def test_a_new_dtype_or_shape_traces_again(monkeypatch):
    calls = _count_traces(monkeypatch)
    traced, plain = EnergyView(gaussian_latent_model), EnergyView(gaussian_latent_model, traced=False)
    for dtype in (torch.float32, torch.float64, torch.float32):
        v, h = torch.randn(4, 2, dtype=dtype), torch.randn(4, 2, dtype=dtype)
        assert traced.path(v, values={"h": h}, per_item=True) == "traced"
        out = traced.log_density(v, values={"h": h}, per_item=True)
        assert out.dtype == dtype
        torch.testing.assert_close(out, plain.log_density(v, values={"h": h}, per_item=True), rtol=0, atol=0)
    assert len(calls) == 2  # float32 and float64; the third call reuses the first trace
    v, h = torch.randn(5, 2), torch.randn(5, 2)
    traced.log_density(v, values={"h": h}, per_item=True)
    assert len(calls) == 2  # a signature called once runs on the Pyro path
    traced.log_density(v, values={"h": h}, per_item=True)
    traced.log_density(v, values={"h": h})  # summed: another signature
    traced.log_density(v, values={"h": h})
    assert len(calls) == 4


def test_module_numbers_and_training_flags_are_part_of_the_signature():
    """A graph bakes in Python numbers: a GEBM's temperature set anew, or dropout
    switched off by eval(), give a new trace rather than a stale one."""
    gebm = GEBM(MLP(2, 2, (8,)), torch.nn.Sequential(torch.nn.Dropout(0.5), MLP(2, 1, (8,))), latent_dim=2)
    traced, plain = EnergyView(gebm), EnergyView(gebm, traced=False)
    z = torch.randn(5, 2)

    def lp():
        assert traced.path(5, values={"z": z}) == "traced"  # traced now, if new
        return traced.log_density(5, values={"z": z})

    gebm.eval()
    first = lp()
    gebm.temperature = 2.0
    torch.testing.assert_close(lp(), plain.log_density(5, values={"z": z}))
    assert not torch.allclose(lp(), first)
    gebm.train()  # dropout on: random again, as on the Pyro path
    assert not torch.allclose(lp(), lp())
    gebm.eval()
    gebm.temperature = 1.0
    torch.testing.assert_close(lp(), first)
    # tensors the model makes without a dtype follow the default dtype
    view, values = EnergyView(constrained_model(None)), {"scale": torch.ones(()), "h": torch.ones(3)}
    assert view.log_density(values=values).dtype == torch.float32
    torch.set_default_dtype(torch.float64)
    try:
        assert view.log_density(values=values).dtype == torch.float64
    finally:
        torch.set_default_dtype(torch.float32)


def test_parameters_are_read_live():
    """An optimizer's in-place update, a replaced parameter and a cleared param store
    are all seen by the traced function."""
    grbm = GaussianRBM(3, 2)
    traced, plain = EnergyView(grbm.marginal), EnergyView(grbm.marginal, traced=False)
    v = torch.randn(5, 3)
    assert traced.path(v) == "traced"
    opt = torch.optim.SGD(grbm.parameters(), lr=0.5)
    traced.log_density(v).backward()
    opt.step()
    torch.testing.assert_close(traced.log_density(v), plain.log_density(v))
    grbm.W = torch.nn.Parameter(torch.randn(3, 2))  # a new object
    torch.testing.assert_close(traced.log_density(v), plain.log_density(v))
    (g,) = torch.autograd.grad(traced.log_density(v), grbm.W)
    assert g.abs().sum() > 0
    assert traced.path(v) == "traced"

    view = EnergyView(param_model)
    assert view.path(v) == "traced"
    pyro.clear_param_store()
    torch.testing.assert_close(view.log_density(v), EnergyView(param_model, traced=False).log_density(v))
    with torch.no_grad():
        pyro.get_param_store()._params["mu"].add_(1.0)
    torch.testing.assert_close(view.log_density(v), EnergyView(param_model, traced=False).log_density(v))


def test_traced_switch_and_environment_variable(monkeypatch):
    v = torch.randn(3, 2)
    view = EnergyView(gaussian_latent_model, traced=False)
    path = view.path(v, values={"h": v})
    assert path == "pyro" and path.reason == "traced=False"
    view.traced = True
    assert view.path(v, values={"h": v}) == "traced"
    monkeypatch.setenv("PYRO_EBM_TRACE", "0")
    assert not EnergyView(gaussian_latent_model).traced
    monkeypatch.setenv("PYRO_EBM_TRACE", "1")
    assert EnergyView(gaussian_latent_model).traced


def test_signatures_beyond_the_limit_run_on_the_pyro_path(monkeypatch):
    monkeypatch.setattr(_traced, "MAX_SIGNATURES", 2)
    view = EnergyView(gaussian_latent_model)
    for n in (2, 3):
        assert view.path(torch.randn(n, 2), values={"h": torch.randn(n, 2)}) == "traced"
    path = view.path(torch.randn(4, 2), values={"h": torch.randn(4, 2)})
    assert path == "pyro" and "signatures" in path.reason


def test_pyro_handlers_see_the_pyro_path_and_svi_finds_the_parameters():
    """Under poutine.trace the Pyro path runs (every message seen); under the
    parameter-only trace SVI puts around a loss the graph runs and the param sites
    are still sent, so SVI trains the same parameters to the same values."""
    v = torch.randn(50, 2, dtype=torch.float64) * 1.5 + 0.5
    view = energy_view(param_model)
    view.log_density(v)
    with poutine.trace() as tracer:
        path = view.path(v)
        view.log_density(v)
    assert path == "pyro" and "handlers" in path.reason
    assert {"mu", "log_s", "tau"} <= set(tracer.trace.nodes)
    with poutine.trace(param_only=True):
        assert view.path(v) == "traced"

    def train(traced):
        pyro.clear_param_store()
        model = _copy_of(param_model)
        energy_view(model).traced = traced
        svi = pyro.infer.SVI(model, lambda v: None, pyro.optim.Adam({"lr": 0.05}), loss=DSM(0.3))
        torch.manual_seed(0)
        losses = [svi.step(v) for _ in range(5)]
        return losses, {k: p.detach().clone() for k, p in pyro.get_param_store().named_parameters()}

    (l1, p1), (l2, p2) = train(True), train(False)
    assert set(p1) == {"mu", "log_s", "tau"} and p1["mu"] != 0.3  # trained
    assert l1 == pytest.approx(l2, rel=1e-12)
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-12, atol=1e-12)


def _copy_of(fn):
    def copy(*args, **kwargs):
        return fn(*args, **kwargs)

    return copy


def test_guide_views_run_on_the_pyro_path_with_fast_weights():
    """GuideView keeps the Pyro path: fast weights swapped in by ``using`` must reach
    the guide's density."""
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(2, 4)

        def forward(self, v):
            loc, raw = self.net(v).chunk(2, -1)
            return loc, torch.nn.functional.softplus(raw) + 1e-3

    guide = AmortizedNormal(Encoder(), site="h")
    view = GuideView(guide)
    v, h = torch.randn(3, 2), torch.randn(3, 2)
    path = view.view.path(v, values={"h": h})
    assert path == "pyro" and path.reason == "traced=False"
    own = view.view.log_density(v, values={"h": h})
    weights = {k: (p.detach() + 0.5).requires_grad_() for k, p in guide.named_parameters()}
    with view.using(weights):
        assert not torch.allclose(view.view.log_density(v, values={"h": h}), own)


# -- chains of a model written for one draw -----------------------------------------------------


def textbook_logistic(x, y):
    """The textbook Bayesian logistic regression, written for one draw of w."""
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1], dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)


def broadcasting_logistic(x, y):
    """The same posterior written to broadcast over leading dims of w."""
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1], dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(x * w).sum(-1)), obs=y)


def _logistic_data(n=40, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(x @ torch.tensor([1.0, -1.5], dtype=torch.float64)), generator=g)
    return x, y


def _mean_and_se(draws):
    draws = draws.detach().double()
    return float(draws.mean()), float(draws.std()) / math.sqrt(float(az.ess(draws.numpy())))


def test_chains_of_a_model_written_for_one_draw_are_vectorized_with_vmap():
    x, y = _logistic_data()
    w = torch.randn(6, 2, dtype=torch.float64)
    for traced in (True, False):
        view = EnergyView(textbook_logistic, traced=traced)
        path = view.path(x, y, values={"w": w}, num_chains=6)
        assert path.chains == "vmap" and "chain plate" in path.reason
        assert path == ("traced" if traced else "pyro")
        lp = view.log_density(x, y, values={"w": w}, num_chains=6)
        expected = torch.stack([view.log_density(x, y, values={"w": w[c]}) for c in range(6)])
        torch.testing.assert_close(lp, expected, rtol=1e-12, atol=1e-12)
    path = EnergyView(broadcasting_logistic).path(x, y, values={"w": w}, num_chains=6)
    assert path == "traced" and path.chains == "plate"


def test_a_model_that_mixes_chains_under_the_plate_is_vectorized_with_vmap():
    def model(v):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.factor("shrink", -w.pow(2).sum())  # sums over every chain under a chain plate
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", -((v - w) ** 2).sum(-1))

    view = EnergyView(model)
    v, w = torch.randn(5, 2), torch.randn(4, 2)
    path = view.path(v, values={"w": w}, num_chains=4)
    assert path.chains == "vmap" and "mixes" in path.reason
    expected = torch.stack([view.log_density(v, values={"w": w[c]}) for c in range(4)])
    torch.testing.assert_close(view.log_density(v, values={"w": w}, num_chains=4), expected)


def test_mcmc_sample_runs_the_textbook_logistic_regression_with_64_chains():
    """mcmc.sample with 64 MALA chains on the model written for one draw (vmap) and on
    the same posterior written with broadcasting (chain plate): the posterior means
    agree within the two runs' combined Monte Carlo error."""
    x, y = _logistic_data()
    runs = []
    for model in (textbook_logistic, broadcasting_logistic):
        torch.manual_seed(0)
        samples = mcmc.sample(model, mcmc.MALA(0.3), num_chains=64, num_samples=150, warmup_steps=150,
                              model_args=(x, y), progress=False)
        runs.append(samples.get_samples()["w"])
    assert runs[0].shape == (64, 150, 2)
    for i in range(2):
        (m1, se1), (m2, se2) = _mean_and_se(runs[0][..., i]), _mean_and_se(runs[1][..., i])
        assert abs(m1 - m2) < 5 * math.hypot(se1, se2), (i, m1, m2, se1, se2)
    assert float(runs[0][..., 0].mean()) > 0.3 and float(runs[0][..., 1].mean()) < -0.3  # the data's signs


def test_a_model_neither_path_can_run_for_chains_is_explained():
    x, y = _logistic_data(10)

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        logits = x @ w
        if float(w.sum()) > 100.0:  # a value read in Python: vmap cannot run it
            logits = 2 * logits
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)

    EnergyView(model).log_density(x, y, values={"w": torch.zeros(2, dtype=x.dtype)})  # one draw works
    with pytest.raises(ValueError, match=r"cannot be evaluated for 4 chains at once: under a chain plate it "
                                         r"raised RuntimeError.*torch.func.vmap it raised.*"
                                         r"w.unsqueeze\(-1\).*no Python control flow"):
        mcmc.sample(model, mcmc.MALA(0.1), num_chains=4, num_samples=2, model_args=(x, y), progress=False)


def test_a_model_failing_on_one_draw_keeps_its_own_error():
    """When one draw fails too, the problem is not the chains: the model's own error
    comes back (here torch's, for integer labels at a Bernoulli site)."""
    x, y = _logistic_data(10)
    view = EnergyView(broadcasting_logistic)
    with pytest.raises(RuntimeError, match="Long"):
        view.log_density(x, y.long(), values={"w": torch.randn(4, 2, dtype=x.dtype)}, num_chains=4)


# -- constants folded at trace time -----------------------------------------------------------

def _prior_model(features):
    w = pyro.sample("w", dist.Normal(torch.zeros(4, dtype=features.dtype), 1.0).to_event(1))
    pyro.factor("lik", -(w @ features.T).pow(2).sum(-1))


@pytest.mark.parametrize("chains", [16, 20000])
def test_graph_folds_constant_ops(chains):
    """The prior's ops on constants (log(scale), loc = 0 expanded over the chains,
    2 * scale^2) run once at trace time, not in the graph; the values and gradients
    stay those of the Pyro path, and a constant over many chains is stored at its
    broadcasting size."""
    features = torch.randn(5, 4, dtype=torch.float64)
    view = EnergyView(_prior_model)
    w = torch.randn(chains, 4, dtype=torch.float64, requires_grad=True)
    pure = view.pure(features, values={"w": w}, num_chains=chains)
    module = pure._entry.forward.__self__
    ops = {n.target for n in module.graph.nodes if n.op == "call_function"}
    aten = torch.ops.aten
    assert not ops & {aten.log.default, aten.zeros.default, aten.lift_fresh_copy.default}, ops
    sub_zero = [n for n in module.graph.nodes
                if n.target == aten.sub.Tensor and n.args[0].op == "placeholder"]
    assert not sub_zero  # w - loc with loc = 0 is w
    assert all(b.numel() <= max(4, 1 << 16) for b in module.buffers())
    lp = pure(pure.parameters(), features, values={"w": w})
    ref = view._pyro_log_density(view.structure(features), (features,), {}, {"w": w}, False, chains)
    torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(lp.sum(), w)
    (g_ref,) = torch.autograd.grad(ref.sum(), w)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def _like_model(features, theta):
    """A prior built from another tensor's dtype, device and shape only."""
    probs = 0.5 * theta.new_ones(theta.shape[0])
    loc = torch.zeros_like(theta)
    with pyro.plate("data", features.shape[0]):
        h = pyro.sample("h", dist.Bernoulli(probs).to_event(1))
        pyro.factor("e", -((features - loc.sum()) ** 2).sum(-1) + (h * theta).sum(-1))


def test_graph_folds_factories_that_read_only_metadata():
    """``theta.new_ones(k)`` and ``torch.zeros_like(theta)`` read only the dtype,
    device and shape of ``theta``, which the traced signature fixes: they and
    what is computed from them alone (the prior's logits) fold into constants,
    while ``theta``'s value and gradient still flow; values and gradients equal
    the Pyro path's, and a new shape of ``theta`` traces anew."""
    aten = torch.ops.aten
    factories = {aten.new_ones.default, aten.zeros_like.default, aten.log.default, aten.log1p.default}
    view = EnergyView(_like_model)
    for hidden in (3, 5):
        features = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
        theta = torch.randn(hidden, dtype=torch.float64, requires_grad=True)
        h = torch.rand(6, hidden, dtype=torch.float64, requires_grad=True)
        pure = view.pure(features, theta, values={"h": h})
        module = pure._entry.forward.__self__
        ops = {n.target for n in module.graph.nodes if n.op == "call_function"}
        assert not ops & factories, ops
        lp = pure(pure.parameters(), features, theta, values={"h": h})
        ref = view._pyro_log_density(view.structure(features, theta), (features, theta), {}, {"h": h}, False,
                                     None)
        torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(lp, (features, theta, h))
        refs = torch.autograd.grad(ref, (features, theta, h))
        for g, g_ref in zip(grads, refs, strict=True):
            torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_graph_sums_without_keeping_a_dim_it_squeezes():
    """The total log density's last reduction, a sum that keeps its dim followed
    by a squeeze of that dim, becomes one sum; value and gradients equal the Pyro
    path's."""
    from pyro_ebm.models import GaussianRBM

    grbm = GaussianRBM(3, 2).double()
    view = EnergyView(grbm.marginal)
    v = torch.rand(7, 3, dtype=torch.float64, requires_grad=True)
    pure = view.pure(v)
    module = pure._entry.forward.__self__
    ops = [n.target for n in module.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.squeeze.dims not in ops, ops
    lp = pure(pure.parameters(), v)
    ref = view._pyro_log_density(view.structure(v), (v,), {}, {}, False, None)
    assert lp.shape == ref.shape == ()
    torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(torch.autograd.grad(lp, [v, grbm.W], create_graph=True),
                        torch.autograd.grad(ref, [v, grbm.W], create_graph=True), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
