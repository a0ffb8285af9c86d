"""The error both command lines (comet-prep and comet-ds) print as one line instead of a traceback."""


class CometInputError(ValueError):
    """Input the user has to fix (config, data, model directory); the message says what to change."""
