# SPDX-License-Identifier: Apache-2.0
"""Checks shared by the trainers: the data of every batch, errors that name the
step, and the diagnosis of a non-finite loss (which site went NaN)."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from ..energy import check_data, find_nonfinite

__all__ = ["at_step", "check_batch", "check_loss", "check_losses", "describe_nonfinite"]


def check_batch(v, where: str, name: str = "data") -> torch.Tensor:
    """:func:`pyro_ebm.energy.check_data` on one batch, named by where it was
    passed, e.g. ``"data (step 3)"``: type, float dtype, batch dim, an empty
    batch, NaN/Inf with its index, overflow. One reduction; run on every batch."""
    return check_data(v, f"{name} ({where})")


@contextmanager
def at_step(algorithm: str, where: str):
    """Re-raise a ``ValueError`` or ``TypeError`` from inside the block with the
    algorithm and the step (or method) in front of its message."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise type(err)(f"{algorithm} ({where}): {err}") from err


def describe_nonfinite(v, args=(), kwargs=None, guide=None, model=None, values=None,
                       guide_role="guide", model_role="model") -> str:
    """Which site of the guide or the model is NaN / Inf on the batch ``v`` (see
    :func:`pyro_ebm.energy.find_nonfinite`): the guide first, then the model with
    its latent sites at ``values`` (a dict, or a callable returning one, called
    only when the guide is finite). Says so when every site is finite."""
    args = (v,) + tuple(args)
    if guide is not None:
        found = find_nonfinite(guide, args, kwargs, role=guide_role)
        if found:
            return found
    if model is not None:
        if callable(values):
            with torch.no_grad():
                values = values()
        found = find_nonfinite(model, args, kwargs, values=values, role=model_role)
        if found:
            return found
    return ("every site of the model and guide is finite on this batch, so the NaN / Inf arises "
            "in a gradient (e.g. the score w.r.t. the data) or the objective")


def check_loss(algorithm, step, where, value, diagnose=None):
    """Raise a ``ValueError`` naming the step when the float ``value`` is not
    finite; ``diagnose()`` (if given) adds which site went non-finite."""
    if not math.isfinite(value):
        detail = f"; {diagnose()}" if diagnose is not None else ""
        raise ValueError(f"{algorithm} diverged at step {step}: the {where} loss is {value}{detail}")


def check_losses(algorithm, step, named_losses, diagnose=None):
    """One host sync for all losses of a step: raise a ``ValueError`` naming the
    step and the first non-finite loss (and, with ``diagnose``, the site);
    return the values as floats."""
    if not named_losses:
        return []
    values = torch.stack([loss.detach().reshape(()) for _, loss in named_losses]).tolist()
    for (where, _), value in zip(named_losses, values, strict=True):
        check_loss(algorithm, step, where, value, diagnose)
    return values
