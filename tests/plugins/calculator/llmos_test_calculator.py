"""Test plugin: offers one tool, add."""

from llmos.plugins.hookspecs import hookimpl

SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}


@hookimpl
def llmos_register_tools(register):
    register("add", "Adds two numbers.", SCHEMA, lambda data: {"sum": data["a"] + data["b"]})
