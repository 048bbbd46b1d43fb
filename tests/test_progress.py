# SPDX-License-Identifier: Apache-2.0
import io

import pytest

from pyro_ebm.progress import progress_bar, progress_enabled


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


@pytest.mark.parametrize("tty", [False, True])
def test_bars_follow_the_terminal_by_default(monkeypatch, tty):
    monkeypatch.delenv("PYRO_EBM_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr", _Stream(tty))
    assert progress_enabled() is tty
    items = [1, 2, 3]
    bar = progress_bar(items)
    assert (bar is items) is (not tty)


def test_environment_and_argument_override(monkeypatch):
    monkeypatch.setattr("sys.stderr", _Stream(True))
    monkeypatch.setenv("PYRO_EBM_PROGRESS", "0")
    assert not progress_enabled()
    assert progress_enabled(True)
    monkeypatch.setattr("sys.stderr", _Stream(False))
    monkeypatch.setenv("PYRO_EBM_PROGRESS", "1")
    assert progress_enabled()
    assert not progress_enabled(False)
