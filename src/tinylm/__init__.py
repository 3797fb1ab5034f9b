"""tinylm: build tiny language models on TinyStories."""

__version__ = "0.1.0"
