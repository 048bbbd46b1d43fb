# SPDX-License-Identifier: Apache-2.0
"""The traced path of the energy view: a Pyro model turned, once per argument
signature, into a plain torch function, and run afterwards with no Pyro message.

For a view of the model ``model(v, *args)``, the second call of
:meth:`~pyro_ebm.energy.EnergyView.log_density` with a given signature

- shapes, dtypes and devices of every tensor argument and latent value,
- values of the other (static) arguments (the structure's cache key),
- ``per_item`` and ``num_chains``,
- the default dtype, the model module's own numbers, strings and flags and
  its submodules' training flags,

runs the Pyro path once under ``torch.fx.experimental.proxy_tensor.make_fx`` (the
first call runs the Pyro path: a signature used once is not worth a trace;
:meth:`~pyro_ebm.energy.EnergyView.path` traces at once). The result is an aten-level ``torch.fx`` graph

.. math::

    (\\theta, \\text{tensor arguments}, h) \\mapsto \\log \\tilde p(v, h)

whose inputs are the model's parameters :math:`\\theta` (the ``nn.Parameter`` and
buffers of the model's module and all its submodules, and the Pyro param-store
parameters it reads through ``pyro.param`` / ``pyro.module``, as unconstrained
tensors with their constraint applied inside the graph), the tensor arguments
and the latent values. Later calls with the same signature look up the current
parameter objects and run the graph: values, gradients and second derivatives
are those of the Pyro path (aten ops have their own derivatives).

**The guard.** Right after tracing, the graph and the Pyro path run once on the
same inputs, from the same random state; their values and their gradients in
every input must agree (to about 1e-4 relative in float32, 1e-9 in float64).
A model that cannot be traced falls back to the Pyro path for that signature,
silently (one debug-level log record on the ``pyro_ebm.energy`` logger;
:meth:`~pyro_ebm.energy.EnergyView.path` says which path runs and why):

- control flow on values (``if h.sum() > 0:``), ``.item()``, ``float(t)``:
  ``make_fx`` refuses to read a value while tracing;
- a disagreement with the Pyro path (e.g. ``torch.no_grad()`` blocks, which an
  aten graph does not record);
- a tensor captured from outside the model that carries a gradient and is not a
  leaf (e.g. a cached result), which the graph would keep as a stale constant;
- an in-place update of an input, a parameter or a buffer (batch norm's running
  statistics, spectral norm's power iteration in training mode);
- more than :data:`MAX_SIGNATURES` signatures for one view.

Python side effects of the model (appending to a list, printing, counters) run
once, while tracing, and not on later calls. Random ops inside the model
(``torch.randn``) are recorded as ops and stay random.

While Pyro handlers are active around a call (e.g. ``poutine.trace``), the Pyro
path runs, so that the handlers see every message; the one exception is a
parameter-only trace (``poutine.trace(param_only=True)``, what ``pyro.infer.SVI``
puts around a loss): the graph runs and the ``pyro.param`` sites the model reads
are sent as messages, so the trace finds the parameters.

**Chains of a model written for one draw.** With ``num_chains=C`` the view first
runs the model under an extra chain plate (one run for all chains, the fastest
where the model broadcasts over leading dims). If that raises, returns the wrong
shape or disagrees with a run on one chain's draw alone (chains 0 and C-1 are
checked, once per signature), the one-draw function is vectorized over the
chains with ``torch.func.vmap``; if that fails too, a ``ValueError`` says what
the model must do.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK, am_i_wrapped
from pyro.poutine.trace_messenger import TraceMessenger
from torch.distributions import constraints, transform_to

__all__ = ["MAX_SIGNATURES", "FastPath", "NotTraced", "Path", "default_traced", "prior_draws"]

log = logging.getLogger("pyro_ebm.energy")
_STORE = pyro.get_param_store()  # the one global param store (clearing it keeps the object)

#: traced signatures per view; beyond them new signatures run on the Pyro path
MAX_SIGNATURES = 16

_PLAIN = (bool, int, float, str)
_CAUGHT = (RuntimeError, ValueError, IndexError, TypeError)  # what a model fails with on a bad shape


def default_traced() -> bool:
    """Whether new views use the traced path: on, unless the environment variable
    ``PYRO_EBM_TRACE`` is ``0`` (read when a view is made)."""
    return os.environ.get("PYRO_EBM_TRACE", "1").strip().lower() not in ("0", "false", "no", "off")


class Path(str):
    """Which path :meth:`~pyro_ebm.energy.EnergyView.log_density` runs for given
    arguments: the string ``"traced"`` or ``"pyro"``, with two attributes:

    - ``chains``: for ``num_chains=C``, ``"plate"`` (one run under a chain plate) or
      ``"vmap"`` (the one-draw function vectorized with ``torch.func.vmap``);
      ``None`` otherwise;
    - ``reason``: why the Pyro path runs, and with ``chains="vmap"`` why the chain
      plate does not; ``None`` on the traced path with a chain plate or none.
    """

    chains: str | None
    reason: str | None

    def __new__(cls, kind: str, chains: str | None = None, reason: str | None = None):
        self = super().__new__(cls, kind)
        self.chains, self.reason = chains, reason
        return self

    def __repr__(self):
        extra = "".join(f", {k}={v!r}" for k, v in (("chains", self.chains), ("reason", self.reason)) if v)
        return f"Path({str(self)!r}{extra})"


class NotTraced(RuntimeError):
    """The signature runs on the Pyro path, so it has no pure function
    (:meth:`~pyro_ebm.energy.EnergyView.pure`); the message says why."""


class _Stale(Exception):
    """A parameter of a traced signature changed dtype or shape, or is gone."""


class _PyroFailed(Exception):
    """The Pyro path itself raised on the tracing inputs (the caller's run raises too)."""


# -- arguments ------------------------------------------------------------------


def _collect(obj, out):
    if torch.is_tensor(obj):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _collect(x, out)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=repr):
            _collect(obj[k], out)


