# SPDX-License-Identifier: Apache-2.0
"""The run store of ``pyro-ebm reproduce``: finished runs on disk, resumable.

An experiment is a set of *runs* (a method and a seed, say). Each run goes
through :meth:`RunStore.run`, which writes the run's numbers to
``OUT/runs/<key>.json`` (and the tensors its figures need to ``<key>.pt``) the
moment it ends, each file written atomically (a temporary file in the folder,
then ``os.replace``). With ``resume=True`` a run whose record exists, and was
made with the same configuration (``--quick`` or not, sizes), is loaded instead
of recomputed. Runs reseed themselves, so a skipped run does not change the
numbers of the next one, and the report is always built from the records: an
interrupted reproduction rerun with ``--resume`` writes the same report as an
uninterrupted one (apart from wall times).

Inside a run, :meth:`RunStore.train` is the training loop of a long training:
every ``every`` steps (and after the step during which Ctrl-C came) it writes
``<key>.<name>.ckpt.pt``: the trainer's ``state_dict()`` (parameters, optimizer
states, random states, step count), the state of the given modules, the loop's
position and the values its steps returned; the last checkpoint is taken before
the last step. A resumed run continues from there bit-identically (the
trainers' ``state_dict`` contract). The checkpoints of a run are deleted once its
record is written.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
import warnings
from pathlib import Path

from ..infer.trainer import random_state, set_random_state
from ..longrun import DeferredInterrupt, atomic_write

RUNS = "runs"
RECORD_FORMAT = "pyro_ebm.run/1"
CHECKPOINT_FORMAT = "pyro_ebm.run-checkpoint/1"
#: steps between two checkpoints of :meth:`RunStore.train` unless ``every`` is given
CHECKPOINT_EVERY = 200
#: a step of :meth:`RunStore.train` that returns this ends the training there (e.g. it diverged)
STOP = "pyro_ebm.experiments._runs.STOP"


def finished_runs(out_dir) -> int:
    """The number of run records in ``out_dir`` (any configuration)."""
    return len(list((Path(out_dir) / RUNS).glob("*.json")))


def _plain(value):
    """``value`` as it reads back from JSON (tuples become lists), so that a fresh
    run and a loaded one feed the report the same values."""
    return json.loads(json.dumps(value))


def mean_sd(values):
    """Mean and sample standard deviation of ``values`` (sd 0 for one value): the
    spread over seeds that every report gives."""
    values = list(values)
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(values, digits=2):
    """``"mean ± sd"`` of ``values`` (:func:`mean_sd`), for a report's table."""
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def at_milestones(step, milestones, evaluate, seed):
    """``step(i, batch)`` that also runs ``evaluate()`` after the step that completes
    each of ``milestones`` steps (counted from 1), on a random stream of its own
    (``seed + i``; the training's stream is left as it was). At a milestone the
    step's value becomes ``{"value": ..., "milestone": m, "evaluation": ...}``: the
    evaluations are step values of :meth:`RunStore.train`, so a resumed run keeps
    those made before the interruption. :func:`split_milestones` takes them apart."""
    import torch

    milestones = set(milestones)

    def run_step(i, batch):
        value = step(i, batch)
        if i + 1 not in milestones:
            return value
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            return {"value": value, "milestone": i + 1, "evaluation": evaluate()}

    return run_step


def split_milestones(values):
    """The steps' own values and ``{milestone: evaluation}`` from the values of a
    loop whose step :func:`at_milestones` made."""
    plain, evaluations = [], {}
    for x in values:
        if isinstance(x, dict) and "milestone" in x:
            evaluations[x["milestone"]] = x["evaluation"]
            x = x["value"]
        plain.append(x)
    return plain, evaluations


class OptimState:
    """``state_dict`` / ``load_state_dict`` for a loop that steps a ``pyro.optim``
    optimizer itself (``pyro.infer.SVI``, a hand-written loss): the optimizer's
    per-parameter states, the step count and the random states. The parameters
    are the modules' (given to :meth:`RunStore.train`), restored from their
    ``state_dict``; the optimizer states wait in the optimizer until their
    parameter is first stepped (``PyroOptim.set_state``)."""

    def __init__(self, optim):
        self.optim = optim
        self.num_steps = 0

    def state_dict(self):

        return {"optim": self.optim.get_state(), "num_steps": self.num_steps, "rng": random_state()}

    def load_state_dict(self, state):

        self.optim.set_state(state["optim"])
        self.num_steps = int(state["num_steps"])
        set_random_state(state["rng"])


