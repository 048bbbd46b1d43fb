# SPDX-License-Identifier: Apache-2.0
"""A training loop for long runs: batches, a progress bar, metrics, checkpoints,
resume, and interrupts that lose nothing.

:func:`fit` steps any :class:`~pyro_ebm.infer.Trainer` on mini-batches of a data
set for ``num_steps`` steps. Step :math:`s` (0-based) of the loop takes batch

.. math::

    e = \\lfloor s / B \\rfloor, \\qquad
    \\text{rows} = \\pi_e[(s - eB)\\,b : (s - eB + 1)\\,b], \\qquad B = \\lfloor N / b \\rfloor,

with :math:`\\pi_e` = ``torch.randperm(N, generator=Generator().manual_seed(seed + e))``
(:math:`N` items, batch size :math:`b`; the :math:`N - Bb` items left over in an
epoch are skipped so that every batch has the same shape). The batch depends on
the step alone, so a resumed run sees the batches the uninterrupted run saw,
and, since a checkpoint holds the trainer's :meth:`~pyro_ebm.infer.Trainer.state_dict`
(random states included), it takes the same steps bit for bit on CPU.

Under an initialized ``torch.distributed`` process group of :math:`W > 1`
processes (e.g. started by ``torchrun``), every rank computes the same
:math:`\\pi_e` and takes its slice of each global batch: rank :math:`r` steps on
rows :math:`[r b/W, (r+1) b/W)` of it (``DistributedSampler`` semantics; :math:`b`
must divide by :math:`W`), so the ranks together see the batches one process
sees, and the trainers average the gradients (:mod:`pyro_ebm.infer.distributed`).
Rank 0 alone writes the checkpoints, the CSV and TensorBoard logs and shows
the bar; the logged losses are the means over the ranks. A checkpoint records
:math:`W` and every rank's random states, so a run resumes with the same
:math:`W` (another is refused) and each rank continues its own random stream.

Checkpoints are files ``step-00001000.pt`` in the folder ``checkpoint``, each
written to a temporary file in the same folder, flushed to disk and renamed
over its name, so a crash never leaves a half-written ``step-*.pt``; the newest
``keep`` are kept. :func:`load_checkpoint` reads one.
"""

from __future__ import annotations

import csv
import io
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..energy import DivergenceError
from ..longrun import TMP_PREFIX, DeferredInterrupt, atomic_write
from ..progress import progress_bar
from .distributed import rank, world_size
from .trainer import Trainer, random_state, set_random_state

__all__ = ["CHECKPOINT_FORMAT", "FitResult", "fit", "load_checkpoint"]

#: the ``"format"`` entry of a checkpoint file
CHECKPOINT_FORMAT = "pyro_ebm.checkpoint/1"
_NAME = re.compile(r"step-(\d+)\.pt")
#: weight of the newest loss in the bar's moving averages
_EMA = 0.1


@dataclass
class FitResult:
    """What :func:`fit` did.

    :ivar int num_steps: the loop's steps taken in all (those of a resumed
        checkpoint included).
    :ivar bool interrupted: whether SIGINT / Ctrl-C stopped the loop early.
    :ivar checkpoint: the newest checkpoint file (a ``Path``), or ``None``
        without a ``checkpoint`` folder.
    :ivar dict losses: ``{name: [float, ...]}``, every loss of
        ``trainer.last_losses`` for each step this call took.
    """

    num_steps: int
    interrupted: bool = False
    checkpoint: Path | None = None
    losses: dict = field(default_factory=dict)


# -- checkpoint files ------------------------------------------------------------------


