"""safegene: restore the safety alignment of fine-tuned LLMs with a reusable safety adapter."""

__version__ = "0.1.0"
