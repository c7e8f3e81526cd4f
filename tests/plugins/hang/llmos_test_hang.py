"""Test plugin: its hook never returns."""

import time

from llmos.plugins.hookspecs import hookimpl


@hookimpl
def llmos_before_request():
    time.sleep(3600)
