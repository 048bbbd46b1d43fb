# SPDX-License-Identifier: Apache-2.0
"""Shared runner of the GaussianRBM reproduction tables (BiSM and VaGES papers).

Every method trains a fresh ``GaussianRBM`` with the same optimizer settings and
data stream; the table reports the exact test log-likelihood (log Z by
enumeration) and the test score-matching objective (exact trace, the expectation
of the SSM objective), mean ± standard deviation across seeds.
"""

from __future__ import annotations

import math
import statistics

import pyro
import torch

from .. import datasets
from ..guides import AmortizedBernoulli
from ..infer import DSM, SSM, BiSM, ContrastiveDivergence, ExactSM, ScoreMatching, VaGES
from ..models import GaussianRBM
from ._runs import STOP, OptimState, mean_sd

#: bi-level / variational method -> its plain score-matching counterpart
COUNTERPART = {
    "BiDSM (K=5, N=0)": "DSM",
    "BiDSM (K=5, N=5)": "DSM",
    "BiSSM (K=5, N=5)": "SSM",
    "VaGES-DSM (L=2, K=5)": "DSM",
}


def _no_guide(v):
    pass


def method_factories(sigma, lr, visible, hidden, compile=False):
    """Name -> grbm -> trainer with ``.step(v)``. With ``compile=True`` every method
    runs on a trainer with compiled steps (plain score matching on
    :class:`~pyro_ebm.infer.ScoreMatching` instead of ``pyro.infer.SVI``): the
    same losses, about 2–5× faster a step, for the long runs."""

    def optim():
        return pyro.optim.Adam({"lr": lr, "betas": (0.9, 0.95)})

    def guide():
        return AmortizedBernoulli(visible, hidden, site="h", temperature=0.1)

    def svi(loss):
        if compile:
            return lambda g: ScoreMatching(g.marginal, optim(), objective=loss, compile=True)
        return lambda g: pyro.infer.SVI(g.marginal, _no_guide, optim(), loss=loss)

    def bism(objective, unroll):
        return lambda g: BiSM(g, guide(), optim(), objective=objective, inner_steps=5, unroll_steps=unroll,
                              compile=compile)

    return {
        "CD-1": lambda g: ContrastiveDivergence(g, optim(), k=1, compile=compile),
        "PCD-1": lambda g: ContrastiveDivergence(g, optim(), k=1, persistent=True, compile=compile),
        "DSM": svi(DSM(sigma)),
        "SSM": svi(SSM()),
        "BiDSM (K=5, N=0)": bism(DSM(sigma), 0),
        "BiDSM (K=5, N=5)": bism(DSM(sigma), 5),
        "BiSSM (K=5, N=5)": bism(SSM(), 5),
        "VaGES-DSM (L=2, K=5)": lambda g: VaGES(g, guide(), optim(), objective="dsm", num_particles=2,
                                                inner_steps=5, noise_scale=sigma, compile=compile),
    }


def _diverged(err):
    text = str(err)
    return "non-finite" in text or "NaN" in text or "diverg" in text


