"""One exception type for every user-facing mistake.

The CLI prints a `UserError` as a single line (no traceback) and exits with status 2, so a
typo in a config costs a second, not a model load. Messages name the offending key or
argument and the fix.
"""


class UserError(Exception):
    """Bad input a user can fix; its message is one line that says how."""