def _tensor_leaves(args, kwargs):
    """Every tensor in the arguments, in a fixed order (the order of :func:`_rebuild`)."""
    out = []
    _collect(args, out)
    for k in sorted(kwargs):
        _collect(kwargs[k], out)
    return out


def _replace(obj, it):
    if torch.is_tensor(obj):
        return next(it)
    if isinstance(obj, (tuple, list)):
        items = [_replace(x, it) for x in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        new = dict(obj)
        for k in sorted(obj, key=repr):
            new[k] = _replace(obj[k], it)
        return type(obj)(new) if type(obj) is not dict else new
    return obj


def _rebuild(args, kwargs, tensors):
    """``(args, kwargs)`` with their tensors replaced by ``tensors``, in order."""
    it = iter(tensors)
    args = tuple(_replace(a, it) for a in args)
    kwargs = {k: _replace(kwargs[k], it) for k in sorted(kwargs)}
    return args, kwargs


def _signature(tensors):
    return tuple((t.shape, t.dtype, t.device) for t in tensors)


def _value_signature(values):
    return tuple((k, v.shape, v.dtype, v.device) for k, v in values.items())


# -- Pyro messages while tracing ---------------------------------------------------


class _ParamNames(Messenger):
    """Records the names of the ``pyro.param`` sites a run reads, in order."""

    def __init__(self):
        super().__init__()
        self.names = {}

    def _pyro_post_param(self, msg):
        self.names.setdefault(msg["name"], None)


class _LiftParams(Messenger):
    """Answers every ``pyro.param`` message with the traced input of that name (the
    unconstrained tensor, through its constraint), so that param-store parameters
    become inputs of the graph rather than constants, and the store is never read."""

    def __init__(self, by_name):
        super().__init__()
        self.by_name = by_name  # name -> (tensor, constraint)

    def _pyro_param(self, msg):
        found = self.by_name.get(msg["name"])
        if found is None:
            raise RuntimeError(f"the model read pyro.param('{msg['name']}') while tracing but not in its "
                               "reference run")
        tensor, constraint = found
        msg["value"] = tensor if constraint is constraints.real else transform_to(constraint)(tensor)
        msg["done"] = True


def _param_only_wrapped() -> bool:
    """Whether every active Pyro handler is a parameter-only trace."""
    return all(isinstance(h, TraceMessenger) and h.param_only for h in _PYRO_STACK)


@contextmanager
def _swapped(objects, tensors):
    """Put ``tensors`` where the module parameters and buffers ``objects`` sit."""
    done = []
    try:
        for obj, tensor in zip(objects, tensors, strict=True):
            for store, key in obj.places:
                done.append((store, key, store[key]))
                store[key] = tensor
        yield
    finally:
        for store, key, old in reversed(done):
            store[key] = old


# -- one traced signature ---------------------------------------------------------


class _Input:
    """A tensor the graph takes as input and the caller's run looks up live:
    ``store[key]`` for a module's ``_parameters`` / ``_buffers``, the parameter
    ``key`` of Pyro's param store, or the object itself when ``store`` is ``None``."""

    __slots__ = ("obj", "store", "key", "places", "dtype", "shape", "buffer")

    def __init__(self, obj, store, key, buffer=False):
        self.obj, self.store, self.key, self.places = obj, store, key, []
        self.dtype, self.shape, self.buffer = obj.dtype, obj.shape, buffer

    def live(self):
        store = self.store
        if store is None:
            t = self.obj
        elif store is _STORE:  # looked up by name: pyro.clear_param_store() replaces its dict
            t = store._params.get(self.key)
        else:
            t = store.get(self.key)
        if t is None or t.dtype != self.dtype or t.shape != self.shape:
            raise _Stale
        return t


class _Entry:
    """A traced signature: the graph and what it takes, or the reason it is not traced."""

    __slots__ = ("forward", "pre", "post", "value_names", "store_names", "reason", "structure")

    def __init__(self, structure, reason=None):
        self.structure = structure  # held, so its id (in the key) is never reused
        self.reason = reason
        self.forward = None
        self.pre, self.post, self.value_names, self.store_names = [], [], [], ()


def _devices(tensors):
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def _rng_state(devices):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state, devices):
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1], strict=True):
        torch.cuda.set_rng_state(s, d)


