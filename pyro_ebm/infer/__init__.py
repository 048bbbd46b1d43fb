# SPDX-License-Identifier: Apache-2.0
"""Inference classes and losses for EBLVMs, shaped like ``pyro.infer.SVI``."""

import importlib

_WHERE = {
    "ScoreObjective": "score_matching",
    "ExactSM": "score_matching",
    "SSM": "score_matching",
    "DSM": "score_matching",
    "MDSM": "score_matching",
    "ScoreMatching": "score_matching",
    "DivergenceError": "trainer",  # defined in the energy core, re-exported here
    "Trainer": "trainer",
    "vaes_score": "vages",
    "ContrastiveDivergence": "cd",
    "BiSM": "bism",
    "VaGES": "vages",
    "KALE": "kale",
    "MCMCTeaching": "teaching",
    "BiDVL": "bidvl",
    "fit": "loop",
    "FitResult": "loop",
    "load_checkpoint": "loop",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        module = importlib.import_module(f".{_WHERE[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'pyro_ebm.infer' has no attribute {name!r}")
