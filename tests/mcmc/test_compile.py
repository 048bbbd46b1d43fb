# SPDX-License-Identifier: Apache-2.0
"""``mcmc.sample(..., compile=...)``: the compiled kernel step gives the eager
step's draws (same seed), falls back to the eager kernel with one warning, and
samples the right distribution.

Most cases compile with ``{"backend": "aot_eager"}`` (dynamo and AOT autograd
without code generation: fast); one runs the default inductor backend."""

import signal
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch._dynamo

from pyro_ebm import mcmc
from pyro_ebm.energy import energy_view

DT = torch.float64
FAST = {"backend": "aot_eager"}
GEN = torch.Generator().manual_seed(0)
FEATURES = torch.randn(40, 3, generator=GEN, dtype=DT)
LABELS = (FEATURES[:, 0] + 0.5 * torch.randn(40, generator=GEN, dtype=DT) > 0).to(DT)


def logistic_model(features, labels):
    """A posterior over a real weight vector and a positive scale (a log-det term)."""
    w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=DT), 1.0).to_event(1))
    scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=DT), 0.5))
    logits = (w @ features.T) * scale.unsqueeze(-1)  # (N,), or (C, N) under the chain plate
    nll = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, labels.expand_as(logits), reduction="none").sum(-1)
    pyro.factor("log_likelihood", -nll)


def quartic(x):
    return 0.5 * x.pow(2).sum(-1) + 0.1 * x.pow(4).sum(-1)


KERNELS = {
    "MALA": lambda: mcmc.MALA(0.05),
    "HMC": lambda: mcmc.HMC(0.1, num_steps=3),
}


def run(target, kernel, compile, seed=1, chains=8, draws=15, warmup=15):
    torch.manual_seed(seed)
    if target == "model":
        return mcmc.sample(logistic_model, kernel, chains, draws, warmup_steps=warmup,
                           model_args=(FEATURES, LABELS), compile=compile, progress=False)
    return mcmc.sample(potential_fn=target, kernel=kernel, num_chains=chains, num_samples=draws,
                       warmup_steps=warmup, initial=torch.zeros(chains, 2, dtype=DT), compile=compile,
                       progress=False)


def assert_same_run(a, b, tol=1e-9):
    for site, value in a.get_samples().items():
        torch.testing.assert_close(b.get_samples()[site], value, rtol=tol, atol=tol)
    for name, value in a.stats.items():
        if value.dtype == torch.bool:
            assert torch.equal(b.stats[name], value), name
        else:
            torch.testing.assert_close(b.stats[name], value, rtol=tol, atol=tol)


def no_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert not messages, messages
    return out


def compiled_graphs(fn):
    """``fn()`` and the number of graphs dynamo compiled while it ran."""
    torch._dynamo.utils.counters.clear()
    out = fn()
    return out, torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("target", ["model", "potential"])
def test_compiled_equals_eager(name, target):
    target = "model" if target == "model" else quartic
    if target == "model":  # trace the model's structure before either run draws from the seed
        run("model", KERNELS[name](), False, draws=1, warmup=0)
    torch._dynamo.reset()
    eager = run(target, KERNELS[name](), False)
    compiled, graphs = compiled_graphs(lambda: no_warnings(lambda: run(target, KERNELS[name](), FAST)))
    assert graphs >= 1  # the step really was compiled
    assert_same_run(eager, compiled)
    assert eager.stats["accept_prob"].mean() > 0.3  # the runs moved, so equal draws mean something


def test_compiled_equals_eager_data_potential():
    """A model's data potential (a GaussianRBM's free energy) as ``potential_fn``:
    compiled through the model's pure density, parameters passed as tensors."""
    from pyro_ebm.models import GaussianRBM

    torch.manual_seed(0)
    grbm = GaussianRBM(visible_dim=2, hidden_dim=3).double()
    energy = energy_view(grbm.marginal).data_potential()
    torch._dynamo.reset()
    eager = run(energy, mcmc.MALA(0.1), False)
    compiled, graphs = compiled_graphs(lambda: no_warnings(lambda: run(energy, mcmc.MALA(0.1), FAST)))
    assert graphs >= 1
    assert_same_run(eager, compiled)


@pytest.mark.parametrize("kernel", [
    mcmc.ULA(0.05),
    mcmc.UnderdampedLangevin(0.1, friction=0.5),
    mcmc.AnnealedLangevin(0.05, temperatures=[4.0, 2.0, 1.0], steps_per_level=5),
], ids=lambda k: type(k).__name__)
def test_compiled_equals_eager_other_kernels(kernel):
    torch._dynamo.reset()
    eager = run(quartic, kernel, False)
    compiled = no_warnings(lambda: run(quartic, kernel, FAST))
    assert_same_run(eager, compiled)


def test_compiled_inductor_default():
    """``compile=True``: torch.compile's default backend (inductor) on CPU."""
    torch._dynamo.reset()
    eager = run(quartic, mcmc.MALA(0.3), False, draws=10, warmup=10)
    compiled = no_warnings(lambda: run(quartic, mcmc.MALA(0.3), True, draws=10, warmup=10))
    assert_same_run(eager, compiled, tol=1e-7)


