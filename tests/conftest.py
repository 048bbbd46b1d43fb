# SPDX-License-Identifier: Apache-2.0
"""Shared test setup: one thread (the ops are tiny; threads only contend on 2 cores),
a clean Pyro param store and a fixed seed for every test."""

import pyro
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
