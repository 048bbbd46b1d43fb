# SPDX-License-Identifier: Apache-2.0
"""The README's Python examples run as written (with their loop sizes shrunk)."""

import math
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SHRINK = {"range(2000)": "range(20)", "num_chains=1024": "num_chains=32", "num_samples=200": "num_samples=20",
          "warmup_steps=200": "warmup_steps=20"}


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    code = "\n".join(blocks)
    for big, small in SHRINK.items():
        assert big in code, f"README no longer contains {big!r}; update SHRINK"
        code = code.replace(big, small)
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    assert math.isfinite(scope["loss"])
    table = scope["samples"].summary()
    assert {"r_hat", "ess_bulk", "ess_tail"} <= set(table.columns)
    assert len(table) == 5 * 3  # 5 data items x 3 latent coordinates
