"""The one exception type users see: its message is a single line saying what is wrong and how to fix it."""


class EdgepruneError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""
