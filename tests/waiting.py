"""Polling for something another thread or process does (a record written, a row freed). A plain module, not
conftest: test files import it by name."""

from __future__ import annotations

import time


def wait_for(what, timeout: float = 15, interval: float = 0.05):
    """what()'s first truthy value within `timeout` seconds, else its last (falsy) one."""
    deadline = time.monotonic() + timeout
    while not (found := what()) and time.monotonic() < deadline:
        time.sleep(interval)
    return found
