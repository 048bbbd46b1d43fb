# SPDX-License-Identifier: Apache-2.0
"""Ctrl-C during mcmc.sample: the draws taken so far come back (and go to the
checkpoint file) with a warning that says how many; they are the first draws of
the uninterrupted run."""

import signal

import pytest
import torch

from pyro_ebm import mcmc

TARGET = torch.tensor([1.0, -2.0], dtype=torch.float64)


def gaussian(calls, interrupt_at=None):
    """U(x) = ‖x - μ‖²/2 per chain; sends SIGINT to this process on call ``interrupt_at``."""

    def potential(x):
        calls.append(1)
        if interrupt_at is not None and len(calls) == interrupt_at:
            signal.raise_signal(signal.SIGINT)
        return 0.5 * (x - TARGET).pow(2).sum(-1)

    return potential


def run(interrupt_at=None, **kwargs):
    torch.manual_seed(0)
    calls = []
    x0 = torch.zeros(4, 2, dtype=torch.float64)
    return mcmc.sample(potential_fn=gaussian(calls, interrupt_at), kernel=mcmc.MALA(0.5), num_chains=4,
                       num_samples=30, warmup_steps=10, initial=x0, progress=False, **kwargs)


def test_an_interrupted_run_returns_the_draws_so_far(tmp_path):
    full = run()
    path = tmp_path / "draws.pt"
    with pytest.warns(UserWarning, match=r"interrupted at step \d+ of 40 \(sampling\): returning the \d+ "
                                         r"draw\(s\) per chain") as record:
        part = run(interrupt_at=25, checkpoint=path)
    kept = part.num_samples
    assert 0 < kept < 30 and any(f"returning the {kept} draw" in str(w.message) for w in record)
    torch.testing.assert_close(part.positions, full.positions[:, :kept], rtol=0, atol=0)
    saved = mcmc.load_draws(path)
    assert torch.equal(saved["positions"], part.positions)
    assert torch.equal(saved["samples"]["x"], part.get_samples()["x"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_an_interrupt_during_warmup_returns_no_draw_and_the_state_to_go_on():
    with pytest.warns(UserWarning, match=r"\(warmup\): returning the 0 draw"):
        part = run(interrupt_at=4)
    assert part.num_samples == 0 and part.positions.shape == (4, 0, 2)
    more = mcmc.sample(potential_fn=gaussian([]), kernel=mcmc.MALA(0.5), num_chains=4, num_samples=200,
                       initial=part.last_state, progress=False)
    assert more.num_samples == 200
    torch.testing.assert_close(more.positions.mean((0, 1)), TARGET, atol=0.3, rtol=0)


def test_a_second_interrupt_stops_at_once():
    calls = []

    def potential(x):
        calls.append(1)
        if len(calls) in (3, 4):  # two leapfrog evaluations of the first step
            signal.raise_signal(signal.SIGINT)
        return 0.5 * x.pow(2).sum(-1)

    with pytest.raises(KeyboardInterrupt):
        mcmc.sample(potential_fn=potential, kernel=mcmc.HMC(0.3, num_steps=4), num_chains=2, num_samples=10,
                    initial=torch.zeros(2, 1), progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_load_draws_refuses_a_foreign_file(tmp_path):
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt is not a file of mcmc.sample draws"):
        mcmc.load_draws(tmp_path / "other.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="broken.pt cannot be read"):
        mcmc.load_draws(tmp_path / "broken.pt")


def test_a_process_that_ignores_sigint_keeps_ignoring_it():
    """SIG_IGN (a job a non-interactive shell started in the background) is left
    alone, as Python leaves it: no handler is installed and the run is not stopped."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        full = run()
        part = run(interrupt_at=25)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert part.num_samples == full.num_samples == 30
    torch.testing.assert_close(part.positions, full.positions, rtol=0, atol=0)
