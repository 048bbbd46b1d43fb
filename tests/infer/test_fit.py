# SPDX-License-Identifier: Apache-2.0
"""fit: the training loop of long runs. Resume in a new process is bit-identical;
SIGINT finishes the step, checkpoints and returns; a corrupt or foreign newest
checkpoint is skipped with a warning naming it; a divergence leaves the last good
checkpoint byte-identical; keep, the CSV, TensorBoard and bad arguments."""

import csv
import importlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyro
import pytest
import torch
from resume_cases import build, parameters

import pyro_ebm
from pyro_ebm.infer import DSM, DivergenceError, FitResult, ScoreMatching, fit, load_checkpoint
from pyro_ebm.models import GaussianRBM

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
HALF = 4  # 5 batches of 8 per epoch: the second half crosses an epoch boundary
CASES = ["ScoreMatching", "PCD", "BiSM"]


def data():
    return torch.randn(40, 2, generator=torch.Generator().manual_seed(7))


def _env():
    path = os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PYRO_EBM_PROGRESS": "0"}


def _steps(folder):
    return sorted(int(p.name[5:13]) for p in Path(folder).glob("step-*.pt"))


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _same(a, b, what):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """{name: parameters after fit to HALF (checkpoint) then, in a new process, a
    fresh trainer fit to 2 * HALF with resume=True}."""
    folder = tmp_path_factory.mktemp("fit_resume")
    for name in CASES:
        result = fit(build(name), data(), HALF, 8, checkpoint=folder / name, checkpoint_every=3)
        assert result.num_steps == HALF and result.checkpoint == folder / name / f"step-{HALF:08d}.pt"
        assert _steps(folder / name) == [3, HALF]
    script = textwrap.dedent(f"""
        import torch
        from resume_cases import build, parameters
        from pyro_ebm import fit
        from test_fit import CASES, data
        for name in CASES:
            trainer = build(name)
            torch.manual_seed(12345)  # the checkpoint's random state replaces it
            result = fit(trainer, data(), {2 * HALF}, 8, checkpoint=r"{folder}/" + name, checkpoint_every=3,
                         resume=True)
            assert result.num_steps == {2 * HALF} and not result.interrupted, result
            assert len(result.losses[trainer.main_loss]) == {HALF}, result.losses
            torch.save(parameters(trainer), r"{folder}/" + name + ".out.pt")
    """)
    done = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, {name: torch.load(folder / f"{name}.out.pt") for name in CASES}


@pytest.mark.parametrize("name", CASES)
def test_fit_resumed_in_a_new_process_is_bit_identical(name, resumed):
    folder, again = resumed
    trainer = build(name)
    result = fit(trainer, data(), 2 * HALF, 8)
    assert result.num_steps == 2 * HALF and result.checkpoint is None
    _same(parameters(trainer), again[name], name)
    # every 3 steps and at the end; the newest 3 kept; one CSV row per step of both halves
    assert _steps(folder / name) == [3, 4, 6, 8][-3:]
    rows = _rows(folder / name / "metrics.csv")
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 2 * HALF + 1))


def _sigint_on(trainer, at, times=1):
    """Make ``trainer.step`` send SIGINT to this process ``times`` times after its step ``at``."""
    original = trainer.step

    def step(*args):
        loss = original(*args)
        if trainer.num_steps == at:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # let the handler run between the two
        return loss

    trainer.step = step


@pytest.fixture
def recording_handler():
    """A SIGINT handler of the test's own, so that a SIGINT fit does not catch is
    recorded rather than stopping pytest; fit must put it back."""
    got = []

    def handler(*_):
        got.append(1)

    previous = signal.signal(signal.SIGINT, handler)
    yield got, handler
    signal.signal(signal.SIGINT, previous)


def test_sigint_finishes_the_step_checkpoints_and_returns(tmp_path, recording_handler):
    trainer = build("ScoreMatching")
    _sigint_on(trainer, 3)
    result = fit(trainer, data(), 50, 8, checkpoint=tmp_path, checkpoint_every=100)
    assert isinstance(result, FitResult)
    assert result.interrupted and result.num_steps == 3 and trainer.num_steps == 3
    assert result.checkpoint == tmp_path / "step-00000003.pt" and _steps(tmp_path) == [3]
    got, handler = recording_handler
    assert got == []  # fit's handler took it
    assert signal.getsignal(signal.SIGINT) is handler  # and put the previous one back


