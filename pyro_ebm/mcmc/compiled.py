# SPDX-License-Identifier: Apache-2.0
"""Compiled kernel steps for :func:`pyro_ebm.mcmc.sample` (``compile=``).

A kernel step is compiled as the pure function

.. math::

    (\\theta, x, U(x), \\nabla U(x), \\epsilon, p, \\xi) \\mapsto
    (x', U(x'), \\nabla U(x'), p', \\text{statistics}),

the kernel's :meth:`~pyro_ebm.mcmc.kernels._Kernel.move` on the potential
:math:`U_\\theta` and its gradient by ``torch.func.grad_and_value``, with the
model's parameters :math:`\\theta` passed in as tensors and the step's random
numbers :math:`\\xi` (proposal noise, momentum, accept uniforms) drawn eagerly
by :meth:`~pyro_ebm.mcmc.kernels._Kernel.step_inputs`, so compiled and eager
steps consume the same random numbers. The potential of a Pyro model comes from
:meth:`~pyro_ebm.energy.EnergyView.pure` (its traced log density); a plain
potential function is used as it is.
"""

from __future__ import annotations

import types
import warnings

import torch

from ..energy import DataPotential, LatentPotential, NotTraced
from ..energy.compile import Compiled

__all__ = ["compiled_step"]


def _pure_potential(potential, position):
    """``(U, params, pure)``: ``U(params, x)`` the potential at positions ``x`` as a pure
    function of the parameters ``params`` (live tensors, looked up now), and the
    model's :class:`~pyro_ebm.energy.PureDensity` (``None`` for a plain potential). Raises
    :class:`~pyro_ebm.energy.NotTraced` for a model on the Pyro path."""
    if isinstance(potential, LatentPotential):
        view, args, kwargs = potential.view, potential.args, potential.kwargs
        values = potential.unpack(position)
        pure = view.pure(*args, values=values, num_chains=position.shape[0], **kwargs)

        def latent(params, z):
            values, log_det = potential.unpack(z, with_log_det=True)
            lp = pure(params, *args, values=values, **kwargs)
            return -lp if isinstance(log_det, float) else -(lp + log_det)

        return latent, pure.parameters(), pure
    if isinstance(potential, DataPotential):
        view, args, kwargs, given = potential.view, potential.args, potential.kwargs, potential.values
        shape = potential.event_shape

        def as_items(x):
            return x if shape is None else x.reshape((x.shape[0],) + shape)

        potential(position)  # its checks of the model, once, eagerly
        pure = view.pure(as_items(position), *args, values=given, per_item=True, **kwargs)

        def data(params, x):
            return -pure(params, as_items(x), *args, values=given, **kwargs)

        return data, pure.parameters(), pure
    return (lambda params, x: potential(x)), [], None


#: a copy of the step's code per (kernel type, potential): torch.compile keeps its
#: compiled graphs and its recompile limit (8) per code object, so one shared
#: code would stop compiling, silently, after the eighth model or shape
_CODES = {}


def _own_code(fn, kernel, potential, pure):
    """``fn`` (a closure) with a code object of its own for this kernel type and
    potential (the traced graph of a model, or a plain potential's code)."""
    entry = getattr(pure, "_entry", None) if pure is not None else None
    target = id(entry) if entry is not None else getattr(potential, "__code__", type(potential))
    key = (type(kernel), target)
    code = _CODES.get(key)
    if code is None:
        if len(_CODES) >= 256:  # forgetting a copy costs a compile, never a wrong result
            _CODES.clear()
        code = _CODES[key] = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _potential_and_grad(potential, params, x):
    """:math:`(U(x), \\nabla_x U(x))` by ``torch.func.grad_and_value`` (per chain)."""
    def total(x):
        u = potential(params, x)
        return u.sum(), u

    grad, (_, u) = torch.func.grad_and_value(total, has_aux=True)(x)
    return u, grad


def compiled_step(kernel, state, options):
    """The step ``step(state) -> (state, info)`` of ``kernel`` on ``state``'s
    potential with its arithmetic compiled by ``torch.compile(**options)``, or
    ``kernel.step`` itself with one ``UserWarning`` when the step cannot be written
    as a pure function (a kernel without ``step_inputs`` / ``move``, a model whose
    log density runs on the Pyro path, a potential that ``torch.func`` refuses).
    A step that the compiler refuses runs the pure function eagerly, with one
    warning (:class:`~pyro_ebm.energy.compile.Compiled`)."""
    name = type(kernel).__name__
    if not all(callable(getattr(kernel, a, None)) for a in ("step_inputs", "move", "advance")):
        return _eager(kernel, f"{name} has no pure move(...) to compile")
    try:
        potential, params, pure = _pure_potential(state.potential_fn, state.position)
        # one eager evaluation: the potential must run under torch.func and agree
        u, grad = _potential_and_grad(potential, params, state.position)
    except NotTraced as err:
        return _eager(kernel, str(err))
    except Exception as err:  # noqa: BLE001 - whatever torch.func refuses, the eager kernel runs
        return _eager(kernel, f"the potential does not run under torch.func.grad_and_value: "
                              f"{type(err).__name__}: {_first_line(err)}")
    if not (_agrees(u, state.potential_energy) and _agrees(grad, state.grad)):
        return _eager(kernel, "the pure potential does not reproduce the potential and its gradient at "
                              "the initial positions")

    def pure_step(params, x, u, g, step_size, momentum, *inputs):
        return kernel.move(lambda z: _potential_and_grad(potential, params, z), x, u, g, step_size,
                           momentum, *inputs)

    pure_step = _own_code(pure_step, kernel, state.potential_fn, pure)
    compiled = Compiled(pure_step, options, f"the {name} step")

    def step(state):
        inputs = kernel.step_inputs(state)
        out = compiled(params, state.position, state.potential_energy, state.grad, state.step_size,
                       state.momentum, *inputs)
        return kernel.advance(state, out)

    return step


def _agrees(a, b):
    scale = 1 + float(b.abs().max())
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale))


def _eager(kernel, why):
    warnings.warn(f"mcmc.sample(compile=...): the {type(kernel).__name__} step runs eagerly: {why}",
                  UserWarning, stacklevel=4)
    return kernel.step


def _first_line(err):
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
