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
steps consume the same random numbers. At a fixed step size (after warmup)
:meth:`CompiledSteps.run` compiles ``k`` such steps, unrolled, into one call:
the random numbers of all ``k`` are drawn first, step after step in the order
of ``k`` single steps, and the ``k`` positions and statistics come back stacked,
so one call's fixed cost (guards, wrappers, the driver's Python) is paid once
per ``k`` steps. The potential of a Pyro model comes from
:meth:`~pyro_ebm.energy.EnergyView.pure` (its traced log density); a plain
potential function is used as it is.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch

from ..energy import DataPotential, LatentPotential, NotTraced
from ..energy.compile import Compiled
from .kernels import KernelState

__all__ = ["CompiledSteps", "Steps", "compiled_step"]


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


def _code_key(kernel, potential, pure, steps=1):
    """What a compiled step's graphs are shared by (see
    :func:`~pyro_ebm.energy.compile._own_code`): the kernel type, the potential
    (the traced graph of a model, or a plain potential's code) and the number of
    steps per call, so that sampling the same potential again compiles nothing."""
    entry = getattr(pure, "_entry", None) if pure is not None else None
    target = id(entry) if entry is not None else getattr(potential, "__code__", type(potential))
    return (type(kernel), target, steps)


def _potential_and_grad(potential, params, x):
    """:math:`(U(x), \\nabla_x U(x))` by ``torch.func.grad_and_value`` (per chain)."""
    def total(x):
        u = potential(params, x)
        return u.sum(), u

    grad, (_, u) = torch.func.grad_and_value(total, has_aux=True)(x)
    return u, grad


def compiled_step(kernel, state, options):
    """The step ``step(state) -> (state, info)`` of ``kernel`` on ``state``'s
    potential with its arithmetic compiled by ``torch.compile(**options)`` (a
    :class:`CompiledSteps`, which also runs ``k`` steps per call), or
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

    one = Compiled(pure_step, options, f"the {name} step",
                   code_key=_code_key(kernel, state.potential_fn, pure))
    return CompiledSteps(kernel, potential, params, one, state.potential_fn, pure, options)


class Steps(NamedTuple):
    """What ``k`` steps of C chains report, each stacked over the steps in dim 0:
    positions ``(k, C, *event)``, and ``(k, C)`` for the rest (``energy`` is
    ``None`` for a kernel without a momentum)."""

    position: torch.Tensor
    potential_energy: torch.Tensor
    accept_prob: torch.Tensor
    is_accepted: torch.Tensor
    diverging: torch.Tensor
    energy: Optional[torch.Tensor]


class CompiledSteps:
    """A kernel's compiled step, ``step(state) -> (state, info)``, and
    :meth:`run`, ``k`` steps in one compiled call at a fixed step size.

    One call of a compiled function costs its guards and wrappers (about
    250 µs on CPU) whatever it computes, which at a few chains is many times the
    step's arithmetic; ``k`` steps per call pay that once."""

    def __init__(self, kernel, potential, params, one, potential_fn, pure, options):
        self.kernel, self._potential, self._params, self._one = kernel, potential, params, one
        self._potential_fn, self._pure, self._options = potential_fn, pure, options
        self._many = {}  # k -> Compiled k-step function

    def __call__(self, state):
        inputs = self.kernel.step_inputs(state)
        out = self._one(self._params, state.position, state.potential_energy, state.grad, state.step_size,
                        state.momentum, *inputs)
        return self.kernel.advance(state, out)

    def run(self, state, k):
        """``(state, steps)``: ``k`` steps from ``state`` at its step size, in one
        compiled call, and what they report (:class:`Steps`). The random numbers of
        the ``k`` steps are drawn first, step by step in the order of ``k`` calls of
        :meth:`__call__`, so the draws are theirs (to rounding)."""
        kernel, inputs, fields = self.kernel, [], state[:-1]
        for j in range(k):  # the state of step j: only its step counter differs (built positionally: fast)
            inputs.append(kernel.step_inputs(KernelState(*fields, state.iteration + j)))
        stacked = [torch.stack(column) for column in zip(*inputs, strict=True)]
        many = self._many.get(k)
        if many is None:
            many = self._many[k] = Compiled(self._pure_steps(k), _many_options(self._options, state),
                                            f"the {type(kernel).__name__} step",
                                            code_key=_code_key(kernel, self._potential_fn, self._pure, k))
        many.fell_back = many.fell_back or self._one.fell_back  # one warning, not one per function
        x, u, g, momentum, *reports = many(self._params, state.position, state.potential_energy, state.grad,
                                           state.step_size, state.momentum, *stacked)
        self._one.fell_back = self._one.fell_back or many.fell_back
        state = state._replace(position=x, potential_energy=u, grad=g, momentum=momentum,
                               iteration=state.iteration + k)
        return state, Steps(*reports)

    def _pure_steps(self, k):
        """The pure function of ``k`` steps: :meth:`~pyro_ebm.mcmc.kernels._Kernel.move`
        ``k`` times (unrolled), the ``j``-th on the ``j``-th of the stacked inputs;
        returns the last ``(x, U, ∇U, momentum)`` and the stacked reports."""
        kernel, potential = self.kernel, self._potential

        def pure_steps(params, x, u, g, step_size, momentum, *stacked):
            reports = []
            for j in range(k):
                x, u, g, momentum, accept_prob, accepted, diverging, energy = kernel.move(
                    lambda z: _potential_and_grad(potential, params, z), x, u, g, step_size, momentum,
                    *(t[j] for t in stacked))
                reports.append(Steps(x, u, accept_prob, accepted, diverging, energy))
            columns = ([getattr(r, name) for r in reports] for name in Steps._fields)
            return (x, u, g, momentum, *(None if c[0] is None else torch.stack(c) for c in columns))

        return pure_steps


def _many_options(options, state):
    """The ``torch.compile`` options of the ``k``-step function: on a CPU, unless
    ``options`` names a backend, mode or inductor options, inductor's C++ wrapper
    (``cpp_wrapper``), which calls the generated kernels from C++ rather than
    from Python: the unrolled steps' buffers and views otherwise cost Python at
    each step (measured: 0.13 -> 0.05 ms per MALA step at one chain)."""
    if state.position.device.type == "cpu" and not {"backend", "mode", "options"} & set(options):
        return dict(options, options={"cpp_wrapper": True})
    return options


def _agrees(a, b):
    scale = 1 + float(b.abs().max())
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale))


def _eager(kernel, why):
    warnings.warn(f"mcmc.sample(compile=...): the {type(kernel).__name__} step runs eagerly: {why}",
                  UserWarning, stacklevel=4)
    return kernel.step


def _first_line(err):
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
