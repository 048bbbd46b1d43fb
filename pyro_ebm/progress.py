# SPDX-License-Identifier: Apache-2.0
"""One progress bar for the whole package.

Bars are for people at a terminal: by default a bar is shown only when standard
error is a terminal, so logs of batch jobs and CI are not flooded with redraws.
``PYRO_EBM_PROGRESS=0`` switches every bar off, ``=1`` forces them on; a
function's own ``progress=`` argument wins over both.
"""

from __future__ import annotations

import os
import sys

__all__ = ["progress_bar", "progress_enabled"]


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to draw a bar: ``progress`` when given, else ``PYRO_EBM_PROGRESS``
    when set, else whether standard error is a terminal."""
    if progress is not None:
        return bool(progress)
    env = os.environ.get("PYRO_EBM_PROGRESS", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress_bar(iterable=None, total=None, desc=None, progress: bool | None = None, leave=False):
    """A ``tqdm`` bar over ``iterable`` (or with ``total`` steps), or ``None`` /
    the bare iterable when bars are off (see :func:`progress_enabled`)."""
    if not progress_enabled(progress):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave)
