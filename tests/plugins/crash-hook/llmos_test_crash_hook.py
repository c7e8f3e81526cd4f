"""Test plugin: its process dies in the hook."""

import os

from llmos.plugins.hookspecs import hookimpl


@hookimpl
def llmos_before_request(prompt):
    os._exit(9)
