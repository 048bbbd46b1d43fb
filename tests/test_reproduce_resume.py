# SPDX-License-Identifier: Apache-2.0
"""`pyro-ebm reproduce`: runs written as they finish, `--resume`, mid-run checkpoints."""

import json
import math
import os
import re
import signal

import pytest
import torch

from pyro_ebm import cli, datasets
from pyro_ebm.experiments import _grbm_table, _runs
from pyro_ebm.experiments._runs import RunStore


def _untimed(report):
    """The report without its wall times (the 's / run' column, 'ms per iteration')."""
    report = re.sub(r"\| [\d.]+ \|$", "| T |", report, flags=re.M)
    report = re.sub(r"[\d.]+× cheaper", "T", report)
    return re.sub(r"\d+(\.\d+)? (s|ms)\b", "T", re.sub(r"(iteration, one thread\): ).*", r"\1T", report))


def _count_calls(monkeypatch, module, name, fail_at=None):
    """Wrap ``module.name``: count its calls; the ``fail_at``-th raises KeyboardInterrupt."""
    original, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(args[0] if args else None)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def test_runs_are_written_as_they_finish_and_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    calls = _count_calls(monkeypatch, _grbm_table, "train_one", fail_at=2)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["reproduce", "grbm-checkerboard", "--quick", "--out", str(tmp_path)])
    assert exit_info.value.code == 130 and calls == ["CD-1", "PCD-1"]
    err = capsys.readouterr().err
    assert "interrupted. The 1 finished runs are in" in err, err
    assert f"pyro-ebm reproduce grbm-checkerboard --out {tmp_path} --resume --quick" in err, err
    records = list((tmp_path / "runs").glob("*.json"))
    assert len(records) == 1 and not list((tmp_path / "runs").glob(".*.tmp"))
    record = json.loads(records[0].read_text())
    assert record["key"] == "CD-1 seed 0" and record["config"]["quick"] is True
    assert math.isfinite(record["numbers"]["ll"]) and record["numbers"]["diverged"] is None
    assert not (tmp_path / "grbm-checkerboard.md").exists()


def test_resume_skips_finished_runs_and_gives_the_same_report(tmp_path, monkeypatch, capsys):
    straight = cli.reproduce("grbm-checkerboard", out=tmp_path / "a", quick=True)
    with monkeypatch.context() as m:
        _count_calls(m, _grbm_table, "train_one", fail_at=4)
        with pytest.raises(SystemExit):
            cli.reproduce("grbm-checkerboard", out=tmp_path / "b", quick=True)
    assert _runs.finished_runs(tmp_path / "b") == 3
    calls = _count_calls(monkeypatch, _grbm_table, "train_one")
    resumed = cli.reproduce("grbm-checkerboard", out=tmp_path / "b", quick=True, resume=True)
    capsys.readouterr()
    assert calls == ["SSM", "BiDSM (K=5, N=0)", "BiDSM (K=5, N=5)", "BiSSM (K=5, N=5)",
                     "VaGES-DSM (L=2, K=5)"]
    assert _untimed(resumed) == _untimed(straight)
    assert (tmp_path / "b" / "grbm_checkerboard.png").stat().st_size > 1000
    # without --resume every run is computed again
    calls.clear()
    cli.reproduce("grbm-checkerboard", out=tmp_path / "b", quick=True)
    capsys.readouterr()
    assert len(calls) == 8


def test_a_record_of_another_configuration_or_unreadable_is_computed_again(tmp_path):
    computed = []

    def compute(x):
        computed.append(x)
        return {"x": (x, 2.5)}, {"t": torch.arange(3)}

    store = RunStore(tmp_path, config={"quick": True})
    numbers, tensors = store.run("a/b seed 0", compute, 1)  # a tuple reads back from JSON as a list
    assert numbers == {"x": [1, 2.5]} and torch.equal(tensors["t"], torch.arange(3))
    numbers, tensors = RunStore(tmp_path, resume=True, config={"quick": True}).run("a/b seed 0", compute, 9)
    assert numbers == {"x": [1, 2.5]} and torch.equal(tensors["t"], torch.arange(3)) and computed == [1]
    assert RunStore(tmp_path, resume=True, config={"quick": False}).run("a/b seed 0", compute, 7)[0] == \
        {"x": [7, 2.5]}
    store.record_path("a/b seed 0").write_text("{not json")
    with pytest.warns(UserWarning, match="does not read"):
        assert RunStore(tmp_path, resume=True, config={"quick": True}).run("a/b seed 0", compute, 8)[0] == \
            {"x": [8, 2.5]}


