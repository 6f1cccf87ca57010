"""Loaded by every Python process started with this folder on PYTHONPATH (see `tests.faults.
fault_env`): with TWINSERVE_TEST_FAULTS set, the engine of a real `twinserve serve` process
gets a FaultyRunner, so process-level behaviour (exit on engine death) can be tested."""

import os

if os.environ.get("TWINSERVE_TEST_FAULTS"):
    from tests.faults import install

    install(os.environ["TWINSERVE_TEST_FAULTS"])
