# SPDX-License-Identifier: Apache-2.0
"""state_dict / load_state_dict: 2N steps straight equal N steps, save, load into a
freshly built trainer in a new process, N steps, bit for bit on CPU, for every
trainer (BiSM with N = 5 unrolled steps); bad states give clear errors; Pyro's
param-store idiom continues from the loaded values."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyro
import pytest
import torch
from resume_cases import NAMES, batch, build, parameters, train

from pyro_ebm.infer import ScoreMatching
from pyro_ebm.models import GaussianRBM

HALF = 3
HERE = Path(__file__).parent
ROOT = HERE.parent.parent


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """{name: parameters after N steps, save, load in a new process, N steps}."""
    folder = tmp_path_factory.mktemp("resume")
    for name in NAMES:
        trainer = build(name)
        train(trainer, 0, HALF)
        torch.save(trainer.state_dict(), folder / f"{name}.pt")
    script = textwrap.dedent(f"""
        import torch
        from resume_cases import NAMES, build, parameters, train
        for name in NAMES:
            trainer = build(name)
            torch.manual_seed(12345)  # the loaded state replaces any random state
            trainer.load_state_dict(torch.load(r"{folder}/" + name + ".pt", weights_only=False))
            train(trainer, {HALF}, {2 * HALF})
            torch.save(parameters(trainer), r"{folder}/" + name + ".out.pt")
    """)
    path = os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: torch.load(folder / f"{name}.out.pt") for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_resume_in_a_new_process_is_bit_identical(name, resumed):
    trainer = build(name)
    train(trainer, 0, 2 * HALF)
    straight = parameters(trainer)
    again = resumed[name]
    assert straight.keys() == again.keys()
    for key, value in straight.items():
        assert torch.equal(value, again[key]), f"{name}: {key} differs after resuming"
    assert trainer.num_steps == 2 * HALF


def test_state_dict_survives_torch_save_and_holds_what_a_step_needs(tmp_path):
    trainer = build("PCD")
    train(trainer, 0, 2)
    state = trainer.state_dict()
    assert state["num_steps"] == 2 and state["extra"].shape == (6, 2)  # the persistent chains
    assert set(state["rng"]) >= {"torch", "python", "numpy"}
    torch.save(state, tmp_path / "pcd.pt")
    loaded = torch.load(tmp_path / "pcd.pt", weights_only=False)
    other = build("PCD")
    other.load_state_dict(loaded)
    assert torch.equal(other.chains, trainer.chains) and other.num_steps == 2


def test_a_foreign_or_mismatched_state_is_refused():
    trainer = build("ScoreMatching")
    with pytest.raises(ValueError, match="needs the output of a trainer's state_dict"):
        trainer.load_state_dict({"W": torch.zeros(2)})
    train(trainer, 0, 1)
    with pytest.raises(ValueError, match="comes from ContrastiveDivergence, not ScoreMatching"):
        pcd = build("PCD")
        train(pcd, 0, 1)
        trainer.load_state_dict(pcd.state_dict())
    wrong = build("ScoreMatching")
    train(wrong, 0, 1)
    state = wrong.state_dict()
    state["levels"]["model"]["params"]["W"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match=r"parameter 'W' of the model level has shape \(2, 3\)"):
        trainer.load_state_dict(state)


def test_pyro_param_store_idiom_continues_from_the_loaded_values(tmp_path):
    """get_param_store().save/load with the optimizer's save/load into a fresh module:
    training continues from the saved parameters (not the fresh ones) and matches
    the run that was never interrupted."""
    v = batch(0)
    pyro.clear_param_store()
    torch.manual_seed(0)
    grbm = GaussianRBM(2, 3)
    optim = pyro.optim.Adam({"lr": 0.05})
    trainer = ScoreMatching(grbm.marginal, optim)
    for _ in range(3):
        trainer.step(v)
    pyro.get_param_store().save(tmp_path / "params.pt")
    optim.save(tmp_path / "optim.pt")
    rng = torch.get_rng_state()
    trainer.step(v)
    expected = grbm.W.detach().clone()

    pyro.clear_param_store()
    fresh = GaussianRBM(2, 3)
    pyro.get_param_store().load(tmp_path / "params.pt")
    again = pyro.optim.Adam({"lr": 0.05})
    again.load(tmp_path / "optim.pt")
    other = ScoreMatching(fresh.marginal, again)
    torch.set_rng_state(rng)
    other.step(v)
    assert other.levels["model"].names == ["W", "b", "c", "log_std"]  # one copy of each parameter
    torch.testing.assert_close(fresh.W.detach(), expected, rtol=0, atol=0)
