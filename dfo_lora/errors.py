"""One exception type for bad user input.

Every problem a user can cause (a missing file, a malformed line, a bad config value)
raises `UserError` with a one-line message that names the file, line or field. The CLI
prints it as `error: <message>` and exits with code 2, without a traceback.
"""


class UserError(Exception):
    """Bad input from the user; the message is one line and names the cause."""
