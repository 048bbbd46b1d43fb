# SPDX-License-Identifier: Apache-2.0
"""pyro_ebm.lightning.TrainerModule: a pyro_ebm trainer driven by lightning.Trainer,
on one process and under strategy="ddp" with two CPU processes (gloo). Skipped
when PyTorch Lightning is not installed (pip install 'pyro-ebm[lightning]')."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lightning = pytest.importorskip("lightning")

import pyro  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from pyro_ebm import datasets  # noqa: E402
from pyro_ebm.infer import SSM, ScoreMatching  # noqa: E402
from pyro_ebm.lightning import TrainerModule  # noqa: E402
from pyro_ebm.models import GaussianRBM  # noqa: E402

EXAMPLE = Path(__file__).parent.parent / "examples" / "lightning_ddp.py"
def _fitter(**kwargs):
    return lightning.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_one_process_steps_the_trainer_and_logs_its_losses():
    """Each batch is one trainer.step; the logged losses are the trainer's last_losses;
    the module holds the GRBM behind grbm.marginal."""
    pyro.set_rng_seed(0)
    grbm = GaussianRBM(2, 4)
    trainer = ScoreMatching(grbm.marginal, pyro.optim.Adam({"lr": 1e-2}), objective=SSM())
    module = TrainerModule(trainer)
    assert list(module.ebm_modules) == [grbm]
    before = {k: v.detach().clone() for k, v in grbm.state_dict().items()}
    loader = DataLoader(TensorDataset(datasets.toy("8gaussians", 64)), batch_size=16)
    fitter = _fitter(max_steps=3)
    fitter.fit(module, loader)
    assert trainer.num_steps == 3
    assert set(fitter.callback_metrics) == set(trainer.last_losses)
    assert float(fitter.callback_metrics["loss"]) == pytest.approx(trainer.last_losses["loss"])
    assert any(not torch.equal(before[k], v) for k, v in grbm.state_dict().items())


def test_checkpoint_carries_the_trainer_state():
    pyro.set_rng_seed(0)
    grbm = GaussianRBM(2, 4)
    trainer = ScoreMatching(grbm.marginal, pyro.optim.Adam({"lr": 1e-2}), objective=SSM())
    module = TrainerModule(trainer)
    for _ in range(2):
        trainer.step(datasets.toy("8gaussians", 32))
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    fresh = ScoreMatching(GaussianRBM(2, 4).marginal, pyro.optim.Adam({"lr": 1e-2}), objective=SSM())
    TrainerModule(fresh).on_load_checkpoint(checkpoint)
    assert fresh.num_steps == 2


def test_refuses_what_is_not_a_trainer():
    with pytest.raises(TypeError, match="trainer must be a pyro_ebm.infer trainer"):
        TrainerModule(lambda v: None)
    grbm = GaussianRBM(2, 4)
    with pytest.raises(TypeError, match=r"modules\[0\] must be a torch.nn.Module"):
        TrainerModule(ScoreMatching(grbm.marginal, pyro.optim.Adam({"lr": 1e-2})), modules=["grbm"])


def test_ddp_two_cpu_processes(tmp_path):
    """examples/lightning_ddp.py under lightning.Trainer(strategy="ddp", accelerator="cpu",
    devices=2): both ranks train, the exact score-matching loss on all data goes down,
    and the parameters on both ranks are identical at the end."""
    env = dict(os.environ, PYRO_EBM_PROGRESS="0", OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--devices", "2", "--epochs", "2",
                           "--num-data", "2048", "--objective", "exact", "--save", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    for saved in ranks:
        assert saved["world_size"] == 2
        assert saved["num_steps"] == 2 * 2048 // (2 * 256)  # epochs x batches of each rank's shard
        assert saved["after"] < saved["before"] - 0.1
    params = [saved["parameters"] for saved in ranks]
    assert set(params[0]) == {"W", "b", "c", "log_std"}
    for name, value in params[0].items():
        assert torch.equal(value, params[1][name]), name
