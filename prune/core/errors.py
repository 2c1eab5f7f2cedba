"""The one error type for bad input: the CLI turns it into a one-paragraph message and exit code 2."""


class UserInputError(Exception):
    """Input the user can fix: the message names the problem and what to pass instead."""
