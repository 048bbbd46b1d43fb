# SPDX-License-Identifier: Apache-2.0
"""compile= of BiSM and VaGES: compiled steps equal eager ones from the same seed."""

import warnings

import pyro
import pytest
import torch
from test_bism import GaussianLatentModel, LinearGaussianEncoder  # the Gaussian-latent set-up

from pyro_ebm.guides import AmortizedBernoulli, AmortizedNormal
from pyro_ebm.infer import DSM, MDSM, SSM, BiSM, ExactSM, ScoreObjective, VaGES
from pyro_ebm.models import GaussianRBM

AOT = {"backend": "aot_eager"}  # compiles the same graphs as inductor, without code generation


def grbm_run(make, compile, steps=2, seed=0):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    grbm = GaussianRBM(2, 4, init_scale=0.3, name="grbm")
    guide = AmortizedBernoulli(2, 4, site="h", temperature=0.5)
    algo = make(grbm, guide, compile)
    v = torch.randn(32, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [algo.step(v) for _ in range(steps)]
    params = [p.detach().clone() for p in list(grbm.parameters()) + list(guide.parameters())]
    return losses, params, [w for w in caught if "compiled" in str(w.message)]


def assert_same(eager, compiled, rtol=1e-5):
    assert compiled[0] == pytest.approx(eager[0], rel=rtol)
    for a, b in zip(eager[1], compiled[1], strict=True):
        torch.testing.assert_close(b, a, rtol=rtol, atol=1e-6)


def bism(objective=None, num_particles=1, inner=2, unroll=2):
    def make(grbm, guide, compile):
        return BiSM(grbm, guide, pyro.optim.Adam({"lr": 0.05, "betas": (0.9, 0.95)}),
                    objective=DSM(0.3) if objective is None else objective, inner_steps=inner,
                    unroll_steps=unroll, num_particles=num_particles, compile=compile)

    return make


@pytest.mark.parametrize("num_particles, objective", [(1, DSM(0.3)), (2, MDSM(0.1, 1.0, 0.2)), (1, SSM()),
                                                     (2, SSM(num_projections=2)), (1, ExactSM())])
def test_bism_compiled_equals_eager(num_particles, objective):
    make = bism(objective, num_particles)
    eager = grbm_run(make, False)
    compiled = grbm_run(make, AOT)
    assert not compiled[2], [str(w.message) for w in compiled[2]]
    assert_same(eager, compiled)
    # and the steps did move the parameters (a compiled step that updated nothing would fail above
    # only if eager did nothing too)
    start = grbm_run(make, False, steps=0)
    assert max(float((a - b).abs().max()) for a, b in zip(start[1], eager[1], strict=True)) > 1e-3


def test_bism_compiled_fisher_lower_with_a_gaussian_guide():
    def run(compile):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = GaussianLatentModel()
        guide = AmortizedNormal(LinearGaussianEncoder().double(), site="h")
        v = torch.randn(16, 1, dtype=torch.float64) * 1.3
        algo = BiSM(model, guide, pyro.optim.Adam({"lr": 0.05}), objective=DSM(0.5), inner_steps=1,
                    unroll_steps=1, lower="fisher", compile=compile)
        losses = [algo.step(v) for _ in range(2)]
        return losses, [p.detach().clone() for p in list(model.parameters()) + list(guide.parameters())]

    eager, compiled = run(False), run(AOT)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-10)
    for a, b in zip(eager[1], compiled[1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("objective", ["dsm", "mdsm"])
def test_vages_compiled_equals_eager(objective):
    def make(grbm, guide, compile):
        return VaGES(grbm, guide, pyro.optim.Adam({"lr": 0.05}), objective=objective, noise_scale=0.3,
                     num_particles=3, inner_steps=2, compile=compile)

    eager = grbm_run(make, False)
    compiled = grbm_run(make, AOT)
    assert not compiled[2], [str(w.message) for w in compiled[2]]
    assert_same(eager, compiled)


def test_bism_compiled_with_inductor():
    make = bism(inner=0, unroll=0)  # one graph: the other parts compile with aot_eager above (cold cache)
    eager = grbm_run(make, False)
    compiled = grbm_run(make, True)
    assert not compiled[2], [str(w.message) for w in compiled[2]]
    assert_same(eager, compiled, rtol=1e-4)


class EagerOnlySM(ScoreObjective):
    """A user's objective with ``per_item`` alone (no ``pure_per_item``): SSM's value."""

    def per_item(self, score_fn, v):
        return SSM().per_item(score_fn, v)


def test_an_objective_without_a_pure_form_falls_back_with_one_warning():
    make = bism(EagerOnlySM())
    eager = grbm_run(make, False, steps=3)
    compiled = grbm_run(make, AOT, steps=3)
    assert len(compiled[2]) == 1
    message = str(compiled[2][0].message)
    assert "EagerOnlySM" in message and "runs eagerly" in message
    assert_same(eager, compiled)


def test_a_compiler_failure_falls_back_with_one_warning_per_compiled_part():
    def refuse(gm, example_inputs):
        raise RuntimeError("this backend compiles nothing")

    torch._dynamo.reset()  # graphs cached by the tests before, with another backend, would be reused
    make = bism()
    eager = grbm_run(make, False, steps=3)
    compiled = grbm_run(make, {"backend": refuse}, steps=3)
    # the lower-level step and the hypergradient: one warning each, not one per step
    messages = sorted(str(w.message).split(" could not")[0] for w in compiled[2])
    assert messages == ["BiSM's hypergradient", "BiSM's lower-level step"]
    assert_same(eager, compiled)