def test_a_second_sigint_raises_keyboard_interrupt(tmp_path, recording_handler):
    trainer = build("ScoreMatching")
    _sigint_on(trainer, 2, times=2)
    with pytest.raises(KeyboardInterrupt):
        fit(trainer, data(), 50, 8, checkpoint=tmp_path)
    got, handler = recording_handler
    assert got == [] and _steps(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is handler


def test_sigint_to_a_process_running_fit_then_resume_matches_an_uninterrupted_run(tmp_path):
    script = textwrap.dedent(f"""
        import signal
        from resume_cases import build
        from pyro_ebm import fit
        from test_fit import data
        result = fit(build("ScoreMatching"), data(), 10 ** 7, 8, checkpoint=r"{tmp_path}",
                     checkpoint_every=10 ** 7)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        print("RESULT", result.num_steps, result.interrupted, result.checkpoint)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.csv"
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "fit wrote no metrics line"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    steps, interrupted, path = out.split("RESULT")[1].split()
    steps = int(steps)
    assert interrupted == "True" and path == str(tmp_path / f"step-{steps:08d}.pt")
    assert _steps(tmp_path) == [steps]
    assert [int(r[0]) for r in _rows(metrics)[1:]] == list(range(1, steps + 1))
    assert load_checkpoint(path)["fit"]["step"] == steps

    trainer = build("ScoreMatching")
    result = fit(trainer, data(), steps + 3, 8, checkpoint=tmp_path, resume=True)
    assert result.num_steps == steps + 3 and not result.interrupted
    straight = build("ScoreMatching")
    fit(straight, data(), steps + 3, 8)
    _same(parameters(trainer), parameters(straight), "after SIGINT and resume")


def test_a_truncated_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    fit(build("PCD"), data(), 6, 8, checkpoint=tmp_path, checkpoint_every=3)
    newest = tmp_path / "step-00000006.pt"
    newest.write_bytes(newest.read_bytes()[:200])
    with pytest.raises(ValueError, match="step-00000006.pt cannot be read"):
        load_checkpoint(newest)
    assert load_checkpoint(tmp_path / "step-00000003.pt")["fit"]["step"] == 3

    trainer = build("PCD")
    with pytest.warns(UserWarning, match=r"skipping .*step-00000006\.pt"):
        result = fit(trainer, data(), 8, 8, checkpoint=tmp_path, checkpoint_every=3, resume=True)
    assert result.num_steps == 8 and len(result.losses["loss"]) == 5  # steps 4..8 from step 3
    straight = build("PCD")
    fit(straight, data(), 8, 8)
    _same(parameters(trainer), parameters(straight), "resumed from the previous checkpoint")
    # the rows of steps 4-6 the first run logged were dropped before steps 4-8 were logged again
    assert [int(r[0]) for r in _rows(tmp_path / "metrics.csv")[1:]] == list(range(1, 9))


def test_a_foreign_file_is_refused_naming_it(tmp_path):
    foreign = tmp_path / "step-00000009.pt"
    torch.save({"a": 1}, foreign)
    with pytest.raises(ValueError, match=r"step-00000009\.pt is not a pyro_ebm checkpoint"):
        load_checkpoint(foreign)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.pt cannot be read"):
        load_checkpoint(text)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    # resume skips it (nothing else there: a fresh start), and keep=1 keeps the good file
    with pytest.warns(UserWarning, match=r"skipping .*step-00000009\.pt"):
        result = fit(build("ScoreMatching"), data(), 2, 8, checkpoint=tmp_path, resume=True, keep=1)
    assert result.num_steps == 2 and len(result.losses["loss"]) == 2
    assert _steps(tmp_path) == [2, 9] and load_checkpoint(result.checkpoint)["fit"]["step"] == 2


def _overflowing():
    pyro.clear_param_store()
    torch.manual_seed(0)
    # Adam moves every parameter by about lr: the energies overflow at the second step
    return ScoreMatching(GaussianRBM(2, 3).marginal, pyro.optim.Adam({"lr": 1e30}), objective=DSM(0.1))


def test_a_divergence_leaves_the_last_good_checkpoint_byte_identical(tmp_path):
    fit(_overflowing(), data(), 1, 8, checkpoint=tmp_path)
    good = tmp_path / "step-00000001.pt"
    before = good.read_bytes()
    with pytest.raises(DivergenceError, match="diverged at step 2") as info:
        fit(_overflowing(), data(), 10, 8, checkpoint=tmp_path, checkpoint_every=1, resume=True)
    assert info.value.step == 2
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "step-00000001.pt"]
    assert [int(r[0]) for r in _rows(tmp_path / "metrics.csv")[1:]] == [1]


def test_keep_and_the_csv_has_one_row_per_step_with_the_loss_columns(tmp_path):
    trainer = build("BiSM")
    result = fit(trainer, data(), 5, 8, checkpoint=tmp_path, checkpoint_every=1, keep=2,
                 log=tmp_path / "logs" / "bism.csv")
    assert _steps(tmp_path) == [4, 5] and not (tmp_path / "metrics.csv").exists()
    rows = _rows(tmp_path / "logs" / "bism.csv")
    assert rows[0] == ["step", "seconds", *trainer.last_losses]
    assert rows[0][2:] == ["upper", "lower"]
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 3, 4, 5]
    assert [float(r[2]) for r in rows[1:]] == result.losses["upper"]
    assert [float(r[3]) for r in rows[1:]] == result.losses["lower"]
    assert all(float(a[1]) <= float(b[1]) for a, b in zip(rows[1:], rows[2:], strict=False))


def test_batches_follow_the_seeded_permutation_of_each_epoch():
    seen = []
    trainer = build("ScoreMatching")
    original = trainer.step
    trainer.step = lambda v: (seen.append(v.clone()), original(v))[1]
    x = torch.arange(10.0).unsqueeze(-1).expand(10, 2).contiguous()
    fit(trainer, x, 7, 3, seed=5)
    # 3 batches of 3 per epoch (the 10th item is left out), then epoch 1
    for step, batch in enumerate(seen):
        epoch, pos = divmod(step, 3)
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(5 + epoch))
        assert torch.equal(batch, x[perm[3 * pos:3 * pos + 3]]), step


def test_tuple_data_and_the_whole_data_each_step():
    seen = []
    trainer = build("ScoreMatching")
    original = trainer.step
    trainer.step = lambda v, *rest: (seen.append(len(rest)), original(v))[1]
    x = data()
    fit(trainer, (x, torch.arange(40)), 2, 4)
    assert seen == [1, 1]
    seen.clear()
    trainer.step = lambda v: (seen.append(v), original(v))[1]
    fit(trainer, x, 2)
    assert all(v is x for v in seen)


def test_refuses_to_mix_runs_and_to_resume_with_other_arguments(tmp_path):
    fit(build("ScoreMatching"), data(), 2, 8, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="already holds checkpoints .*resume=True"):
        fit(build("ScoreMatching"), data(), 2, 8, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="batch_size=8, this call has batch_size=4"):
        fit(build("ScoreMatching"), data(), 4, 4, checkpoint=tmp_path, resume=True)
    with pytest.raises(ValueError, match="comes from ScoreMatching, not ContrastiveDivergence"):
        fit(build("PCD"), data(), 4, 8, checkpoint=tmp_path, resume=True)
    done = fit(build("ScoreMatching"), data(), 2, 8, checkpoint=tmp_path, resume=True)
    assert done.num_steps == 2 and done.losses == {} and done.checkpoint == tmp_path / "step-00000002.pt"


@pytest.mark.parametrize("kwargs, match", [
    ({"num_steps": 0}, "num_steps must be an int >= 1, got 0"),
    ({"batch_size": 41}, "batch_size=41 exceeds the 40 items of data"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"checkpoint_every": 0}, "checkpoint_every must be an int >= 1, got 0"),
    ({"keep": 0}, "keep must be an int >= 1"),
    ({"seed": -1}, "seed must be an int >= 0, got -1"),
    ({"data": (torch.zeros(40, 2), torch.zeros(39))}, r"share their first dim, got lengths \[40, 39\]"),
    ({"data": torch.zeros(0, 2)}, "data holds no items"),
    ({"resume": True}, "resume=True needs the checkpoint folder"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = {"data": data(), "num_steps": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        fit(build("ScoreMatching"), **args)


def test_a_non_trainer_or_non_tensor_data_is_a_type_error():
    with pytest.raises(TypeError, match="trainer must be a pyro_ebm.infer trainer .* got SVI"):
        fit(pyro.infer.SVI(lambda: None, lambda: None, pyro.optim.Adam({}), pyro.infer.Trace_ELBO()),
            data(), 3)
    with pytest.raises(TypeError, match=r"data\[1\] must be a tensor, got list"):
        fit(build("ScoreMatching"), (data(), [1, 2]), 3)


def test_the_bar_shows_a_moving_average_of_each_loss(capsys):
    fit(build("BiSM"), data(), 3, 8, progress=True)
    err = capsys.readouterr().err
    assert "step/s" in err and "upper=" in err and "lower=" in err


def test_fit_runs_outside_the_main_thread():
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("r", fit(build("ScoreMatching"), data(), 2, 8)))
    worker.start()
    worker.join(60)
    assert out["r"].num_steps == 2


def test_tensorboard_logs_or_says_what_is_missing(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"needs the tensorboard package \(pip install tensorboard\)"):
            fit(build("ScoreMatching"), data(), 2, 8, tensorboard=tmp_path / "tb")
        return
    fit(build("ScoreMatching"), data(), 2, 8, tensorboard=tmp_path / "tb")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_exported_lazily_in_any_import_order():
    code = ("import sys, pyro_ebm; assert 'fit' in pyro_ebm.__all__; "
            "print(sorted(m for m in ('torch', 'pyro') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "[]", done.stderr[-2000:]
    module = importlib.import_module("pyro_ebm.infer.loop")
    assert pyro_ebm.fit is fit and module.fit is fit and module.load_checkpoint is load_checkpoint
    assert pyro_ebm.infer.fit is fit  # the function, in any import order
