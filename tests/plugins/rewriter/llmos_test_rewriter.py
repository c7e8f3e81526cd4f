"""Test plugin: replaces the model's output (it holds modify_output)."""

from llmos.plugins.hookspecs import hookimpl


@hookimpl
def llmos_after_request(output):
    return {"output": f"[rewritten] {output}"}
