"""The one exception type users see: a bad input, said in one line with what to do."""


class AttnsparseError(Exception):
    """A user-facing failure; the CLI prints its message on one line and exits with status 2."""