def train_one(name, factory, train, test, visible, hidden, iterations, seed, store, ais=None):
    """One method and seed, trained in ``store``'s checkpointed loop: its numbers,
    and the trained GaussianRBM's state (for the figures). With ``ais`` (the
    keyword arguments of :meth:`~pyro_ebm.models.GaussianRBM.ais_log_partition`)
    the numbers also hold the test log-likelihood under the AIS estimate of log Z
    (``ll_ais``) and that estimate's standard error (``ais_se``)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    grbm = GaussianRBM(visible, hidden).to(train.dtype)
    trainer = factory(grbm)
    if isinstance(trainer, pyro.infer.SVI):
        state = OptimState(trainer.optim)
    else:
        state = trainer
    stream = datasets.batches(train, 100, seed=seed)
    diverged = None

    def step(i, v):
        nonlocal diverged
        try:
            return trainer.step(v)
        except (ValueError, RuntimeError) as err:
            if not _diverged(err):
                raise
            diverged = i + 1
            return STOP

    _, seconds = store.train("trainer", state, stream, iterations, step=step, modules=(grbm,),
                             desc=f"{name} seed {seed}")
    with torch.no_grad():
        ll = float(grbm.log_likelihood(test).mean()) if diverged is None else math.nan
    sm = ExactSM(max_exact_dim=test.shape[1]).evaluate(grbm.marginal, test) if diverged is None else math.nan
    numbers = {"ll": ll, "sm": sm, "seconds": seconds, "diverged": diverged}
    if ais is not None:
        numbers["ll_ais"], numbers["ais_se"] = math.nan, math.nan
        if diverged is None:
            torch.manual_seed(20_000 + seed)
            log_z, se = grbm.ais_log_partition(**ais, return_stderr=True)
            with torch.no_grad():
                numbers["ll_ais"] = float(grbm.log_likelihood(test, log_partition=log_z).mean())
            numbers["ais_se"] = float(se)
    return numbers, {"model": {k: v.detach().clone() for k, v in grbm.state_dict().items()}}


def trained_model(tensors, visible, hidden, dtype):
    """The GaussianRBM of a stored run (its figure input)."""
    with torch.random.fork_rng(devices=[]):
        grbm = GaussianRBM(visible, hidden).to(dtype)
    grbm.load_state_dict(tensors["model"])
    return grbm


def _fmt(values, digits=3):
    finite = [x for x in values if math.isfinite(x)]
    if not finite:
        return "diverged"
    mean, sd = mean_sd(finite)
    note = "" if len(finite) == len(values) else f" ({len(values) - len(finite)} diverged)"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}{note}"


def run_table(title, train, test, visible, hidden, sigma, lr, iterations, seeds, store, plot=None,
              compile=False, methods=None, ais=None):
    """Every method of :func:`method_factories` (or those named in ``methods``)
    for every seed, each a run of ``store`` (a
    :class:`~pyro_ebm.experiments._runs.RunStore`): the Markdown table and the
    runs' numbers by method. ``plot(grbm, name, ll)`` gets the first seed's
    trained model of each method that did not diverge; ``ais`` adds the AIS
    column (see :func:`train_one`)."""
    factories = method_factories(sigma, lr, visible, hidden, compile=compile)
    if methods is not None:
        factories = {name: factories[name] for name in methods}
    results = {name: [] for name in factories}
    for name, factory in factories.items():
        for seed in seeds:
            r, tensors = store.run(f"{name} seed {seed}", train_one,
                                   name, factory, train, test, visible, hidden, iterations, seed, store,
                                   **({} if ais is None else {"ais": ais}))
            if plot is not None and seed == seeds[0] and r["diverged"] is None:
                plot(trained_model(tensors, visible, hidden, train.dtype), name, r["ll"])
            results[name].append(r)
    lines = [
        f"### {title}",
        "",
        f"GaussianRBM({visible}, {hidden}), batch 100, Adam(lr {lr}, betas (0.9, 0.95)), "
        f"{iterations} iterations, seeds {list(seeds)}, DSM σ = {sigma}"
        f"{', compiled steps' if compile else ''}. Mean ± sd across seeds.",
        "",
        "| method | test log-likelihood | " + ("AIS test log-likelihood | " if ais else "")
        + "test SM objective (exact trace) | s / run |",
        "|---|---|---|---|" + ("---|" if ais else ""),
    ]
    for name, rs in results.items():
        lines.append(f"| {name} | {_fmt([r['ll'] for r in rs])} | "
                     + (f"{_fmt([r['ll_ais'] for r in rs])} | " if ais else "")
                     + f"{_fmt([r['sm'] for r in rs])} | {statistics.fmean(r['seconds'] for r in rs):.1f} |")
    lines += ["", verdict(results), ""]
    return "\n".join(lines), results


def verdict(results):
    """The papers' claim: each bi-level / variational method is comparable to its
    plain counterpart (mean log-likelihood within one sd across seeds, or better)."""
    parts, holds = [], True
    for name, base in COUNTERPART.items():
        if name not in results or base not in results:
            continue
        a = [r["ll"] for r in results[name]]
        b = [r["ll"] for r in results[base]]
        if not all(map(math.isfinite, a + b)):
            parts.append(f"{name}: diverged in some seed")
            holds = False
            continue
        (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
        sd = max(sa, sb)
        ok = ma >= mb - sd
        holds &= ok
        parts.append(f"{name} {ma:.3f} vs {base} {mb:.3f} (sd {sd:.3f}): "
                     f"{'comparable or better' if ok else f'worse by {mb - ma - sd:.3f} beyond one sd'}")
    head = "**Claim holds**" if holds else "**Claim does not fully hold**"
    return f"{head} (each bi-level / variational method within one sd of its counterpart, or better): " \
        + "; ".join(parts) + "."
