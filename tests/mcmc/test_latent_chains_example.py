# SPDX-License-Identifier: Apache-2.0
"""Smoke test of examples/latent_chains.py with tiny sizes."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "latent_chains.py"


@pytest.mark.parametrize("kernel", ["mala", "hmc"])
def test_latent_chains_example(tmp_path, capsys, kernel):
    spec = importlib.util.spec_from_file_location("latent_chains_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        samples, table = module.main(["--num-chains", "6", "--num-samples", "15", "--warmup-steps", "10",
                                      "--num-data", "2", "--kernel", kernel, "--threads", "1",
                                      "--out", str(tmp_path / "trace.png"), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert samples.get_samples()["h"].shape == (6, 15, 2, 2)
    assert list(table.index) == ["h[0, 0]", "h[0, 1]", "h[1, 0]", "h[1, 1]"]
    assert {"r_hat", "ess_bulk", "ess_tail"} <= set(table.columns)
    out = capsys.readouterr().out
    assert "r_hat" in out and "trace plot written" in out
    assert (tmp_path / "trace.png").read_bytes()[:4] == b"\x89PNG"
