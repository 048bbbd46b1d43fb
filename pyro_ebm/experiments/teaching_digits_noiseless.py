# SPDX-License-Identifier: Apache-2.0
"""``pyro-ebm reproduce teaching-digits-noiseless``: ``teaching-digits-budget``
with the reference code's revision: the K Langevin steps with their noise
switched off (gradient descent on the energy), trained 2400 iterations and
measured at 1200 and 2400. It asks whether the taught VAE beats the VAE alone
under the setting the paper's code ran, where ``teaching-digits-budget`` (noise
on, this library's default) finds that it does not.
"""

from __future__ import annotations

from pathlib import Path

from .teaching_digits_budget import run_budget


def run(out_dir: Path, quick: bool = False, seeds=(0, 1, 2), resume: bool = False) -> str:
    return run_budget(out_dir, quick, seeds, resume, name="teaching-digits-noiseless", iterations=2400,
                      milestones=(1200, 2400), noise=False,
                      title="the reference code's revision (Langevin noise off)")
