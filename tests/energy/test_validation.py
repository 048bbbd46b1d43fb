# SPDX-License-Identifier: Apache-2.0
import pickle

import pytest

from pyro_ebm.energy import DivergenceError


def test_divergence_error_names_the_step_and_the_level():
    err = DivergenceError("loss is nan; model factor 'energy': NaN at index (3,)", step=7, level="upper",
                          algorithm="BiSM")
    assert isinstance(err, ValueError)  # code that caught the earlier ValueError keeps working
    assert (err.step, err.level, err.algorithm) == (7, "upper", "BiSM")
    assert str(err) == ("BiSM diverged at step 7 (upper level): loss is nan; model factor 'energy': NaN at "
                        "index (3,)")
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), str(again), again.step, again.level) == (DivergenceError, str(err), 7, "upper")
    with pytest.raises(ValueError, match=r"^diverged at step 2 \(lower level\): gradient is inf$"):
        raise DivergenceError("gradient is inf", step=2, level="lower")
