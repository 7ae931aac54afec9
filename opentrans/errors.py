"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class OpenTransError(Exception):
    """A user-facing error: bad input, a missing file, an unavailable back end.

    The message is a single line that says what went wrong and, where possible, what to do.
    """
