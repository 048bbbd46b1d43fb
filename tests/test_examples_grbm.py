# SPDX-License-Identifier: Apache-2.0
import importlib.util
import math
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "examples" / "grbm_score_matching.py"


@pytest.mark.parametrize("method", ["cd", "dsm", "ssm", "bidsm", "bissm", "vages"])
def test_grbm_example_improves_the_likelihood(method):
    spec = importlib.util.spec_from_file_location("grbm_example", PATH)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    start, final = example.main(["--method", method, "--steps", "40", "--lr", "2e-2"])
    assert math.isfinite(final) and final > start
