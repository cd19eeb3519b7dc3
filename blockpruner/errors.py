"""The exceptions a user sees as one line.

The CLI prints a `UserError` as a single line (no traceback) and exits with status 2, so a
typo in a config costs a second, not a model load. Messages name the offending key or
argument and the fix. A `DiskFull` is one too (the write that failed left the earlier files
whole). A `Resumable` (SIGTERM or SIGINT during a search step) exits with `EXIT_RESUMABLE`.
"""

import errno

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: try again later; the workflow's retries resubmit the job


class UserError(Exception):
    """Bad input a user can fix; its message is one line that says how."""


class DiskFull(UserError):
    """A write failed for lack of space (ENOSPC, EDQUOT); what was written before is intact."""


def no_space(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


class Resumable(Exception):
    """The job was asked to stop (SIGTERM, SIGINT) and saved what it had done; its message says
    how to resume."""
