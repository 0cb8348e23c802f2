"""Named points inside a promotion where a test can hold the process and kill it.

With `STREAMLEARN_DEPLOY_PAUSE=<point>` set, a process that reaches that point
writes `paused at <point>` to stderr and waits there until it is killed; without
it every point is a no-op. The crash tests SIGKILL a promotion at each point and
check that the registry, the production pointer and the artifacts still agree.

>>> pause_point("after-commit")   # not asked for: returns at once
"""

from __future__ import annotations

import os
import sys
import time

PAUSE_ENV = "STREAMLEARN_DEPLOY_PAUSE"
POINTS = ("in-transaction", "after-commit", "after-pointer")


def pause_point(point: str) -> None:
    """Holds the process here forever when the environment asks for this point (a test will kill it)."""
    if os.environ.get(PAUSE_ENV) != point:
        return
    sys.stderr.write(f"paused at {point}\n")
    sys.stderr.flush()
    while True:
        time.sleep(3600)
