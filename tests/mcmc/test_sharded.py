# SPDX-License-Identifier: Apache-2.0
"""Chain-sharded sampling: two gloo ranks on 127.0.0.1 running C / 2 chains each
give, on rank 0, the draws of one process running all C chains with the same seed."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_ebm.mcmc.sharded import chain_shard

WORKER = Path(__file__).with_name("_sharded_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("_sharded_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, free_port):
    """What rank 0 and rank 1 of a two-process gloo group saved."""
    tmp = tmp_path_factory.mktemp("sharded")
    port = free_port()
    env = dict(os.environ, PYRO_EBM_PROGRESS="0", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", str(port),
                               str(tmp / f"{rank}.pt")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    for rank, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, f"rank {rank} failed:\n{output}"
    return [torch.load(tmp / f"{rank}.pt") for rank in range(2)]


@pytest.fixture(scope="module")
def one_process():
    worker = _worker_module()
    return worker.flat(worker.run())


def test_rank0_draws_equal_one_process_with_all_chains(two_ranks, one_process):
    """Same seed: MALA with per-chain warmup adaptation, underdamped Langevin (a
    velocity drawn at init, uniform initial positions) and a run going on from a
    last_state give on rank 0 exactly the draws, statistics and last state of one
    process running all 8 chains (float64)."""
    rank0 = two_ranks[0]
    assert set(rank0) - {"error"} == set(one_process)
    for key, expected in one_process.items():
        got = rank0[key]
        assert got.shape == expected.shape, key
        assert got.dtype == expected.dtype, key
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=key)
    # the runs are not trivially equal: chains differ and adapted step sizes differ per chain
    assert not torch.equal(one_process["mala/z"][0], one_process["mala/z"][1])
    step = one_process["mala/stats/step_size"][:, 0]
    assert step.unique().numel() == step.numel()


def test_other_rank_gets_its_own_chains(two_ranks, one_process):
    rank1 = two_ranks[1]
    """Rank 1 returns the Samples of its chains 4..7 (draws, statistics, last state)."""
    for key in ("mala/z", "mala/s", "mala/stats/accept_prob", "mala/last/step_size", "underdamped/z",
                "underdamped/last/momentum", "more/z"):
        torch.testing.assert_close(rank1[key], one_process[key][4:], rtol=0, atol=1e-12, msg=key)


def test_num_chains_must_divide_world_size(two_ranks):
    for rank in range(2):
        message = two_ranks[rank]["error"]
        assert "num_chains=7" in message and "world size 2" in message


def test_no_process_group_means_no_shard():
    assert chain_shard(8) is None
    assert chain_shard(8, shard_chains=False) is None
    with pytest.raises(ValueError, match="shard_chains=True needs an initialized"):
        chain_shard(8, shard_chains=True)
    with pytest.raises(TypeError, match="shard_chains must be None, True or False"):
        chain_shard(8, shard_chains="yes")
