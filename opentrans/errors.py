"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class OpenTransError(Exception):
    """A user-facing error: bad input, a missing file, an unavailable back end.

    The message is a single line that says what went wrong and, where possible, what to do.
    """


class OpenTransWarning(UserWarning):
    """Something the user should know but that does not stop the command (e.g. bf16 asked for on a CPU without
    native bf16). The CLI prints each one once as a ``Warning: ...`` line on stderr."""