def test_compiled_known_answer():
    """Compiled HMC on a correlated Gaussian: means 0, covariance [[1, .8], [.8, 1]]
    (Monte Carlo errors of 512 chains x 100 draws are about 0.01 for the means)."""
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=DT)
    prec = torch.linalg.inv(cov)

    def gaussian(x):
        return 0.5 * ((x @ prec) * x).sum(-1)

    torch._dynamo.reset()
    torch.manual_seed(0)
    samples = mcmc.sample(potential_fn=gaussian, kernel=mcmc.HMC(0.3, num_steps=5), num_chains=512,
                          num_samples=100, warmup_steps=100, initial=torch.randn(512, 2, dtype=DT),
                          compile=FAST, progress=False)
    x = samples.get_samples(group_by_chain=False)["x"]
    assert x.mean(0).abs().max() < 0.06
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.06, rtol=0)


def test_not_traced_model_falls_back_with_one_warning():
    """A model whose view runs on the Pyro path has no pure density: one warning,
    then the eager kernel's draws."""
    def model(features, labels):
        logistic_model(features, labels)

    view = energy_view(model)
    view.traced = False
    run_model = lambda compile: (torch.manual_seed(1), mcmc.sample(  # noqa: E731
        model, mcmc.MALA(0.05), 8, 10, warmup_steps=10, model_args=(FEATURES, LABELS), compile=compile,
        progress=False))[1]
    run_model(False)  # the structure, traced once before the seeded runs
    eager = run_model(False)
    with pytest.warns(UserWarning) as caught:
        compiled = run_model(FAST)
    assert len(caught) == 1
    assert "MALA step runs eagerly" in str(caught[0].message) and "Pyro path" in str(caught[0].message)
    assert_same_run(eager, compiled, tol=0)


def test_potential_refused_by_torch_func_falls_back_with_one_warning():
    def item_potential(x):  # NumPy cannot see a tensor under torch.func.grad
        return quartic(x) + 0.0 * float(x.detach().numpy().sum())

    eager = run(item_potential, mcmc.MALA(0.05), False)
    with pytest.warns(UserWarning) as caught:
        compiled = run(item_potential, mcmc.MALA(0.05), FAST)
    assert len(caught) == 1 and "torch.func" in str(caught[0].message)
    assert_same_run(eager, compiled, tol=0)


def test_step_refused_by_compiler_falls_back_with_one_warning():
    def breaking(x):  # a graph break, which fullgraph=True refuses
        torch._dynamo.graph_break()
        return quartic(x)

    torch._dynamo.reset()
    eager = run(breaking, mcmc.HMC(0.1, num_steps=3), False)
    with pytest.warns(UserWarning) as caught:
        compiled = run(breaking, mcmc.HMC(0.1, num_steps=3), {"backend": "aot_eager", "fullgraph": True})
    assert len(caught) == 1 and "HMC step could not be compiled" in str(caught[0].message)
    assert_same_run(eager, compiled)


@pytest.mark.parametrize("bad", ["yes", 1, {"bogus": 1}])
def test_bad_compile_argument(bad):
    with pytest.raises(TypeError, match="compile must be True|not torch.compile arguments"):
        run(quartic, mcmc.MALA(0.05), bad)


def test_each_model_compiles_within_its_own_recompile_limit():
    """torch.compile counts recompiles per code object: each model (and kernel type)
    gets its own copy of the step's code, so a process that samples many models
    keeps compiling them (here with the limit lowered to 2, and 3 models)."""
    def make_model(shift):
        def model(features, labels):
            w = pyro.sample("w", dist.Normal(torch.full((3,), shift, dtype=DT), 1.0).to_event(1))
            pyro.factor("lik", -(w @ features.T - labels).pow(2).sum(-1))
        return model

    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2):
        for shift in (0.0, 1.0, 2.0):
            model = make_model(shift)
            _, graphs = compiled_graphs(lambda model=model: mcmc.sample(
                model, mcmc.MALA(0.05), 4, 3, model_args=(FEATURES, LABELS),
                initial=torch.zeros(4, 3, dtype=DT), compile=FAST, progress=False))
            assert graphs >= 1, shift


@pytest.mark.parametrize("target", ["model", "potential"])
def test_sampling_the_same_target_again_compiles_nothing(target):
    """A second ``mcmc.sample(compile=...)`` call on the same model (or potential)
    and shapes reuses the graphs of the first: it compiles no new graph, one step
    per call and k steps per call alike."""
    target = "model" if target == "model" else quartic
    torch._dynamo.reset()
    _, first = compiled_graphs(lambda: run(target, mcmc.MALA(0.05), FAST, seed=1))
    again, second = compiled_graphs(lambda: run(target, mcmc.MALA(0.05), FAST, seed=2))
    assert first >= 2  # the warmup's one-step function and the k-step function after it
    assert second == 0
    assert torch.isfinite(next(iter(again.get_samples().values()))).all()


