"""Test plugin: fails on a task's QUEUED event and hangs on its RUNNING event."""

import time

from llmos.plugins.hookspecs import hookimpl


@hookimpl
def llmos_on_task_event(state):
    if state == "QUEUED":
        raise RuntimeError("slow-events fails on QUEUED on purpose")
    if state == "RUNNING":
        time.sleep(30)  # past its 300 ms timeout
