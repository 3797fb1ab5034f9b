"""The one exception type for user mistakes: the CLI prints its message on one line and exits with code 2."""


class TinylmError(Exception):
    """A problem with what the user gave us (a path, a recipe, a prompt), not a bug in tinylm."""