def counting_runs(monkeypatch, interrupt_after=None):
    """Count the calls of ``CompiledSteps.run`` (and their step counts); with
    ``interrupt_after``, send SIGINT to this process after that many calls."""
    from pyro_ebm.mcmc.compiled import CompiledSteps

    calls = []
    original = CompiledSteps.run

    def run_steps(self, state, k):
        out = original(self, state, k)
        calls.append(k)
        if interrupt_after is not None and len(calls) == interrupt_after:
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(CompiledSteps, "run", run_steps)
    return calls


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("target", ["model", "potential"])
def test_several_steps_per_call_equal_eager(name, target, monkeypatch):
    """After warmup, ``steps_per_call`` compiled steps per call (their random numbers
    drawn first, in the order of single steps) give the eager run's draws and
    statistics, with thinning and a sampling phase of 7 * 3 = 21 steps: five calls
    of 4 steps, then one single step; the generator ends where the eager run's does."""
    target = "model" if target == "model" else quartic
    if target == "model":
        run("model", KERNELS[name](), False, draws=1, warmup=0)
    torch._dynamo.reset()
    options = dict(FAST, steps_per_call=4)

    def sampled(compile):
        torch.manual_seed(1)
        if target == "model":
            out = mcmc.sample(logistic_model, KERNELS[name](), 8, 7, warmup_steps=10, thin=3,
                              model_args=(FEATURES, LABELS), compile=compile, progress=False)
        else:
            out = mcmc.sample(potential_fn=target, kernel=KERNELS[name](), num_chains=8, num_samples=7,
                              warmup_steps=10, thin=3, initial=torch.zeros(8, 2, dtype=DT), compile=compile,
                              progress=False)
        return out, torch.rand(3)  # where the generator ended

    eager, after_eager = sampled(False)
    calls = counting_runs(monkeypatch)
    compiled, after_compiled = no_warnings(lambda: sampled(options))
    assert calls == [4] * 5
    assert compiled.num_samples == 7
    assert_same_run(eager, compiled)
    torch.testing.assert_close(compiled.last_state.position, eager.last_state.position, rtol=1e-9, atol=1e-9)
    assert compiled.last_state.iteration == eager.last_state.iteration == 31
    assert torch.equal(after_compiled, after_eager)
    assert eager.stats["accept_prob"].mean() > 0.3


def test_several_steps_per_call_annealed_langevin(monkeypatch):
    """A kernel whose step inputs depend on the step number (the temperature of
    AnnealedLangevin): each of the k steps of a call gets its own."""
    kernel = mcmc.AnnealedLangevin(0.05, temperatures=[4.0, 2.0, 1.0], steps_per_level=3)
    torch._dynamo.reset()
    eager = run(quartic, kernel, False, draws=12, warmup=0)
    calls = counting_runs(monkeypatch)
    compiled = no_warnings(lambda: run(quartic, kernel, dict(FAST, steps_per_call=6), draws=12, warmup=0))
    assert calls == [6, 6]
    assert_same_run(eager, compiled)


def test_steps_per_call_default_and_short_runs(monkeypatch):
    """By default the sampling phase runs mcmc.run.STEPS_PER_CALL steps per call; a
    sampling phase shorter than that is one call; ``steps_per_call=1`` is one step
    per call."""
    from pyro_ebm.mcmc.run import STEPS_PER_CALL

    torch._dynamo.reset()
    calls = counting_runs(monkeypatch)
    run(quartic, mcmc.MALA(0.05), FAST, draws=2 * STEPS_PER_CALL + 1, warmup=3)
    assert calls == [STEPS_PER_CALL] * 2
    calls.clear()
    run(quartic, mcmc.MALA(0.05), FAST, draws=3, warmup=3)
    assert calls == [3]
    calls.clear()
    run(quartic, mcmc.MALA(0.05), dict(FAST, steps_per_call=1), draws=5, warmup=3)
    assert calls == []


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "10"])
def test_bad_steps_per_call(bad):
    with pytest.raises(ValueError, match=r"compile\['steps_per_call'\] must be an int >= 1"):
        run(quartic, mcmc.MALA(0.05), dict(FAST, steps_per_call=bad))


def test_interrupted_compiled_run_returns_the_draws_so_far(monkeypatch):
    """Ctrl-C during a call of several compiled steps ends the run after that call:
    the draws of the calls made come back, the first draws of the whole run."""
    torch._dynamo.reset()
    options = dict(FAST, steps_per_call=5)
    full = run(quartic, mcmc.MALA(0.05), options, draws=20, warmup=4)
    counting_runs(monkeypatch, interrupt_after=2)
    with pytest.warns(UserWarning, match=r"interrupted at step 14 of 24 \(sampling\): returning the 10 "
                                         r"draw\(s\) per chain"):
        part = run(quartic, mcmc.MALA(0.05), options, draws=20, warmup=4)
    assert part.num_samples == 10 and part.last_state.iteration == 14
    torch.testing.assert_close(part.positions, full.positions[:, :10], rtol=0, atol=0)
    for name, value in part.stats.items():
        assert torch.equal(value, full.stats[name][:, :10]), name
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
