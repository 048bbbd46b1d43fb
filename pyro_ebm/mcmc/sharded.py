# SPDX-License-Identifier: Apache-2.0
"""Chain-sharded sampling for :func:`~pyro_ebm.mcmc.sample` under an initialized
``torch.distributed`` process group: each of the W ranks runs C / W of the C chains
(one device each) and rank 0 gathers the draws.

**Same draws as one process.** Every random number a chain uses is drawn at the
size of the whole run, ``(C, ...)``, on every rank from the same generator state,
and each rank keeps its slice of rows ``[r C / W, (r + 1) C / W)``:

- the initial positions (drawn from the model, ``"uniform"``, or given by the
  user) are made for all C chains and sliced;
- a momentum drawn at ``init`` (:class:`~pyro_ebm.mcmc.UnderdampedLangevin`) is
  drawn as ``(C, *event)`` and sliced;
- each step's random numbers come from the kernel's own
  :meth:`~pyro_ebm.mcmc.kernels._Kernel.step_inputs`, called on a state of C
  chains (only the shapes are read), and every input with C rows is sliced.

So with the same seed on every rank (``torch.manual_seed`` before ``sample``) the
draws of chain c are those of chain c of one process running all C chains:
rank r's chain i consumes the very numbers that row ``r C / W + i`` of the
unsharded run consumes, and the arithmetic of a chain never looks at another
chain (step-size adaptation is per chain). The cost is that each rank draws the
random numbers of all C chains, which is cheap next to the potential's gradient
(C / W chains per rank) unless the event is huge.
"""

from __future__ import annotations

import copy
import functools
from typing import NamedTuple

import torch
import torch.distributed as dist

from .kernels import KernelState

__all__ = ["ChainShard", "chain_shard"]


class ChainShard(NamedTuple):
    """The chains ``[start, stop)`` of ``num_chains`` that rank ``rank`` of
    ``world_size`` runs."""

    rank: int
    world_size: int
    num_chains: int

    @property
    def size(self) -> int:
        return self.num_chains // self.world_size

    @property
    def start(self) -> int:
        return self.rank * self.size

    @property
    def stop(self) -> int:
        return self.start + self.size

    def take(self, tensor):
        """The rank's rows of a tensor of ``num_chains`` rows."""
        return tensor[self.start:self.stop]

    def take_state(self, state: KernelState) -> KernelState:
        """A :class:`KernelState` of ``num_chains`` chains cut to the rank's chains;
        one that already holds the rank's ``size`` chains is returned as it is."""
        chains = state.position.shape[0]
        if chains == self.size:
            return state
        if chains != self.num_chains:
            raise ValueError(
                f"initial is a KernelState of {chains} chains; chain-sharded sampling of "
                f"num_chains={self.num_chains} on {self.world_size} ranks takes a state of all "
                f"{self.num_chains} chains or of this rank's {self.size}"
            )
        return state._replace(**{f: self.take(getattr(state, f)) for f in _CHAIN_FIELDS
                                 if getattr(state, f) is not None})

    def kernel(self, kernel):
        """A shallow copy of ``kernel`` that draws every random number at the size of
        all ``num_chains`` chains and keeps the rank's rows (see the module
        docstring); a per-chain ``step_size`` tensor is cut to the rank's chains."""
        if not callable(getattr(kernel, "step_inputs", None)) or not callable(getattr(kernel, "move", None)):
            raise TypeError(
                f"chain-sharded sampling needs a kernel that draws its random numbers in "
                f"step_inputs(state) and moves in move(...) (the built-in kernels do), got "
                f"{type(kernel).__name__}; pass shard_chains=False to run every chain on every rank"
            )
        local = copy.copy(kernel)
        step_size = getattr(kernel, "step_size", None)
        if torch.is_tensor(step_size) and step_size.dim() == 1:
            if step_size.shape[0] != self.num_chains:
                raise ValueError(f"a per-chain step_size must have shape ({self.num_chains},), got "
                                 f"{tuple(step_size.shape)}")
            local.step_size = self.take(step_size)
        draws_momentum = bool(getattr(kernel, "uses_momentum", False))
        # the instance's own init and step_inputs shadow the class's; _Kernel.step and
        # the compiled step both call self.step_inputs
        local.uses_momentum = False
        local.init = functools.partial(self._init, kernel, local, draws_momentum)
        local.step_inputs = functools.partial(self._step_inputs, kernel)
        return local

    def _init(self, kernel, local, draws_momentum, position, potential):
        state = type(kernel).init(local, position, potential)
        if draws_momentum:  # as _Kernel.init draws it, at the size of all chains
            full = position.new_empty((self.num_chains,) + tuple(position.shape[1:]))
            state = state._replace(momentum=self.take(torch.randn_like(full)))
        return state

    def _step_inputs(self, kernel, state):
        full = state._replace(
            position=state.position.new_empty((self.num_chains,) + tuple(state.position.shape[1:])),
            potential_energy=state.potential_energy.new_empty((self.num_chains,)),
        )
        return tuple(self.take(x) if torch.is_tensor(x) and x.dim() and x.shape[0] == self.num_chains else x
                     for x in kernel.step_inputs(full))

    def gather(self, samples):
        """Rank 0: the :class:`~pyro_ebm.mcmc.Samples` of all chains, in chain order
        (draws, statistics, warmup divergences and ``last_state``); every other
        rank: its own ``samples`` (its chains ``[start, stop)``). A collective: every
        rank calls it."""
        positions = self._gather(samples.positions)
        stats = {k: self._gather(samples.stats[k]) for k in sorted(samples.stats)}
        warm = self._gather(samples.warmup_divergences)
        last = samples.last_state
        fields = {f: self._gather(getattr(last, f)) for f in _CHAIN_FIELDS if getattr(last, f) is not None}
        if self.rank != 0:
            return samples
        return type(samples)(positions, stats, samples._unpack, warm, last._replace(**fields))

    def _gather(self, tensor):
        """``torch.distributed.gather`` of every rank's rows to rank 0 (concatenated in
        rank order there; ``None`` elsewhere). Bool goes as uint8, which every
        backend carries."""
        send = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
        send = send.contiguous()
        parts = [torch.empty_like(send) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(send, parts, dst=0)
        if self.rank != 0:
            return None
        return torch.cat(parts).to(tensor.dtype)


_CHAIN_FIELDS = ("position", "potential_energy", "grad", "step_size", "momentum")


def chain_shard(num_chains: int, shard_chains=None):
    """The rank's :class:`ChainShard` of ``num_chains`` chains when a process group
    is initialized with more than one rank (and ``shard_chains`` is not
    ``False``), else ``None``: every chain runs here.

    :param int num_chains: C, which must be a multiple of the world size.
    :param shard_chains: ``None`` (shard when a process group is initialized),
        ``True`` (shard, and it is an error if no process group is initialized) or
        ``False`` (never shard: every rank runs its own C chains).
    """
    if shard_chains is not None and not isinstance(shard_chains, bool):
        raise TypeError(f"shard_chains must be None, True or False, got {shard_chains!r}")
    if shard_chains is False:
        return None
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized:
        if shard_chains:
            raise ValueError("shard_chains=True needs an initialized torch.distributed process group "
                             "(torch.distributed.init_process_group(), e.g. under torchrun)")
        return None
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if world_size == 1:
        return None
    if num_chains % world_size:
        raise ValueError(
            f"num_chains={num_chains} must be a multiple of the process group's world size "
            f"{world_size} for chain-sharded sampling (each rank runs num_chains / world size chains); "
            f"pass shard_chains=False to run all chains on every rank"
        )
    return ChainShard(rank, world_size, num_chains)
