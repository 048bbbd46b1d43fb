# SPDX-License-Identifier: Apache-2.0
"""The ArviZ adapter: InferenceData under ArviZ 0.x (tested for real), the nested
dict that ArviZ 1.x's from_dict receives, summary and trace plots."""

import warnings

import numpy as np
import pytest
import torch

from pyro_ebm import diagnostics, mcmc

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

ARVIZ_1 = int(az.__version__.split(".")[0]) >= 1


@pytest.fixture(scope="module")
def samples():
    torch.manual_seed(0)
    return mcmc.sample(potential_fn=lambda x: 0.5 * x.pow(2).sum(-1), kernel=mcmc.HMC(0.5, 3), num_chains=4,
                       num_samples=50, warmup_steps=20, initial=torch.randn(4, 2, dtype=torch.float64),
                       progress=False)


def test_nested_dict_layout_and_names(samples):
    """The dict both ArviZ versions are built from: posterior draws and statistics
    under ArviZ's names, (chain, draw) leading."""
    data = diagnostics.inference_data_dict(samples.get_samples(), samples.stats)
    assert set(data) == {"posterior", "sample_stats"}
    assert data["posterior"]["x"].shape == (4, 50, 2)
    np.testing.assert_array_equal(data["posterior"]["x"], samples.get_samples()["x"].numpy())
    stats = data["sample_stats"]
    assert set(stats) == {"acceptance_rate", "step_size", "diverging", "energy", "lp"}
    assert stats["diverging"].dtype == bool
    np.testing.assert_allclose(stats["lp"], -samples.stats["potential_energy"].numpy())
    np.testing.assert_allclose(stats["energy"], samples.stats["energy"].numpy())  # the Hamiltonian
    np.testing.assert_allclose(stats["acceptance_rate"], samples.stats["accept_prob"].numpy())
    # without a Hamiltonian the potential energy stands in for "energy"
    no_h = {k: v for k, v in samples.stats.items() if k != "energy"}
    data = diagnostics.inference_data_dict(samples.get_samples(), no_h)
    np.testing.assert_allclose(data["sample_stats"]["energy"], samples.stats["potential_energy"].numpy())


def test_nested_dict_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"site 'a' must have shape \(chain, draw"):
        diagnostics.inference_data_dict({"a": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"site 'b' has \(chain, draw\) = \(2, 4\)"):
        diagnostics.inference_data_dict({"a": torch.zeros(2, 3), "b": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="statistic 'step_size'"):
        diagnostics.inference_data_dict({"a": torch.zeros(2, 3)}, {"step_size": torch.zeros(2, 4)})


@pytest.mark.skipif(ARVIZ_1, reason="ArviZ 0.x path")
def test_inference_data_under_arviz_0(samples):
    idata = samples.to_inference_data()
    assert isinstance(idata, az.InferenceData)
    assert idata.posterior["x"].shape == (4, 50, 2)
    assert idata.sample_stats["diverging"].dtype == bool
    for name in ("acceptance_rate", "step_size", "diverging", "energy", "lp"):
        assert idata.sample_stats[name].shape == (4, 50)
    # ArviZ's own functions accept it
    assert az.bfmi(idata).shape == (4,)
    assert float(az.rhat(idata)["x"].max()) < 1.2


def test_arviz_1_branch_passes_the_nested_dict(monkeypatch, samples):
    """Under ArviZ >= 1 the adapter calls ``from_dict`` with the nested dict only
    (checked by substituting the version and ``from_dict``)."""
    calls = []
    monkeypatch.setattr(diagnostics, "arviz_major_version", lambda: 1)
    monkeypatch.setattr(az, "from_dict", lambda *args, **kwargs: calls.append((args, kwargs)) or "tree")
    assert diagnostics.to_inference_data(samples) == "tree"
    (args, kwargs), = calls
    assert kwargs == {} and len(args) == 1
    assert set(args[0]) == {"posterior", "sample_stats"}
    assert args[0]["posterior"]["x"].shape == (4, 50, 2)


@pytest.mark.skipif(not ARVIZ_1, reason="needs ArviZ >= 1")
def test_datatree_under_arviz_1(samples):  # pragma: no cover - ArviZ 1.x only
    tree = samples.to_inference_data()
    assert tree["posterior"]["x"].shape == (4, 50, 2)
    assert "diverging" in tree["sample_stats"]


def test_summary_is_arvizs(samples):
    """The summary is ArviZ's table, with nothing added: its r_hat and ess_bulk
    equal ArviZ's own diagnostics on the same draws."""
    table = samples.summary(round_to="none")
    for column in ("mean", "sd", "ess_bulk", "ess_tail", "r_hat"):
        assert column in table.columns
    assert list(table.index) == ["x[0]", "x[1]"]
    idata = samples.to_inference_data()
    np.testing.assert_allclose(table["r_hat"].to_numpy(), az.rhat(idata)["x"].to_numpy())
    np.testing.assert_allclose(table["ess_bulk"].to_numpy(), az.ess(idata)["x"].to_numpy())
    # dicts of draws work too
    again = diagnostics.summary(samples.get_samples(), kind="diagnostics", round_to="none")
    np.testing.assert_allclose(again["r_hat"].to_numpy(), table["r_hat"].to_numpy())


def test_plot_trace_writes_png(tmp_path, samples):
    path = samples.plot_trace(tmp_path / "plots" / "trace.png")
    assert path.exists() and path.stat().st_size > 5000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = diagnostics.plot_trace({"a": torch.randn(2, 30), "b": torch.randn(2, 30, 3)}, tmp_path / "ab.png")
    assert other.read_bytes()[:4] == b"\x89PNG"
