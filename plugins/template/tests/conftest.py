# The `llmos_plugin` fixture: the plugin in a real plugin host, over gRPC.
pytest_plugins = ["llmos.plugins.testing"]
