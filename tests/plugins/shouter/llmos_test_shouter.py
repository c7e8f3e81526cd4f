"""Test plugin: upper-cases the prompt (read_prompt, modify_prompt)."""

from llmos.plugins.hookspecs import hookimpl


@hookimpl
def llmos_before_request(prompt):
    return {"prompt": prompt.upper()}
