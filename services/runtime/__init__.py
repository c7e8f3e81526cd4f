"""The model runtime: loads models and streams tokens (see server.py and engine.py)."""
