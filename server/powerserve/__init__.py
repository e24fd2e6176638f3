"""powerserve: an OpenAI-compatible inference server for power sampling."""

__version__ = "0.1.0"