def _interrupt_at(monkeypatch, cls, step_number):
    """``cls.step`` sends SIGINT to this process during its ``step_number``-th call
    (counted from 1); returns the list of calls."""
    original, calls = cls.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step_number:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "step", step)
    return calls


@pytest.mark.parametrize("method", ["DSM", "PCD-1", "BiDSM (K=5, N=5)"])
def test_a_training_interrupted_mid_run_resumes_from_its_checkpoint(method, tmp_path, monkeypatch):
    monkeypatch.setattr(_runs, "CHECKPOINT_EVERY", 4)
    train = datasets.toy("checkerboard", 500, seed=100)
    test = datasets.toy("checkerboard", 200, seed=101)
    factory = _grbm_table.method_factories(0.05, 1e-3, 2, 4)[method]
    config = {"iterations": 12}

    def run(folder, resume=False):
        store = RunStore(folder, resume, config)
        return store.run("run", _grbm_table.train_one, method, factory, train, test, 2, 4, 12, 0, store)

    straight, straight_model = run(tmp_path / "a")
    from pyro_ebm.models import GaussianRBM

    cls = type(factory(GaussianRBM(2, 4)))
    with monkeypatch.context() as m:
        _interrupt_at(m, cls, 10)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "b")
    checkpoint = RunStore(tmp_path / "b", config=config).checkpoint_path("run", "trainer")
    assert torch.load(checkpoint, weights_only=False)["step"] == 10  # saved after the interrupted step
    assert _runs.finished_runs(tmp_path / "b") == 0
    calls = _interrupt_at(monkeypatch, cls, -1)
    resumed, resumed_model = run(tmp_path / "b", resume=True)
    assert len(calls) == 2  # steps 11 and 12 only
    assert (resumed["ll"], resumed["sm"]) == (straight["ll"], straight["sm"])
    for name, value in straight_model["model"].items():
        assert torch.equal(resumed_model["model"][name], value), name
    assert not checkpoint.exists()  # the finished run's record replaces its checkpoints


def test_a_run_of_several_trainings_resumes_mid_run_with_the_same_report(tmp_path, monkeypatch, capsys):
    """teaching-toy trains a VAE by SVI, a short-run EBM by a hand-written loop and
    MCMC teaching in one run: interrupted in the third training, the resumed run
    restores the first two from their last checkpoints and continues the third."""
    from pyro_ebm.infer import MCMCTeaching

    monkeypatch.setattr(_runs, "CHECKPOINT_EVERY", 2)
    straight = cli.reproduce("teaching-toy", out=tmp_path / "a", quick=True)
    with monkeypatch.context() as m:
        _interrupt_at(m, MCMCTeaching, 3)
        with pytest.raises(SystemExit) as exit_info:
            cli.reproduce("teaching-toy", out=tmp_path / "b", quick=True)
    assert exit_info.value.code == 130
    assert "The 0 finished runs are in" in capsys.readouterr().err
    checkpoints = sorted(p.name.split(".")[1] for p in (tmp_path / "b" / "runs").glob("*.ckpt.pt"))
    assert checkpoints == ["VAE_alone", "short-run_EBM", "teaching"]
    calls = _interrupt_at(monkeypatch, MCMCTeaching, -1)
    resumed = cli.reproduce("teaching-toy", out=tmp_path / "b", quick=True, resume=True)
    capsys.readouterr()
    assert len(calls) == 2  # steps 4 and 5 of 5
    assert _untimed(resumed) == _untimed(straight)


def test_bidvl_digits_interrupted_in_its_first_training_resumes_with_the_same_report(tmp_path, monkeypatch,
                                                                                   capsys):
    from pyro_ebm.infer import BiDVL

    monkeypatch.setattr(_runs, "CHECKPOINT_EVERY", 3)
    straight = cli.reproduce("bidvl-digits", out=tmp_path / "a", quick=True)
    with monkeypatch.context() as m:
        _interrupt_at(m, BiDVL, 5)
        with pytest.raises(SystemExit):
            cli.reproduce("bidvl-digits", out=tmp_path / "b", quick=True)
    calls = _interrupt_at(monkeypatch, BiDVL, -1)
    resumed = cli.reproduce("bidvl-digits", out=tmp_path / "b", quick=True, resume=True)
    capsys.readouterr()
    assert len(calls) == 5  # steps 6 to 10 of 10
    assert _untimed(resumed) == _untimed(straight)


def test_resume_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--resume continue an interrupted reproduction in the same --out folder" in text
