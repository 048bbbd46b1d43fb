# SPDX-License-Identifier: Apache-2.0
"""The parameters of a Pyro callable: the ones it owns, the ones a run touched,
and the callable run with other weights swapped in.

An ``nn.Module`` (a :class:`~pyro.nn.PyroModule` or a module that calls
``pyro.module`` on itself) owns its trainable parameters; a plain function's
parameters are its ``pyro.param`` statements, found by running it.
:func:`functional` runs a module with fast weights through
``torch.func.functional_call`` (``poutine.substitute`` does not reach a
PyroModule's parameters).
"""

from __future__ import annotations

from contextlib import contextmanager

import pyro
import torch
from pyro import poutine
from pyro.params.param_store import normalize_param_name
from torch.func import functional_call

from .sites import param_tensors
from .validation import module_of

__all__ = ["adopt_store", "collect_parameters", "collect_params", "functional", "module_parameters",
           "param_sites", "trainable_parameters"]


def trainable_parameters(module: torch.nn.Module) -> dict:
    """The module's parameters that require a gradient, by name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def functional(module: torch.nn.Module, weights: dict | None):
    """``module`` as a function of its fast ``weights`` (``None``: its own parameters)."""
    if weights is None:
        return module

    def call(*args, **kwargs):
        return functional_call(module, weights, args, kwargs)

    return call


@contextmanager
def collect_params(found: set):
    """Add the unconstrained leaf tensor of every ``pyro.param`` site run inside
    the block (a PyroModule's parameters included) to the set ``found``.

    >>> params = set()
    >>> with collect_params(params):
    ...     loss = -energy_view(model).log_density(v)
    >>> loss.backward(); optim(params)
    """
    with poutine.trace(param_only=True) as tracer:
        yield found
    param_tensors(tracer.trace, found)


# -- the parameters of a trainer's parts, collected once ----------------------------


def _display(name):
    return normalize_param_name(name) if name else name


def module_parameters(fn, prefix=None):
    """``[(name, parameter)]``: the trainable parameters of the ``nn.Module`` behind
    ``fn`` (the module itself or the owner of a bound method; ``[]`` for a plain
    function), children of every kind included, named by the param store when
    it holds them, else by ``prefix`` and the module's own names."""
    module = module_of(fn)
    if module is None:
        return []
    store = pyro.get_param_store()
    if prefix is None:
        prefix = getattr(module, "_pyro_name", "") or ""
    out = []
    for name, p in module.named_parameters():
        if p.requires_grad:
            out.append((_display(store.param_name(p)) or (f"{prefix}.{name}" if prefix else name), p))
    return out


def param_sites(run):
    """``[(name, tensor)]``: the unconstrained leaf tensors of every ``pyro.param``
    statement of one run of ``run()`` (no gradient), by param-store name."""
    with torch.no_grad(), poutine.trace(param_only=True) as tracer:
        run()
    out = []
    for name, site in tracer.trace.nodes.items():
        value = site["value"]
        unconstrained = getattr(value, "unconstrained", None)
        tensor = unconstrained() if callable(unconstrained) else value
        if torch.is_tensor(tensor) and tensor.requires_grad:
            out.append((_display(name), tensor))
    return out


def _store_key(display):
    """The param store's own key of a parameter shown as ``display``."""
    store = pyro.get_param_store()
    if display in store._params:
        return display
    return next((k for k in store._params if _display(k) == display), None)


def adopt_store(own, sites):
    """``sites`` without the param-store entries that stand for a module's own
    parameter under its name but are another tensor (Pyro's idiom of
    ``get_param_store().load(path)`` into a fresh module): the module's
    parameter takes the store's value and the store points at the module's
    parameter again, so the loaded values are trained rather than two copies."""
    mine = dict(own)
    out = []
    for name, tensor in sites:
        p = mine.get(name)
        if p is None or p is tensor:
            out.append((name, tensor))
            continue
        if p.shape != tensor.shape:
            raise ValueError(
                f"Pyro's param store holds '{name}' of shape {tuple(tensor.shape)}, but the module's "
                f"parameter has shape {tuple(p.shape)}: another module of the same Pyro name registered it "
                "(call pyro.clear_param_store() before building a new model or guide, or give the modules "
                "distinct names), or a saved store was loaded (load a saved trainer with "
                "trainer.load_state_dict(torch.load(path)) instead)")
        with torch.no_grad():
            p.copy_(tensor)
        key = _store_key(name)
        if key is not None:
            pyro.get_param_store()._params[key] = p
            pyro.get_param_store()._param_to_name[p] = key
    return out


def _unique(named, exclude=()):
    seen = {id(t) for t in exclude}
    out = []
    for name, t in named:
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def collect_parameters(sources):
    """The parameters of each part of a trainer, collected once.

    :param dict sources: ``{part: [(fn, run), ...]}`` with a Pyro callable ``fn``
        (or ``None``) and a thunk ``run`` (or ``None``) that runs it once.
    :returns: ``{part: [(name, tensor), ...]}``: the trainable parameters of each
        ``fn``'s ``nn.Module`` (all of them, plain ``nn.Module`` children
        included), then the ``pyro.param`` sites of each ``run()``, without
        repeats. A module behind the callables of two parts (e.g. ``vae.model``
        and ``vae.guide``) cannot tell which parameter belongs to which: there
        only the ``pyro.param`` / ``pyro.module`` statements of each run count.
    """
    owners = {}
    for part, items in sources.items():
        for fn, _ in items:
            module = module_of(fn)
            if module is not None:
                owners.setdefault(id(module), set()).add(part)
    out = {}
    for part, items in sources.items():
        named = []
        for fn, run in items:
            module = module_of(fn)
            own = module_parameters(module) if module is not None and len(owners[id(module)]) == 1 else []
            named += own
            if run is not None:
                named += adopt_store(own, param_sites(run))
        out[part] = _unique(named)
    return out
