"""The one exception type a user can cause.

Every message names the bad value, the allowed values and the fix; notebooks and the command line
print the message, not a traceback.
"""


class QRError(ValueError):
    """Bad input or a missing prerequisite, with a message that says how to fix it."""
