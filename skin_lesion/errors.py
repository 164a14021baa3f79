"""The one exception type that stages turn into a clear, one-line error message."""

from __future__ import annotations


class PipelineError(Exception):
    """Bad input or configuration: the message names the file or parameter at fault."""
