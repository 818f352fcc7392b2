"""The error type for user mistakes: the `s4l` command prints its message and exits with 2."""


class UserError(Exception):
    """A problem with the user's input (arguments, files, data) rather than a bug.

    The message must say what is wrong and, where possible, what would be right.
    """
