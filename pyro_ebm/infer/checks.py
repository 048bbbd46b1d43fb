# SPDX-License-Identifier: Apache-2.0
"""Checks shared by the trainers: the data of every batch, errors that name the
step, and the diagnosis of a non-finite loss (which site went NaN). Divergence
itself (the checks of losses, gradients and updates, and the restore) is the
trainer base's: :mod:`pyro_ebm.infer.trainer`."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..energy import check_data, find_nonfinite, is_validation_error

__all__ = ["ALL_FINITE", "at_step", "check_batch", "describe_nonfinite"]


def check_batch(v, where: str, name: str = "data") -> torch.Tensor:
    """:func:`pyro_ebm.energy.check_data` on one batch, named by where it was
    passed, e.g. ``"data (step 3)"``: type, float dtype, batch dim, an empty
    batch, NaN/Inf with its index, overflow. One reduction; run on every batch."""
    return check_data(v, f"{name} ({where})")


@contextmanager
def at_step(algorithm: str, where: str, diagnose=None):
    """Re-raise a ``ValueError`` or ``TypeError`` from inside the block with the
    algorithm and the step (or method) in front of its message; torch's
    distribution-validation error (which names no site) is replaced by
    ``diagnose()``'s description of the NaN / Inf site, when it finds one."""
    try:
        yield
    except (ValueError, TypeError) as err:
        found = diagnose() if diagnose is not None and is_validation_error(err) else None
        raise type(err)(f"{algorithm} ({where}): {found or _without_shapes(err)}") from err


def _without_shapes(err) -> str:
    """The message of ``err`` without the table of trace shapes Pyro appends when
    an error passes through a traced run (it re-raises the error from itself)."""
    cause = err.__cause__
    if isinstance(cause, type(err)) and str(err).startswith(str(cause)):
        return str(cause)
    return str(err)


def describe_nonfinite(v, args=(), kwargs=None, guide=None, model=None, values=None,
                       guide_role="guide", model_role="model") -> str:
    """Which site of the model or the guide is NaN / Inf on the batch ``v`` (see
    :func:`pyro_ebm.energy.find_nonfinite`). In order: the model with its latent
    sites drawn from its own sampling statements (an energy that is NaN for
    finite data shows here, before a guide it may have corrupted through NaN
    gradients), the guide, then the model at the guide's draws ``values`` (a
    dict, or a callable returning one, called only if needed); ``None`` when
    every site is finite."""
    args = (v,) + tuple(args)
    if model is not None:
        found = find_nonfinite(model, args, kwargs, role=model_role)
        if found:
            return found
    if guide is not None:
        found = find_nonfinite(guide, args, kwargs, role=guide_role)
        if found:
            return found
    if model is not None and values is not None:
        if callable(values):
            with torch.no_grad():
                values = values()
        return find_nonfinite(model, args, kwargs, values=values, role=model_role)
    return None


ALL_FINITE = ("every site of the model and guide is finite on this batch, so the NaN / Inf arises in a "
              "gradient (e.g. the score w.r.t. the data) or in the objective")