class RunStore:
    """Records of the finished runs of one experiment in ``out_dir/runs``.

    :param out_dir: the experiment's output folder.
    :param bool resume: load the runs that have a record (with the same
        ``config``) and continue interrupted trainings from their checkpoints;
        otherwise every run is computed afresh and its files overwritten.
    :param dict config: what the numbers depend on besides the run's key (e.g.
        ``{"quick": True}``); a record or checkpoint made with another config is
        not loaded.

    >>> store = RunStore(out_dir, resume=True, config={"quick": False})
    >>> numbers, tensors = store.run(f"DSM seed {seed}", train_and_score, seed, store)
    """

    def __init__(self, out_dir, resume: bool = False, config: dict | None = None):
        self.folder = Path(out_dir) / RUNS
        self.folder.mkdir(parents=True, exist_ok=True)
        self.resume = bool(resume)
        self.config = _plain(config or {})
        self.loaded, self.computed = [], []
        self._current = None

    def _stem(self, key):
        slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", key).strip("_")[:80]
        return f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"

    def record_path(self, key: str) -> Path:
        return self.folder / f"{self._stem(key)}.json"

    def checkpoint_path(self, key: str, name: str) -> Path:
        return self.folder / f"{self._stem(key)}.{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.ckpt.pt"

    def _load(self, key):
        path = self.record_path(key)
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            warnings.warn(f"run record {path} does not read ({err}); the run '{key}' is computed again",
                          stacklevel=3)
            return None
        if record.get("format") != RECORD_FORMAT or record.get("key") != key \
                or record.get("config") != self.config:
            return None
        tensors = None
        if record.get("tensors"):
            import torch

            try:
                tensors = torch.load(path.with_suffix(".pt"), weights_only=False)
            except Exception as err:  # noqa: BLE001  (missing, truncated: the run is redone)
                warnings.warn(f"the tensors of run '{key}' ({path.with_suffix('.pt')}) do not load ({err}); "
                              "the run is computed again", stacklevel=3)
                return None
        return record["numbers"], tensors

    def run(self, key: str, compute, *args, **kwargs):
        """The numbers (a JSON-able dict) and tensors (a dict, or ``None``) of the
        run ``key``: loaded from its record when resuming and it exists, else
        ``compute(*args, **kwargs)`` (which returns ``numbers`` or
        ``(numbers, tensors)``), written to disk as soon as it returns."""
        if self.resume:
            found = self._load(key)
            if found is not None:
                self.loaded.append(key)
                return found
        self._current = key
        try:
            out = compute(*args, **kwargs)
        finally:
            self._current = None
        numbers, tensors = out if isinstance(out, tuple) else (out, None)
        numbers = _plain(numbers)
        path = self.record_path(key)
        if tensors is not None:
            import torch

            atomic_write(path.with_suffix(".pt"), lambda f: torch.save(tensors, f))
        record = {"format": RECORD_FORMAT, "key": key, "config": self.config, "numbers": numbers,
                  "tensors": tensors is not None}
        atomic_write(path, lambda f: f.write(json.dumps(record, indent=1).encode()))
        for stale in self.folder.glob(f"{self._stem(key)}.*.ckpt.pt"):
            stale.unlink()
        self.computed.append(key)
        return numbers, tensors

    def train(self, name, trainer, batches, iterations, step=None, modules=(), every=None, desc=None,
              time_from=0):
        """Run ``iterations`` training steps of the current run, checkpointed.

        :param str name: the training's name within the run (a run may train
            several models).
        :param trainer: has ``state_dict()`` / ``load_state_dict(state)``: a
            :class:`~pyro_ebm.infer.trainer.Trainer`, or an :class:`OptimState`.
        :param batches: an iterator of batches; step ``i`` gets its ``i``-th (on
            resume the first ones are drawn and dropped).
        :param int iterations: number of steps.
        :param step: ``step(i, batch) -> value``; default ``trainer.step(batch)``
            (a tuple batch is spread over the arguments). A step that returns
            :data:`STOP` ends the training (nothing more is saved).
        :param modules: modules whose ``state_dict`` is saved too (the
            parameters an :class:`OptimState` does not hold).
        :param int every: steps between checkpoints (default
            :data:`CHECKPOINT_EVERY`).
        :param int time_from: steps before this one are not timed.
        :returns: ``(values, seconds)``: every step's returned value, and the time
            spent in the timed steps (summed over interrupted sessions).
        """
        import torch

        from ..progress import progress_bar

        if self._current is None:
            raise RuntimeError("RunStore.train is called inside the compute function of RunStore.run")
        if step is None:
            def step(i, batch):
                return trainer.step(*batch) if isinstance(batch, tuple) else trainer.step(batch)
        every = CHECKPOINT_EVERY if every is None else int(every)
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        path = self.checkpoint_path(self._current, name)
        start, values, seconds = 0, [], 0.0
        if self.resume and path.exists():
            try:
                saved = torch.load(path, weights_only=False)
                if saved.get("format") != CHECKPOINT_FORMAT or saved.get("config") != self.config:
                    raise ValueError("made by another configuration")
            except Exception as err:  # noqa: BLE001
                warnings.warn(f"checkpoint {path} is not used ({err}); training '{name}' starts afresh",
                              stacklevel=2)
            else:
                for module, state in zip(modules, saved["modules"], strict=True):
                    module.load_state_dict(state)
                trainer.load_state_dict(saved["trainer"])
                start, values, seconds = saved["step"], saved["values"], saved["seconds"]

        def save(done):
            state = {"format": CHECKPOINT_FORMAT, "config": self.config, "step": done, "values": values,
                     "seconds": seconds, "trainer": trainer.state_dict(),
                     "modules": [m.state_dict() for m in modules]}
            atomic_write(path, lambda f: torch.save(state, f))

        batches = iter(batches)
        for _ in range(start):
            next(batches)
        saved_at = start if start else None
        with DeferredInterrupt() as interrupt:
            for i in progress_bar(range(start, iterations), desc=desc):
                if i == iterations - 1 and saved_at != i:
                    # a checkpoint always has a step left to run: resuming runs it, which
                    # rebuilds what a trainer sets up at its first step
                    save(i)
                batch = next(batches)
                tic = time.perf_counter()
                value = step(i, batch)
                if isinstance(value, str) and value == STOP:
                    break
                values.append(value)
                if isinstance(trainer, OptimState):
                    trainer.num_steps += 1
                if i >= time_from:
                    seconds += time.perf_counter() - tic
                if i + 1 < iterations and (interrupt.requested or (i + 1) % every == 0):
                    save(i + 1)
                    saved_at = i + 1
                if interrupt.requested:
                    raise KeyboardInterrupt
        return values, seconds
