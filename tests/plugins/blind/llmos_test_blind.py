"""Test plugin without read_prompt/read_output: fails loudly if it is sent either."""

from llmos.plugins.hookspecs import hookimpl


@hookimpl
def llmos_before_request(prompt, messages, tenant):
    if prompt is not None or messages is not None:
        raise RuntimeError("blind was sent the prompt")


@hookimpl
def llmos_after_request(prompt, output):
    if prompt is not None or output is not None:
        raise RuntimeError("blind was sent the prompt or the output")
