# SPDX-License-Identifier: Apache-2.0
"""Data-parallel training under a 2-process gloo group (CPU): two ranks with half
a batch each equal one process with the whole batch. The two ranks are spawned
once for the module (tests/infer/distributed_cases.py runs every case); the
one-process references run here."""

import os
import subprocess
import sys
from pathlib import Path

import distributed_cases as cases
import pytest
import torch

from pyro_ebm.infer import fit

HERE = Path(__file__).parent
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, free_port):
    """Both ranks' results: ``[rank 0's, rank 1's]`` and the common output prefix."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    port = free_port()
    path = os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "PYRO_EBM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    script = str(HERE / "distributed_cases.py")
    procs = [subprocess.Popen([sys.executable, script, str(r), "2", str(port), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"
    return [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(2)], out


def _worst(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("name, tol", [("exact_sm", 1e-6), ("dsm", 1e-5), ("bism", 1e-5), ("kale", 1e-5),
                                       ("teaching", 1e-5), ("bidvl", 1e-5)])
def test_two_half_batches_equal_one_whole_batch(ranks, name, tol):
    results, _ = ranks
    reference = cases.train(name)  # one process, no process group, the whole batch
    assert _worst(reference[-1], reference[0]) > 1e-3  # the steps moved the parameters
    for step in range(cases.STEPS):
        assert _worst(results[0]["trained"][name][step], reference[step]) < tol, f"step {step + 1}"


@pytest.mark.parametrize("name", cases.NAMES)
def test_parameters_identical_on_both_ranks_after_every_step(ranks, name):
    results, _ = ranks
    for step in range(cases.STEPS):
        a, b = results[0]["trained"][name][step], results[1]["trained"][name][step]
        assert all(torch.equal(a[k], b[k]) for k in a), f"step {step + 1}"


def test_fit_writes_on_rank_0_and_resumes(ranks, tmp_path):
    results, out = ranks
    folder = Path(f"{out}.fit")
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.csv", "step-00000002.pt", "step-00000004.pt",
                                                        "step-00000006.pt"]
    rows = (folder / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,seconds")
    assert [r.split(",")[0] for r in rows[1:]] == [str(s) for s in range(1, 7)]
    ckpt = torch.load(folder / "step-00000004.pt", weights_only=False)
    assert ckpt["fit"]["world_size"] == 2 and len(ckpt["fit"]["rng_by_rank"]) == 2
    for r in range(2):
        assert results[r]["fit"][1] == 4 and results[r]["fit_resumed"][1] == 6
    assert _worst(results[0]["fit_resumed"][0], results[1]["fit_resumed"][0]) == 0
    # the 2-rank fit (resumed at step 4) equals one process fitting the same 6 global batches
    reference, _ = cases.fit_run(tmp_path / "one", 6)
    assert _worst(results[0]["fit_resumed"][0], reference) < 1e-6
    # a different world size is refused, naming it
    with pytest.raises(ValueError, match="world_size=2.*world_size=1"):
        fit(cases.build("exact_sm"), torch.cat(list(cases.data("exact_sm")))[:16], 8, batch_size=8, seed=3,
            checkpoint=folder, resume=True, progress=False)


def test_batch_size_must_divide_by_the_world_size(ranks):
    results, _ = ranks
    for r in range(2):
        assert "batch_size = 7 does not divide by the world size 2" in results[r]["odd_batch"]
