"""Test plugin: answers with a prompt that is not a string."""

from llmos.plugins.hookspecs import hookimpl


@hookimpl
def llmos_before_request(prompt):
    return {"prompt": 42}
