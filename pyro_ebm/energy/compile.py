# SPDX-License-Identifier: Apache-2.0
"""``compile=`` of trainers and samplers: a pure step compiled with
``torch.compile``, falling back to the eager step with one warning.

A step is compiled only when it is written as a pure function of tensors (the
model's log density through :meth:`~pyro_ebm.energy.EnergyView.pure`, its
derivatives through ``torch.func``), since a compiled graph supports no double
backward and no Pyro message. :class:`Compiled` wraps such a function:

- ``compile=True`` compiles with ``torch.compile``'s defaults on CPU and with
  ``mode="reduce-overhead"`` (CUDA graphs) when an argument lives on a CUDA
  device; a dict is passed to ``torch.compile`` as its keyword arguments
  (e.g. ``{"backend": "aot_eager"}``, ``{"mode": "max-autotune"}``);
- the first call compiles; when compiling or running the compiled function
  raises, one ``UserWarning`` says what could not be compiled and why, and the
  eager function runs from then on. New shapes recompile (``torch.compile``'s
  own guards).
"""

from __future__ import annotations

import functools
import types
import warnings

import torch

__all__ = ["Compiled", "compile_options"]


def compile_options(compile) -> dict | None:
    """``None`` for ``compile=False``, else the keyword arguments of ``torch.compile``
    (``{}`` for ``True``). Raises a ``TypeError`` for anything else."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if isinstance(compile, dict):
        allowed = {"backend", "mode", "fullgraph", "dynamic", "options"}
        unknown = sorted(set(compile) - allowed)
        if unknown:
            raise TypeError(f"compile options {unknown} are not torch.compile arguments; use "
                            f"{sorted(allowed)}")
        return dict(compile)
    raise TypeError(f"compile must be True, False or a dict of torch.compile arguments, got {compile!r}")


def _on_cuda(args):
    stack = list(args)
    while stack:
        x = stack.pop()
        if torch.is_tensor(x):
            if x.device.type == "cuda":
                return True
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
    return False


#: code objects shared by the callers that pass the same ``code_key`` (see :func:`_own_code`)
_CODES = {}


def _own_code(fn, key=None):
    """``fn`` with a code object of its own. ``torch.compile`` keeps its compiled
    graphs per code object, at most ``torch._dynamo.config.recompile_limit`` (8)
    of them, and the steps of all trainers and samplers are closures of a few
    functions, each guarded on what it closes over: without a code object each,
    the ninth trainer of a process (say, the third seed of three methods) would
    silently run its step uncompiled.

    ``key=None`` gives a fresh code object (a trainer's step: compiled once, for
    that trainer); a key gives the code object of that key, so that callers that
    compute the same thing (a sampler's step on the same potential, called again)
    find the graphs compiled before instead of compiling anew."""
    if not isinstance(fn, types.FunctionType):
        return fn
    if key is None:
        code = fn.__code__.replace()
    else:
        key = (fn.__code__, key)
        code = _CODES.get(key)
        if code is None:
            if len(_CODES) >= 256:  # forgetting a copy costs a compile, never a wrong result
                _CODES.clear()
            code = _CODES[key] = fn.__code__.replace()
    own = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__ = fn.__kwdefaults__
    return functools.update_wrapper(own, fn, updated=())


def _clone(out):
    if torch.is_tensor(out):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_clone(x) for x in out)
    if isinstance(out, dict):
        return {k: _clone(v) for k, v in out.items()}
    return out


class Compiled:
    """``fn`` compiled at its first call with ``torch.compile(**options)``, or ``fn``
    itself after a failure (one warning) or with ``options=None``.

    :param callable fn: a pure function of tensors.
    :param dict options: :func:`compile_options`'s result.
    :param str what: what ``fn`` computes, for the warning (e.g. ``"the DSM step"``).
    :param code_key: ``None`` (default) compiles ``fn`` under a code object of its
        own; a hashable key shares the compiled graphs with every ``Compiled`` of
        the same function and key (see :func:`_own_code`).

    :ivar bool fell_back: whether compiling failed and ``fn`` runs eagerly.
    """

    def __init__(self, fn, options, what, code_key=None):
        self.fn, self.options, self.what, self.code_key = fn, options, what, code_key
        self._compiled = None
        self._graphs = False
        self.fell_back = options is None

    def __call__(self, *args):
        if self.fell_back:
            return self.fn(*args)
        try:
            if self._compiled is None:
                options = dict(self.options)
                if "mode" not in options and "backend" not in options and _on_cuda(args):
                    options["mode"] = "reduce-overhead"  # CUDA graphs: one launch per step
                self._graphs = options.get("mode") == "reduce-overhead"
                self._compiled = torch.compile(_own_code(self.fn, self.code_key), **options)
            if self._graphs:
                torch.compiler.cudagraph_mark_step_begin()
                return _clone(self._compiled(*args))  # a graph's outputs are overwritten by its next run
            return self._compiled(*args)
        except Exception as err:  # noqa: BLE001 - whatever the compiler refuses, the eager step runs
            self.fell_back = True
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(f"{self.what} could not be compiled and runs eagerly: "
                          f"{type(err).__name__}: {first}", UserWarning, stacklevel=3)
            return self.fn(*args)
