# SPDX-License-Identifier: Apache-2.0
"""ScoreMatching(compile=...): the torch.func form of every objective, compiled,
gives the eager trainer's numbers from the same seed; what cannot be compiled
trains eagerly after one warning."""

import warnings

import pyro
import pytest
import torch
from torch.distributions import constraints

from pyro_ebm.energy import DivergenceError
from pyro_ebm.infer import DSM, MDSM, SSM, ExactSM, ScoreMatching
from pyro_ebm.models import GaussianRBM

FAST = {"backend": "aot_eager"}  # the torch.func step through dynamo and AOT autograd, no code generation


@pytest.fixture(autouse=True)
def _traced_path(monkeypatch):  # compiled steps need the traced path (conftest clears the param store)
    monkeypatch.delenv("PYRO_EBM_TRACE", raising=False)


def _train(make_model, objective, compile, steps=3, dtype=torch.float64, lr=1e-2):
    pyro.clear_param_store()
    torch.manual_seed(0)
    model, params = make_model(dtype)
    trainer = ScoreMatching(model, pyro.optim.Adam({"lr": lr}), objective=objective, compile=compile)
    v = torch.randn(12, 5, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [trainer.step(v) for _ in range(steps)]
    ours = [w for w in caught if "runs eagerly" in str(w.message)]
    return losses, [p.detach().clone() for p in params()], ours, trainer


def grbm(dtype):
    g = GaussianRBM(5, 3).to(dtype)
    return g.marginal, lambda: list(g.parameters())


def param_store_model(dtype):
    def model(v):
        mu = pyro.param("mu", torch.zeros(5, dtype=dtype))
        scale = pyro.param("scale", torch.ones((), dtype=dtype), constraint=constraints.positive)
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", -0.5 * ((v - mu) / scale).pow(2).sum(-1) - 0.1 * (v - mu).pow(4).sum(-1))

    store = pyro.get_param_store()
    return model, lambda: [store["mu"], store["scale"]]


@pytest.mark.parametrize("objective", [DSM(0.1), MDSM(), SSM(2), ExactSM(), ExactSM(max_exact_dim=2)],
                         ids=["DSM", "MDSM", "SSM", "ExactSM", "ExactSM-Hutchinson"])
@pytest.mark.parametrize("make_model", [grbm, param_store_model], ids=["grbm", "pyro.param"])
def test_compiled_equals_eager(make_model, objective):
    eager_losses, eager_params, _, _ = _train(make_model, objective, False)
    losses, params, warned, trainer = _train(make_model, objective, FAST)
    assert not warned
    assert any(c is not None and not c.fell_back for c in trainer._compiled_steps.values())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-10, atol=1e-10)
    for a, b in zip(params, eager_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert losses[0] != losses[-1]  # the parameters moved


def test_inductor_compiled_equals_eager():
    """The default backend (code generation) on float32: the same numbers to rounding."""
    eager_losses, eager_params, _, _ = _train(grbm, DSM(0.1), False, dtype=torch.float32)
    losses, params, warned, _ = _train(grbm, DSM(0.1), True, dtype=torch.float32)
    assert not warned
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-5)
    for a, b in zip(params, eager_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def untraceable(dtype):
    mu = torch.zeros(5, dtype=dtype, requires_grad=True)

    def model(v):
        p = pyro.param("mu_u", mu)
        with pyro.plate("data", v.shape[0]):
            e = 0.5 * (v - p).pow(2).sum(-1)
            if e.sum() > 0:  # control flow on a value: no traced graph
                pyro.factor("energy", -e)

    return model, lambda: [pyro.get_param_store()["mu_u"]]


def test_a_model_without_a_pure_density_trains_eagerly_after_one_warning():
    eager_losses, eager_params, _, _ = _train(untraceable, DSM(0.1), False)
    losses, params, warned, _ = _train(untraceable, DSM(0.1), FAST)
    assert len(warned) == 1 and "reads a tensor's value" in str(warned[0].message)
    assert losses == eager_losses
    torch.testing.assert_close(params[0], eager_params[0], rtol=0, atol=0)


def test_a_step_the_compiler_refuses_trains_eagerly_after_one_warning():
    eager_losses, eager_params, _, _ = _train(grbm, DSM(0.1), False)
    losses, params, warned, _ = _train(grbm, DSM(0.1), {"backend": "no_such_backend"})
    assert len(warned) == 1 and "could not be compiled" in str(warned[0].message)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-10, atol=1e-10)
    for a, b in zip(params, eager_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bad_compile_argument():
    g = GaussianRBM(2, 2)
    with pytest.raises(TypeError, match="not torch.compile arguments"):
        ScoreMatching(g.marginal, pyro.optim.Adam({"lr": 1e-3}), compile={"nonsense": 1})
    with pytest.raises(TypeError, match="compile must be True, False or a dict"):
        ScoreMatching(g.marginal, pyro.optim.Adam({"lr": 1e-3}), compile="yes")


def test_compiled_divergence_restores_the_parameters():
    """A huge learning rate overflows the energy: the compiled step raises
    DivergenceError naming the step and leaves the parameters as before it."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    g = GaussianRBM(5, 3)
    trainer = ScoreMatching(g.marginal, pyro.optim.Adam({"lr": 1e30}), objective=DSM(0.1), compile=FAST)
    v = torch.randn(12, 5)
    with pytest.raises(DivergenceError) as info:
        for _ in range(5):
            before = [p.detach().clone() for p in g.parameters()]
            trainer.step(v)
    assert f"step {info.value.step}" in str(info.value) and info.value.level == "model"
    for a, b in zip(g.parameters(), before, strict=True):
        assert torch.equal(a.detach(), b)


def _optim_run(make_optim, compile, steps=4, scheduler=False):
    pyro.clear_param_store()
    torch.manual_seed(0)
    g = GaussianRBM(5, 3).double()
    optim = make_optim()
    trainer = ScoreMatching(g.marginal, optim, objective=DSM(0.1), compile=compile)
    v = torch.randn(12, 5, dtype=torch.float64)
    for _ in range(steps):
        trainer.step(v)
        if scheduler:
            optim.step()  # the pyro.optim scheduler: a new learning rate each step
    level = trainer.levels["model"]
    states = [{k: t.clone() for k, t in level.optimizer.state[p].items()} for p in level.params]
    return [p.detach().clone() for p in g.parameters()], states, trainer


@pytest.mark.parametrize("make_optim, scheduler", [
    (lambda: pyro.optim.Adam({"lr": 0.02, "betas": (0.8, 0.95), "weight_decay": 0.1}), False),
    (lambda: pyro.optim.AdamW({"lr": 0.02, "weight_decay": 0.1}), False),
    (lambda: pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05},
                                       "gamma": 0.5}), True),
    (lambda: pyro.optim.SGD({"lr": 0.01, "momentum": 0.9}), False),
], ids=["Adam-weight-decay", "AdamW", "Adam-scheduler", "SGD"])
def test_the_optimizer_step_inside_the_compiled_function_equals_torch(make_optim, scheduler):
    """Adam and AdamW run inside the compiled function (their moments and step counts
    are the optimizer's own state tensors, learning rates read at each step), other
    optimizers outside it: parameters and optimizer states equal the eager run's."""
    eager, eager_states, _ = _optim_run(make_optim, False, scheduler=scheduler)
    compiled, states, trainer = _optim_run(make_optim, FAST, scheduler=scheduler)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    for sa, sb in zip(states, eager_states, strict=True):
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k].double(), sb[k].double(), rtol=1e-10, atol=1e-13)
    steps = [c for c in trainer._compiled_steps.values() if c is not None and not isinstance(c, bool)]
    assert len(steps) == 1  # a new learning rate compiles nothing new


def test_every_trainer_of_a_process_gets_compiled_steps_past_the_recompile_limit():
    """torch.compile keeps at most ``recompile_limit`` (8) graphs per code object;
    the steps of all trainers are closures of one function, so without a code
    object each the ninth trainer would run its step uncompiled, silently."""
    compiled = []

    def counting(gm, example_inputs):
        compiled.append(1)
        return gm.forward

    torch._dynamo.reset()
    limit = torch._dynamo.config.recompile_limit
    for seed in range(limit + 2):
        pyro.clear_param_store()
        torch.manual_seed(seed)
        grbm = GaussianRBM(2, 3)
        trainer = ScoreMatching(grbm.marginal, pyro.optim.Adam({"lr": 1e-2}), objective=DSM(0.3),
                                compile={"backend": counting})
        before = len(compiled)
        trainer.step(torch.randn(16, 2))
        assert len(compiled) > before, f"trainer {seed + 1} ran its step uncompiled"
