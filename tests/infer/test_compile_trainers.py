# SPDX-License-Identifier: Apache-2.0
"""compile= on KALE, MCMCTeaching and BiDVL: the compiled updates give the eager
trainer's numbers from the same seed; what cannot be compiled trains eagerly
after one warning; a divergence under compile restores the parameters."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_ebm import mcmc
from pyro_ebm.energy import DivergenceError
from pyro_ebm.infer import KALE, BiDVL, MCMCTeaching
from pyro_ebm.models import GEBM
from pyro_ebm.models.nets import MLP

FAST = {"backend": "aot_eager"}  # dynamo and AOT autograd, no code generation
D64 = torch.float64
D, Z = 3, 2


@pytest.fixture(autouse=True)
def _traced_path(monkeypatch):  # compiled steps need the traced path (conftest clears the param store)
    monkeypatch.delenv("PYRO_EBM_TRACE", raising=False)


# -- the trainers, tiny ------------------------------------------------------------


def kale(compile, dtype=D64, lr=1e-2, fixed_base=False, **kwargs):
    gebm = GEBM(MLP(2, 2, (8,)), MLP(2, 1, (8,)), latent_dim=2).to(dtype)
    options = dict(critic_steps=2, warmup_critic_steps=3, init_samples=16)
    options.update(kwargs)
    generator_optim = None if fixed_base else pyro.optim.Adam({"lr": lr})
    trainer = KALE(gebm, pyro.optim.Adam({"lr": lr}), generator_optim, compile=compile, **options)
    return trainer, (torch.randn(10, 2, dtype=dtype),), lambda: [*gebm.parameters(), trainer.c]


def quadratic_ebm(x, y=None):
    """E(x) = ½ a ‖x − μ − y‖² (y: an optional per-item shift, a conditional model)."""
    a = pyro.param("a", torch.tensor(1.0, dtype=x.dtype))
    mu = pyro.param("mu", torch.zeros(D, dtype=x.dtype))
    shift = mu if y is None else mu + y.unsqueeze(-1)
    with pyro.plate("data", len(x)):
        pyro.factor("energy", -0.5 * a * (x - shift).pow(2).sum(-1) - 0.1 * (x - shift).pow(4).sum(-1))


def untraceable_ebm(x, y=None):
    mu = pyro.param("mu", torch.zeros(D, dtype=x.dtype))
    with pyro.plate("data", len(x)):
        e = 0.5 * (x - mu).pow(2).sum(-1)
        if e.sum() > 0:  # control flow on a value: no traced graph, no pure density
            pyro.factor("energy", -e)


def linear_decoder(x, y=None):
    w = pyro.param("w", torch.full((Z, D), 0.5, dtype=x.dtype))
    with pyro.plate("data", len(x)):
        h = pyro.sample("h", dist.Normal(x.new_zeros(len(x), Z), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(h @ w + 2.0, 0.5).to_event(1), obs=x)


def delta_encoder(x, y=None):
    b = pyro.param("b", torch.full((D, Z), 0.1, dtype=x.dtype))
    with pyro.plate("data", len(x)):
        pyro.sample("h", dist.Delta(x @ b).to_event(1))


def _store(*names):
    return lambda: [pyro.get_param_store()[n] for n in names]


def teaching(compile, dtype=D64, lr=0.05, energy=quadratic_ebm, **kwargs):
    trainer = MCMCTeaching(energy, linear_decoder, delta_encoder, pyro.optim.Adam({"lr": lr}),
                           pyro.optim.Adam({"lr": 0.05}), kernel=mcmc.ULA(0.05), num_langevin_steps=3,
                           compile=compile, **kwargs)
    names = ("a", "mu") if energy is quadratic_ebm else ("mu",)
    return trainer, (torch.randn(12, D, dtype=dtype),), _store(*names, "w", "b")


def bidvl(compile, dtype=D64, lr=0.05, energy=quadratic_ebm, conditional=False, **kwargs):
    trainer = BiDVL(energy, linear_decoder, delta_encoder, pyro.optim.Adam({"lr": lr}),
                    pyro.optim.Adam({"lr": 0.01}), inner_steps=1, compile=compile, **kwargs)
    x = torch.randn(12, D, dtype=dtype)
    args = (x, torch.randn(12, dtype=dtype)) if conditional else (x,)
    names = ("a", "mu") if energy is quadratic_ebm else ("mu",)
    return trainer, args, _store(*names, "w", "b")


CASES = {
    "KALE": kale,
    "KALE-no-penalty": lambda compile, **kw: kale(compile, penalty=0.0, energy_floor=None, c_grad_clip=None,
                                                  **kw),
    "KALE-fixed-base": lambda compile, **kw: kale(compile, fixed_base=True, **kw),
    "MCMCTeaching": teaching,
    "MCMCTeaching-penalty-chains": lambda compile, **kw: teaching(compile, energy_penalty=0.1, num_chains=7,
                                                                  **kw),
    "BiDVL": bidvl,
    "BiDVL-conditional": lambda compile, **kw: bidvl(compile, conditional=True, **kw),
}


def _train(case, compile, steps=3, **kwargs):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    trainer, args, params = CASES[case](compile, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = []
        for _ in range(steps):
            main = trainer.step(*args)
            losses.append(dict(trainer.last_losses, main=main))
    ours = [w for w in caught if "runs eagerly" in str(w.message)]
    return losses, [p.detach().clone() for p in params()], ours, trainer


def _assert_same(a, b, rtol, atol):
    (losses_a, params_a), (losses_b, params_b) = a, b
    assert [sorted(x) for x in losses_a] == [sorted(x) for x in losses_b]
    for x, y in zip(losses_a, losses_b, strict=True):
        torch.testing.assert_close(torch.tensor([x[k] for k in sorted(x)], dtype=D64),
                                   torch.tensor([y[k] for k in sorted(x)], dtype=D64), rtol=rtol, atol=atol)
    for p, q in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


def _compiled(trainer):
    from pyro_ebm.energy.compile import Compiled

    return [c for c in trainer._compiled_steps.values() if isinstance(c, Compiled)]


# -- compiled == eager -------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_equals_eager(case):
    eager_losses, eager_params, _, _ = _train(case, False)
    losses, params, warned, trainer = _train(case, FAST)
    assert not warned
    compiled = _compiled(trainer)
    assert compiled and not any(c.fell_back for c in compiled)
    _assert_same((losses, params), (eager_losses, eager_params), rtol=1e-10, atol=1e-12)
    assert losses[0]["main"] != losses[-1]["main"]  # the parameters moved


def test_kale_compiles_both_updates():
    _, _, _, trainer = _train("KALE", FAST, steps=1)
    assert {k if isinstance(k, str) else k[0] for k in trainer._compiled_steps} == {"critic", "generator"}


def test_inductor_compiled_equals_eager():
    """The default backend (code generation) on float32: the same numbers to rounding."""
    eager = _train("MCMCTeaching", False, dtype=torch.float32)
    compiled = _train("MCMCTeaching", True, dtype=torch.float32)
    assert not compiled[2]
    _assert_same(compiled[:2], eager[:2], rtol=1e-5, atol=1e-5)


# -- fallbacks ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["MCMCTeaching", "BiDVL"])
def test_a_model_without_a_pure_density_trains_eagerly_after_one_warning(case):
    eager_losses, eager_params, _, _ = _train(case, False, energy=untraceable_ebm)
    losses, params, warned, _ = _train(case, FAST, energy=untraceable_ebm)
    assert len(warned) == 1 and "reads a tensor's value" in str(warned[0].message)
    _assert_same((losses, params), (eager_losses, eager_params), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["KALE", "MCMCTeaching", "BiDVL"])
def test_a_compile_the_compiler_refuses_trains_eagerly_after_one_warning(case):
    eager_losses, eager_params, _, _ = _train(case, False)
    losses, params, warned, _ = _train(case, {"backend": "no_such_backend"})
    assert len(warned) == 1 and "could not be compiled" in str(warned[0].message)
    _assert_same((losses, params), (eager_losses, eager_params), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [KALE, MCMCTeaching, BiDVL])
def test_bad_compile_argument(cls):
    case = {KALE: "KALE", MCMCTeaching: "MCMCTeaching", BiDVL: "BiDVL"}[cls]
    with pytest.raises(TypeError, match="not torch.compile arguments"):
        CASES[case]({"nonsense": 1})


# -- divergence --------------------------------------------------------------------------


@pytest.mark.parametrize("case, level", [("KALE", "critic"), ("BiDVL", "energy")])
def test_compiled_divergence_restores_the_parameters(case, level):
    """A huge learning rate overflows the energy (float32): the compiled update
    raises DivergenceError naming the step and the level, and leaves every
    parameter as before the step."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    trainer, args, params = CASES[case](FAST, dtype=torch.float32)
    if case == "BiDVL":
        trainer.inner_steps = 0  # the upper (compiled) update alone
    trainer.step(*args)  # compiles, creates every parameter
    trainer.optim = pyro.optim.Adam({"lr": 1e30})  # the level's optimizer is rebuilt at the next step
    with pytest.raises(DivergenceError) as info:
        for _ in range(5):
            before = [p.detach().clone() for p in params()]
            trainer.step(*args)
    assert f"step {info.value.step}" in str(info.value) and info.value.level == level
    for a, b in zip(params(), before, strict=True):
        assert torch.equal(a.detach(), b)
    compiled = _compiled(trainer)
    assert compiled and not any(c.fell_back for c in compiled)


def test_compiled_ebm_update_divergence_restores_the_parameters():
    """MCMCTeaching's compiled EBM update on revised samples whose energy overflows."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    trainer, (x,), params = teaching(FAST, dtype=torch.float32)
    trainer.step(x)
    before = [p.detach().clone() for p in params()]
    with pytest.raises(DivergenceError, match="the EBM loss is") as info:
        trainer.ebm_step(x, torch.full_like(x, 1e20))
    assert info.value.level == "energy"
    for a, b in zip(params(), before, strict=True):
        assert torch.equal(a.detach(), b)
    compiled = _compiled(trainer)
    assert compiled and not any(c.fell_back for c in compiled)
