"""Plugins: hookspecs, manifest schema and plugin host (built in the plugins work item)."""
