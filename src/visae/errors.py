"""User-facing errors: the CLI prints these as one line, without a traceback."""


class VisaeError(Exception):
    """A problem with the user's input (config, data, weights, files) that they can fix."""
