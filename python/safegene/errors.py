"""One exception family for everything safegene refuses.

Every message names the file (and tensor, where there is one) and says how to fix the
problem, because the CLI prints exactly ``error: <message>`` and nothing else.
"""

from __future__ import annotations


class SafeGeneError(Exception):
    """Base class of every error safegene raises on purpose."""


class UsageError(SafeGeneError):
    """Arguments that cannot work together (the CLI exits 2 for these)."""


class CheckpointError(SafeGeneError):
    """A checkpoint file or directory is missing, malformed or unsupported."""


class HeaderError(CheckpointError):
    """A safetensors header (or shard index) fails validation."""


class PickleRefusedError(CheckpointError):
    """A pickled checkpoint (``*.bin``/``*.pt``) was offered; safegene never unpickles."""


class MismatchError(SafeGeneError):
    """Two checkpoints (or a gene and a target) do not describe the same architecture."""


class GeneError(SafeGeneError):
    """A gene directory is missing, malformed, or does not fit what it is used with."""


class OutputError(SafeGeneError):
    """The output location is unsafe (an input, inside an input) or cannot be written."""


class NonFiniteError(SafeGeneError):
    """NaN or Inf values were found where they are refused."""


class DataError(SafeGeneError):
    """A prompt/data file is missing or malformed."""
