"""The one exception type a user sees: its message is printed as a single line by the CLI."""


class ReportgenError(Exception):
    """Bad input or an impossible request. The message names the file and the problem."""


def first_line(e: BaseException, limit: int = 120) -> str:
    """The first line of an exception's message for a one-line error (its type's name when it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
