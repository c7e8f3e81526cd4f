"""LLM OS: an operating system for language-model applications."""

__version__ = "0.1.0"
