"""The error type of the package: what the user asked for or gave cannot be done."""


class AddpError(ValueError):
    """An error in what the user asked for or gave; its message is one line."""
