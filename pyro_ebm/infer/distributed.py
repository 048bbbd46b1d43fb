# SPDX-License-Identifier: Apache-2.0
r"""Data-parallel training under an initialized ``torch.distributed`` process group.

When ``torch.distributed.is_available() and torch.distributed.is_initialized()``
and the world holds more than one process, every trainer of
:mod:`pyro_ebm.infer` trains data-parallel: each rank steps on its shard of
the batch, and

- the gradient of every level is averaged over the ranks (summed for a level
  whose loss sums over the batch, e.g. MCMCTeaching's VAE trained with Pyro's
  ``Trace_ELBO``) before the level's optimizer steps (:func:`average_gradients`:
  one bucketed ``all_reduce`` per device and dtype, in :meth:`~pyro_ebm.infer.Trainer._apply`, the one update
  path), so that a loss that is a mean over the batch gets the gradient of the
  mean over the global batch,

  .. math::

      \frac1W\sum_{r=1}^W \nabla_\theta \frac1{b}\sum_{i\in \text{shard}_r} \ell_i
      = \nabla_\theta \frac1{Wb}\sum_{i=1}^{Wb} \ell_i ;

- the gradients inside unrolled (differentiable) optimizer steps are averaged
  with a differentiable ``all_reduce`` (:func:`differentiable_mean`), so that a
  hypergradient through them is the one-process hypergradient;
- terms that couple the items of a batch (KALE's log-mean-exp over generator
  draws) are computed over the global batch (:func:`log_mean_exp`);
- rank 0's parameters are broadcast to all ranks once, at the first step
  (:func:`broadcast_parameters`), after which identical updates keep them equal.

Each rank draws its own noise and latents from its own torch random stream;
seed it with :func:`seed_by_rank` (``seed + rank``).
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = ["average_gradients", "broadcast_parameters", "differentiable_mean", "log_mean_exp", "rank",
           "seed_by_rank", "world_size"]


def _dist():
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """The number of processes of the default process group (1 without one)."""
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def seed_by_rank(seed: int) -> int:
    """Seed torch, Python and numpy with ``seed + rank`` (the seeding rule of
    data-parallel runs: every rank its own stream); returns that seed."""
    import pyro

    mine = int(seed) + rank()
    pyro.set_rng_seed(mine)
    return mine


def _buckets(tensors):
    """``{(device, dtype): [index, ...]}`` of the tensors that are not ``None``."""
    found = {}
    for i, t in enumerate(tensors):
        if t is not None:
            found.setdefault((t.device, t.dtype), []).append(i)
    return found


def average_gradients(grads, summed=False):
    """The gradients ``grads`` (a list, ``None`` where a parameter has none)
    averaged over the ranks (``summed=True``: summed, for a loss that sums over
    the batch, e.g. Pyro's ``Trace_ELBO``): per device and dtype one flat
    buffer, one ``all_reduce`` (sum), divided by the world size. Returns
    ``grads`` as they are without a process group of more than one process.

    A ``None`` gradient must be ``None`` on every rank (the ranks run the same
    code on batches of the same shape)."""
    grads = list(grads)
    size = world_size()
    if size == 1:
        return grads
    dist = torch.distributed
    for idx in _buckets(grads).values():
        flat = torch.cat([grads[i].detach().reshape(-1) for i in idx])
        dist.all_reduce(flat)
        if not summed:
            flat.div_(size)
        offset = 0
        for i in idx:
            n = grads[i].numel()
            grads[i] = flat[offset:offset + n].view_as(grads[i])
            offset += n
    return grads


def broadcast_parameters(params):
    """Copy rank 0's values of ``params`` into every rank's (one bucketed
    ``broadcast`` per device and dtype); nothing without a process group."""
    if world_size() == 1:
        return
    dist = torch.distributed
    params = list(params)
    with torch.no_grad():
        for idx in _buckets(params).values():
            flat = torch.cat([params[i].detach().reshape(-1) for i in idx])
            dist.broadcast(flat, src=0)
            offset = 0
            for i in idx:
                n = params[i].numel()
                params[i].copy_(flat[offset:offset + n].view_as(params[i]))
                offset += n


def _differentiable_all_reduce(t):
    """``torch.distributed.nn.functional.all_reduce`` (sum, differentiable): torch 2.x
    marks it deprecated for a private module that has no autograd for all_reduce."""
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(t)


def differentiable_mean(tensors):
    """The tensors averaged over the ranks by one differentiable ``all_reduce``
    (``torch.distributed.nn.functional.all_reduce``; its backward sums the
    incoming gradients of every rank), so that a graph through them, e.g. an
    unrolled optimizer step, is the one-process graph. ``None`` entries stay
    ``None``; without a process group the tensors come back as they are."""
    tensors = list(tensors)
    size = world_size()
    if size == 1:
        return tensors
    for idx in _buckets(tensors).values():
        flat = _differentiable_all_reduce(torch.cat([tensors[i].reshape(-1) for i in idx])) / size
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx]), strict=True):
            tensors[i] = part.view_as(tensors[i])
    return tensors


def log_mean_exp(t):
    r"""The log-mean-exp of the 1-d tensor ``t`` over the *global* batch,

    .. math::

        \log \frac1{N}\sum_{r}\sum_{i} e^{t_{ri}}
        = m + \log \sum_r \sum_i e^{t_{ri} - m}, \qquad m = \max_{r,i} t_{ri},

    with :math:`N` the items of all ranks: one ``all_reduce`` of the maximum (no
    gradient) and one differentiable ``all_reduce`` of the sums, so that two
    ranks with half the draws each get what one process gets with all of them.
    Without a process group: ``torch.logsumexp(t, 0) - log(len(t))``."""
    size = world_size()
    if size == 1:
        return torch.logsumexp(t, 0) - math.log(t.shape[0])
    dist = torch.distributed
    with torch.no_grad():
        m = t.detach().amax()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        n = torch.tensor(float(t.shape[0]), dtype=t.dtype, device=t.device)
        dist.all_reduce(n)
    total = _differentiable_all_reduce((t - m).exp().sum())
    return m + total.log() - n.log()
