"""User-facing errors: one line naming the problem and the fix; the CLI prints it and exits with code 2."""


class LigeroError(Exception):
    """A problem with the user's input or environment (not a bug in Ligero)."""
