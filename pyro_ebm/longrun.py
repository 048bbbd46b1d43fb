# SPDX-License-Identifier: Apache-2.0
"""How long runs meet the operating system: files written so that a crash never
leaves half of one, and Ctrl-C deferred to the end of a step.

A leaf module (it imports nothing of pyro_ebm), shared by the training loop
(:func:`pyro_ebm.infer.fit`), the samplers (:func:`pyro_ebm.mcmc.sample`) and the
reproductions' run store.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

__all__ = ["TMP_PREFIX", "DeferredInterrupt", "atomic_write"]

#: the name of a file being written starts with this (then its own name and the process id)
TMP_PREFIX = ".tmp-"


def _fsync_folder(folder):
    try:  # makes the rename itself durable; not every platform opens folders
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write) -> None:
    """``write(file)`` into a temporary file in ``path``'s folder (opened in binary
    mode), flushed and fsynced, then renamed over ``path`` (atomic on POSIX and
    Windows): a reader sees the old file or the whole new one, and a crash leaves
    no half-written ``path``. The one way pyro_ebm writes checkpoints, logs it
    rewrites and run records."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


class DeferredInterrupt:
    """While active (main thread only): the first SIGINT (Ctrl-C) sets
    :attr:`requested` and prints ``message``, for the loop to stop after its
    current step; the second raises ``KeyboardInterrupt`` at once; the previous
    handler comes back on exit.

    A process that ignores SIGINT (``SIG_IGN``: e.g. a job a non-interactive
    shell started in the background, so that Ctrl-C at the terminal spares it)
    keeps ignoring it, as Python itself does; stop such a run with SIGTERM, or
    restore the handler first (``signal.signal(signal.SIGINT,
    signal.default_int_handler)``) to have Ctrl-C checkpoint it.

    :param str message: what the first Ctrl-C prints (``None``: nothing).
    """

    def __init__(self, message=None):
        self.requested, self.previous, self.message = False, None, message

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.message:
            print(f"\n{self.message}", file=sys.stderr, flush=True)

    def __enter__(self):
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN):
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False
