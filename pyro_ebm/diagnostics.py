# SPDX-License-Identifier: Apache-2.0
"""Chains into ArviZ: the one conversion of draws and sampler statistics, the
summary table (R-hat, bulk and tail ESS) and trace plots, all computed by ArviZ.

Draws are ``(chain, draw, *site_shape)`` tensors by site, the layout of
:meth:`pyro_ebm.mcmc.Samples.get_samples`. Sampler statistics take ArviZ's names:

==================== =====================
pyro_ebm             ArviZ ``sample_stats``
==================== =====================
``accept_prob``      ``acceptance_rate``
``step_size``        ``step_size``
``diverging``        ``diverging``
``energy``           ``energy`` (the Hamiltonian, for kernels with a momentum)
``potential_energy`` ``lp`` (its negative), and ``energy`` when no Hamiltonian is given
==================== =====================

Under ArviZ 0.x the result is an ``InferenceData``; under ArviZ 1.x a
``DataTree``, built from the same nested dict (:func:`inference_data_dict`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = ["arviz_major_version", "inference_data_dict", "plot_trace", "summary", "to_inference_data"]

_STAT_NAMES = {
    "accept_prob": "acceptance_rate",
    "step_size": "step_size",
    "diverging": "diverging",
    "energy": "energy",
}


def _arviz():
    with warnings.catch_warnings():  # ArviZ 0.2x announces its 1.0 refactor on import
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def arviz_major_version() -> int:
    """The installed ArviZ's major version."""
    return int(_arviz().__version__.split(".")[0])


def _numpy(x):
    if torch.is_tensor(x):
        x = x.detach().cpu()
        return x.numpy() if x.dtype == torch.bool else x.to(torch.float64 if x.dtype == torch.float64
                                                              else torch.float32).numpy()
    return np.asarray(x)


def inference_data_dict(samples, stats=None) -> dict:
    """The nested dict ``{"posterior": {...}, "sample_stats": {...}}`` of numpy
    arrays in the layout ``(chain, draw, ...)``, with ArviZ's statistic names."""
    if not samples:
        raise ValueError("no draws to convert: samples is empty")
    posterior, lead = {}, None
    for name, value in samples.items():
        arr = _numpy(value)
        if arr.ndim < 2:
            raise ValueError(
                f"draws of site '{name}' must have shape (chain, draw, *site_shape), got {arr.shape}"
            )
        if lead is None:
            lead = arr.shape[:2]
        elif arr.shape[:2] != lead:
            raise ValueError(
                f"site '{name}' has (chain, draw) = {arr.shape[:2]}, other sites have {lead}"
            )
        posterior[name] = arr
    sample_stats = {}
    stats = stats or {}
    for name, value in stats.items():
        arr = _numpy(value)
        if arr.shape[:2] != lead:
            raise ValueError(f"statistic '{name}' has shape {arr.shape}, expected (chain, draw) = {lead}")
        if name == "potential_energy":
            sample_stats["lp"] = -arr
            if "energy" not in stats:
                sample_stats["energy"] = arr
        elif name == "diverging":
            sample_stats["diverging"] = arr.astype(bool)
        else:
            sample_stats[_STAT_NAMES.get(name, name)] = arr
    data = {"posterior": posterior}
    if sample_stats:
        data["sample_stats"] = sample_stats
    return data


def to_inference_data(samples, stats=None):
    """Draws and sampler statistics as ArviZ data: an ``InferenceData`` under ArviZ
    0.x, a ``DataTree`` (nested-dict ``from_dict``) under ArviZ 1.x.

    :param dict samples: ``(chain, draw, *site_shape)`` tensors or arrays by site,
        or a :class:`~pyro_ebm.mcmc.Samples` (then ``stats`` defaults to its own).
    :param dict stats: ``(chain, draw)`` statistics with pyro_ebm's names.

    >>> idata = to_inference_data(samples.get_samples(), samples.stats)
    >>> arviz.rhat(idata)
    """
    if hasattr(samples, "get_samples"):
        stats = samples.stats if stats is None else stats
        samples = samples.get_samples()
    data = inference_data_dict(samples, stats)
    az = _arviz()
    with warnings.catch_warnings():  # many chains of few draws is the layout meant here
        warnings.filterwarnings("ignore", message="More chains")
        if arviz_major_version() >= 1:
            return az.from_dict(data)
        return az.from_dict(posterior=data["posterior"], sample_stats=data.get("sample_stats"))


def _as_arviz(samples):
    if hasattr(samples, "get_samples"):
        return samples.to_inference_data()
    if isinstance(samples, dict):
        return to_inference_data(samples)
    return samples  # already ArviZ data


def summary(samples, **kwargs):
    """ArviZ's summary table of every site and coordinate: mean, sd, interval,
    MCSE, ``ess_bulk``, ``ess_tail`` and ``r_hat`` (all from ArviZ).

    :param samples: a :class:`~pyro_ebm.mcmc.Samples`, a dict of ``(chain, draw,
        ...)`` draws, or ArviZ data.
    :param kwargs: passed to ``arviz.summary`` (e.g. ``kind="diagnostics"``).
    :returns: a ``pandas.DataFrame``.
    """
    return _arviz().summary(_as_arviz(samples), **kwargs)


def plot_trace(samples, path, var_names=None, max_chains=8):
    """Write ArviZ's trace plot (marginal density and trace per site, chains
    overlaid) to the PNG file ``path``, without opening a window (Agg canvas).

    :param samples: a :class:`~pyro_ebm.mcmc.Samples`, a dict of draws, or ArviZ data.
    :param path: the output file.
    :param list var_names: sites to plot (all by default).
    :param int max_chains: plot only the first chains (a thousand overlaid
        chains show nothing more and take minutes to draw); ``None`` for all.
    :returns: the path written, as a :class:`pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _as_arviz(samples)
    if max_chains is not None:
        data = data.isel(chain=slice(0, max_chains))
    az = _arviz()
    if arviz_major_version() >= 1:  # pragma: no cover - ArviZ 1.x plots through a PlotCollection
        import matplotlib.pyplot as plt

        plot = az.plot_trace(data, var_names=var_names, backend="matplotlib")
        if hasattr(plot, "savefig"):
            plot.savefig(path)
        else:
            plt.gcf().savefig(path)
        plt.close("all")
        return path
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(data.posterior.data_vars) if var_names is None else list(var_names)
    fig = Figure(figsize=(10, 2.4 * len(names)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), 2, squeeze=False)
    az.plot_trace(data, var_names=names, axes=axes, compact=True)
    fig.savefig(path, dpi=90)
    return path
