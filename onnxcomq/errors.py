"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (file, model, calibration data, options)."""
