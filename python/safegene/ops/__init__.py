"""Streaming operations on checkpoints and genes that never load a model: ``extract``,
``apply``, ``export-lora`` and ``inspect``."""