def load_checkpoint(path, map_location=None) -> dict:
    """Read the checkpoint file ``path`` written by :func:`fit`.

    :returns: ``{"format": CHECKPOINT_FORMAT, "trainer": trainer.state_dict(),
        "fit": {...}}``; ``trainer.load_state_dict(ckpt["trainer"])`` continues
        the trainer. A checkpoint is a pickle (it holds Python and numpy random
        states): load only files you trust.
    :param map_location: as in ``torch.load``.
    :raises ValueError: naming the file, when it is truncated, unreadable or not
        a pyro_ebm checkpoint.
    :raises FileNotFoundError: when there is no such file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint file {path}")
    try:
        found = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # a truncated zip, a text file, ...: torch raises many kinds
        raise ValueError(f"checkpoint file {path} cannot be read (truncated or not written by torch.save): "
                         f"{type(err).__name__}: {err}") from err
    if not isinstance(found, dict) or found.get("format") != CHECKPOINT_FORMAT:
        what = found.get("format") if isinstance(found, dict) else type(found).__name__
        raise ValueError(f"{path} is not a pyro_ebm checkpoint (format {CHECKPOINT_FORMAT!r} expected, "
                         f"got {what!r})")
    if not isinstance(found.get("trainer"), dict) or not isinstance(found.get("fit"), dict):
        raise ValueError(f"checkpoint file {path} lacks its 'trainer' or 'fit' entry")
    return found


def _checkpoints(folder):
    """``[(step, path)]`` of the checkpoint files in ``folder``, newest first."""
    found = []
    for path in folder.iterdir():
        m = _NAME.fullmatch(path.name)
        if m and path.is_file():
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


# -- the batches -----------------------------------------------------------------------


class _Batches:
    """Step -> batch by arithmetic (see the module docstring): this rank's
    ``1 / shards`` of it."""

    def __init__(self, tensors, batch_size, seed, shard=0, shards=1):
        self.tensors, self.batch_size, self.seed = tensors, batch_size, seed
        self.shard, self.shards = shard, shards
        self.n = len(tensors[0])
        self.per_epoch = self.n // batch_size if batch_size is not None else 1
        self._epoch, self._perm = None, None

    def __call__(self, step):
        if self.batch_size is None:
            if self.shards == 1:
                return self.tensors
            size = self.n // self.shards
            return tuple(t[self.shard * size:(self.shard + 1) * size] for t in self.tensors)
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        rows = self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]
        if self.shards > 1:
            size = self.batch_size // self.shards
            rows = rows[self.shard * size:(self.shard + 1) * size]
        return tuple(t[rows.to(t.device)] for t in self.tensors)


# -- logs ---------------------------------------------------------------------------------


class _Csv:
    """Metrics as CSV (``step, seconds, <loss names>``), one line per step, flushed
    line by line; on resume the lines after the resumed step are dropped first."""

    def __init__(self, path, start):
        self.path, self.file, self.writer, self.names = Path(path), None, None, None
        if start > 0 and self.path.exists():
            with open(self.path, newline="") as f:
                rows = list(csv.reader(f))
            if rows and rows[0][:2] == ["step", "seconds"]:
                self.names = rows[0][2:]
                kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= start]
                _write_rows(self.path, kept)
                self._open("a")

    def _open(self, mode):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, mode, newline="", buffering=1)
        self.writer = csv.writer(self.file)

    def write(self, step, seconds, losses):
        if self.writer is None:
            self.names = list(losses)
            self._open("w")
            self.writer.writerow(["step", "seconds", *self.names])
        self.writer.writerow([step, f"{seconds:.3f}",
                              *(repr(float(losses[k])) if k in losses else "" for k in self.names)])

    def close(self):
        if self.file is not None:
            self.file.close()


def _write_rows(path, rows):
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def _tensorboard(log_dir, start):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(f"fit(tensorboard={str(log_dir)!r}) needs the tensorboard package "
                          "(pip install tensorboard); leave tensorboard=None to log to CSV only") from err
    # purge_step drops events a crashed run logged after the resumed step
    return SummaryWriter(log_dir=str(log_dir), purge_step=start + 1 if start > 0 else None)


# -- SIGINT ----------------------------------------------------------------------------------


# -- the loop ----------------------------------------------------------------------------------


def _check_int(name, value, least):
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def _check_data(data):
    tensors = tuple(data) if isinstance(data, (tuple, list)) else (data,)
    if not tensors:
        raise ValueError("data must be a tensor or a tuple of tensors, got an empty tuple")
    for i, t in enumerate(tensors):
        if not torch.is_tensor(t):
            where = f"data[{i}]" if isinstance(data, (tuple, list)) else "data"
            raise TypeError(f"{where} must be a tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"data tensors need a first (item) dimension, got a 0-d tensor at data[{i}]")
    lengths = [len(t) for t in tensors]
    if len(set(lengths)) != 1:
        raise ValueError(f"the tensors of data must share their first dim, got lengths {lengths}")
    if lengths[0] == 0:
        raise ValueError("data holds no items (first dim 0)")
    return tensors


def _resume(folder, trainer, expected):
    """Load the newest checkpoint of ``folder`` that reads into ``trainer``;
    ``(fit state, path)`` or ``(None, None)``. Files that cannot be read are
    skipped with a warning naming them."""
    for _, path in _checkpoints(folder):
        try:
            found = load_checkpoint(path)
        except ValueError as err:
            warnings.warn(f"fit(resume=True): skipping {path}: {err}", UserWarning, stacklevel=3)
            continue
        state = found["fit"]
        for key, value in expected.items():
            if state.get(key, 1 if key == "world_size" else None) != value:  # older files: one process
                raise ValueError(f"fit(resume=True): the checkpoint {path} was written with "
                                 f"{key}={state.get(key)!r}, this call has {key}={value!r}; resume with the "
                                 "same data and arguments (or load the trainer alone with "
                                 "trainer.load_state_dict(load_checkpoint(path)['trainer']))")
        try:
            trainer.load_state_dict(found["trainer"])
        except ValueError as err:
            raise ValueError(f"fit(resume=True): the checkpoint {path} does not fit this trainer: "
                             f"{err}") from err
        mine = state.get("rng_by_rank")
        if mine is not None:  # each rank continues its own random stream
            set_random_state(mine[rank()])
        return state, path
    return None, None


def _across_ranks(losses, requested, shards):
    """``(losses averaged over the ranks, whether any rank was interrupted)`` by
    one ``all_reduce``."""
    values = torch.tensor([float(requested), *losses.values()], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        values = values.cuda()
    torch.distributed.all_reduce(values)
    values = values.tolist()
    return dict(zip(losses, (v / shards for v in values[1:]), strict=True)), values[0] > 0


def fit(trainer, data, num_steps, batch_size=None, *, seed=0, checkpoint=None, checkpoint_every=1000,
        keep=3, resume=False, progress=None, log=None, tensorboard=None) -> FitResult:
    """Train ``trainer`` for ``num_steps`` steps on mini-batches of ``data``, with a
    progress bar, metrics, periodic checkpoints, resume and a clean Ctrl-C.

    Each step calls ``trainer.step(*batch)`` with the rows of one batch of every
    tensor of ``data`` (see the module docstring for which rows). The bar shows
    steps/s and an exponential moving average (weight 0.1 on the newest) of each
    loss in ``trainer.last_losses``. Metrics go to the CSV file ``log`` (columns
    ``step, seconds`` and the first step's loss names, one line per step) and to
    TensorBoard (scalars ``loss/<name>``) when ``tensorboard`` is a folder.

    Checkpoints ``{"format": CHECKPOINT_FORMAT, "trainer": trainer.state_dict(),
    "fit": {...}}`` are written every ``checkpoint_every`` steps and at the end,
    atomically; the newest ``keep`` files are kept.

    - ``resume=True`` continues from the newest checkpoint that loads (a
      truncated or foreign newer file is skipped with a warning that names it);
      with none, the run starts fresh. Resuming with other ``data`` size,
      ``batch_size`` or ``seed`` is refused.
    - SIGINT / Ctrl-C (in the main thread) finishes the current step, writes a
      checkpoint and returns with ``interrupted=True``; a second Ctrl-C raises
      ``KeyboardInterrupt`` at once. The previous handler is restored.
    - Under a ``torch.distributed`` process group each rank steps on its slice
      of every batch (see the module docstring); ``batch_size`` (or, with
      ``batch_size=None``, the number of items) must divide by the world size,
      rank 0 alone writes and shows the bar, and resuming needs the world size
      the checkpoint was written with.
    - A :class:`~pyro_ebm.infer.DivergenceError` stops the loop and is re-raised
      (it names the step); nothing is written after it, so the last checkpoint
      is byte for byte the last good state.

    :param Trainer trainer: any trainer of :mod:`pyro_ebm.infer`.
    :param data: a tensor ``(N, ...)`` or a tuple of tensors sharing the first
        dim (e.g. ``(images, labels)``).
    :param int num_steps: the loop's total number of steps (a resumed run
        continues to it).
    :param batch_size: rows per step, ``1 <= batch_size <= N``; ``None`` passes
        the whole data every step.
    :param int seed: seed of the batch order.
    :param checkpoint: a folder (created if missing), or ``None`` for no checkpoints.
    :param int checkpoint_every: steps between checkpoints.
    :param int keep: how many checkpoint files to keep (newest first).
    :param bool resume: continue from the newest checkpoint in ``checkpoint``.
    :param progress: show the bar (``None``: see :func:`pyro_ebm.progress.progress_enabled`).
    :param log: the CSV file; default ``checkpoint/metrics.csv`` when
        ``checkpoint`` is given, else no CSV.
    :param tensorboard: a TensorBoard log folder (needs the ``tensorboard`` package).
    :returns: a :class:`FitResult`.

    >>> result = fit(trainer, datasets.toy("moons", 5000), 20000, batch_size=128,
    ...              checkpoint="runs/moons", checkpoint_every=1000, resume=True)  # doctest: +SKIP
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"trainer must be a pyro_ebm.infer trainer (a Trainer, e.g. ScoreMatching or BiSM), "
                        f"got {type(trainer).__name__}")
    tensors = _check_data(data)
    _check_int("num_steps", num_steps, 1)
    n = len(tensors[0])
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} exceeds the {n} items of data")
    _check_int("seed", seed, 0)
    shards, shard = world_size(), rank()
    if shards > 1:
        total, what = (batch_size, "batch_size") if batch_size is not None else (n, "the number of items")
        if total % shards:
            raise ValueError(f"fit under a process group of {shards} processes splits each batch evenly, but "
                             f"{what} = {total} does not divide by the world size {shards}")
    _check_int("checkpoint_every", checkpoint_every, 1)
    _check_int("keep", keep, 1)
    folder = Path(checkpoint) if checkpoint is not None else None
    if resume and folder is None:
        raise ValueError("resume=True needs the checkpoint folder to resume from (checkpoint=...)")
    if log is None and folder is not None:
        log = folder / "metrics.csv"

    expected = {"num_items": n, "batch_size": batch_size, "seed": seed, "world_size": shards}
    writes = shard == 0
    start, seconds0, latest = 0, 0.0, None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{TMP_PREFIX}step-*") if writes else ():  # left by a killed writer
            stale.unlink(missing_ok=True)
        if resume:
            state, latest = _resume(folder, trainer, expected)
            if state is not None:
                start, seconds0 = int(state["step"]), float(state.get("seconds", 0.0))
        elif _checkpoints(folder):
            names = ", ".join(p.name for _, p in _checkpoints(folder)[:3])
            raise ValueError(f"checkpoint folder {folder} already holds checkpoints ({names}); pass "
                             "resume=True to continue that run, or give an empty folder")
    if start >= num_steps:
        return FitResult(num_steps=start, interrupted=False, checkpoint=latest, losses={})

    batches = _Batches(tensors, batch_size, seed, shard, shards)
    writer = _tensorboard(tensorboard, start) if tensorboard is not None and writes else None
    metrics = _Csv(log, start) if log is not None and writes else None
    bar = progress_bar(total=num_steps, desc=trainer.algorithm, progress=progress if writes else False)
    if bar is not None:
        bar.unit = "step"
        bar.n = bar.last_print_n = bar.initial = start  # rates count this run's steps only
        bar.refresh()
    history, ema = {}, {}
    step, written = start, start if latest is not None else None
    t0 = time.perf_counter()

    def save():
        nonlocal latest, written
        path = folder / f"step-{step:08d}.pt"
        state = {"step": step, "num_steps": num_steps, "seconds": seconds0 + time.perf_counter() - t0,
                 **expected}
        if shards > 1:  # every rank's random states (a collective: all ranks call save)
            gathered = [None] * shards
            torch.distributed.all_gather_object(gathered, random_state())
            state["rng_by_rank"] = gathered
        latest, written = path, step
        if not writes:
            return
        ckpt = {"format": CHECKPOINT_FORMAT, "trainer": trainer.state_dict(), "fit": state}
        atomic_write(path, lambda f: torch.save(ckpt, f))
        # newer files are ones a resume skipped (unreadable): never let them crowd out good ones
        for _, old in [c for c in _checkpoints(folder) if c[0] <= step][keep:]:
            old.unlink(missing_ok=True)

    interrupted = False
    try:
        with DeferredInterrupt("fit: interrupted; finishing this step and writing a checkpoint (Ctrl-C "
                               "again to stop at once)") as interrupts:
            while step < num_steps:
                try:
                    trainer.step(*batches(step))
                except DivergenceError as err:
                    where = f"; the last good checkpoint is {latest}" if latest is not None else ""
                    if hasattr(err, "add_note"):  # Python >= 3.11
                        err.add_note(f"fit stopped at its step {step + 1} of {num_steps}{where}")
                    raise
                step += 1
                losses = {k: float(v) for k, v in trainer.last_losses.items()}
                if shards > 1:  # one collective: the ranks' mean losses, and whether any was interrupted
                    losses, stop = _across_ranks(losses, interrupts.requested, shards)
                    interrupts.requested = interrupts.requested or stop
                for k, v in losses.items():
                    history.setdefault(k, []).append(v)
                    ema[k] = v if k not in ema else (1 - _EMA) * ema[k] + _EMA * v
                elapsed = seconds0 + time.perf_counter() - t0
                if metrics is not None:
                    metrics.write(step, elapsed, losses)
                if writer is not None:
                    for k, v in losses.items():
                        writer.add_scalar(f"loss/{k}", v, step)
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in ema.items()}, refresh=False)
                    bar.update(1)
                if interrupts.requested:
                    interrupted = True
                    break
                if folder is not None and step % checkpoint_every == 0:
                    save()
            if folder is not None and written != step:
                save()
        if shards > 1:  # rank 0's last checkpoint is on disk before any rank returns
            torch.distributed.barrier()
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        if writer is not None:
            writer.close()
    return FitResult(num_steps=step, interrupted=interrupted, checkpoint=latest, losses=history)
