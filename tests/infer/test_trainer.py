# SPDX-License-Identifier: Apache-2.0
"""The trainer contract shared by every trainer: parameters collected once (plain
nn.Module parameters included), one torch optimizer per level built from the
pyro.optim object (schedulers, per-parameter arguments, saved state), one return
type, and divergences that name the step and the level and undo the step."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from test_bad_input import TRAINERS, data, make  # the set-ups of every trainer
from torch import nn

from pyro_ebm.guides import AmortizedBernoulli
from pyro_ebm.infer import DSM, BiSM, ContrastiveDivergence, DivergenceError, ScoreMatching
from pyro_ebm.models import GaussianRBM


@pytest.fixture(autouse=True)
def _fresh_param_store():
    pyro.clear_param_store()


class PlainEnergy(nn.Module):
    """A plain nn.Module (no PyroModule, no pyro.module): E(v) = ½‖v‖² + Linear(v)²."""

    def __init__(self, dim=2):
        super().__init__()
        self.lin = nn.Linear(dim, 1)

    def forward(self, v):
        with pyro.plate("data", len(v)):
            pyro.factor("energy", -(0.5 * v.pow(2).sum(-1) + self.lin(v).squeeze(-1).pow(2)))


class PlainLatentModel(nn.Module):
    """h ~ N(0, 1), p̃(v | h) = exp(-½‖v − W h‖²) with W a plain nn.Linear child."""

    def __init__(self):
        super().__init__()
        self.W = nn.Linear(1, 2, bias=False)

    def forward(self, v):
        with pyro.plate("data", len(v)):
            h = pyro.sample("h", dist.Normal(v.new_zeros(len(v), 1), 1.0).to_event(1))
            pyro.factor("energy", -0.5 * (v - self.W(h)).pow(2).sum(-1))


class PlainGuide(nn.Module):
    """A guide whose encoder is a plain nn.Linear, with no pyro.module statement."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 2)

    def forward(self, v):
        loc, raw = self.net(v).chunk(2, -1)
        with pyro.plate("data", len(v)):
            pyro.sample("h", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


def snapshot(modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


def changed(before, modules):
    after = [p.detach() for m in modules for p in m.parameters()]
    return [not torch.equal(b, a) for b, a in zip(before, after, strict=True)]


@pytest.mark.parametrize("name", ["ScoreMatching", "CD", "BiSM"])
def test_plain_nn_module_parameters_are_trained(name):
    """Parameters of a plain nn.Module model (and guide) that never meet Pyro's
    param store were silently left untouched; every level now trains them."""
    torch.manual_seed(0)
    v = torch.randn(16, 2)
    if name == "BiSM":
        model, guide = PlainLatentModel(), PlainGuide()
        trainer = BiSM(model, guide, pyro.optim.Adam({"lr": 0.01}), objective=DSM(0.3), inner_steps=1,
                       unroll_steps=1)
        modules = [model, guide]
    else:
        model = PlainEnergy()
        optim = pyro.optim.Adam({"lr": 0.01})
        kind = ScoreMatching if name == "ScoreMatching" else ContrastiveDivergence
        trainer = kind(model, optim)
        modules = [model]
    before = snapshot(modules)
    trainer.step(v)
    assert all(changed(before, modules)), changed(before, modules)


def test_score_matching_equals_svi_with_the_same_objective():
    """infer.ScoreMatching takes the step SVI(loss=DSM) takes (SGD: no state)."""
    v = torch.randn(32, 3, dtype=torch.float64)
    results = []
    for kind in ("trainer", "svi"):
        pyro.clear_param_store()
        torch.manual_seed(0)
        grbm = GaussianRBM(3, 4).double()
        optim = pyro.optim.SGD({"lr": 0.05})
        if kind == "trainer":
            trainer = ScoreMatching(grbm.marginal, optim, objective=DSM(0.2))
        else:
            trainer = pyro.infer.SVI(grbm.marginal, lambda v: None, optim, loss=DSM(0.2))
        torch.manual_seed(1)
        losses = [trainer.step(v) for _ in range(3)]
        results.append((losses, [p.detach().clone() for p in grbm.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    for a, b in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_one_fused_optimizer_per_level_and_separate_states():
    grbm = GaussianRBM(2, 3)
    guide = AmortizedBernoulli(2, 3, site="h")
    optim = pyro.optim.Adam({"lr": 1e-3})
    bism = BiSM(grbm, guide, optim, objective=DSM(0.1), inner_steps=2, unroll_steps=1)
    loss = bism.step(torch.randn(8, 2))
    assert isinstance(loss, float) and set(bism.last_losses) == {"upper", "lower"}
    model, lower = bism.levels["model"], bism.levels["guide"]
    assert {id(p) for p in model.params} == {id(p) for p in grbm.parameters()}
    assert {id(p) for p in lower.params} == {id(p) for p in guide.parameters()}
    for level in (model, lower):
        assert isinstance(level.optimizer, torch.optim.Adam) and level.optimizer.defaults["fused"]
    # one pyro.optim object, two torch optimizers with their own states
    assert model.optimizer is not lower.optimizer
    assert float(lower.optimizer.state[lower.params[0]]["step"]) == 2
    assert float(model.optimizer.state[model.params[0]]["step"]) == 1
    sgd = ScoreMatching(GaussianRBM(2, 3).marginal, pyro.optim.SGD({"lr": 0.1}))
    sgd.step(torch.randn(8, 2))
    assert sgd.levels["model"].optimizer.defaults["foreach"]


def test_pyro_scheduler_steps_the_level_optimizer():
    grbm = GaussianRBM(2, 3)
    scheduler = pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.1},
                                          "gamma": 0.5})
    trainer = ScoreMatching(grbm.marginal, scheduler)
    v = torch.randn(8, 2)
    trainer.step(v)
    optimizer = trainer.levels["model"].optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    scheduler.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    trainer.step(v)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_callable_optim_args_give_one_group_per_distinct_arguments():
    grbm = GaussianRBM(2, 3)
    optim = pyro.optim.Adam(lambda name: {"lr": 0.1 if name == "W" else 0.0})
    trainer = ScoreMatching(grbm.marginal, optim)
    before = {k: p.detach().clone() for k, p in grbm.named_parameters()}
    trainer.step(torch.randn(8, 2))
    groups = trainer.levels["model"].optimizer.param_groups
    assert sorted(g["lr"] for g in groups) == [0.0, 0.1] and sum(len(g["params"]) for g in groups) == 4
    for name, p in grbm.named_parameters():
        assert torch.equal(p.detach(), before[name]) == (name != "W"), name


def test_pyro_optim_state_round_trip_reaches_the_level_optimizer(tmp_path):
    torch.manual_seed(0)
    v = torch.randn(8, 2)
    grbm = GaussianRBM(2, 3)
    optim = pyro.optim.Adam({"lr": 0.01})
    trainer = ScoreMatching(grbm.marginal, optim)
    for _ in range(3):
        trainer.step(v)
    path = tmp_path / "optim.pt"
    optim.save(str(path))
    again = pyro.optim.Adam({"lr": 0.01})
    again.load(str(path))
    other = ScoreMatching(grbm.marginal, again)
    other.step(v)  # loads the saved state before its update
    level = other.levels["model"]
    assert float(level.optimizer.state[level.params[0]]["step"]) == 4
    # the trainer's own state_dict carries num_steps and the optimizers
    state = trainer.state_dict()
    fresh = ScoreMatching(grbm.marginal, pyro.optim.Adam({"lr": 0.01}))
    fresh.load_state_dict(state)
    assert fresh.num_steps == 3
    fresh.step(v)
    level = fresh.levels["model"]
    assert fresh.num_steps == 4 and float(level.optimizer.state[level.params[0]]["step"]) == 4


def optimizer_states(trainer):
    return {name: [{k: v.detach().clone() if torch.is_tensor(v) else v for k, v in st.items()}
                   for st in (level.optimizer.state.get(p, {}) for p in level.params)]
            for name, level in trainer.levels.items()}


def assert_same_states(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            assert x.keys() == y.keys(), name
            for k in x:
                assert torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])), (name, k)


