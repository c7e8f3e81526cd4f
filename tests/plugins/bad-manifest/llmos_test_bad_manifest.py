"""Test plugin whose manifest grants modify_prompt without read_prompt (invalid)."""

from llmos.plugins.hookspecs import hookimpl


@hookimpl
def llmos_before_request(prompt):
    return None
