"""The one exception type that stages turn into a clear, one-line error message."""


class PipelineError(Exception):
    """Bad input or configuration: the message names the file or parameter at fault."""