def test_diverged_model_update_names_the_model_level_and_undoes_the_step():
    """A model update that overflows (a huge learning rate on a model with large
    gradients) was reported at the next step, blamed on the guide, with every
    parameter already NaN. Now the step that diverges says so, names the model
    level, and leaves parameters and optimizer states as they were."""
    torch.manual_seed(0)
    grbm = GaussianRBM(2, 3)
    guide = AmortizedBernoulli(2, 3, site="h")
    bism = BiSM(grbm, guide, pyro.optim.Adam({"lr": 1e-2}), objective=DSM(0.1), inner_steps=2, unroll_steps=1)
    v = 30 * torch.randn(16, 2)
    bism.step(v)
    bism.step(v)
    bism.levels["model"].optimizer.param_groups[0]["lr"] = 1e39  # overflows float32
    params = snapshot([grbm, guide])
    states = optimizer_states(bism)
    with pytest.raises(DivergenceError) as info:
        bism.step(v)
    err = info.value
    assert err.step == 3 and err.level == "model"
    assert "BiSM diverged at step 3 (upper-level update): parameter" in str(err), str(err)
    assert "(model level)" in str(err), str(err)
    assert not any(changed(params, [grbm, guide]))
    assert_same_states(states, optimizer_states(bism))
    assert bism.num_steps == 2
    # and training goes on from there
    bism.levels["model"].optimizer.param_groups[0]["lr"] = 1e-2
    assert math.isfinite(bism.step(v)) and bism.num_steps == 3


