# SPDX-License-Identifier: Apache-2.0
"""Shared test setup: one thread (the ops are tiny; threads only contend on 2 cores),
a clean Pyro param store and a fixed seed for every test, and an empty cache
folder for the whole session (also when pytest runs outside `make test`), so no
test leans on files an earlier run left in ~/.cache."""

import os
import shutil
import socket
import tempfile

import pyro
import pytest
import torch

torch.set_num_threads(1)

_CACHE = tempfile.mkdtemp(prefix="pyro_ebm_test_cache_")
os.environ["XDG_CACHE_HOME"] = _CACHE
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_CACHE, "matplotlib"))


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _python_sigint():
    """SIGINT handled by Python, as in a shell's foreground: a run started in the
    background of a non-interactive shell inherits SIGINT ignored, which the
    interrupt tests (and the processes they start) would inherit too."""
    import signal

    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def free_port():
    """A function returning a free TCP port on 127.0.0.1 (for a gloo process group
    spawned by a test; no other address is ever a target)."""

    def find():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return find
