"""Imported at start-up by every Python process a test starts while the suite's clock is
moved (tests/clock.py puts this folder on PYTHONPATH): the process runs shifted by the same
amount as the test that started it. Without CT_TEST_CLOCK_SHIFT it does nothing."""
import os

_shift = os.environ.get("CT_TEST_CLOCK_SHIFT")
if _shift:
    import time

    try:
        import time_machine
    except ImportError:  # a Python without the test extra (a venv being made): real time
        pass
    else:
        time_machine.travel(time.time() + float(_shift), tick=True).start()
