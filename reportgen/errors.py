"""The one exception type a user sees: its message is printed as a single line by the CLI."""


class ReportgenError(Exception):
    """Bad input or an impossible request. The message names the file and the problem."""