def _leaf(t):
    t = t.detach()
    return t.requires_grad_(True) if t.is_floating_point() else t


def _first_line(err):
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _close(a, b):
    """Equal shape and dtype and values within a tolerance for the dtype (NaN equal)."""
    if a is None or b is None:
        return (a is None or not bool(a.any())) and (b is None or not bool(b.any()))
    a, b = a.detach(), b.detach()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return bool((a == b).all())
    rtol = 1e-9 if a.dtype == torch.float64 else 1e-4
    finite = b[torch.isfinite(b)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    return torch.allclose(a, b, rtol=rtol, atol=rtol * scale, equal_nan=True)


def _base_node(node):
    """The node whose storage ``node`` views (following aten view ops)."""
    while node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        returns = node.target._schema.returns
        if not returns or returns[0].alias_info is None or returns[0].alias_info.is_write or not node.args:
            break
        node = node.args[0]
    return node


def _mutated_input(graph):
    """The first in-place update of a graph input or constant, as a string, or ``None``."""
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for i, arg in enumerate(node.target._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            target = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if isinstance(target, torch.fx.Node) and _base_node(target).op in ("placeholder", "get_attr"):
                return str(node.target)
    return None


def _meta(node):
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return (val.shape, val.dtype) if torch.is_tensor(val) else None


def _squeezes_kept_dims(node):
    """Whether ``node`` squeezes exactly the dims that its input, a sum with
    ``keepdim=True`` used by nothing else, kept (the per-item log density's
    reduction over the event dims)."""
    aten = torch.ops.aten
    if node.target is not aten.squeeze.dims or len(node.args) != 2 or node.kwargs:
        return False
    source = node.args[0]
    return (isinstance(source, torch.fx.Node) and source.target is aten.sum.dim_IntList
            and len(source.args) == 3 and source.args[2] is True and not source.kwargs
            and len(source.users) == 1 and list(node.args[1])  # an empty list sums over every dim
            and list(source.args[1]) == list(node.args[1]))


def _simplify(graph):
    """Drop the ops that return their input unchanged (a view or expand to the same
    shape, a product with 1), which an aten graph keeps from the Pyro path's
    broadcasting: each would cost a forward and a backward node on every call.
    Then drop the traced values kept in the nodes' metadata."""
    aten = torch.ops.aten
    same_shape = {aten.view.default, aten.expand.default, aten.reshape.default, aten._unsafe_view.default}
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.args:
            continue
        source = node.args[0]
        if _squeezes_kept_dims(node):  # sum(x, dims, keepdim=True).squeeze(dims) is sum(x, dims)
            source.args = source.args[:2]
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            continue
        if _meta(source) is None or _meta(source) != _meta(node):
            continue
        if node.target in same_shape:
            pass
        elif node.target in (aten.mul.Tensor, aten.div.Tensor) and len(node.args) == 2 and not node.kwargs:
            other = node.args[1]
            if isinstance(other, bool) or not isinstance(other, (int, float)) or other != 1:
                continue
            if any(isinstance(u.target, torch._ops.OpOverload) and u.target._schema.is_mutable
                   for u in node.users):
                continue  # the product is a new tensor that is updated in place: keep it
        else:
            continue
        node.replace_all_uses_with(source)
        graph.erase_node(node)
    for node in graph.nodes:
        node.meta.clear()


#: folded constants up to this many entries are stored whole (an op reads a
#: contiguous operand faster than a broadcast one); larger ones at their smallest
#: broadcasting size, so that constants over a million chains take no memory
_FOLD_WHOLE = 1 << 16
_ADD_SUB = (torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor)


def _compact(value):
    """``value`` narrowed to one entry along every dim on which it is constant."""
    for d in range(value.dim()):
        if value.shape[d] > 1 and bool((value == value.narrow(d, 0, 1)).all()):
            value = value.narrow(d, 0, 1)
    return value.contiguous()


def _adds_zero(user, node, value):
    """Whether ``user`` is ``x + node`` or ``x - node`` with ``node`` all zeros and the
    result of ``x``'s shape and dtype: then it is ``x``."""
    if user.target not in _ADD_SUB or user.kwargs or len(user.args) != 2 or user.args[1] is not node:
        return False
    x = user.args[0]
    return (isinstance(x, torch.fx.Node) and _meta(x) is not None and _meta(x) == _meta(user)
            and not bool(value.any()))


#: factories whose value depends on their tensor argument's dtype, device and
#: shape only, which a traced signature fixes (``c.new_ones(k)`` for a prior's
#: probabilities, ``torch.zeros_like(x)`` for a location)
_METADATA_ONLY = frozenset({
    torch.ops.aten.new_ones.default, torch.ops.aten.new_zeros.default, torch.ops.aten.new_full.default,
    torch.ops.aten.ones_like.default, torch.ops.aten.zeros_like.default, torch.ops.aten.full_like.default,
})


def _fold_constants(gm):
    """Compute once, at trace time, every op that reads no graph input (the
    distributions' parameters built from constants, e.g. a prior's ``log(scale)``
    expanded over the chains), and keep its value as a constant of the graph: the
    traced function then does per call only the work that depends on its inputs.
    A factory that reads only its input's dtype, device and shape
    (:data:`_METADATA_ONLY`, e.g. ``c.new_ones(k)``) counts as reading no input:
    the signature the graph is traced for fixes those. Each folded value is stored
    at its smallest broadcasting size and expanded (a view) back to its shape."""
    graph = gm.graph
    known = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            value = getattr(gm, node.target, None)
            if torch.is_tensor(value):
                known[node] = value
            continue
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target._schema.is_mutable or torch.Tag.nondeterministic_seeded in node.target.tags:
            continue
        # a metadata-only factory reads its first argument for dtype, device, shape and strides
        first = (node.args[0] if node.target in _METADATA_ONLY and node.args
                 and isinstance(node.args[0], torch.fx.Node) else None)
        if not all(n in known for n in node.all_input_nodes if n is not first):
            continue
        lookup = known.__getitem__
        if first is not None:
            val = first.meta.get("val")  # a fake tensor
            if not torch.is_tensor(val):
                continue
            stand_in = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)

            def lookup(n, first=first, stand_in=stand_in):
                return stand_in if n is first else known[n]

        try:
            args = torch.fx.node.map_arg(node.args, lookup)
            kwargs = torch.fx.node.map_arg(node.kwargs, lookup)
            with torch.no_grad():
                value = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - an op that will not run here stays in the graph
            continue
        if torch.is_tensor(value):
            known[node] = value
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node not in known or all(u in known for u in node.users):
            continue  # an input-free op used only by other folded ops goes with them
        value = known[node]
        for user in list(node.users):
            if _adds_zero(user, node, value):  # e.g. x - loc for a prior with loc 0
                user.replace_all_uses_with(user.args[0])
                graph.erase_node(user)
        if not node.users:
            continue
        small = value.contiguous() if value.numel() <= _FOLD_WHOLE else _compact(value)
        name = f"_folded_{count}"
        count += 1
        gm.register_buffer(name, small, persistent=False)
        with graph.inserting_before(node):
            new = graph.get_attr(name)
            if small.shape != value.shape:
                new = graph.call_function(torch.ops.aten.expand.default, (new, list(value.shape)))
        node.replace_all_uses_with(new)
    graph.eliminate_dead_code()


def _trace(view, st, args, kwargs, tensors, values, per_item, num_chains):
    """Trace one signature; an :class:`_Entry` with a graph, or with the reason it has none.

    Raises :class:`_PyroFailed` when the Pyro path raises on these inputs."""
    try:
        return _trace_signature(view, st, args, kwargs, tensors, values, per_item, num_chains)
    except _PyroFailed:
        raise
    except Exception as err:  # noqa: BLE001 - whatever goes wrong here, the Pyro path still runs
        return _Entry(st, f"tracing failed: {_first_line(err)}")


def _trace_signature(view, st, args, kwargs, tensors, values, per_item, num_chains):
    from .validation import module_of  # the energy core imports this module

    entry = _Entry(st)
    model = view.model
    module = module_of(model)
    # the module's parameters and buffers, each object once, with every place it sits
    objects, by_id = [], {}
    if module is not None:
        for sub in module.modules():
            for store, buffer in ((sub._parameters, False), (sub._buffers, True)):
                for key, t in store.items():
                    if t is None:
                        continue
                    found = by_id.get(id(t))
                    if found is None:
                        found = by_id[id(t)] = _Input(t, store, key, buffer=buffer)
                        objects.append(found)
                    found.places.append((store, key))
    value_names = list(values)
    all_tensors = list(tensors) + [values[k] for k in value_names] + [o.obj for o in objects]
    devices = _devices(all_tensors)
    with torch.random.fork_rng(devices=devices):  # the caller's random stream is left as it was
        rng = _rng_state(devices)
        # the Pyro path once on fresh leaves: the reference, and the pyro.param sites it reads
        leaf_args = [_leaf(t) for t in tensors]
        leaf_values = {k: _leaf(values[k]) for k in value_names}
        ref_args, ref_kwargs = _rebuild(args, kwargs, leaf_args)
        try:
            with torch.enable_grad(), poutine.block(), _ParamNames() as seen:
                ref = view._pyro_log_density(st, ref_args, ref_kwargs, leaf_values, per_item, num_chains)
        except Exception as err:  # noqa: BLE001 - the caller's own run raises it
            raise _PyroFailed from err
        store = _STORE
        lifted = {}  # param-store name -> (id of its unconstrained tensor, constraint)
        for name in seen.names:
            u = store._params[name]  # the unconstrained leaf; its constraint goes into the graph
            if id(u) not in by_id:
                by_id[id(u)] = _Input(u, _STORE, name)
                objects.append(by_id[id(u)])
            lifted[name] = (id(u), store._constraints.get(name, constraints.real))
        entry.store_names = tuple(seen.names)
        index = {id(o.obj): i for i, o in enumerate(objects)}
        n_obj, n_args = len(objects), len(tensors)

        def pure(*flat):
            params = flat[:n_obj]
            a, k = _rebuild(args, kwargs, flat[n_obj:n_obj + n_args])
            vals = dict(zip(value_names, flat[n_obj + n_args:], strict=True))
            by_name = {name: (params[index[i]], c) for name, (i, c) in lifted.items()}
            with _swapped([o for o in objects if o.places], [p for o, p in zip(objects, params, strict=True)
                                                             if o.places]):
                with poutine.block(), _LiftParams(by_name):
                    return view._pyro_log_density(st, a, k, vals, per_item, num_chains)

        from torch.fx.experimental.proxy_tensor import make_fx

        # detached stand-ins (copies for buffers, which the model may update) that keep
        # requires_grad: pyro.module skips parameters without it
        stand_ins = [o.obj.detach().clone() if o.buffer else o.obj.detach() for o in objects]
        example = ([t.requires_grad_(o.obj.requires_grad) for t, o in zip(stand_ins, objects, strict=True)]
                   + [t.detach() for t in tensors] + [values[k].detach() for k in value_names])
        try:
            with warnings.catch_warnings():  # the reference run has shown the model's warnings
                warnings.simplefilter("ignore")
                gm = make_fx(pure, tracing_mode="real")(*example)
        except Exception as err:  # noqa: BLE001 - whatever tracing refuses, the Pyro path runs
            if "_local_scalar_dense" in str(err):
                entry.reason = ("the model reads a tensor's value (Python control flow on values, .item(), "
                                "float() or bool() of a tensor), which a traced graph cannot record")
            else:
                entry.reason = f"tracing failed: {_first_line(err)}"
            return entry
        graph = gm.graph
        graph.eliminate_dead_code()
        # tensors the model reaches outside its module and the param store (a closure's
        # nn.Module, a tensor with requires_grad): graph inputs too, looked up live
        post = []
        placeholders = [n for n in graph.nodes if n.op == "placeholder"][:n_obj]
        inputs = {id(o.obj): n for o, n in zip(objects, placeholders, strict=True)}
        for node in list(graph.nodes):
            if node.op != "get_attr":
                continue
            obj = getattr(gm, node.target)
            if not torch.is_tensor(obj) or not (isinstance(obj, torch.nn.Parameter) or obj.requires_grad):
                continue
            if not obj.is_leaf:
                entry.reason = ("the model uses a tensor with a gradient computed outside it (e.g. a cached "
                                "value), which a traced graph would keep as a stale constant")
                return entry
            ph = inputs.get(id(obj))  # e.g. a closure's module registered by pyro.module: an input already
            if ph is None:
                name = next((n for n, u in store._params.items() if u is obj), None)
                post.append(_Input(obj, _STORE if name is not None else None, name))
                last = [n for n in graph.nodes if n.op == "placeholder"]
                where = (graph.inserting_after(last[-1]) if last
                         else graph.inserting_before(next(iter(graph.nodes))))
                with where:
                    ph = inputs[id(obj)] = graph.placeholder(f"lifted_{len(post)}")
            node.replace_all_uses_with(ph)
            graph.erase_node(node)
            delattr(gm, node.target)
        mutated = _mutated_input(graph)
        if mutated is not None:
            entry.reason = (f"the model updates an input, parameter or buffer in place ({mutated}; e.g. "
                            "batch norm's running statistics or spectral norm's power iteration in training "
                            "mode)")
            return entry
        _fold_constants(gm)
        _simplify(graph)
        graph._codegen = torch.fx.graph.CodeGen()  # plain positional inputs
        graph.lint()
        gm.recompile()
        entry.pre, entry.post, entry.value_names = objects, post, value_names
        # the guard: the graph and the Pyro path agree in value and in gradient
        _set_rng_state(rng, devices)
        flat = ([o.obj for o in objects] + leaf_args + [leaf_values[k] for k in value_names]
                + [o.obj for o in post])
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out = gm.forward(*flat)
            except Exception as err:  # noqa: BLE001
                entry.reason = f"the traced graph failed: {_first_line(err)}"
                return entry
            if not torch.is_tensor(out) or not _close(out, ref):
                entry.reason = "the traced graph's value differs from the Pyro path's"
                return entry
            wrt = [t for t in [o.obj for o in objects + post] + leaf_args + list(leaf_values.values())
                   if t.is_floating_point() and t.requires_grad]
            wrt = list({id(t): t for t in wrt}.values())
            if wrt and ref.requires_grad:
                weight = torch.randn_like(ref)
                g_ref = torch.autograd.grad((ref * weight).sum(), wrt, allow_unused=True)
                if not out.requires_grad:
                    entry.reason = "the traced graph's value carries no gradient where the Pyro path's does"
                    return entry
                g_out = torch.autograd.grad((out * weight).sum(), wrt, allow_unused=True)
                if not all(_close(a, b) for a, b in zip(g_out, g_ref, strict=True)):
                    entry.reason = ("the traced graph's gradient differs from the Pyro path's (e.g. a "
                                    "torch.no_grad() block inside the model)")
                    return entry
    entry.forward = gm.forward
    return entry


# -- the fast path of one view ----------------------------------------------------------


class FastPath:
    """The traced path and the chain choice of one :class:`~pyro_ebm.energy.EnergyView`."""

    def __init__(self, view):
        self.view = view
        self._entries = {}
        self._chains = {}  # chain signature -> ("plate" | "vmap", reason)
        self._seen = set()  # signatures called once, on the Pyro path
        self._dicts = None  # the __dict__ of the model's module and its submodules (not the modules)

    # -- entry points (called by EnergyView) ----------------------------------

    def log_density(self, st, args, kwargs, values, per_item, num_chains):
        if num_chains:
            mode, _ = self._chain_mode(st, args, kwargs, values, per_item, num_chains)
            if mode == "vmap":
                return self._vmapped(st, args, kwargs, values, per_item)
        prepared = self._prepare(st, args, kwargs, values, per_item, num_chains)
        return self._run(prepared, st, args, kwargs, values, per_item, num_chains)

    def path(self, st, args, kwargs, values, per_item, num_chains) -> Path:
        chains = reason = None
        if num_chains:
            chains, reason = self._chain_mode(st, args, kwargs, values, per_item, num_chains)
            if chains == "vmap":
                values, num_chains = {k: v[0] for k, v in values.items()}, None
        prepared = self._prepare(st, args, kwargs, values, per_item, num_chains, now=True)
        if prepared is not None:
            return Path("traced", chains, reason if chains == "vmap" else None)
        why = self._why_not(st, args, kwargs, values, per_item, num_chains)
        return Path("pyro", chains, why if not reason else f"{why}; chains: {reason}")

    def pure(self, st, args, kwargs, values, per_item, num_chains):
        """``(entry, vmapped)`` of the signature, traced now; raises
        :class:`NotTraced` on the Pyro path."""

        vmapped = False
        if num_chains:
            mode, _ = self._chain_mode(st, args, kwargs, values, per_item, num_chains)
            if mode == "vmap":
                values, num_chains, vmapped = {k: v[0] for k, v in values.items()}, None, True
        prepared = self._prepare(st, args, kwargs, values, per_item, num_chains, now=True)
        if prepared is None:
            raise NotTraced(f"the {self.view.role} runs on the Pyro path for these arguments: "
                            f"{self._why_not(st, args, kwargs, values, per_item, num_chains)}")
        return prepared[0], vmapped

    # -- one signature ----------------------------------------------------------

    def _key(self, st, tensors, values, per_item, num_chains):
        return (id(st), per_item, num_chains, _signature(tensors), _value_signature(values),
                torch.get_default_dtype(), self._module_state())

    def _module_state(self):
        """What a graph bakes in from the model's module besides tensors: the module's
        own numbers, strings and flags (e.g. a temperature) and every submodule's
        training flag (dropout, batch norm)."""
        dicts = self._dicts
        if dicts is None:
            from .validation import module_of

            module = module_of(self.view.model)
            # the dicts, not the modules: a cached view must not keep its model alive
            dicts = self._dicts = [] if module is None else [m.__dict__ for m in module.modules()]
        if not dicts:
            return ()
        own = tuple((k, v) for k, v in dicts[0].items() if type(v) in _PLAIN and k[:1] != "_")
        return own + tuple(d.get("training") for d in dicts[1:])

    def _prepare(self, st, args, kwargs, values, per_item, num_chains, now=False):
        """``(entry, inputs before, tensors, inputs after, emit)`` for the traced path,
        or ``None`` for the Pyro path. Traces on the second call of a signature (a
        signature used once is not worth a trace), or on the first with ``now``."""
        view = self.view
        if not view.traced:
            return None
        wrapped = am_i_wrapped()
        if wrapped and not _param_only_wrapped():
            return None
        tensors = _tensor_leaves(args, kwargs)
        key = self._key(st, tensors, values, per_item, num_chains)
        entry = self._entries.get(key)
        if entry is None and torch.is_inference_mode_enabled():
            return None  # no gradients to check the graph by: trace outside inference mode
        if entry is None and not now and key not in self._seen:
            if len(self._seen) >= 8 * MAX_SIGNATURES:
                self._seen.clear()
            self._seen.add(key)
            return None
        for _ in range(2):
            if entry is None:
                entry = self._build(key, st, args, kwargs, tensors, values, per_item, num_chains)
                if entry is None:
                    return None
            if entry.forward is None:
                return None
            try:
                pre = [o.live() for o in entry.pre]
                post = [o.live() for o in entry.post]
            except _Stale:  # a parameter changed dtype or shape or is gone: trace again
                del self._entries[key]
                entry = None
                continue
            if wrapped and any(name not in _STORE._params for name in entry.store_names):
                # a parameter left the param store (e.g. a PyroModule attribute set anew): the
                # Pyro path registers it again, and the trace around the call sees it
                return None
            return entry, pre, tensors, post, wrapped
        return None

    def _build(self, key, st, args, kwargs, tensors, values, per_item, num_chains):
        if len(self._entries) >= MAX_SIGNATURES:
            entry = _Entry(st, f"this view traced {MAX_SIGNATURES} signatures already (shapes, dtypes, "
                               "devices or static arguments); new ones run on the Pyro path")
        else:
            try:
                entry = _trace(self.view, st, args, kwargs, tensors, values, per_item, num_chains)
            except _PyroFailed:
                return None  # not cached: the caller's run raises the model's error
        if entry.reason is not None:
            log.debug("%s %r runs on the Pyro path: %s", self.view.role, self.view.model, entry.reason)
        self._entries[key] = entry
        return entry

    def _why_not(self, st, args, kwargs, values, per_item, num_chains):
        if not self.view.traced:
            return "traced=False"
        if am_i_wrapped() and not _param_only_wrapped():
            names = ", ".join(type(h).__name__ for h in _PYRO_STACK)
            return f"Pyro handlers are active around the call ({names})"
        key = self._key(st, _tensor_leaves(args, kwargs), values, per_item, num_chains)
        entry = self._entries.get(key)
        if entry is not None:
            return entry.reason
        if torch.is_inference_mode_enabled():
            return "inference mode: a signature is traced outside it"
        return "the Pyro path raised on these arguments"

    def _run(self, prepared, st, args, kwargs, values, per_item, num_chains):
        if prepared is None:
            return self.view._pyro_log_density(st, args, kwargs, values, per_item, num_chains)
        entry, pre, tensors, post, emit = prepared
        out = entry.forward(*pre, *tensors, *[values[k] for k in entry.value_names], *post)
        if emit:  # a parameter-only trace (e.g. SVI's) collects the parameters from these messages
            for name in entry.store_names:
                pyro.param(name)
        return out

    # -- chains -----------------------------------------------------------------

    def _vmapped(self, st, args, kwargs, values, per_item):
        """The one-draw log density vectorized over the leading dim of every value."""
        first = {k: v[0] for k, v in values.items()}
        prepared = self._prepare(st, args, kwargs, first, per_item, None)  # traced outside vmap

        def one(vals):
            return self._run(prepared, st, args, kwargs, vals, per_item, None)

        return torch.func.vmap(one, randomness="different")(values)

    def _chain_mode(self, st, args, kwargs, values, per_item, num_chains):
        key = (id(st), per_item, num_chains, tuple((k, v.shape) for k, v in values.items()))
        found = self._chains.get(key)
        if found is None:
            found = self._chains[key] = self._choose(st, args, kwargs, values, per_item, num_chains)
        return found

    def _choose(self, st, args, kwargs, values, per_item, C):
        """``("plate", None)`` when one run under a chain plate gives each chain's log
        density; else ``("vmap", why the plate does not)``; else a ``ValueError``."""
        pyro_one = self.view._pyro_log_density
        with torch.no_grad():
            plate_error = None
            try:
                plate = self._plate(st, args, kwargs, values, per_item, C)
            except _CAUGHT as err:
                plate, plate_error = None, err
            try:
                one = pyro_one(st, args, kwargs, {k: v[0] for k, v in values.items()}, per_item, None)
            except _CAUGHT:
                if plate_error is not None:
                    raise plate_error from None  # not about chains: the model fails on one draw too
                raise
            expected = (C,) + tuple(one.shape)
            if plate_error is not None:
                why = f"under a chain plate it raised {_first_line(plate_error)}"
            elif tuple(plate.shape) != expected:
                why = f"under a chain plate its log density has shape {tuple(plate.shape)}, not {expected}"
            else:
                last = pyro_one(st, args, kwargs, {k: v[-1] for k, v in values.items()}, per_item, None)
                if _close(plate[0], one) and _close(plate[-1], last):
                    return "plate", None
                why = ("under a chain plate a chain's log density differs from that of its draw run alone "
                       "(the model mixes the chains' values)")
            try:
                out = self._vmapped(st, args, kwargs, values, per_item)
            except Exception as err:  # noqa: BLE001 - explained with the plate's failure below
                raise ValueError(
                    f"the {self.view.role} cannot be evaluated for {C} chains at once: {why}; vectorized "
                    f"over the chains with torch.func.vmap it raised {_first_line(err)}. Write it so that "
                    "its latent values may carry leading batch dims (e.g. (features * w.unsqueeze(-2))"
                    ".sum(-1) or features @ w.unsqueeze(-1) instead of features @ w), or so that "
                    "torch.func.vmap can run it: no Python control flow, .item() or float() on values "
                    "computed from latent sites"
                ) from err
            if tuple(out.shape) != expected:
                raise ValueError(
                    f"the {self.view.role} cannot be evaluated for {C} chains at once: {why}; vectorized "
                    f"over the chains with torch.func.vmap its log density has shape {tuple(out.shape)}, "
                    f"not {expected}"
                )
        log.debug("%s %r: chains vectorized with torch.func.vmap: %s", self.view.role, self.view.model, why)
        return "vmap", why

    def _plate(self, st, args, kwargs, values, per_item, num_chains):
        prepared = self._prepare(st, args, kwargs, values, per_item, num_chains)
        return self._run(prepared, st, args, kwargs, values, per_item, num_chains)


def prior_draws(model, args, kwargs, sites, num_chains, error):
    """Latent draws ``{site: (C, *site_shape)}`` from ``num_chains`` runs of a model
    written for one draw (for which one run under a chain plate raised ``error``),
    by running it once per chain; re-raises ``error`` when one run fails too."""
    draws = {info.name: [] for info in sites}
    with pyro.validation_enabled(False), torch.no_grad():
        for _ in range(num_chains):
            try:
                trace = poutine.trace(model).get_trace(*args, **kwargs)
            except _CAUGHT:
                raise error from None
            for name, found in draws.items():
                found.append(trace.nodes[name]["value"])
    return {name: torch.stack(found) for name, found in draws.items()}
