"""Fault injection for the tests, loaded by Python at start-up in the Ray workers a test
starts with ``PYTHONPATH`` pointing here (``tests/test_faults.py``); production code has
no hook. With ``BLIS_TEST_CRASH_ONCE_DIR`` naming a folder that holds a file named after
an experiment, the first worker to featurize that experiment deletes the file and kills
its own process (a Ray worker dying mid-task), once.
"""

import os
from pathlib import Path

CRASH_ONCE_ENV = "BLIS_TEST_CRASH_ONCE_DIR"


def _install() -> None:
    folder = os.environ.get(CRASH_ONCE_ENV)
    if not folder:
        return
    from blis_model.calibration import recipe

    real = recipe.featurize_experiment

    def featurize_or_die(p, name):  # noqa: ANN001, ANN202 - same signature as the recipe's
        try:
            (Path(folder) / name).unlink()  # only one attempt can remove the marker
        except FileNotFoundError:
            return real(p, name)
        os._exit(1)

    recipe.featurize_experiment = featurize_or_die


_install()
