# SPDX-License-Identifier: Apache-2.0
"""Shared runner of the GEBM density benchmarks (``gebm-density``,
``gebm-density-breast-cancer``): a RealNVP base by maximum likelihood versus a
GEBM with that base and an energy trained by KALE, on a table of non-negative
features described by a :class:`DensityData`.

The GEBM's density is :math:`q(x) = g(x)\\, e^{-E(x)} / Z` with :math:`g` the
flow's density and :math:`\\log Z = \\log \\mathbb E_{x \\sim g}[e^{-E(x)}]`
estimated by importance sampling from the base, with its standard error. The
paper's claim: the GEBM is comparable to maximum likelihood.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch

from ..infer import KALE
from ..models import GEBM
from ..models.nets import MLP, RealNVP
from ._runs import RunStore


def standardized_splits(features, split_seed: int = 0):
    """A fixed 60 / 20 / 20 split of a table of non-negative features, log1p of
    each, standardized with the training statistics:
    :math:`(\\log(1 + x) - \\bar m) / \\bar s` with :math:`\\bar m, \\bar s` the
    training split's mean and standard deviation per coordinate.

    :param features: ``(n, d)`` array or tensor, ``n >= 5``, every entry ``>= 0``.
    :param int split_seed: seed of the row permutation.
    :returns: ``[train, val, test]``, float32 tensors.
    """
    x = torch.as_tensor(features, dtype=torch.float32)
    if x.dim() != 2 or len(x) < 5:
        raise ValueError(f"features must be a 2-D table with at least 5 rows, got shape {tuple(x.shape)}")
    if not bool((x >= 0).all()):
        raise ValueError(f"features must be non-negative for log1p, got a minimum of {float(x.min())}")
    x = torch.log1p(x)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    n_train, n_val = int(0.6 * len(x)), int(0.2 * len(x))
    train, val, test = x[perm[:n_train]], x[perm[n_train:n_train + n_val]], x[perm[n_train + n_val:]]
    mean, sd = train.mean(0), train.std(0)
    return [(t - mean) / sd for t in (train, val, test)]


def clip_splits(splits, bound: float):
    """Every coordinate of every split clamped to ``[-bound, bound]``, and how
    many coordinates of each split that moved."""
    if not bound > 0:
        raise ValueError(f"the clipping bound must be positive, got {bound}")
    return ([t.clamp(-bound, bound) for t in splits], [int((t.abs() > bound).sum()) for t in splits])


@dataclass(frozen=True)
class DensityData:
    """What differs between the density benchmarks: the table, its outlier
    handling and the sizes; :func:`run_density` does the rest.

    :param str experiment: the ``pyro-ebm reproduce`` name.
    :param str title: the data set's name in the report.
    :param load: ``load() -> (n, d)`` non-negative features.
    :param clip: bound of the standardized coordinates (all splits), or ``None``.
    :param int flow_layers: affine couplings of the RealNVP base.
    :param tuple flow_hidden: hidden widths of each coupling's network.
    :param float flow_lr: Adam's learning rate for the base.
    :param bool whiten: fit the RealNVP to the whitened data (:class:`Whitened`).
    :param tuple energy_hidden: hidden widths of the MLP energy.
    :param tuple iterations: ``(maximum-likelihood steps, KALE steps, evaluation
        interval)`` of the full run.
    :param str sizes_note: said after the sizes in the report (why they are what they are).
    """

    experiment: str
    title: str
    load: Callable
    clip: float | None = None
    flow_layers: int = 4
    flow_hidden: tuple = (32, 32)
    flow_lr: float = 1e-3
    whiten: bool = False
    energy_hidden: tuple = (64, 64)
    iterations: tuple = (1500, 1500, 50)
    sizes_note: str = ""


class Whitened(torch.nn.Module):
    r"""A flow :math:`g_y` on whitened coordinates as a density on the data's:
    :math:`y = (x - m) W` with :math:`W = V \Lambda^{-1/2}`, :math:`m` and
    :math:`\Sigma = V \Lambda V^\top` the mean and covariance of ``train``, and

    .. math::

        \log g(x) = \log g_y\big((x - m) W\big) - \tfrac12 \sum_i \log \lambda_i .

    The whitening is the Gaussian maximum-likelihood fit of ``train``, a fixed
    affine first layer: it takes out the linear correlations, which a RealNVP
    with two fixed halves of coordinates cannot model within a half. Calling
    the module maps latent draws to data, :math:`x = \mathrm{flow}(z)\,
    \Lambda^{1/2} V^\top + m`, so that it serves as a GEBM's generator.
    """

    def __init__(self, flow, train):
        super().__init__()
        self.flow = flow
        x = train.double()
        evals, vecs = torch.linalg.eigh(torch.cov(x.T))
        if not bool((evals > 0).all()):
            raise ValueError(f"the training covariance is singular (smallest eigenvalue "
                             f"{float(evals.min())}, train of shape {tuple(train.shape)}); whitening "
                             "needs more rows than columns and no constant column")
        self.register_buffer("mean", x.mean(0).to(train.dtype))
        self.register_buffer("whiten", (vecs / evals.sqrt()).to(train.dtype))
        self.register_buffer("unwhiten", (vecs * evals.sqrt()).T.to(train.dtype))
        self.register_buffer("log_det", (-0.5 * evals.log().sum()).to(train.dtype))

    def forward(self, z):
        return self.flow(z) @ self.unwhiten + self.mean

    def log_prob(self, x):
        """:math:`\\log g(x)`, one value per row of ``x``."""
        return self.flow.log_prob((x - self.mean) @ self.whiten) + self.log_det


def fit_flow(train, val, seed, iterations, eval_every, batch_size=64, num_layers=4, hidden_features=(32, 32),
             lr=1e-3, whiten=False):
    """RealNVP by maximum likelihood (Adam), the state with the best validation
    NLL; with ``whiten``, the RealNVP on the whitened data (:class:`Whitened`)."""
    torch.manual_seed(seed)
    flow = RealNVP(train.shape[1], num_layers=num_layers, hidden_features=hidden_features)
    optim = torch.optim.Adam(flow.parameters(), lr=lr, weight_decay=1e-5)
    if whiten:
        flow = Whitened(flow, train)
    best = (math.inf, None)
    for it in range(iterations + 1):
        if it % eval_every == 0:
            with torch.no_grad():
                nll = -float(flow.log_prob(val).mean())
            if nll < best[0]:
                best = (nll, copy.deepcopy(flow.state_dict()))
        if it == iterations:
            break
        idx = torch.randint(0, len(train), (batch_size,))
        loss = -flow.log_prob(train[idx]).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    flow.load_state_dict(best[1])
    flow.requires_grad_(False)
    return flow


def gebm_log_likelihood(gebm, x, num_base_samples):
    """Per-item :math:`\\log g(x) - E(x)` and the estimate :math:`\\log \\hat Z`
    with its standard error."""
    with torch.no_grad():
        log_z, stderr = gebm.log_partition_estimate(num_base_samples)
        unnormalized = gebm.generator.log_prob(x) - gebm.energy_values(x)
    return unnormalized, log_z, stderr


def fit_energy(flow, train, val, seed, iterations, eval_every, num_base_samples, batch_size=64,
               hidden_features=(64, 64)):
    """The energy of a GEBM on the fixed base ``flow``, trained by KALE; the state
    with the best validation NLL, and the validation curve."""
    torch.manual_seed(seed)
    gebm = GEBM(flow, MLP(train.shape[1], 1, hidden_features), latent_dim=train.shape[1])
    kale = KALE(gebm, pyro.optim.Adam({"lr": 1e-3, "betas": (0.5, 0.9)}), None, critic_steps=1,
                warmup_critic_steps=0, penalty=0.1)
    curve, best = [], (math.inf, None)
    for it in range(iterations + 1):
        if it % eval_every == 0:
            lp, log_z, _ = gebm_log_likelihood(gebm, val, num_base_samples)
            nll = -(float(lp.mean()) - log_z)
            curve.append((it, nll))
            if nll < best[0]:
                best = (nll, copy.deepcopy(gebm.energy.state_dict()))
        if it == iterations:
            break
        idx = torch.randint(0, len(train), (batch_size,))
        kale.step(train[idx])
    gebm.energy.load_state_dict(best[1])
    return gebm, curve


def _mean_se(t):
    return float(t.mean()), float(t.std() / math.sqrt(len(t)))


def run_density(data: DensityData, out_dir: Path, quick: bool = False, seeds=(0, 1, 2),
                resume: bool = False) -> str:
    """The benchmark on ``data``: per seed, the base by maximum likelihood and the
    GEBM's energy by KALE (each seed a :class:`RunStore` run), the figure
    ``<experiment>.png`` and the report (Markdown)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = tuple(seeds)[:1] if quick else tuple(seeds)
    mle_iters, kale_iters, every = (20, 20, 10) if quick else data.iterations
    base_samples, final_samples = (2000, 2000) if quick else (20_000, 200_000)
    store = RunStore(out_dir, resume, {"experiment": data.experiment, "quick": quick})
    features = data.load()
    splits = standardized_splits(features, split_seed=0)
    if data.clip is not None:
        splits, clipped = clip_splits(splits, data.clip)
    train, val, test = splits
    sizes = dict(num_layers=data.flow_layers, flow_hidden=data.flow_hidden, flow_lr=data.flow_lr,
                 whiten=data.whiten, energy_hidden=data.energy_hidden)
    rows, curves, items, wall = [], [], None, 0.0
    for seed in seeds:
        numbers, tensors = store.run(f"seed {seed}", _one_seed,
            seed, train, val, test, mle_iters, kale_iters, every, base_samples, final_samples, **sizes)
        rows.append(tuple(numbers["row"]))
        curves.append((seed, numbers["base_val"], [tuple(c) for c in numbers["curve"]]))
        if items is None:
            items = (tensors["base"], tensors["gebm"])
        wall += numbers["seconds"]  # the runs' own times, so that a resumed report adds them up
        print(f"[{data.experiment}] seed {seed} done at {wall:.0f} s", flush=True)
    figure = data.experiment.replace("-", "_") + ".png"
    _figure(curves, items, out_dir / figure)

    def widths(hidden):
        return "-".join(map(str, hidden))

    n_rows, n_cols = features.shape
    outliers, whitened, lr = "", "", ""
    if data.whiten:
        whitened = (" on the data whitened with the training split's mean and covariance (a fixed affine "
                    "first layer, its log-determinant included)")
    if data.flow_lr != 1e-3:  # the default, which wine's report does not name
        lr = f" at learning rate {data.flow_lr:g}"
    if data.clip is not None:
        outliers = (f" Outliers: every standardized coordinate is clipped to [-{data.clip:g}, {data.clip:g}] "
                    f"in all three splits, the same data for both models; {clipped[2]} of the "
                    f"{test.numel()} test coordinates were clipped ({clipped[0]} of {train.numel()} "
                    f"training, {clipped[1]} of {val.numel()} validation).")
    lines = [
        f"## GEBM density estimation on {data.title} (`pyro-ebm reproduce {data.experiment}`)",
        "",
        f"scikit-learn's {data.title} data ({n_rows} × {n_cols}, log1p, standardized), fixed 60/20/20 split "
        f"({len(train)} train, {len(val)} validation, {len(test)} test).{outliers} Base: RealNVP "
        f"({data.flow_layers} affine couplings, {widths(data.flow_hidden)}){whitened} by maximum likelihood "
        f"({mle_iters} Adam steps{lr}, the best validation state). GEBM: that base, fixed, and an MLP "
        f"energy ({widths(data.energy_hidden)}) trained by KALE ({kale_iters} critic steps, penalty 0.1, "
        f"the best validation state).{data.sizes_note} Test NLL in nats per item ± s.e. (over test items; "
        f"the GEBM's also includes the s.e. of log Z, estimated from {final_samples} base draws). "
        "Δ = GEBM − base, "
        "paired over test items.",
        "",
        "| seed | base (MLE) NLL | GEBM (KALE) NLL | Δ | log Z ± s.e. |",
        "| --- | --- | --- | --- | --- |",
    ]
    for seed, b, g, d, log_z, z_se in rows:
        lines.append(f"| {seed} | {b[0]:.2f} ± {b[1]:.2f} | {g[0]:.2f} ± {g[1]:.2f} | "
                     f"{d[0]:+.2f} ± {d[1]:.2f} | {log_z:.3f} ± {z_se:.3f} |")
    mean_b = sum(r[1][0] for r in rows) / len(rows)
    mean_g = sum(r[2][0] for r in rows) / len(rows)
    mean_d = sum(r[3][0] for r in rows) / len(rows)
    se_d = math.sqrt(sum(r[3][1] ** 2 for r in rows)) / len(rows)
    lines.append(f"| mean | {mean_b:.2f} | {mean_g:.2f} | {mean_d:+.2f} ± {se_d:.2f} | |")
    if mean_d < -2 * se_d:
        verdict = "holds, and the GEBM is better than maximum likelihood alone"
    elif mean_d <= 2 * se_d:
        verdict = "holds: the two are within two standard errors"
    else:
        verdict = "does not hold: the GEBM is worse than maximum likelihood alone"
    lines += [
        "",
        f"Verdict: the claim {verdict} (mean test NLL {mean_b:.2f} for the base, {mean_g:.2f} for the "
        f"GEBM; Δ = {mean_d:+.2f} ± {se_d:.2f} nats). Δ is paired over test items, so the spread of "
        "the items' NLLs, which both models share, drops out of its s.e. Figure "
        f"`{figure}`: validation NLL during KALE, and per-item test NLL. Wall time {wall:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def _one_seed(seed, train, val, test, mle_iters, kale_iters, every, base_samples, final_samples,
              num_layers=4, flow_hidden=(32, 32), flow_lr=1e-3, whiten=False, energy_hidden=(64, 64)):
    """One seed: the base by maximum likelihood, the GEBM's energy by KALE, their
    test NLLs; the per-item test NLLs (for the figure)."""
    start = time.perf_counter()
    flow = fit_flow(train, val, seed, mle_iters, every, num_layers=num_layers, hidden_features=flow_hidden,
                    lr=flow_lr, whiten=whiten)
    with torch.no_grad():
        base_lp = flow.log_prob(test)
    gebm, curve = fit_energy(flow, train, val, seed, kale_iters, every, base_samples,
                             hidden_features=energy_hidden)
    torch.manual_seed(10_000 + seed)
    gebm_lp, log_z, z_se = gebm_log_likelihood(gebm, test, final_samples)
    base_nll = _mean_se(-base_lp)
    gebm_mean, gebm_item_se = _mean_se(-gebm_lp)
    gebm_nll = (gebm_mean + log_z, math.sqrt(gebm_item_se**2 + z_se**2))
    diff_mean, diff_se = _mean_se(-gebm_lp - (-base_lp))
    diff = (diff_mean + log_z, math.sqrt(diff_se**2 + z_se**2))
    numbers = {"row": (seed, base_nll, gebm_nll, diff, log_z, z_se), "curve": curve,
               "base_val": -float(flow.log_prob(val).mean()), "seconds": time.perf_counter() - start}
    return numbers, {"base": (-base_lp).detach().clone(), "gebm": (-(gebm_lp - log_z)).detach().clone()}


def _figure(curves, items, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for seed, base_val, curve in curves:
        its, nll = zip(*curve, strict=True)
        line = axes[0].plot(its, nll, label=f"GEBM, seed {seed}")[0]
        axes[0].axhline(base_val, color=line.get_color(), ls="--", lw=0.8)
    axes[0].set_xlabel("KALE step")
    axes[0].set_ylabel("validation NLL (dashed: base)")
    axes[0].legend(fontsize=7)
    base, gebm = items
    axes[1].scatter(base.numpy(), gebm.numpy(), s=8)
    lim = [float(min(base.min(), gebm.min())), float(max(base.max(), gebm.max()))]
    axes[1].plot(lim, lim, "k--", lw=0.8)
    axes[1].set_xlabel("test NLL per item, base")
    axes[1].set_ylabel("test NLL per item, GEBM")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
