"""One exception type whose message is the single line the CLI prints."""


class AGPError(Exception):
    """A user-facing error: its message names the problem and the fix, on one line."""
