# SPDX-License-Identifier: Apache-2.0
import pickle

from pyro_ebm.energy import DivergenceError


def test_divergence_error_carries_the_step_and_the_level():
    err = DivergenceError("BiSM diverged at step 7: the model loss is nan", step=7, level="model")
    assert isinstance(err, ValueError)  # code that caught the earlier ValueError keeps working
    assert (err.step, err.level) == (7, "model")
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), str(again), again.step, again.level) == (DivergenceError, str(err), 7, "model")
