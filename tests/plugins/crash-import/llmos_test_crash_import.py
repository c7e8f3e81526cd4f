"""Test plugin: crashes while it is imported."""

raise ImportError("crash-import fails at import on purpose")