@pytest.mark.parametrize("name", [n for n in TRAINERS if n != "SVI+DSM"])
def test_every_trainer_undoes_a_diverged_step(name):
    trainer, step, _ = make(name)
    v = data()
    step(v)
    step(v)
    params = [p for level in trainer.levels.values() for p in level.params]
    before = [p.detach().clone() for p in params]
    states = optimizer_states(trainer)
    chains = getattr(trainer, "chains", None)
    for level in trainer.levels.values():
        for group in level.optimizer.param_groups:
            group["lr"] = 1e39
    with pytest.raises(DivergenceError) as info:
        step(v)
    assert info.value.step == 3 and info.value.level in trainer.levels, str(info.value)
    assert "diverged at step 3" in str(info.value) and f"({info.value.level} level)" in str(info.value)
    for b, p in zip(before, params, strict=True):
        assert torch.equal(b, p.detach())
    assert_same_states(states, optimizer_states(trainer))
    assert getattr(trainer, "chains", None) is chains
    assert trainer.num_steps == 2 and params


def test_the_return_type_is_one_float_everywhere():
    for name in [n for n in TRAINERS if n != "SVI+DSM"]:
        trainer, step, _ = make(name)
        v = data()
        loss = step(v)
        assert isinstance(loss, float), name
        assert loss == trainer.last_losses[trainer.main_loss], name
        assert all(isinstance(x, float) for x in trainer.last_losses.values()), name
        assert isinstance(trainer.evaluate_loss(v), float), name
        assert trainer.num_steps == 1, name


def test_collecting_the_parameters_leaves_the_random_stream_alone():
    """The first call collects the parameters by running the guide and the model;
    those runs must not shift the user's random numbers."""
    grbm = GaussianRBM(2, 3)
    bism = BiSM(grbm, AmortizedBernoulli(2, 3, site="h"), pyro.optim.Adam({"lr": 1e-3}), objective=DSM(0.1),
                inner_steps=1, unroll_steps=1)
    v = torch.randn(8, 2)
    bism.score(v)  # validation (once per shape) is not part of this test
    torch.manual_seed(5)
    first = bism.hypergradient(v)[0]  # collects the parameters
    torch.manual_seed(5)
    assert bism.hypergradient(v)[0] == first
